#!/usr/bin/env bash
# Run dpojax on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e pod slice, one process per host).
#
#   launch/tpu_vm_pod.sh TPU_NAME ZONE CONFIG.yaml [section.key=value ...]
#   e.g. launch/tpu_vm_pod.sh my-v5p-128 us-east5-a configs/llama-3.1-70b_ultrafeedback_v5p-128.yaml
#
# Copies this checkout to ~/dpojax on all workers, installs it with the tpu extra (once), and starts
# `dpojax train` on all workers at once. JAX finds the other hosts itself (distributed.mode=on: JAX's Cloud
# TPU cluster detection); process 0 writes metrics, every host writes its checkpoint shards, so output_dir
# must be shared: a gs:// URL (no mount needed; the VM's service account is used), or a mounted filesystem.
#   e.g. launch/tpu_vm_pod.sh my-v5p-128 us-east5-a CONFIG.yaml output_dir=gs://my-bucket/runs/NAME
# Check first that the config fits:
#   dpojax compile CONFIG.yaml --topology v5p-128
# Env: PROJECT (gcloud project, optional), PYTHON (default python3 on the workers).
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,13p "$0"; exit 2; fi
TPU=$1; ZONE=$2; CONFIG=$3; shift 3
PY=${PYTHON:-python3}
GCLOUD=(gcloud compute tpus tpu-vm)
[ -n "${PROJECT:-}" ] && GCLOUD+=(--project "$PROJECT")
ROOT=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/dpojax-src.tgz .
"${GCLOUD[@]}" scp /tmp/dpojax-src.tgz "$TPU":/tmp/dpojax-src.tgz --zone "$ZONE" --worker=all
"${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/dpojax && tar -C ~/dpojax -xzf /tmp/dpojax-src.tgz && cd ~/dpojax
  test -x .venv/bin/dpojax || { $PY -m venv .venv && .venv/bin/pip install -q -e '.[tpu,gcs]'; }
  .venv/bin/dpojax train $CONFIG distributed.mode=on $*
"
