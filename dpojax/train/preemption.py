"""SIGTERM handling: TPU/GKE/SLURM preemption notices become a checkpoint at the next step boundary.

The first SIGTERM sets a flag the loop reads between steps (all hosts agree through a tiny all-gather, so
every process stops at the same step and takes part in the save); a second SIGTERM exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("dpojax")


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested:
            os.write(2, b"dpojax: second SIGTERM, exiting now without saving\n")
            os._exit(128 + signum)
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary (send it again to exit now)")

    def should_stop(self) -> bool:
        """True on every process once any process got SIGTERM (a collective when there are several)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))
