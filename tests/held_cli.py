"""`python -m dpojax.cli` that holds at one train step: a test's handle on a run at a known point, whatever the
machine's speed.

    DPOJAX_HOLD_AT=3 DPOJAX_RELEASE=/tmp/go python tests/held_cli.py train CONFIG ...

Right after the train record of step DPOJAX_HOLD_AT is written (MetricsWriter.write runs on every process),
prints "HELD AT STEP 3" and waits until the file DPOJAX_RELEASE exists (forever if unset, at most 10 min).
With DPOJAX_SPIN=SECONDS it instead keeps the Python thread busy for that long (holding the GIL, like a
tokenizer or a Python-heavy callback) and goes on. With DPOJAX_HOLD_IN=save it holds instead right after the
checkpoint save of that step was started (an async save under way: "HELD IN SAVE AT STEP 3").
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time

from dpojax import metrics, paths
from dpojax.cli import main
from dpojax.trainer import checkpoint

HOLD_AT = int(os.environ["DPOJAX_HOLD_AT"])
RELEASE = os.environ.get("DPOJAX_RELEASE")
SPIN = float(os.environ.get("DPOJAX_SPIN", "0"))
IN_SAVE = os.environ.get("DPOJAX_HOLD_IN") == "save"
FILL = os.environ.get("DPOJAX_FILL")
FILL_LEAVE = int(os.environ.get("DPOJAX_FILL_LEAVE", "0"))
FILL_AFTER = os.environ.get("DPOJAX_FILL_AFTER")
NO_SPACE_AT = int(os.environ.get("DPOJAX_NO_SPACE_AT", "0"))
_write = metrics.MetricsWriter.write
_save = checkpoint.save
_add = paths.LineAppender.add


def _held_write(self, step, split, record):
    _write(self, step, split, record)
    if split == "train" and step == HOLD_AT and not IN_SAVE:
        _hold(f"HELD AT STEP {step}", step)


def _held_save(mngr, step, *args, **kwargs):
    _save(mngr, step, *args, **kwargs)
    if IN_SAVE and step == HOLD_AT:
        _hold(f"HELD IN SAVE AT STEP {step}", step)


def _full_disk_add(self, line: str) -> None:
    if NO_SPACE_AT and self.path.name == "metrics.jsonl" and json.loads(line)["step"] == NO_SPACE_AT:
        with open(self.path, "a") as f:
            f.write(line[: len(line) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
    _add(self, line)


def _fill(folder: str, leave: int) -> None:
    """Fill the file system of `folder`, then give `leave` bytes back."""
    end = time.monotonic() + 600
    while FILL_AFTER and not os.path.exists(FILL_AFTER) and time.monotonic() < end:
        time.sleep(0.05)
    filler = os.path.join(folder, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    os.truncate(filler, max(0, os.path.getsize(filler) - leave))
    print(f"FILLED {folder}", flush=True)


def _hold(text: str, step: int) -> None:
    print(text, flush=True)
    if FILL:
        _fill(FILL, FILL_LEAVE)
        return
    end = time.monotonic() + (SPIN or 600)
    while time.monotonic() < end:
        if not SPIN:
            if RELEASE and os.path.exists(RELEASE):
                break
            time.sleep(0.05)
    print(f"RELEASED AT STEP {step}", flush=True)


metrics.MetricsWriter.write = _held_write
checkpoint.save = _held_save
paths.LineAppender.add = _full_disk_add

if __name__ == "__main__":
    sys.exit(main())  # the command line itself (argv None): a storage error ends the process at once
