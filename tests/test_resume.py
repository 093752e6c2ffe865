"""Fault tolerance with real processes: SIGKILL between checkpoints and during an async save, SIGTERM
preemption, resume onto another mesh and device count, and non-finite steps. Each run is `dpojax train`
in a subprocess on fake CPU devices; metrics after a resume must equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_models import make_tiny_checkpoint, xla_flags
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax.metrics import read_metrics

STEPS = 8
TIMING = {"tokens_per_second", "pairs_per_second", "mfu"}
HELD_CLI = str(Path(__file__).with_name("held_cli.py"))  # holds a run at a known step, whatever the speed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = make_tokenizer(root / "tok")
    policy = make_tiny_checkpoint(root / "policy", seed=0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(32, "standard", seed=5)))
    cfg = {
        "model": {"name_or_path": str(policy), "tokenizer": str(tok)},
        "data": {"train": str(data), "max_length": 48, "cache_dir": str(root / "cache")},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": STEPS, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = root / "uninterrupted"
    _run(path, reference).check_returncode()
    return {"root": root, "config": path, "reference": reference}


def _cmd(config: Path, out: Path, *overrides: str, wrapper: str | None = None) -> list[str]:
    head = [sys.executable, wrapper] if wrapper else [sys.executable, "-m", "dpojax.cli"]
    return [*head, "train", str(config), f"output_dir={out}", *overrides]


def _env(devices: int = 8, **extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run(config, out, *overrides, devices=8, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(config, out, *overrides), env=_env(devices), capture_output=True, text=True, timeout=timeout
    )


def _train_records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")
            if r["split"] == "train"]


def _start_held(config: Path, out: Path, step: int, *overrides: str, release: Path | None = None):
    """`dpojax train` in a subprocess, held right after writing step `step`'s metrics until `release` exists."""
    env = _env(DPOJAX_HOLD_AT=str(step), **({"DPOJAX_RELEASE": str(release)} if release else {}))
    proc = subprocess.Popen(_cmd(config, out, *overrides, wrapper=HELD_CLI), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # reading as it comes keeps the pipe from filling up
        seen.append(line)
        if "HELD AT STEP" in line:
            return proc
    raise AssertionError(f"the run ended before step {step} ({proc.wait()}): {''.join(seen)[-3000:]}")


def _wait_for_dir(path: Path, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.is_dir():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def test_sigkill_between_checkpoints_resumes_exactly(setup):
    out = setup["root"] / "killed"
    proc = _start_held(setup["config"], out, 5)  # the async save of step 4 completes while step 5 is held
    _wait_for_dir(out / "checkpoints" / "4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "export").exists()
    # samples.jsonl is trimmed like metrics.jsonl (this run has no eval set, so the lines stand for an eval's)
    lines = [json.dumps({"step": s, "prompt": "p", "policy": "é"}, ensure_ascii=False) for s in (4, 5)]
    (out / "samples.jsonl").write_text("".join(line + "\n" for line in lines))
    result = _run(setup["config"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    # bitwise: the same compiled step on the same inputs from the same restored state
    assert _train_records(out) == _train_records(setup["reference"])
    assert (out / "samples.jsonl").read_text() == lines[0] + "\n"  # the step-5 line, past checkpoint 4, is gone


STALL = """
import sys, time
import orbax.checkpoint as ocp
original = ocp.JsonCheckpointHandler.async_save
def stalled(self, directory, *args, **kwargs):
    if "/4.orbax-checkpoint-tmp" in str(directory):
        print("STALLING IN SAVE", flush=True)
        time.sleep(600)
    return original(self, directory, *args, **kwargs)
ocp.JsonCheckpointHandler.async_save = stalled
from dpojax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_async_save_resumes_from_previous(setup):
    out = setup["root"] / "killed_in_save"
    wrapper = setup["root"] / "stall.py"
    wrapper.write_text(STALL)
    proc = subprocess.Popen(_cmd(setup["config"], out, wrapper=str(wrapper)), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    while line and "STALLING" not in line:
        line = proc.stdout.readline()
    assert "STALLING" in line
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Orbax may not have created the step-4 temporary folder yet (it does so in the background): either way
    # there is no complete checkpoint 4, and the complete checkpoint 2 must be what the next start uses.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "2" in names and "4" not in names, names
    result = _run(setup["config"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stderr
    assert _train_records(out) == _train_records(setup["reference"])


def test_sigterm_saves_exits_zero_and_resumes(setup):
    out, release = setup["root"] / "preempted", setup["root"] / "preempted.release"
    # step 2's record is written after step 3 is dispatched (records are read a step late): held there, the SIGTERM
    # lands before step 3's boundary, where the run saves
    proc = _start_held(setup["config"], out, 2, "checkpoint.every=100", release=release)
    proc.send_signal(signal.SIGTERM)
    release.touch()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM at step 3;" in output, output[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3"]
    result = _run(setup["config"], out, "checkpoint.every=100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3" in result.stderr
    assert _train_records(out) == _train_records(setup["reference"])


def _resumed_on_four_devices(setup, name: str, *first_mesh: str) -> None:
    """4 steps on 8 devices with `first_mesh`, then the rest resumed data-parallel on 4: the uninterrupted records."""
    out = setup["root"] / name
    first = _run(setup["config"], out, "train.steps=4", *first_mesh)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(setup["config"], out, "mesh.data=4", devices=4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 4" in second.stderr
    ours, ref = _train_records(out), _train_records(setup["reference"])
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["rewards/margins"], b["rewards/margins"], rtol=1e-4, atol=1e-6)


def test_resume_on_another_mesh_and_device_count(setup):
    """Saved with params sharded fsdp=8 on 8 devices; resumed data-parallel on 4 devices."""
    _resumed_on_four_devices(setup, "remesh", "mesh.data=1", "mesh.fsdp=8")


@pytest.mark.skipif(os.environ.get("DPOJAX_SLOW_TESTS") != "1", reason="slow: set DPOJAX_SLOW_TESTS=1")
def test_resume_across_the_context_axis(setup):
    """Saved with rows split over mesh.context = 4 (parameters over fsdp x context); resumed without the axis."""
    _resumed_on_four_devices(setup, "context", "mesh.data=2", "mesh.context=4")


def test_changed_config_refuses_resume(setup):
    out = setup["root"] / "changed"
    assert _run(setup["config"], out, "train.steps=2").returncode == 0
    result = _run(setup["config"], out, "train.batch_size=16")
    assert result.returncode == 2
    assert "train.batch_size: 8 -> 16" in result.stderr
    harmless = _run(setup["config"], out, "train.steps=3", "train.log_every=2")
    assert harmless.returncode == 0, harmless.stderr[-3000:]


def test_non_finite_steps_are_skipped_then_stop(setup):
    out = setup["root"] / "diverged"
    result = _run(setup["config"], out, "optim.name=sgd", "optim.lr=1e30", "optim.max_grad_norm=null",
                  "train.max_bad_steps=2", "checkpoint.every=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "consecutive steps had a non-finite loss" in result.stderr
    import orbax.checkpoint as ocp

    steps = [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]
    for step_dir in steps:
        restored = ocp.StandardCheckpointer().restore(step_dir / "params")
        leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored)]
        assert all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f"), step_dir
