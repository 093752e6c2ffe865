"""Running what `build.py` set up: the training loop (log, eval, checkpoint, preemption), the final eval, summary,
plot and export; `dpojax eval`; `dpojax export`. The effects (files, devices, progress) live here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import queue
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dpojax import distributed, paths, tracking
from dpojax import flops as F
from dpojax import metrics as M
from dpojax.config import Config, dump_yaml, load_config
from dpojax.data.batching import PreferenceBatch, eval_batches, train_batches
from dpojax.data.packing import PackedBatch
from dpojax.data.tokenize import TokenizedData
from dpojax.errors import ConfigError, NumericsError, UserError
from dpojax.models import lora
from dpojax.models.hf import copy_tokenizer_files, export_hf
from dpojax.trainer import checkpoint as ckpt
from dpojax.trainer import reference
from dpojax.trainer.build import (
    Run,
    batch_kw,
    build_models,
    load_split,
    make_sharder,
    precompute_references,
    setup_eval,
    setup_train,
    to_device,
    total_steps,
)
from dpojax.trainer.preemption import Preemption
from dpojax.trainer.samples import make_samples
from dpojax.trainer.step import TrainState, batch_sharding, stacked_batch_sharding

log = logging.getLogger("dpojax")


def run_eval(run: Run, params, data: TokenizedData) -> dict[str, float]:
    cfg = run.cfg
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    sharding = batch_sharding(run.sharder)
    sums = None
    table = reference.lookup(run.models.ref_tables, data)
    for batch in eval_batches(data, bs, **batch_kw(cfg, run.spec, run.sharder, train=False)):
        batch = reference.attach(batch, table)
        out = run.eval_step(params, run.models.ref_params, to_device(batch, sharding))
        sums = M.add_sums(sums, fetch(out))
    return M.finalize(sums)


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


def _batches(run: Run, data: TokenizedData, start: int, stop: int) -> Iterator[PreferenceBatch | PackedBatch]:
    cfg = run.cfg
    return train_batches(data, cfg.train.batch_size, cfg.train.seed, start_step=start, stop_step=stop,
                         **batch_kw(cfg, run.spec, run.sharder, train=True))


@dataclasses.dataclass(frozen=True)
class _Ready:
    """One dispatch's batch, on the devices, with what the host counts of each of its steps: one step's batch, or
    the batches of K steps stacked on a leading axis (`TrainStep.many`)."""

    batch: PreferenceBatch | PackedBatch  # global jax.Arrays
    tokens: tuple[int, ...]  # this process's real tokens, per step
    flops: tuple[float, ...]  # model FLOPs of this process's rows, per step

    @property
    def steps(self) -> int:
        return len(self.tokens)


def _ready_batches(run: Run, data: TokenizedData, start: int, table) -> Iterator[_Ready]:
    """Batches of steps start+1 .. total_steps, built (packing, reference log-probs), counted and sent to the
    devices (collective-free: each process places its own rows); `_Prefetch` runs it in a thread. With
    train.steps_per_dispatch = K > 1, the steps k*K+1 .. (k+1)*K go as one stacked batch when their batches have
    one shape (one length bucket, one packed layout); otherwise, and for steps outside such a run of K (a resume
    at a step that is not a multiple of K, the last steps), a batch goes alone."""
    single, stacked = batch_sharding(run.sharder), stacked_batch_sharding(run.sharder)
    k, total, group = run.cfg.train.steps_per_dispatch, run.total_steps, []

    def alone(batch) -> _Ready:
        return _Ready(to_device(batch, single), (batch.real_tokens(),), (_model_flops(run, batch),))

    for step, batch in enumerate(_batches(run, data, start, total), start + 1):
        batch = reference.attach(batch, table)
        if k == 1 or (not group and ((step - 1) % k or step + k - 1 > total)):
            yield alone(batch)
            continue
        group.append(batch)
        if len(group) < k:
            continue
        batches, group = group, []
        if _one_shape(batches):
            yield _Ready(to_device(jax.tree.map(lambda *xs: np.stack(xs), *batches), stacked),
                         tuple(b.real_tokens() for b in batches), tuple(_model_flops(run, b) for b in batches))
        else:
            yield from (alone(b) for b in batches)


def _one_shape(batches: list) -> bool:
    """Whether host batches can be stacked: one tree structure, one shape and dtype per leaf."""
    first = jax.tree.structure(batches[0])
    shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(batches[0])]
    return all(jax.tree.structure(b) == first and [(x.shape, x.dtype) for x in jax.tree.leaves(b)] == shapes
               for b in batches[1:])


PREFETCH = 2  # ready batches the producer thread keeps ahead of the loop (0: the loop thread builds them)


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


class _Prefetch:
    """The items of `items` (here `_ready_batches`), made by a background thread up to `depth` ahead of the loop
    and taken in order, so the loop thread spends no time building, counting or sending batches. An error in the
    producer is raised by `next` in the loop thread (the same exception, after the items made before it);
    `close` (end of training, SIGTERM stop, an error in the loop) stops the thread and joins it."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = PREFETCH):
        self._items, self._queue, self._closed = items, queue.Queue(maxsize=depth), threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="dpojax-batches", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the loop thread
            self._put(_Failed(e))
        finally:
            self._items = None  # the generator is closed here, in its own thread

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self) -> _Ready:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is self._END or isinstance(item, _Failed):
            self._finished = True
            if isinstance(item, _Failed):
                raise item.error
            raise StopIteration
        return item

    def close(self, timeout: float = 60.0) -> None:
        self._closed.set()
        self._finished = True
        self._thread.join(timeout)
        if self._thread.is_alive():  # a batch build that takes minutes; the thread is a daemon, so exit still works
            log.warning("the batch thread did not stop within %.0f s; leaving it", timeout)
        while not self._queue.empty():  # drop ready batches: free their device memory now
            self._queue.get_nowait()


