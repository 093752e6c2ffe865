"""Running what `build.py` set up: `train` (resume, the run's files and trackers, the loop, the final eval, summary,
plot and export) and the loop itself, which dispatches the steps, keeps their metrics in a window read once per log
record (`window.py`), takes its batches from a producer thread (`prefetch.py`) and calls its hooks: eval, samples,
checkpoint, stop on SIGTERM, profile (`hooks.py`). The effects (files, devices, progress) live here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
from typing import Any, Iterator

import jax
from tqdm.auto import tqdm

from dpojax import distributed, paths, tracking
from dpojax import metrics as M
from dpojax.config import Config, dump_yaml
from dpojax.data.tokenize import TokenizedData
from dpojax.errors import ConfigError, StorageError
from dpojax.trainer import checkpoint as ckpt
from dpojax.trainer import online, prefetch, reference
from dpojax.trainer import window as W
from dpojax.trainer.build import (
    Models,
    Run,
    build_models,
    load_split,
    make_sharder,
    precompute_references,
    process_kw,
    setup_train,
    to_device,
    total_steps,
)
from dpojax.trainer.evaluation import WRITTEN, config_urls, run_eval
from dpojax.trainer.export import export_policy
from dpojax.trainer.hooks import Hook, Hooks, Profile, Savers, make_hooks
from dpojax.trainer.preemption import Preemption
from dpojax.trainer.samples import make_samples
from dpojax.trainer.step import TrainState, batch_sharding

log = logging.getLogger("dpojax")


# ------------------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass(frozen=True)
class LoopState:
    """What the loop carries from one dispatch to the next."""

    step: int  # the last step dispatched
    leaves: list  # the train state as the step's flat leaves (per layer when the layers are unrolled)
    ref_params: Any  # the reference (TR-DPO moves it every ref_model.sync_every steps)
    ref_leaves: list  # its leaves, as the step takes them
    previous: tuple[int, jax.Array] | None = None  # (last step, metrics) of the dispatch before, not waited for yet


@dataclasses.dataclass(frozen=True)
class LoopEnd:
    state: TrainState
    ref_params: Any  # the reference at the end (TR-DPO moved it)
    stopped_at: int | None  # the step a SIGTERM stopped the run at, or None


def run_loop(run: Run, state: TrainState, ref_params, hooks: Hooks, train_data: TokenizedData, start: int) -> LoopEnd:
    """Steps start+1 .. total_steps from `state` (consumed) and the reference `ref_params`.

    The host keeps ahead of the devices: a producer thread (`prefetch.Prefetch`) builds and sends the batches; the
    loop dispatches step s, then waits for step s-1 (finished by then: it stays one step ahead) and, when s-1 is a
    log step, reads the window's metrics in one read and writes its record. It reads or waits for step s itself
    only where the loop waits for it anyway (an eval, a checkpoint, a stop, the last step). The state stays as the
    step's flat leaves between steps. With train.steps_per_dispatch = K a dispatch runs K steps (`TrainStep.many`
    on K stacked batches) and all of the above holds per dispatch."""
    upcoming = prefetch.upcoming(run, train_data, start, reference.lookup(run.models.ref_tables, train_data))
    try:
        with frozen_heap():
            begin = LoopState(start, run.train_step.leaves_of(state), ref_params, jax.tree.leaves(ref_params))
            return run_steps(run, hooks, upcoming, begin)
    finally:
        upcoming.close()


@contextlib.contextmanager
def frozen_heap():
    """Python's full collections walk every object the process holds: with JAX, transformers and torch loaded,
    hundreds of thousands of them, a stall of a large fraction of a second on whichever thread triggers one (the
    loop's or the producer's), every few hundred steps of a few-ms step. The objects alive when the loop starts
    (models, tokenizer, data, compiled steps) are left out of collections while it runs (`gc.freeze`, after one
    collection of what is garbage already) and handed back after it; young objects are still collected as usual."""
    gc.collect()
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:  # leave a freeze made by someone else in place
            gc.unfreeze()


def progress(total: int, start: int):
    """The progress bar (process 0). It redraws at most once a second: a redraw costs the loop thread host time that
    tqdm's default of 10 a second would add to every few-ms step."""
    return tqdm(total=total, initial=start, desc="train", unit="step", mininterval=1.0,
                disable=jax.process_index() != 0)


