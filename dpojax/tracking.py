"""Where a run reports besides metrics.jsonl: TensorBoard event files, Weights & Biases, and profiler traces.

- `train.report_to: [tensorboard, wandb]` (TRL's key): every record written to metrics.jsonl goes to the same
  trackers too, under `<split>/<metric name>` (e.g. `train/loss`, `eval/rewards/accuracies`) at the same step.
  TensorBoard: event files in output_dir/tensorboard/ (`tensorboard --logdir OUTPUT_DIR/tensorboard`), written
  with tensorboard's own event writer (no TensorFlow, no torch); on gs:// uploaded at each checkpoint and at the
  end. W&B: `train.wandb.{project, name, mode}`; mode auto is online when an API key is known (WANDB_API_KEY or a
  `wandb login`) and offline otherwise (files under output_dir/wandb/, `wandb sync` uploads them later). Only
  process 0 writes. `pip install 'dpojax[tracking]'`.
- `train.profile: {start_step, steps}`: a JAX profiler trace of those optimizer steps in output_dir/profile/
  (process 0; on gs:// uploaded when the trace ends): `tensorboard --logdir OUTPUT_DIR/profile` with
  tensorboard-plugin-profile, or the `plugins/profile/*/*.trace.json.gz` file in https://ui.perfetto.dev.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

import jax

from dpojax import paths
from dpojax.config import Config, to_dict
from dpojax.errors import ConfigError

log = logging.getLogger("dpojax")


def _scalars(split: str, metrics: Mapping) -> dict[str, float]:
    return {f"{split}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or hasattr(v, "item")}


class TensorBoard:
    """Scalars to event files in `logdir`, with tensorboard's own writer. A run resumed at step `start` marks a
    restart there, so TensorBoard drops the previous session's records past it (the run redoes those steps).
    On object storage (no append: tensorboard's fsspec "append" would rewrite the object with the last event
    only) the events go to a local staging folder, uploaded whole at each `flush` (every checkpoint) and at
    `close`."""

    def __init__(self, logdir, start: int = 0):
        from tensorboard.compat.proto import event_pb2  # optional dependency, needed only with report_to tensorboard
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # as above

        self.logdir = logdir
        self.local = paths.staging_dir() if paths.is_remote(logdir) else None
        paths.makedirs(logdir)
        self.writer = EventFileWriter(os.fspath(self.local or logdir))
        if start:
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(start) + 1,  # keeps < start + 1
                                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def write(self, step: int, split: str, metrics: Mapping) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2  # optional dependency (report_to tensorboard)

        values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in _scalars(split, metrics).items()]
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary_pb2.Summary(value=values)))
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()
        if self.local is not None:
            paths.upload_tree(self.local, self.logdir)

    def close(self) -> None:
        self.writer.close()
        if self.local is not None:
            paths.upload_tree(self.local, self.logdir)
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None


def wandb_mode(mode: str) -> str:
    """auto -> WANDB_MODE if set, online when an API key is known (WANDB_API_KEY, ~/.netrc from `wandb login`),
    else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandB:
    """One W&B run per training process (process 0); records logged at their step."""

    def __init__(self, cfg: Config, out_dir):
        import wandb  # optional dependency, needed only with report_to wandb

        local = Path(os.fspath(out_dir))
        if paths.is_remote(out_dir):  # W&B writes its files locally
            local = paths.cache_root() / "wandb" / local.name
            log.info("W&B files of %s go to %s (output_dir is object storage)", out_dir, local)
        local.mkdir(parents=True, exist_ok=True)
        w = cfg.train.wandb
        self.run = wandb.init(project=w.project, name=w.name or local.name, dir=str(local), mode=wandb_mode(w.mode),
                              config=to_dict(cfg))

    def write(self, step: int, split: str, metrics: Mapping) -> None:
        self.run.log({k: v for k, v in _scalars(split, metrics).items() if math.isfinite(v)}, step=int(step))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """A metrics writer (metrics.jsonl) plus the trackers of `train.report_to`: `write` goes to all of them."""

    def __init__(self, writer, cfg: Config, out_dir, enabled: bool = True, start: int = 0):
        self.writer, self.trackers = writer, []
        if not enabled:
            return
        for name in cfg.train.report_to:
            try:
                self.trackers.append(TensorBoard(out_dir / "tensorboard", start) if name == "tensorboard"
                                     else WandB(cfg, out_dir))
            except ImportError:
                raise ConfigError(f"config: 'train.report_to' lists {name!r} but it is not installed; "
                                  f"pip install 'dpojax[tracking]' (or {name}).") from None

    def write(self, step: int, split: str, metrics: Mapping) -> None:
        self.writer.write(step, split, metrics)
        for tracker in self.trackers:
            tracker.write(step, split, metrics)

    def flush(self) -> None:
        """metrics.jsonl (and TensorBoard's events) durable up to here (the loop calls this at each checkpoint)."""
        self.writer.flush()
        for tracker in self.trackers:
            if hasattr(tracker, "flush"):
                tracker.flush()

    def close(self) -> None:
        self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class Profiler:
    """Traces optimizer steps start_step .. start_step + steps - 1 into `logdir` (process 0 only). On object storage
    the trace is written to a local staging folder and uploaded when it ends (JAX's own gs:// writer talks to
    storage.googleapis.com only)."""

    def __init__(self, cfg: Config, logdir, enabled: bool = True):
        p = cfg.train.profile
        self.logdir, self.active, self.local = logdir, False, None
        self.first = p.start_step if enabled else None
        self.last = None if self.first is None else self.first + p.steps - 1

    def before_step(self, step: int) -> None:
        if step == self.first:
            self.local = paths.staging_dir() if paths.is_remote(self.logdir) else None
            paths.makedirs(self.local or self.logdir)
            jax.profiler.start_trace(os.fspath(self.local or self.logdir), create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, out) -> None:
        if self.active and step >= self.last:
            self.stop(out)

    def stop(self, out=None) -> None:
        """End the trace (waiting for `out`, the last traced step's result, so its device work is in it)."""
        if self.active:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
            self.active = False
            if self.local is not None:
                paths.upload_tree(self.local, self.logdir)
                shutil.rmtree(self.local, ignore_errors=True)
                self.local = None
