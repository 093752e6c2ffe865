"""SIGTERM handling: TPU/GKE/SLURM preemption notices become a checkpoint at the next step boundary.

The loop calls `should_stop(step)` at every step boundary. One process: the first SIGTERM makes it True at
the next boundary. Later SIGTERMs change nothing: launchers send it more than once (SLURM signals every process of
a job, so a supervised worker gets it directly and through its supervisor, and again at the time limit) and then
SIGKILL after a grace period, so a second one must not cut the save short. SIGINT (Ctrl-C) still stops at once.

Several processes must all stop at the same step (the save is collective) although SIGTERM may reach only one
of them, and without a collective per step (it would wait for the step just dispatched). The agreement runs
once, through the coordination service's key-value store, in the way of JAX's own preemption sync manager:
  1. a process that got SIGTERM posts a notice key at its next step boundary;
  2. a watcher thread in every process waits on that key (a long-poll RPC, no work per step); when it appears,
     the watcher holds this process's step lock, posts the last step its loop passed, waits at a barrier for
     every process's post, and sets the stop step to the largest posted step + 1;
  3. `should_stop(step)` takes the lock (free except during step 2) and compares.
While the lock is held no loop can pass a boundary, so no process is past the stop step when it is set; every
process then stops at the first boundary >= it, all at the same step. The watchers need no loop to make
progress (a loop may be waiting on a collective with a frozen peer), so the exchange cannot deadlock.
JAX's `reached_preemption_sync_point` is not used: its step counter is shared with Orbax, whose background
finalize thread reports older steps, and it can pick a step a process has already passed.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import threading

import jax

log = logging.getLogger("dpojax")

POLL_MS = 1000  # a watcher's long poll; bounds how long leaving the loop waits for the watcher
BARRIER_MS = 300_000  # how long the exchange waits for every process to post its step
_runs = itertools.count()  # one key prefix per Preemption, the same sequence on every process


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._peers: _Agreement | None = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if jax.process_count() > 1:
            self._peers = _Agreement(f"dpojax/preemption/{next(_runs)}/")
        return self

    def __exit__(self, *exc) -> None:
        if self._peers is not None:
            self._peers.close()
            self._peers = None
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested:  # a raw write: the handler may interrupt a write to the same stream
            os.write(_console_fd(), b"dpojax: SIGTERM again: still saving (SIGINT or SIGKILL stop now)\n")
            return
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then stopping")

    def should_stop(self, step: int) -> bool:
        """True at this step boundary when the run must save and stop: every process returns the same answer
        at the same step once any process got SIGTERM. No collective; call it at every boundary."""
        if self._peers is None:
            return self.requested
        if self.requested:
            self._peers.announce()
        return self._peers.passed(step)


def _console_fd() -> int:
    """The descriptor of sys.stderr (a supervised worker's console), else 2."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without a descriptor (a test's capture)
        return 2


class _Agreement:
    """The multi-process stop step, agreed once through the coordination service (see the module doc)."""

    def __init__(self, prefix: str) -> None:
        from jax._src.distributed import global_state

        self._client, self._prefix = global_state.client, prefix
        self._lock = threading.Lock()
        self._step = 0  # the last step boundary this process's loop passed
        self._stop_at: int | None = None
        self._announced = False
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="dpojax-preemption", daemon=True)
        self._watcher.start()

    def announce(self) -> None:
        if not self._announced:  # several processes may get SIGTERM: the notice is the same from each
            self._client.key_value_set(self._prefix + "notice", str(jax.process_index()), allow_overwrite=True)
            self._announced = True

    def passed(self, step: int) -> bool:
        with self._lock:
            self._step = step
            return self._stop_at is not None and step >= self._stop_at

    def close(self) -> None:
        """Stop watching. A notice posted before this process left its loop is still answered (the poster
        waits for every process's step), so the watcher is joined rather than abandoned."""
        self._closing.set()
        self._watcher.join()

    def _watch(self) -> None:
        while not self._notice_seen():
            if self._closing.is_set():
                return
        with self._lock:
            try:
                self._client.key_value_set(f"{self._prefix}step/{jax.process_index()}", str(self._step))
                self._client.wait_at_barrier(self._prefix + "barrier", BARRIER_MS)
                steps = [int(v) for _, v in self._client.key_value_dir_get(self._prefix + "step/")]
            except jax.errors.JaxRuntimeError as e:  # a peer died: the heartbeat check stops this run
                log.error("preemption: the processes could not agree on a stop step: %s", e)
                return
            self._stop_at = max(steps) + 1
        log.warning("preemption: a process got SIGTERM; every process saves and stops at step %d", self._stop_at)

    def _notice_seen(self) -> bool:
        try:
            self._client.blocking_key_value_get(self._prefix + "notice", POLL_MS)
            return True
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" in str(e):
                return False
            if not self._closing.is_set():  # a peer is lost: the run is ending, and `dpojax.supervise` says why
                log.debug("preemption: lost the coordination service while watching for SIGTERM: %s", e)
            self._closing.set()
            return False