def run_steps(run: Run, hooks: Hooks, upcoming: Iterator[prefetch.ReadyBatch], s: LoopState) -> LoopEnd:
    """The loop of `run_loop`, from `s` over the ready batches of `upcoming`."""
    log_every = run.cfg.train.log_every
    window, bar = W.MetricWindow(run.cfg), progress(run.total_steps, s.step)
    ready = next(upcoming, None)
    while s.step < run.total_steps:  # a dispatch runs `ready.steps` steps: step+1 .. step+n (one, or K stacked)
        first = s.step + 1
        s, out, state = dispatch(run, s, ready, hooks.profile)  # `state`: built from the leaves, or None
        done, ready = ready, next(upcoming, None)  # the next dispatch's batch, built and sent by the producer thread
        if s.previous is not None:  # the dispatch before, finished by now (it ran while the host did the above)
            W.wait(s.previous[1])
            if s.previous[0] % log_every == 0:  # its record, read while this dispatch runs
                write_record(run, window, bar, hooks.writer, s.previous[0])
        for i, step in enumerate(range(first, s.step + 1)):
            window.add(step, out, done.tokens[i], done.flops[i], None if done.steps == 1 else i)
        bar.update(done.steps)
        last = s.step == run.total_steps
        due = hooks.due(s.step, last)
        boundary = last or bool(due)  # these wait for the step anyway: read it (and its record) first
        s = dataclasses.replace(s, previous=None if boundary else (s.step, out))
        if not boundary:
            continue
        if last or s.step % log_every == 0:
            write_record(run, window, bar, hooks.writer, s.step)
        else:
            window.read(run.train_step.metrics_def)
        state = run.train_step.state_of(s.leaves) if state is None else state
        if run_hooks(due, s, state, window):
            bar.close()
            return LoopEnd(state, s.ref_params, s.step)
    bar.close()
    return LoopEnd(run.train_step.state_of(s.leaves), s.ref_params, None)


def dispatch(run: Run, s: LoopState, ready: prefetch.ReadyBatch,
             profile: Profile) -> tuple[LoopState, jax.Array, TrainState | None]:
    """Dispatch the steps of `ready` (one step, or K stacked: `TrainStep.many`) and, at a TR-DPO step, move the
    reference towards the policy. Returns the new loop state, the dispatch's metrics (on the devices) and the
    structured train state where it was built (the TR-DPO update needs it), else None."""
    first, last = s.step + 1, s.step + ready.steps
    profile.before(first, last)
    step_fn = run.train_step.flat if ready.steps == 1 else run.train_step.many
    leaves, out = step_fn(s.leaves, s.ref_leaves, ready.batch)
    profile.after(first, last, out)
    s = dataclasses.replace(s, step=last, leaves=leaves)
    sync_every = run.cfg.ref_model.sync_every if run.sync_reference is not None else 0
    if not (sync_every and last % sync_every == 0):
        return s, out, None
    state = run.train_step.state_of(leaves)
    ref_params = run.sync_reference(state.params, s.ref_params)
    return dataclasses.replace(s, ref_params=ref_params, ref_leaves=jax.tree.leaves(ref_params)), out, state


def write_record(run: Run, window: W.MetricWindow, bar, writer, step: int) -> None:
    """The window's train record (its metrics read now), written at `step` and shown on the progress bar."""
    record = window.flush(run.train_step.metrics_def)
    writer.write(step, "train", record)
    second = {"kl": f"{record.get('kl', float('nan')):.3f}"}  # KTO: no accuracy, its reference point instead
    for name in ("rewards/accuracies", "accuracy"):  # a reward model's (task: reward): `accuracy`
        if name in record:
            second = {"acc": f"{record[name]:.2f}"}
    bar.set_postfix(loss=f"{record['loss']:.4f}", **second, pairs_s=f"{record['pairs_per_second']:.1f}",
                    refresh=False)  # shown at the bar's next refresh


def run_hooks(due: list[Hook], s: LoopState, state: TrainState, window: W.MetricWindow) -> bool:
    """Run the due hooks in order at step `s.step`; True when one of them stops the run."""
    stop = False
    for hook in due:
        stop = bool(hook.fn(s.step, state, s.ref_params)) or stop
        if hook.pauses_clock:
            window.restart_clock()
    return stop


