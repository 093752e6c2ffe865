"""A lost peer ends a two-process run cleanly: SIGKILL one process mid-step, mid-checkpoint or during start-up,
and every survivor exits with status 75 (`supervise.PEER_LOST`) within the heartbeat timeout, printing one line
that names the lost process (rank and host), the last complete checkpoint and the command that resumes, and no
native stack trace (the detail is in output_dir/logs/). Nothing past that checkpoint is lost and the resumed run
equals an uninterrupted one."""

from __future__ import annotations

import re
import socket
import time

import pytest
from procs import HEARTBEAT, RUN, check_equal, check_nothing_lost, kill_all, spawn, two_processes, wait_for_text

from dpojax import supervise

pytestmark = pytest.mark.serial  # several JAX processes and a timed verdict: alone
NATIVE = ("Check failure stack trace", "    @     0x", "client.h:", "coordination_service")


def _survivor(procs, logs, lost: int, killed_at: float) -> tuple[str, float]:
    """The survivor's screen and the seconds from the kill to its exit; checks its status and its one line."""
    survivor = 1 - lost
    code = procs[survivor].wait(timeout=HEARTBEAT + 60)
    elapsed = time.monotonic() - killed_at
    screen = logs[survivor].read_text(errors="replace")
    assert code == supervise.PEER_LOST, (code, screen[-3000:])
    lines = [line for line in screen.splitlines() if line.startswith("dpojax train: lost")]
    assert len(lines) == 1, screen[-3000:]
    assert f"lost process {lost} (host {socket.gethostname()}): process {survivor} stopped" in lines[0], lines[0]
    assert "Resume on every process with: dpojax train " in lines[0]
    assert not any(s in screen for s in NATIVE), screen[-3000:]
    return lines[0], elapsed


def _check_after(config, out, line: str, uninterrupted) -> None:
    """The line names the newest complete checkpoint; metrics up to it are all there once; the resume is equal."""
    step = check_nothing_lost(out)
    assert f"last complete checkpoint: step {step} " in line, (step, line)
    detail = re.search(r"details: (\S+)\)", line).group(1)
    assert "unhealthy" in open(detail).read() or "coordination service" in open(detail).read()
    assert two_processes(config, out) == 0
    check_equal(out, uninterrupted)


def test_peer_killed_mid_step(config, uninterrupted, tmp_path):
    """Process 0 is held after step 3; process 1 goes on into step 4's collectives, where it is killed."""
    out, logs = tmp_path / "run", [tmp_path / "p0.log", tmp_path / "p1.log"]
    release = tmp_path / "go0"
    envs = [{"DPOJAX_HOLD_AT": "3", "DPOJAX_RELEASE": str(release)}, {"DPOJAX_HOLD_AT": "999"}]
    procs = spawn(["train", str(config), f"output_dir={out}", *RUN], logs, envs)
    try:
        wait_for_text(logs[:1], "HELD AT STEP 3", procs)
        time.sleep(2)  # process 1 dispatched step 4 and waits in its collectives for process 0
        procs[1].kill()
        killed_at = time.monotonic()
        release.touch()
        line, elapsed = _survivor(procs, logs, lost=1, killed_at=killed_at)
    finally:
        kill_all(procs)
    print(f"\nmid-step: process 0 stopped {elapsed:.1f} s after process 1 was killed (heartbeat {HEARTBEAT} s):\n"
          + "\n".join(logs[0].read_text(errors="replace").splitlines()[-3:]))
    assert elapsed < HEARTBEAT + 5
    _check_after(config, out, line, uninterrupted)


def test_coordinator_killed_mid_checkpoint(config, uninterrupted, tmp_path):
    """Both hold right after starting the async save of step 4; process 0 (the coordinator) is killed there."""
    out, logs = tmp_path / "run", [tmp_path / "p0.log", tmp_path / "p1.log"]
    release = tmp_path / "go1"
    envs = [{"DPOJAX_HOLD_AT": "4", "DPOJAX_HOLD_IN": "save"},
            {"DPOJAX_HOLD_AT": "4", "DPOJAX_HOLD_IN": "save", "DPOJAX_RELEASE": str(release)}]
    procs = spawn(["train", str(config), f"output_dir={out}", *RUN], logs, envs)
    try:
        wait_for_text(logs, "HELD IN SAVE AT STEP 4", procs)
        procs[0].kill()
        killed_at = time.monotonic()
        release.touch()
        line, elapsed = _survivor(procs, logs, lost=0, killed_at=killed_at)
    finally:
        kill_all(procs)
    print(f"\nmid-checkpoint: process 1 stopped {elapsed:.1f} s after process 0 was killed")
    assert elapsed < HEARTBEAT + 5
    _check_after(config, out, line, uninterrupted)


def test_peer_killed_at_start_up(config, uninterrupted, tmp_path):
    """Process 1 is killed as soon as it has joined the group: process 0 is still starting up."""
    out, logs = tmp_path / "run", [tmp_path / "p0.log", tmp_path / "p1.log"]
    envs = [{"DPOJAX_HOLD_AT": "999"}] * 2
    procs = spawn(["train", str(config), f"output_dir={out}", *RUN], logs, envs)
    try:
        wait_for_text(logs[1:], "distributed: process 1 of 2", procs)
        procs[1].kill()
        killed_at = time.monotonic()
        line, elapsed = _survivor(procs, logs, lost=1, killed_at=killed_at)
    finally:
        kill_all(procs)
    print(f"\nstart-up: process 0 stopped {elapsed:.1f} s after process 1 was killed")
    assert elapsed < HEARTBEAT + 5
    assert "last complete checkpoint: none yet" in line
    assert two_processes(config, out) == 0
    check_equal(out, uninterrupted)
