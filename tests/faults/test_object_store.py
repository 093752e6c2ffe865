"""The object store failing under a run writing to `gs://` (fake-gcs-server, its objects kept as files so that it
can be stopped and started again): out for a few seconds around a checkpoint, the clients' retries carry the run
on to the same metrics as an uninterrupted run. (Out for good, the run is not stopped within 15 minutes: the
clients retry on; see docs/fault-tolerance.md. The words it ends with: tests/faults/test_storage_errors.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from gcs_emulator import Emulator
from procs import HELD_CLI, TIMING
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax import metrics as M
from dpojax.cli import main

pytestmark = pytest.mark.serial  # subprocess runs against a server they share
OUTAGE_S = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("object_store")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(24, "standard", seed=5)))
    cfg = {
        "model": {"name_or_path": str(make_tiny_checkpoint(root / "policy", seed=0)),
                  "tokenizer": str(make_tokenizer(root / "tok"))},
        "data": {"train": str(data), "max_length": 48, "cache_dir": str(root / "cache"), "packing": "none"},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": 6, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10},
    }
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config), f"output_dir={root / 'uninterrupted'}"]) == 0
    with Emulator(root / "emulator.log", files=root / "objects") as emulator:
        yield {"config": config, "root": root, "emulator": emulator, "bucket": emulator.create_bucket("runs")}


def _records(where) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in M.read_metrics(f"{where}/metrics.jsonl")
            if r["split"] == "train"]


def _held_run(store, out: str, release) -> subprocess.Popen:
    env = {**os.environ, "DPOJAX_HOLD_AT": "3", "DPOJAX_RELEASE": str(release)}
    return subprocess.Popen([sys.executable, HELD_CLI, "train", str(store["config"]), f"output_dir={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_held(proc) -> None:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "HELD AT STEP" in line:
            return
    raise AssertionError("".join(seen)[-3000:])


def test_store_down_for_seconds_carries_on(store, tmp_path):
    out, release = f"{store['bucket']}/transient", tmp_path / "go"
    proc = _held_run(store, out, release)
    try:
        _wait_held(proc)
        store["emulator"].stop()  # the checkpoint of step 4 and the metrics flush meet a store that is gone
        release.touch()
        time.sleep(OUTAGE_S)
        store["emulator"].start_again()
        output, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert _records(out) == _records(store["root"] / "uninterrupted")