def run_online(run: Run, source: online.OnlineSource, state: TrainState, ref_params, hooks: Hooks,
               start: int) -> LoopEnd:
    """Steps start+1 .. total_steps of an online run: each step's rows come from `source` (sampled from the policy
    the step before left; docs/online.md), are batched as offline batches are and go through the same step. No
    batch is built ahead (it needs the policy of the step before): the loop waits for each step's params, and
    reads its metrics at log steps. Iterative runs with reference `previous_round` move the reference to the policy
    at each round's start (`run.sync_reference`, alpha 1)."""
    cfg, window, bar = run.cfg, W.MetricWindow(run.cfg), progress(run.total_steps, start)
    s = LoopState(start, run.train_step.leaves_of(state), ref_params, jax.tree.leaves(ref_params))
    sharding = batch_sharding(run.sharder)
    with frozen_heap():
        while s.step < run.total_steps:
            step = s.step + 1
            r = source.starts_round(step)
            if r and cfg.online.reference == "previous_round":
                ref = run.sync_reference(online.policy_params(run, s.leaves), s.ref_params)
                s = dataclasses.replace(s, ref_params=ref, ref_leaves=jax.tree.leaves(ref))
            host = online.pairs_lib.host_batch(source.rows(run, step, s.leaves), source.plan.layout, **process_kw())
            ready = prefetch.ReadyBatch(to_device(host, sharding), (host.real_tokens(),),
                                        (prefetch.model_flops(run, host),))
            s, out, state = dispatch(run, s, ready, hooks.profile)
            window.add(step, out, ready.tokens[0], ready.flops[0])
            bar.update(1)
            last = step == run.total_steps
            due = hooks.due(step, last)
            if last or step % cfg.train.log_every == 0:
                record = {**window.flush(run.train_step.metrics_def), **source.window.flush()}
                hooks.writer.write(step, "train", record)
            elif due:
                window.read(run.train_step.metrics_def)
            if not due:
                continue
            state = run.train_step.state_of(s.leaves) if state is None else state
            stop = run_hooks(due, s, state, window)
            if any(hook.pauses_clock for hook in due):
                source.window.restart_clock()
            if stop:
                bar.close()
                return LoopEnd(state, s.ref_params, s.step)
    bar.close()
    return LoopEnd(run.train_step.state_of(s.leaves), s.ref_params, None)


# ------------------------------------------------------------------------------------------------ train
def _resume_point(mngr, cfg: Config, steps: int, fingerprint: str = "") -> tuple[int, int]:
    """(step to resume from, schedule horizon): 0 and `steps` for a new run; refuses a config that would make the
    resumed run a different run."""
    found = ckpt.newest_readable(mngr, lambda step: ckpt.read_meta(mngr, step))  # damaged ones: set aside
    if found is None:
        return 0, steps
    step, meta = found
    conflicts = ckpt.resume_conflicts(meta.get("config", {}), cfg)
    if conflicts:
        raise ConfigError(
            f"'{cfg.output_dir}' holds a checkpoint at step {step} made with a different config "
            f"({'; '.join(conflicts)}); resuming would not continue the same run. Use a new output_dir, "
            "or restore the original values."
        )
    horizon = int(meta.get("schedule_horizon", steps))
    why = ckpt.data_conflict(meta, cfg, fingerprint) or ckpt.schedule_conflict(cfg, horizon, steps)
    if why:
        raise ConfigError(f"'{cfg.output_dir}' holds a checkpoint at step {step}: {why}.")
    return int(step), max(horizon, steps) if cfg.optim.schedule == "constant" else horizon