# ------------------------------------------------------------------------------------------------ train
class _Window:
    """The steps since the last log record. Their metrics stay on the devices (`TrainStep.flat`'s stacked array, one
    small array per step) until `read` brings them all to the host in one read: at a log step, and where the loop
    waits for the devices anyway (an eval, a checkpoint, a stop, the last step)."""

    def __init__(self):
        # (step, its dispatch's metrics on the devices, the step's row in them or None), in step order
        self.unread: list[tuple[int, jax.Array, int | None]] = []
        self.sums: np.ndarray | None = None  # the read steps' metric leaves summed (float64), in metrics_def order
        self.tokens, self.flops, self.steps, self.t0 = 0, 0.0, 0, time.perf_counter()

    def add(self, step: int, out: jax.Array, tokens: int, flops: float = 0.0, row: int | None = None) -> None:
        """Count one step (its metrics are read later, by `read`: `out`, or row `row` of the stacked metrics of a
        dispatch of several steps) with its real tokens and model FLOPs."""
        self.unread.append((step, out, row))
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def read(self, skipped_index: int) -> list[tuple[int, bool]]:
        """Read the unread steps' metrics (one `fetch` for all of them) and add them to the window's sums, step by
        step in float64 (as `metrics.add_sums` would); returns (step, whether its update was skipped as
        non-finite: leaf `skipped_index` > 0) for each, in step order."""
        if not self.unread:
            return []
        outs = list({id(out): out for _, out, _ in self.unread}.values())  # a dispatch of K steps is read once
        host = {id(out): np.asarray(value, np.float64) for out, value in zip(outs, fetch(outs))}
        rows = np.stack([host[id(out)] if row is None else host[id(out)][row]
                         for _, out, row in self.unread])  # [steps, metric leaves]
        skipped = [(step, bool(flag)) for (step, _, _), flag in zip(self.unread, rows[:, skipped_index] > 0)]
        if self.sums is not None:
            rows = np.concatenate([self.sums[None], rows])
        self.sums = np.cumsum(rows, axis=0)[-1]  # a running sum: the same additions in the same order, step by step
        self.unread = []
        return skipped

    def flush(self, metrics_def, pairs_per_step: int) -> dict[str, float]:
        """The record of the window's steps, all read (`read`; `metrics_def` unflattens their sums to {name: (sum,
        count)}); starts the next window. Every process calls this at the same steps: each counted only its own rows'
        tokens, so they are summed over processes here (one small host all-gather per log record)."""
        assert not self.unread, "read the window's metrics first"
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = M.finalize(metrics_def.unflatten(self.sums.tolist()))
        if jax.process_count() > 1:
            self.tokens = int(np.sum(multihost_utils.process_allgather(np.asarray(self.tokens, np.int32))))
            self.flops = float(np.sum(multihost_utils.process_allgather(np.asarray(self.flops / 1e9, np.float32))))
            self.flops *= 1e9
        out["tokens_per_second"] = self.tokens / dt
        out["pairs_per_second"] = self.steps * pairs_per_step / dt
        peak = F.peak_flops_per_second()
        if peak:
            out["mfu"] = self.flops / dt / peak  # dpojax.flops: model FLOPs of the real tokens, causal attention
        self.__init__()
        return out


