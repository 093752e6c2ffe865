"""SIGTERM to one process of two while an async checkpoint save is under way: both stop cleanly (status 0) at the
same step with a complete checkpoint there, and the resumed run equals an uninterrupted one."""

from __future__ import annotations

import re
import signal

import pytest
from procs import RUN, check_nothing_lost, kill_all, spawn, train_records, two_processes, wait_for_text

pytestmark = pytest.mark.serial  # several JAX processes


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
    text = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in text]
    stops = [re.findall(r"stopped by SIGTERM at step (\d+);", t) for t in text]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stopped = int(stops[0][0])
    assert 2 < stopped < 6
    assert check_nothing_lost(out) == stopped
    assert two_processes(config, out) == 0
    assert train_records(out) == uninterrupted
