"""SIGTERM to one process of two while an async checkpoint save is under way: both stop cleanly (status 0) at the
same step with a complete checkpoint there, and the resumed run equals an uninterrupted one. The same when both get
SIGTERM, twice (and again during the stop step's save)."""

from __future__ import annotations

import os
import re
import signal

import pytest
from procs import RUN, check_equal, check_nothing_lost, kill_all, spawn, two_processes, wait_for_text

pytestmark = pytest.mark.serial  # several JAX processes


def _stopped_and_resumed_equal(codes, logs, out, config, uninterrupted) -> int:
    """Both processes exited 0 after stopping at the same step, which is the newest complete checkpoint; resumed
    there, the run equals the uninterrupted one. Returns that step."""
    text = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in text]
    stops = [re.findall(r"stopped by SIGTERM at step (\d+);", t) for t in text]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stopped = int(stops[0][0])
    assert check_nothing_lost(out) == stopped
    assert two_processes(config, out) == 0
    check_equal(out, uninterrupted)
    return stopped


def test_sigterm_to_one_process_during_async_save(config, uninterrupted, tmp_path):
    out, logs = tmp_path / "run", [tmp_path / "p0.log", tmp_path / "p1.log"]
    release = [tmp_path / "go0", tmp_path / "go1"]
    envs = [{"DPOJAX_HOLD_AT": "2", "DPOJAX_HOLD_IN": "save", "DPOJAX_RELEASE": str(r)} for r in release]
    procs = spawn(["train", str(config), f"output_dir={out}", *RUN], logs, envs)
    try:
        wait_for_text(logs, "HELD IN SAVE AT STEP 2", procs)  # both started the async save of step 2
        procs[1].send_signal(signal.SIGTERM)  # to process 1's supervisor, passed on to its worker
        release[1].touch()
        wait_for_text(logs, "every process saves and stops at step", procs)
        release[0].touch()
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        kill_all(procs)
    assert 2 < _stopped_and_resumed_equal(codes, logs, out, config, uninterrupted) < 6


def _worker(supervisor) -> int:
    """The pid of a supervisor's worker (`dpojax.supervise`): its only child."""
    children = open(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read().split()
    assert len(children) == 1, children
    return int(children[0])


def test_sigterm_twice_to_both_processes(config, uninterrupted, tmp_path):
    """As a SLURM-like launcher does: SIGTERM to every process, twice (to the supervisor, which passes it on, and to
    its worker directly), during an async save; then once more while the stop step's save is under way. The
    repeats change nothing: both save at the same step and exit 0, and the resumed run equals an uninterrupted one."""
    out, logs = tmp_path / "run", [tmp_path / "p0.log", tmp_path / "p1.log"]
    release = [tmp_path / "go0", tmp_path / "go1"]
    envs = [{"DPOJAX_HOLD_AT": "2", "DPOJAX_HOLD_IN": "save", "DPOJAX_RELEASE": str(r)} for r in release]
    procs = spawn(["train", str(config), f"output_dir={out}", *RUN], logs, envs)
    try:
        wait_for_text(logs, "HELD IN SAVE AT STEP 2", procs)  # both started the async save of step 2
        workers = [_worker(p) for p in procs]
        for p in procs:
            p.send_signal(signal.SIGTERM)  # through the supervisor
        wait_for_text(logs, "SIGTERM received", procs)  # (two at once would be one: pending signals coalesce)
        for worker in workers:
            os.kill(worker, signal.SIGTERM)  # straight to the worker, as a launcher that signals every process
        wait_for_text(logs, "SIGTERM again", procs)
        for r in release:
            r.touch()
        wait_for_text(logs, "every process saves and stops at step", procs)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        kill_all(procs)
    _stopped_and_resumed_equal(codes, logs, out, config, uninterrupted)
