"""The train loop's reads of the devices and its metric window: a log window's metrics stay on the devices until one
read brings them all to the host, where each step is checked for a skipped (non-finite) update."""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpojax import flops as F
from dpojax import metrics as M
from dpojax.config import Config
from dpojax.errors import NumericsError

log = logging.getLogger("dpojax")


def fetch(tree):
    """Device values to the host: the loop's one point of reading them (a host sync). In the train loop it reads the
    metrics of a log window's steps at once, one step late (after the next step was dispatched), or up to the step
    just run where the loop waits for it anyway: an eval, a checkpoint, a stop, the last step."""
    return jax.device_get(tree)


def wait(x):
    """Wait for device values without reading them (a host sync): the train loop waits for step s-1 after it has
    dispatched step s, which keeps it at most one step ahead of the devices (a bounded queue of steps and batches in
    device memory, and a log window's wall time that is the devices')."""
    return jax.block_until_ready(x)


class BadSteps:
    """Counts consecutive skipped (non-finite) steps; stops the run after train.max_bad_steps of them."""

    def __init__(self, cfg: Config):
        self.limit, self.run_of, self.total = cfg.train.max_bad_steps, 0, 0

    def check(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.run_of = 0
            return
        self.run_of += 1
        self.total += 1
        log.warning("step %d: non-finite loss or gradient norm; update skipped (%d in a row)", step, self.run_of)
        if self.run_of >= self.limit:
            raise NumericsError(
                f"training stopped at step {step}: {self.run_of} consecutive steps had a non-finite loss or gradient "
                f"norm (each update was skipped; no checkpoint holds NaNs). Lower optim.lr, set optim.max_grad_norm, "
                f"use model.dtype=float32, or check the data; train.max_bad_steps={self.limit} sets the limit."
            )


def skipped_index(metrics_def) -> int:
    """Where the `skipped_steps` sum sits among the step's stacked metrics (`TrainStep.flat`)."""
    return metrics_def.unflatten(range(metrics_def.num_leaves))["skipped_steps"][0]


class MetricWindow:
    """The steps since the last log record. Their metrics stay on the devices (`TrainStep.flat`'s stacked array, one
    small array per step) until `read` brings them all to the host in one read: at a log step, and where the loop
    waits for the devices anyway (an eval, a checkpoint, a stop, the last step). A non-finite step found there (up
    to log_every - 1 steps after it ran: its update was skipped, so the state is unchanged, and checkpoints refuse
    non-finite parameters) counts towards train.max_bad_steps (`BadSteps`) and names its own step."""

    def __init__(self, cfg: Config):
        self.bad = BadSteps(cfg)
        self.pairs_per_step = cfg.train.batch_size
        self._skipped_index: int | None = None  # known once the step is traced (its metrics' structure)
        self._start()

    def _start(self) -> None:
        # (step, its dispatch's metrics on the devices, the step's row in them or None), in step order
        self.unread: list[tuple[int, jax.Array, int | None]] = []
        self.sums: np.ndarray | None = None  # the read steps' metric leaves summed (float64), in metrics_def order
        self.tokens, self.flops, self.steps, self.t0 = 0, 0.0, 0, time.perf_counter()

    def restart_clock(self) -> None:
        """Leave the time since the window's start out of its throughput (an eval's time)."""
        self.t0 = time.perf_counter()

    def add(self, step: int, out: jax.Array, tokens: int, flops: float = 0.0, row: int | None = None) -> None:
        """Count one step (its metrics are read later, by `read`: `out`, or row `row` of the stacked metrics of a
        dispatch of several steps) with its real tokens and model FLOPs."""
        self.unread.append((step, out, row))
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def read(self, metrics_def) -> None:
        """Read the unread steps' metrics (one `fetch` for all of them), add them to the window's sums, step by step
        in float64 (as `metrics.add_sums` would), and check each step for a skipped update, in step order."""
        if self._skipped_index is None:
            self._skipped_index = skipped_index(metrics_def)
        for step, skipped in self._read(self._skipped_index):
            self.bad.check(step, skipped)

    def _read(self, skipped_at: int) -> list[tuple[int, bool]]:
        """(step, whether its update was skipped as non-finite: leaf `skipped_at` > 0) of each unread step."""
        if not self.unread:
            return []
        outs = list({id(out): out for _, out, _ in self.unread}.values())  # a dispatch of K steps is read once
        host = {id(out): np.asarray(value, np.float64) for out, value in zip(outs, fetch(outs))}
        rows = np.stack([host[id(out)] if row is None else host[id(out)][row]
                         for _, out, row in self.unread])  # [steps, metric leaves]
        skipped = [(step, bool(flag)) for (step, _, _), flag in zip(self.unread, rows[:, skipped_at] > 0)]
        if self.sums is not None:
            rows = np.concatenate([self.sums[None], rows])
        self.sums = np.cumsum(rows, axis=0)[-1]  # a running sum: the same additions in the same order, step by step
        self.unread = []
        return skipped

    def flush(self, metrics_def) -> dict[str, float]:
        """Read the window's unread steps and return its record (`metrics_def` unflattens the sums to {name: (sum,
        count)}); starts the next window. Every process calls this at the same steps: each counted only its own
        rows' tokens, so they are summed over processes here (one small host all-gather per log record)."""
        self.read(metrics_def)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = M.finalize(metrics_def.unflatten(self.sums.tolist()))
        if jax.process_count() > 1:
            self.tokens = int(np.sum(multihost_utils.process_allgather(np.asarray(self.tokens, np.int32))))
            self.flops = float(np.sum(multihost_utils.process_allgather(np.asarray(self.flops / 1e9, np.float32))))
            self.flops *= 1e9
        out["tokens_per_second"] = self.tokens / dt
        out["pairs_per_second"] = self.steps * self.pairs_per_step / dt
        peak = F.peak_flops_per_second()
        if peak:
            out["mfu"] = self.flops / dt / peak  # dpojax.flops: model FLOPs of the real tokens, causal attention
        self._start()
        return out
