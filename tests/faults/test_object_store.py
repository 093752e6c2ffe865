"""The object store failing under a run writing to `gs://` (fake-gcs-server, its objects kept as files so that it
can be stopped and started again): out for a few seconds around a checkpoint, the clients' retries carry the run
on to the same metrics as an uninterrupted run; out for good, the run stops within `checkpoint.storage_timeout`
(plus a probe) with one line naming the URL, the error and the newest complete checkpoint, and once the store is
back the same command resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fsspec
import pytest
import yaml
from gcs_emulator import Emulator
from procs import HELD_CLI, TIMING, check_nothing_lost
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax import metrics as M
from dpojax import paths
from dpojax.cli import main

pytestmark = pytest.mark.serial  # subprocess runs against a server they share
OUTAGE_S = 8
STORAGE_TIMEOUT = 20  # checkpoint.storage_timeout of the run whose store goes for good


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


def _held_run(store, out: str, release, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DPOJAX_HOLD_AT": "3", "DPOJAX_RELEASE": str(release)}
    return subprocess.Popen([sys.executable, HELD_CLI, "train", str(store["config"]), f"output_dir={out}", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed(out: str, step: int) -> bool:
    fsspec.filesystem("gs").invalidate_cache()  # gcsfs keeps listings
    return check_nothing_lost(paths.path(out), allow_none=True) == step


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
    fsspec.filesystem("gs").invalidate_cache()
    assert check_nothing_lost(paths.path(out)) == 6
    _check_equal(out, store["root"] / "uninterrupted")


def _check_equal(out: str, reference) -> None:
    assert _records(out) == _records(reference)
    assert paths.path(f"{out}/export/model.safetensors").read_bytes() == \
        (reference / "export" / "model.safetensors").read_bytes()


def test_store_down_for_good_stops_in_one_line_then_resumes(store, tmp_path):
    out, release = f"{store['bucket']}/permanent", tmp_path / "go"
    proc = _held_run(store, out, release, f"checkpoint.storage_timeout={STORAGE_TIMEOUT}")
    try:
        _wait_held(proc)
        deadline = time.monotonic() + 300
        while not _committed(out, 2):  # the async save of step 2 is complete
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        store["emulator"].stop()  # for good: the checkpoint of step 4 and every later write meet a store that is gone
        stopped_at = time.monotonic()
        release.touch()
        output, _ = proc.communicate(timeout=900)
        elapsed = time.monotonic() - stopped_at
    finally:
        proc.kill()
        if store["emulator"].proc.poll() is not None:
            store["emulator"].start_again()
    lines = [line for line in output.splitlines() if line.startswith("dpojax train: error:")]
    print(f"\nstore down for good: the run stopped {elapsed:.1f} s after the store went away "
          f"(checkpoint.storage_timeout={STORAGE_TIMEOUT}):\n{lines}")
    assert proc.returncode == 2, output[-3000:]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert lines[0].startswith(f"dpojax train: error: object storage failed under {out}: "), lines[0]
    assert f"Nothing past the newest complete checkpoint is kept: step 2 ({out}/checkpoints/2)" in lines[0], lines[0]
    assert elapsed < STORAGE_TIMEOUT + 30, elapsed  # a probe every 5 s, each at most 10 s
    assert check_nothing_lost(paths.path(out)) == 2
    assert main(["train", str(store["config"]), f"output_dir={out}"]) == 0  # the store is back: it resumes
    _check_equal(out, store["root"] / "uninterrupted")