def _data(cfg: Config, models: Models, sharder) -> tuple[Models, TokenizedData, TokenizedData | None, int]:
    """(models, train data, eval data or None, the run's total steps); with ref_model.precompute the models come
    back with the reference log-probs computed and the reference weights dropped."""
    train_data = load_split(cfg, models, cfg.data.train, cfg.data.train_split, train=True)
    eval_data = load_split(cfg, models, cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else None
    models = precompute_references(cfg, models, sharder, [d for d in (train_data, eval_data) if d is not None])
    steps = total_steps(cfg, len(train_data))
    if steps < 1:
        raise ConfigError(
            f"config: {len(train_data)} training rows make no full batch of train.batch_size="
            f"{cfg.train.batch_size}; lower the batch size or add data."
        )
    return models, train_data, eval_data, steps


def _start_files(cfg: Config, out_dir, start: int) -> None:
    """The run folder's config.yaml; the records past the checkpoint resumed from are dropped (they are redone)."""
    paths.makedirs(out_dir)
    paths.write_text(out_dir / "config.yaml", dump_yaml(cfg))
    for name in ("metrics.jsonl", "samples.jsonl", "online_samples.jsonl"):
        M.truncate_after(out_dir / name, start)


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg`; resumes from `output_dir/checkpoints` when present. Returns the final eval metrics
    (empty when the run stopped early on SIGTERM or had no eval set)."""
    distributed.initialize(cfg.distributed)  # before anything touches a device
    paths.check_urls(config_urls(cfg), written=WRITTEN)  # a bad gs:// URL fails here, before anything is written
    out_dir = paths.path(cfg.output_dir)
    is_main = jax.process_index() == 0
    sharder = make_sharder(cfg)
    models = build_models(cfg, sharder)
    if cfg.online.enabled:  # the training data is sampled: a prompt set and a reward instead of data.train
        (prompts, reward), train_data = online.load_online(cfg, models, sharder), None
        eval_data = load_split(cfg, models, cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else None
        steps = online.online_steps(cfg, len(prompts))
    else:
        models, train_data, eval_data, steps = _data(cfg, models, sharder)
    fingerprint = prompts.fingerprint if train_data is None else train_data.fingerprint
    mngr = ckpt.manager(out_dir, cfg)
    with _store_guard(cfg, mngr):  # a gs:// output_dir that stops answering ends the run in one line
        start, horizon = _resume_point(mngr, cfg, steps, fingerprint)
        run, state = setup_train(cfg, models, sharder, steps=steps, horizon=horizon)
        run = online.with_round_reference(run)  # iterative previous_round: the reference moves (and is checkpointed)
        if start:
            start, tree = ckpt.newest_readable(mngr, lambda step: ckpt.restore(mngr, step, run.checkpoint_tree(state)))
            run, state = run.from_checkpoint_tree(tree, start)
            log.info("resumed from %s at step %d", ckpt.checkpoint_dir(cfg.output_dir), start)
        if is_main:
            _start_files(cfg, out_dir, start)
        writer = tracking.Trackers(M.MetricsWriter(out_dir / "metrics.jsonl", enabled=is_main), cfg, out_dir, is_main,
                                   start=start)
        profiler = tracking.Profiler(cfg, out_dir / "profile", enabled=is_main)
        source = (online.OnlineSource(cfg, online.plan(cfg, run, prompts, reward), out_dir) if train_data is None
                  else None)
        what = (f"{len(train_data)} prompts x {train_data.num_responses} responses" if source is None
                else online.describe(cfg, source.plan))
        log.info("training %s: %s, %d steps of %d prompts (%d micro-batches), mesh %s, from step %d",
                 cfg.model.name_or_path, what, run.total_steps, cfg.train.batch_size, cfg.grad_accum_steps,
                 dict(sharder.mesh.shape), start)
        best = ckpt.best_manager(out_dir, cfg) if cfg.checkpoint.best_metric else None
        savers = Savers(mngr, best, run, writer, fingerprint)
        samples = make_samples(cfg, models, eval_data, out_dir)
        store_failed = False
        try:
            with Preemption() as preemption:
                hooks = make_hooks(run, savers, writer, eval_data, samples, preemption, profiler)
                if train_data is None:
                    end = run_online(run, source, state, run.models.ref_params, hooks, start)
                else:
                    end = run_loop(run, state, run.models.ref_params, hooks, train_data, start)
            final = {} if end.stopped_at is not None else _final_eval(run, end, savers, writer, eval_data, samples)
        except Exception as e:
            store_failed = paths.store_failure(e, cfg.output_dir) is not None
            raise
        finally:  # an error (e.g. divergence) still completes the saves already under way; a failed store cannot
            profiler.stop()
            if not store_failed:
                writer.close()
                mngr.wait_until_finished()
                if best is not None:
                    best.wait_until_finished()
        if end.stopped_at is not None:
            print(
                f"dpojax train: stopped by SIGTERM at step {end.stopped_at}; checkpoint saved in "
                f"{ckpt.checkpoint_dir(out_dir)}. Resume with the same command: dpojax train <config> "
                f"output_dir={out_dir}"
            )
            return {}
        return _finish(run, end.state, out_dir, final, samples)


@contextlib.contextmanager
def _store_guard(cfg: Config, mngr):
    """Around the part of a run that writes to output_dir: when it is on object storage that stops answering, the
    run ends with one line naming the URL, the error and the newest complete checkpoint: an error from a write
    (after the clients' retries) is raised as a StorageError; a store that has not answered for
    `checkpoint.storage_timeout` seconds, wherever the run waits for it (`paths.StoreWatch`), ends the process."""
    def down(words: str) -> None:
        _exit_now(f"dpojax train: error: {ckpt.store_down(words, cfg.output_dir, ckpt.newest_saved(mngr))}", 2)

    with paths.StoreWatch(cfg.output_dir, cfg.checkpoint.storage_timeout, down):
        try:
            yield
        except Exception as e:
            words = paths.store_failure(e, cfg.output_dir)
            if words is None:
                raise
            log.debug("the store failed", exc_info=True)
            raise StorageError(ckpt.store_down(words, cfg.output_dir, ckpt.newest_saved(mngr))) from None


def _exit_now(line: str, code: int) -> None:
    """Print `line` and end the process at once, from any thread: the storage clients' threads, still retrying
    writes to a store that is gone, would hold a normal exit for many minutes."""
    _close_bars()
    print(line, file=sys.stderr, flush=True)
    if sys.__stderr__ is not sys.stderr:  # a supervised worker: its log file too
        print(line, file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _close_bars() -> None:
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _final_eval(run: Run, end: LoopEnd, savers: Savers, writer, eval_data, samples) -> dict[str, float]:
    """The eval after the last step (which competes for best/ too); {} without an eval set."""
    if eval_data is None:
        return {}
    final = run_eval(run, end.state.params, eval_data, end.ref_params)
    if samples is not None:
        samples(run.total_steps, end.state.params)
    writer.write(run.total_steps, "eval", final)
    savers.save_best(run.total_steps, end.state, final, end.ref_params)
    return final


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
