"""Shared handles of the fault tests: a tiny two-process run on CPU, processes started and held at known points
(tests/held_cli.py), and the checks every fault ends with (the newest complete checkpoint, metrics.jsonl up to it,
the resumed run against an uninterrupted one)."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from dpojax.metrics import read_metrics
from dpojax.trainer import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
HELD_CLI = str(REPO / "tests" / "held_cli.py")
TIMING = ("tokens_per_second", "pairs_per_second", "mfu")
HEARTBEAT = 10  # distributed.heartbeat_timeout of the two-process runs
RUN = ["train.steps=6", "checkpoint.every=2", "data.eval=null", "data.packing=none",
       f"distributed.heartbeat_timeout={HEARTBEAT}"]
_spec = importlib.util.spec_from_file_location("local_cpu", REPO / "launch" / "local_cpu.py")
local_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cpu)


def spawn(args: list[str], logs: list[Path], envs=({}, {}), devices: int = 2):
    """Processes 0 and 1 of one run of tests/held_cli.py (`dpojax` that holds where told), each writing stdout
    and stderr (the user's screen) to its log file."""
    coordinator = f"127.0.0.1:{local_cpu.free_port()}"
    procs = []
    for i, (log, extra) in enumerate(zip(logs, envs)):
        env = {**local_cpu.process_env(i, 2, coordinator, devices), **extra}
        with open(log, "wb") as f:
            procs.append(subprocess.Popen([sys.executable, HELD_CLI, *args], stdout=f, stderr=subprocess.STDOUT,
                                          env=env))
    return procs


def wait_for_text(logs: list[Path], text: str, procs, timeout: float = 900) -> None:
    """Until every log in `logs` contains `text`; fails when a process ends first."""
    end = time.monotonic() + timeout
    while not all(text in log.read_text(errors="replace") for log in logs):
        ended = [p.returncode for p in procs if p.poll() is not None]
        assert not ended and time.monotonic() < end, (text, ended, [log.read_text()[-2000:] for log in logs])
        time.sleep(0.1)


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def train_records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")
            if r["split"] == "train"]


@dataclasses.dataclass(frozen=True)
class Finished:
    """What a finished run ends with: its train records (timings left out) and its exported weights."""

    records: list[dict]
    weights: bytes


def finished(out: Path) -> Finished:
    return Finished(train_records(out), (out / "export" / "model.safetensors").read_bytes())


def check_equal(out: Path, reference: Finished) -> None:
    """The resumed run ended as the uninterrupted one: the same train records (bitwise on CPU) and weights."""
    assert train_records(out) == reference.records
    assert finished(out).weights == reference.weights


def check_nothing_lost(out: Path, allow_none: bool = False) -> int | None:
    """The newest complete checkpoint's step; metrics.jsonl holds each train step up to it exactly once. (None when
    there is no checkpoint yet and `allow_none`.)"""
    found = ckpt.find_checkpoint(out)
    if found is None and allow_none:
        return None
    assert found is not None, sorted(p.name for p in (out / "checkpoints").iterdir())
    steps = [r["step"] for r in train_records(out) if r["step"] <= found.step]
    assert steps == list(range(1, found.step + 1)), (found.step, steps)
    return found.step


def two_processes(config, out) -> int:
    """The run on two processes of two devices, uninterrupted (the resume, or the reference)."""
    return local_cpu.main(["--devices-per-process", "2", "--grace", "30", "train", str(config), f"output_dir={out}",
                           *RUN])
