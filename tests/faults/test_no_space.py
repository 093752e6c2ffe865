"""A full disk during a checkpoint or a metrics write stops the run with one line naming the path and the free
space there (exit 2); nothing past the newest complete checkpoint is lost and the next start resumes to the same
weights as an uninterrupted run. The checkpoint case is a real ENOSPC: the run folder is a 16 MiB tmpfs (mounted in
a user and mount namespace, `unshare -rm`: no root needed where the kernel allows user namespaces), filled by
tests/held_cli.py at step 3; the metrics case is injected at the storage layer by tests/held_cli.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml
from procs import HELD_CLI, check_nothing_lost, train_records
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax.cli import main

pytestmark = pytest.mark.serial  # subprocess runs


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("no_space")
    tok = make_tokenizer(root / "tok")
    policy = make_tiny_checkpoint(root / "policy", seed=0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(24, "standard", seed=5)))
    cfg = {
        "model": {"name_or_path": str(policy), "tokenizer": str(tok)},
        "data": {"train": str(data), "max_length": 48, "cache_dir": str(root / "cache"), "packing": "none"},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": 6, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = root / "uninterrupted"
    assert main(["train", str(path), f"output_dir={reference}"]) == 0
    return path, reference


def _one_line(stderr: str) -> str:
    """The one error line, and no traceback: neither dpojax's nor one a storage client's thread prints as it fails
    after the run's event loop closed ("RuntimeError: Event loop is closed": the process ends right after the line)."""
    lines = [line for line in stderr.splitlines() if line.startswith("dpojax train: error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "/dpojax/" not in stderr.replace(lines[0], ""), stderr[-3000:]
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
    print(f"\n{lines[0]}")
    return lines[0]


def _resume_equal(config, out, reference) -> None:
    check_nothing_lost(out)
    assert main(["train", str(config), f"output_dir={out}"]) == 0
    assert train_records(out) == train_records(reference)
    assert (out / "export" / "model.safetensors").read_bytes() == (reference / "export" /
                                                                    "model.safetensors").read_bytes()


@pytest.mark.skipif(not _namespaces_work(), reason="no user namespaces here (unshare -rm) to mount a small tmpfs")
def test_disk_full_during_checkpoint(setup, tmp_path):
    config, reference = setup
    mnt, out = tmp_path / "mnt", tmp_path / "run"
    mnt.mkdir()
    out.mkdir()
    run = [sys.executable, HELD_CLI, "train", str(config), f"output_dir={mnt}"]
    script = (f"mount -t tmpfs -o size=16m tmpfs {mnt} && {shlex.join(run)}; code=$?; cp -a {mnt}/. {out}/; "
              "exit $code")
    env = {"DPOJAX_HOLD_AT": "3", "DPOJAX_FILL": str(mnt), "DPOJAX_FILL_LEAVE": str(32 * 1024),
           "DPOJAX_FILL_AFTER": str(mnt / "checkpoints" / "2")}  # the async save of step 2 complete
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert f"no space left on device writing {mnt}/" in line and "MiB free of 16.0 MiB on its file system" in line
    assert "Nothing past the newest complete checkpoint is kept: step 2 " in line, line
    (out / "filler").unlink()
    _resume_equal(config, out, reference)


def test_disk_full_during_metrics_write(setup, tmp_path):
    config, reference = setup
    out = tmp_path / "run"
    env = {"DPOJAX_HOLD_AT": "999", "DPOJAX_NO_SPACE_AT": "5"}
    proc = subprocess.run([sys.executable, HELD_CLI, "train", str(config), f"output_dir={out}"], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert f"no space left on device writing {out / 'metrics.jsonl'} (" in line, line
    assert "Nothing past the newest complete checkpoint is kept: step 4 " in line, line
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # the torn line, dropped on resume
    _resume_equal(config, out, reference)
