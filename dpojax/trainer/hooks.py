"""The train loop's periodic actions, as hooks: an eval (with the best checkpoint and samples), a checkpoint, a stop
on SIGTERM, each due at the steps its interval divides (or when its condition holds), run at the end of a dispatch
in the order given; and the profiler's trace, around the dispatches of the steps it covers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dpojax import metrics as M
from dpojax import tracking
from dpojax.errors import NumericsError
from dpojax.trainer import checkpoint as ckpt
from dpojax.trainer.build import Run
from dpojax.trainer.evaluation import run_eval
from dpojax.trainer.preemption import Preemption
from dpojax.trainer.samples import Samples
from dpojax.trainer.step import TrainState


@dataclasses.dataclass(frozen=True)
class Savers:
    latest: Any  # CheckpointManager of the most recent checkpoints
    best: Any  # CheckpointManager of the best one by checkpoint.best_metric, or None
    run: Run
    writer: M.MetricsWriter  # flushed at each checkpoint: metrics.jsonl holds every record up to it
    data_fingerprint: str = ""  # of the train data (rows, tokenizer, lengths): a resume on other rows is refused

    def save(self, step: int, state: TrainState, ref_params) -> None:
        if self.latest.latest_step() == step:
            return
        if not ckpt.all_finite(state.params):
            raise NumericsError(f"refusing to save a checkpoint at step {step}: the parameters are not finite.")
        self.writer.flush()
        ckpt.save(self.latest, step, self.run.checkpoint_tree(state, ref_params), self.run.cfg,
                  horizon=self.run.horizon, data_fingerprint=self.data_fingerprint)

    def save_best(self, step: int, state: TrainState, metrics: dict[str, float], ref_params) -> None:
        if self.best is None or step in self.best.all_steps():  # e.g. the final eval of a finished run, again
            return
        if ckpt.all_finite(state.params):
            ckpt.save(self.best, step, self.run.checkpoint_tree(state, ref_params), self.run.cfg,
                      horizon=self.run.horizon, metrics=metrics, data_fingerprint=self.data_fingerprint)


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(step, state, ref_params)` at the end of a dispatch whose last step `every` divides (0: never), or where
    `when(step)` holds (asked at every dispatch's end but the run's last); at the run's last step only with
    `at_last`. `fn` returns True to stop the run there. `pauses_clock`: its time is left out of the throughput."""

    name: str
    fn: Callable[[int, TrainState, Any], bool | None]
    every: int = 0
    when: Callable[[int], bool] | None = None
    at_last: bool = False
    pauses_clock: bool = False

    def due(self, step: int, last: bool) -> bool:
        if last:
            return self.at_last
        if self.when is not None:
            return self.when(step)
        return bool(self.every) and step % self.every == 0


@dataclasses.dataclass(frozen=True)
class Profile:
    """The profiler's trace (train.profile), started before and stopped after the dispatches of its steps."""

    profiler: tracking.Profiler

    def before(self, first: int, last: int) -> None:
        if self.profiler.first is not None:
            for step in range(first, last + 1):
                self.profiler.before_step(step)

    def after(self, first: int, last: int, out) -> None:
        if self.profiler.first is not None:
            for step in range(first, last + 1):
                self.profiler.after_step(step, out)


@dataclasses.dataclass(frozen=True)
class Hooks:
    periodic: tuple[Hook, ...]  # in the order they run at a step where several are due
    profile: Profile
    writer: Any  # where the loop writes its train records (`metrics.MetricsWriter`, `tracking.Trackers`)

    def due(self, step: int, last: bool) -> list[Hook]:
        """The hooks due after `step` (each asked once: a `when` condition may have effects)."""
        return [hook for hook in self.periodic if hook.due(step, last)]


def make_hooks(run: Run, savers: Savers, writer, eval_data, samples: Samples | None, preemption: Preemption,
               profiler: tracking.Profiler) -> Hooks:
    """The train loop's hooks: eval (train.eval_every, with an eval set), samples (at each eval), checkpoint
    (checkpoint.every, and the last step), stop on SIGTERM (saving first), and the profiler."""
    cfg = run.cfg
    eval_every = cfg.train.eval_every if eval_data is not None else 0

    def evaluate(step: int, state: TrainState, ref_params) -> None:
        result = run_eval(run, state.params, eval_data, ref_params)
        writer.write(step, "eval", result)
        savers.save_best(step, state, result, ref_params)

    def stop(step: int, state: TrainState, ref_params) -> bool:
        savers.save(step, state, ref_params)
        return True

    hooks = [Hook("eval", evaluate, every=eval_every, pauses_clock=True)]
    if samples is not None:
        hooks.append(Hook("samples", lambda step, state, _: samples(step, state.params), every=eval_every,
                          pauses_clock=True))
    hooks += [Hook("save", savers.save, every=cfg.checkpoint.every, at_last=True),
              Hook("stop", stop, when=preemption.should_stop)]
    return Hooks(tuple(hooks), Profile(profiler), writer)
