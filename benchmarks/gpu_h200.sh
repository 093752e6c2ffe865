#!/usr/bin/env bash
# Issue 17's GPU figures in one command on a lent H200 (the `device` tool), prepared on a CPU machine:
#   make gpu-wheels                       # here, once: TRL, datasets and what they need that the GPU image lacks,
#                                         # as Python 3.12 wheels in .whl/ (git-ignored; carry it: carry [".whl"])
#   bash benchmarks/gpu_h200.sh           # there: the 1B preset at T 2048, bf16, with cuDNN and XLA attention and
#                                         # two remat policies, then TRL's DPOTrainer on the same model, pairs,
#                                         # length and batch; each figure as JSON and the whole log under $OUT
# The image there has JAX (CUDA), flax, optax, orbax, transformers and torch, no internet. Each run is bounded
# (STEP_TIMEOUT seconds) so one slow configuration leaves the others their time.
set -uo pipefail
OUT=${OUT:-/tmp/dpojax-gpu}; mkdir -p "$OUT"
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
run() {  # name, then throughput options
  local name=$1; shift
  echo "=== $name: python -m benchmarks.throughput --preset llama-1b $*"
  timeout "$STEP_TIMEOUT" python3 -m benchmarks.throughput --preset llama-1b --steps 5 --warmup 2 \
    --json "$OUT/$name.json" "$@" || echo "=== $name: failed or timed out (rc $?)"
}
run cudnn_full --attention cudnn --remat full
run xla_full --attention xla --remat full
run cudnn_qkv --attention cudnn --remat qkv
STEP_TIMEOUT=$((STEP_TIMEOUT * 2)) run cudnn_none_trl --attention cudnn --remat none --trl
echo "=== summary (tokens/s, MFU per chip, step median)"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    trl = r.get("trl")
    extra = f"; TRL {trl['pairs_per_s']:.3f} pairs/s, dpojax {trl['step']['median_s'] / r['step']['median_s']:.2f}x" if trl else ""
    print(f"{f.stem:16s} {r['tokens_per_s']:10.0f} tok/s  MFU {r['mfu']:.1%}  step {r['step']['median_s']:.3f} s  "
          f"attention {r['attention']}, remat {r['remat']}, peak {r['peak_memory_bytes'] / 2**30:.1f} GiB{extra}")
PY