def _skipped_index(metrics_def) -> int:
    """Where the `skipped_steps` sum sits among the step's stacked metrics (`TrainStep.flat`)."""
    return metrics_def.unflatten(range(metrics_def.num_leaves))["skipped_steps"][0]


def _progress(total: int, start: int):
    """The progress bar (process 0). It redraws at most once a second: a redraw costs the loop thread ~0.5 ms on a
    busy CPU host, ~30 us a step at tqdm's default of 10 a second with a few-ms step."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", mininterval=1.0,
                disable=jax.process_index() != 0)


def _model_flops(run: Run, batch: PreferenceBatch | PackedBatch) -> float:
    """Model FLOPs of one step on this process's rows (dpojax.flops: policy forward+backward, reference forward;
    under LoRA the backward computes no base-weight gradients)."""
    return F.batch_flops(run.models.policy_cfg, batch, reference=run.models.ref_graphdef is not None,
                         weight_grads=run.models.lora is None).model


def _resume_point(mngr, cfg: Config, steps: int) -> tuple[int, int]:
    """(step to resume from, schedule horizon): 0 and `steps` for a new run; refuses a config that would make the
    resumed run a different run."""
    step = mngr.latest_step()
    if step is None:
        return 0, steps
    meta = ckpt.read_meta(mngr, step)
    conflicts = ckpt.resume_conflicts(meta.get("config", {}), cfg)
    if conflicts:
        raise ConfigError(
            f"'{cfg.output_dir}' holds a checkpoint at step {step} made with a different config "
            f"({'; '.join(conflicts)}); resuming would not continue the same run. Use a new output_dir, "
            "or restore the original values."
        )
    horizon = int(meta.get("schedule_horizon", steps))
    why = ckpt.schedule_conflict(cfg, horizon, steps)
    if why:
        raise ConfigError(f"'{cfg.output_dir}' holds a checkpoint at step {step}: {why}.")
    return int(step), max(horizon, steps) if cfg.optim.schedule == "constant" else horizon


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg`; resumes from `output_dir/checkpoints` when present. Returns the final eval metrics
    (empty when the run stopped early on SIGTERM or had no eval set)."""
    distributed.initialize(cfg.distributed)  # before anything touches a device
    paths.check_urls(config_urls(cfg), written=WRITTEN)  # a bad gs:// URL fails here, before anything is written
    out_dir = paths.path(cfg.output_dir)
    is_main = jax.process_index() == 0
    sharder = make_sharder(cfg)
    models = build_models(cfg, sharder)
    train_data = load_split(cfg, models, cfg.data.train, cfg.data.train_split)
    eval_data = load_split(cfg, models, cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else None
    models = precompute_references(cfg, models, sharder, [d for d in (train_data, eval_data) if d is not None])
    steps = total_steps(cfg, len(train_data))
    if steps < 1:
        raise ConfigError(
            f"config: {len(train_data)} training rows make no full batch of train.batch_size="
            f"{cfg.train.batch_size}; lower the batch size or add data."
        )
    mngr = ckpt.manager(out_dir, cfg)
    start, horizon = _resume_point(mngr, cfg, steps)
    run, state = setup_train(cfg, models, sharder, steps=steps, horizon=horizon)
    if start:
        run, state = run.from_checkpoint_tree(ckpt.restore(mngr, start, run.checkpoint_tree(state)), start)
        log.info("resumed from %s at step %d", ckpt.checkpoint_dir(cfg.output_dir), start)
    if is_main:
        paths.makedirs(out_dir)
        paths.write_text(out_dir / "config.yaml", dump_yaml(cfg))
        for name in ("metrics.jsonl", "samples.jsonl"):  # records past the checkpoint are redone
            M.truncate_after(out_dir / name, start)
    writer = tracking.Trackers(M.MetricsWriter(out_dir / "metrics.jsonl", enabled=is_main), cfg, out_dir, is_main,
                               start=start)
    profiler = tracking.Profiler(cfg, out_dir / "profile", enabled=is_main)
    log.info(
        "training %s: %d prompts x %d responses, %d steps of %d prompts (%d micro-batches), mesh %s, from step %d",
        cfg.model.name_or_path, len(train_data), train_data.num_responses, run.total_steps, cfg.train.batch_size,
        cfg.grad_accum_steps, dict(sharder.mesh.shape), start,
    )
    best = ckpt.best_manager(out_dir, cfg) if cfg.checkpoint.best_metric else None
    savers = Savers(mngr, best, run, writer)
    samples = make_samples(cfg, models, eval_data, out_dir)
    try:
        with Preemption() as preemption:
            state, stopped_at = _loop(run, state, savers, writer, train_data, eval_data, start, preemption, samples,
                                      profiler)
        if stopped_at is None and eval_data is not None:
            final = run_eval(run, state.params, eval_data)
            if samples is not None:
                samples(run.total_steps, state.params)
            writer.write(run.total_steps, "eval", final)
            savers.save_best(run.total_steps, state, final)  # the final eval competes for best/ too
        else:
            final = {}
    finally:  # an error (e.g. divergence) still completes the saves already under way
        profiler.stop()
        writer.close()
        mngr.wait_until_finished()
        if best is not None:
            best.wait_until_finished()
    if stopped_at is not None:
        print(
            f"dpojax train: stopped by SIGTERM at step {stopped_at}; checkpoint saved in "
            f"{ckpt.checkpoint_dir(out_dir)}. Resume with the same command: dpojax train <config> "
            f"output_dir={out_dir}"
        )
        return {}
    return _finish(run, state, out_dir, final, samples)


@dataclasses.dataclass
class Savers:
    latest: Any  # CheckpointManager of the most recent checkpoints
    best: Any  # CheckpointManager of the best one by checkpoint.best_metric, or None
    run: Run
    writer: M.MetricsWriter  # flushed at each checkpoint: metrics.jsonl holds every record up to it

    def save(self, step: int, state: TrainState) -> None:
        if self.latest.latest_step() == step:
            return
        if not ckpt.all_finite(state.params):
            raise NumericsError(f"refusing to save a checkpoint at step {step}: the parameters are not finite.")
        self.writer.flush()
        ckpt.save(self.latest, step, self.run.checkpoint_tree(state), self.run.cfg, horizon=self.run.horizon)

    def save_best(self, step: int, state: TrainState, metrics: dict[str, float]) -> None:
        if self.best is None or step in self.best.all_steps():  # e.g. the final eval of a finished run, again
            return
        if ckpt.all_finite(state.params):
            ckpt.save(self.best, step, self.run.checkpoint_tree(state), self.run.cfg, horizon=self.run.horizon,
                      metrics=metrics)


def _loop(run: Run, state, savers: Savers, writer, train_data, eval_data, start: int, preemption, samples,
          profiler):
    """Steps start+1 .. total_steps. Returns (state, the step a SIGTERM stopped at, or None).

    The host keeps ahead of the devices: a producer thread (`_Prefetch`) builds and sends the batches; the loop
    dispatches step s, then waits for step s-1 (finished by then: it stays one step ahead) and, when s-1 is a log
    step, reads the window's metrics in one read and writes its record. It reads or waits for step s itself only
    where the loop waits for it anyway (an eval, a checkpoint, a stop, the last step). The state stays as the
    step's flat leaves between steps. With train.steps_per_dispatch = K a dispatch runs K steps (`TrainStep.many`
    on K stacked batches) and all of the above holds per dispatch."""
    items = _ready_batches(run, train_data, start, reference.lookup(run.models.ref_tables, train_data))
    upcoming = _Prefetch(items, PREFETCH) if PREFETCH else items
    try:
        with _frozen_heap():
            return _steps(run, state, savers, writer, eval_data, start, preemption, samples, profiler, upcoming)
    finally:
        upcoming.close()


@contextlib.contextmanager
def _frozen_heap():
    """Python's full collections walk every object the process holds: with JAX, transformers and torch loaded,
    ~0.5 M of them, ~0.35 s on whichever thread triggers one (the loop's or the producer's), a stall that came every
    few hundred steps of a few-ms step. The objects alive when the loop starts (models, tokenizer, data, compiled
    steps) are left out of collections while it runs (`gc.freeze`, after one collection of what is garbage already)
    and handed back after it; young objects are still collected as usual."""
    gc.collect()
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:  # leave a freeze made by someone else in place
            gc.unfreeze()


def _steps(run: Run, state, savers: Savers, writer, eval_data, start: int, preemption, samples, profiler,
           upcoming: Iterator[_Ready]):
    cfg, state_of = run.cfg, run.train_step.state_of
    window, bar, bad = _Window(), _progress(run.total_steps, start), _BadSteps(cfg)
    log_every, eval_every, save_every = cfg.train.log_every, cfg.train.eval_every, cfg.checkpoint.every
    if eval_data is None:
        eval_every = 0
    sync_every = cfg.ref_model.sync_every if run.sync_reference is not None else 0
    leaves, ref_leaves = run.train_step.leaves_of(state), jax.tree.leaves(run.models.ref_params)  # the step's flat
    state = None  # arguments (per layer when the layers are unrolled; the stacked state is consumed)
    previous = None  # (last step, metrics) of the dispatch before this one, not yet waited for
    profiling, skipped_index = profiler.first is not None, None

    def read() -> None:
        """Read the window's unread metrics; a non-finite step found there (up to log_every - 1 steps after it ran:
        its update was skipped, so the state is unchanged, and checkpoints refuse non-finite parameters) counts
        towards train.max_bad_steps and names its own step."""
        nonlocal skipped_index
        if skipped_index is None:  # the metrics' structure is known once the step is traced
            skipped_index = _skipped_index(run.train_step.metrics_def)
        for step_read, skipped in window.read(skipped_index):
            bad.check(step_read, skipped)

    def write(step_written: int) -> None:
        read()
        record = window.flush(run.train_step.metrics_def, cfg.train.batch_size)
        writer.write(step_written, "train", record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                        pairs_s=f"{record['pairs_per_second']:.1f}", refresh=False)  # shown at the bar's next refresh

    ready, step = next(upcoming, None), start
    while step < run.total_steps:  # a dispatch runs `ready.steps` steps: step+1 .. step+n (one, or K stacked)
        n, first = ready.steps, step + 1
        step += n
        if profiling:
            for s in range(first, step + 1):
                profiler.before_step(s)
        step_fn = run.train_step.flat if n == 1 else run.train_step.many
        leaves, out = step_fn(leaves, ref_leaves, ready.batch)
        if profiling:
            for s in range(first, step + 1):
                profiler.after_step(s, out)
        state = None  # built from the leaves where needed
        if sync_every and step % sync_every == 0:
            state = state_of(leaves)
            run.models = dataclasses.replace(run.models,
                                             ref_params=run.sync_reference(state.params, run.models.ref_params))
            ref_leaves = jax.tree.leaves(run.models.ref_params)
        done, ready = ready, next(upcoming, None)  # the next dispatch's batch, built and sent by the producer thread
        if previous is not None:  # the dispatch before, finished by now (it ran while the host did the above)
            wait(previous[1])
            if previous[0] % log_every == 0:  # its record, read while this dispatch runs
                write(previous[0])
        for i, s in enumerate(range(first, step + 1)):
            window.add(s, out, done.tokens[i], done.flops[i], None if n == 1 else i)
        bar.update(n)
        last = step == run.total_steps
        evaluate = eval_every and step % eval_every == 0 and not last
        save = (save_every and step % save_every == 0) or last
        stop = not last and preemption.should_stop(step)
        boundary = last or evaluate or save or stop  # these wait for the step anyway: read it (and its record) first
        previous = None if boundary else (step, out)
        if not boundary:
            continue
        if last or step % log_every == 0:
            write(step)
        else:
            read()
        if (evaluate or save or stop) and state is None:
            state = state_of(leaves)
        if evaluate:
            result = run_eval(run, state.params, eval_data)
            writer.write(step, "eval", result)
            savers.save_best(step, state, result)
            if samples is not None:
                samples(step, state.params)
            window.t0 = time.perf_counter()
        if save:
            savers.save(step, state)
        if stop:
            savers.save(step, state)
            bar.close()
            return state, step
    bar.close()
    return state_of(leaves), None


class _BadSteps:
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


def _finish(run: Run, state: TrainState, out_dir, final: dict, samples=None) -> dict[str, Any]:
    records = M.read_metrics(out_dir / "metrics.jsonl")
    train_recs = [r for r in records if r["split"] == "train"]
    export_dir = export_policy(run.cfg, run.models, state.params, out_dir / "export")
    if jax.process_index() != 0:
        return final
    png = M.plot_curves(records, out_dir / "training_curves.png")
    table = {"train (last)": train_recs[-1]} if train_recs else {}
    if final:
        table["eval"] = final
    print("\n" + M.summary_table(table))
    if samples is not None and samples.last:
        print("\n" + samples.summary())
    print(f"\nmetrics: {out_dir / 'metrics.jsonl'}\nplot:    {png}\nexport:  {export_dir}")
    return final


# ------------------------------------------------------------------------------------------------- eval
def _restore_policy(cfg: Config, models, step: int):
    """`models` with the policy parameters of checkpoint `step` of cfg.output_dir, restored into their shardings."""
    mngr = ckpt.manager(cfg.output_dir, cfg)
    params = ckpt.restore(mngr, step, {"params": models.policy_params})["params"]
    mngr.close()
    return dataclasses.replace(models, policy_params=params)


def evaluate(cfg: Config) -> dict[str, float]:
    """Metrics of the policy (a run's newest checkpoint when `output_dir` has one) on data.eval or data.train."""
    distributed.initialize(cfg.distributed)  # before anything touches a device
    paths.check_urls(config_urls(cfg), written=WRITTEN)
    is_main = jax.process_index() == 0
    sharder = make_sharder(cfg)
    found = ckpt.find_checkpoint(cfg.output_dir)
    models = build_models(cfg, sharder, policy_from_checkpoint=found is not None)
    spec_name, split = (cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else (cfg.data.train, cfg.data.train_split)
    data = load_split(cfg, models, spec_name, split)
    models = precompute_references(cfg, models, sharder, [data])
    step = 0
    if found is not None:
        models = _restore_policy(cfg, models, found.step)
        step = found.step
        log.info("evaluating the checkpoint at step %d of %s", step, cfg.output_dir)
    run = setup_eval(cfg, models, sharder)
    result = run_eval(run, models.policy_params, data)
    if is_main:
        writer = M.MetricsWriter(paths.absolute(cfg.output_dir) / "metrics.jsonl")
        writer.write(step, "eval", result)
        writer.close()
        print(M.summary_table({"eval": result}))
    return result


# -------------------------------------------------------------------------------------------------- CLI
WRITTEN = ("output_dir", "data.cache_dir")  # the config keys of config_urls that a run writes to


def config_urls(cfg: Config) -> list[tuple[str, str | None]]:
    """(config key, path) of everything a run reads or writes, for `paths.check_urls`."""
    return [("output_dir", cfg.output_dir), ("data.train", cfg.data.train), ("data.eval", cfg.data.eval),
            ("data.cache_dir", cfg.data.cache_dir), ("model.name_or_path", cfg.model.name_or_path),
            ("model.tokenizer", cfg.model.tokenizer), ("ref_model.name_or_path", cfg.ref_model.name_or_path),
            ("model.lora.init_from", cfg.model.lora.init_from),
            ("train.compilation_cache", cfg.train.compilation_cache)]


def use_compilation_cache(cfg: Config) -> str | None:
    """Point JAX's persistent compilation cache at `train.compilation_cache` (a process-wide setting, so the CLI does
    it, not `train`); JAX_COMPILATION_CACHE_DIR in the environment wins. Returns the folder in use, or None."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    where = cfg.train.compilation_cache
    if where is None:
        return None
    where = where if paths.is_remote(where) else os.path.expanduser(where)
    jax.config.update("jax_compilation_cache_dir", where)
    return where


def train_from_cli(config_path: str, overrides: list[str]) -> None:
    cfg = load_config(config_path, overrides)
    use_compilation_cache(cfg)
    train(cfg)


def eval_from_cli(config_path: str, overrides: list[str]) -> None:
    cfg = load_config(config_path, overrides)
    use_compilation_cache(cfg)
    evaluate(cfg)


def export_policy(cfg: Config, models, params, out_dir, *, merged: bool = False):
    """The policy as a HF folder; a LoRA policy as a PEFT adapter folder (plus the tokenizer files), or with `merged`
    as a HF folder of the base with the adapters merged in (models.ref_params must then hold the base)."""
    if models.lora is None:
        model = nnx.merge(models.policy_graphdef, params)
        return export_hf(model, models.policy_cfg, out_dir, tokenizer_dir=models.tokenizer_dir)
    setup = models.lora
    if merged:
        base = lora.merged_state(models.ref_params, params, list(setup.groups), setup.scale)
        return export_hf(nnx.merge(setup.base_graphdef, base), models.policy_cfg, out_dir,
                         tokenizer_dir=models.tokenizer_dir)
    path = lora.save_peft(out_dir, params, list(setup.groups), models.policy_cfg, cfg.model.lora,
                          cfg.model.name_or_path)
    if jax.process_index() == 0:
        copy_tokenizer_files(models.tokenizer_dir, path)
    return path


def export_from_cli(source: str, out_dir: str, merged: bool = False) -> None:
    """Export the newest checkpoint of a run folder (or one checkpoint folder) as a HF folder: the policy is built
    abstractly and its parameters alone are restored (no optimizer state, no reference, no base weights). A LoRA
    run gives a PEFT adapter folder, or with `merged` a HF folder of the merged model (which reads the base)."""
    paths.check_urls([("export source", str(source)), ("export folder", str(out_dir))], written=["export folder"])
    found = ckpt.find_checkpoint(source)
    if found is None:
        raise UserError(f"export: no checkpoint found in '{source}' (expected RUN_DIR/checkpoints/<step>/).")
    run_dir = found.path.parent.parent
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    if merged and not cfg.model.lora.enabled:
        raise UserError(f"export: --merged merges LoRA adapters, but '{run_dir}' trained every weight; drop --merged.")
    models = build_models(cfg, make_sharder(cfg), policy_from_checkpoint=True, with_reference=merged)
    models = _restore_policy(cfg, models, found.step)
    path = export_policy(cfg, models, models.policy_params, paths.path(out_dir), merged=merged)
    print(f"exported step {found.step} of {run_dir} to {path}")
