"""Orbax checkpoints of the train state (params, optimizer state, step) plus JSON metadata.

`output_dir/checkpoints/<step>/` (a local folder, or on object storage: Orbax writes `gs://` natively) holds
`params/` (the policy), `opt_state/` (the optimizer), `ref/` (the reference, only when TR-DPO changes it) and
`meta/` (step = data position, resolved config, the learning-rate schedule's horizon), each an Orbax item, so
`dpojax eval` and `dpojax export` restore the parameters alone. Orbax writes each step to a temporary folder and
renames it when complete (on GCS, which has no rename, it writes `commit_success.txt` last), so a crash mid-save
leaves the previous checkpoint usable; `latest_step` and `find_checkpoint` only see complete ones. The data
position is the step itself: batches are a pure function of (seed, step). The reference model is re-loaded, not
saved. All processes must call save/restore (Orbax coordinates them: each writes its own shards); only the
metadata is host-independent.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from dpojax import paths
from dpojax.config import Config, to_dict

log = logging.getLogger("dpojax")

# Keys that may change when a run resumes: they change how it runs (speed, memory, mesh, logging, saving), not the
# numbers it computes. Every other key must match the checkpoint's config. (`train.steps`/`epochs`: see
# `schedule_conflict`.)
RESUME_FREE = (
    "train.steps", "train.epochs", "train.log_every", "train.eval_every", "train.eval_batch_size",
    "train.micro_batch_size", "train.max_bad_steps", "data.eval", "data.eval_split", "data.cache_dir",
    "model.attention", "model.remat", "model.scan_layers", "model.vocab_tile", "ref_model.precompute", "mesh.",
    "data.packing", "checkpoint.", "distributed.", "output_dir", "train.report_to", "train.wandb.", "train.profile.",
    "train.compilation_cache",
)


def checkpoint_dir(output_dir: str | os.PathLike) -> epath.Path:
    return paths.absolute(output_dir) / "checkpoints"


def manager(output_dir: str | os.PathLike, cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep,
        enable_async_checkpointing=cfg.checkpoint.async_,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
    )
    return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options)


def best_manager(output_dir: str | os.PathLike, cfg: Config) -> ocp.CheckpointManager:
    """Keeps the single best checkpoint by the eval metric `checkpoint.best_metric` in output_dir/best."""
    name, mode = cfg.checkpoint.best_metric, cfg.checkpoint.best_mode
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        # an eval that lacks the metric (no row fed it) ranks last
        best_fn=lambda metrics: float(metrics.get(name, -math.inf if mode == "max" else math.inf)),
        best_mode=mode,
        enable_async_checkpointing=cfg.checkpoint.async_,
        create=True,
    )
    return ocp.CheckpointManager(paths.absolute(output_dir) / "best", options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree: dict[str, Any], cfg: Config, *, horizon: int,
         metrics: dict | None = None, data_fingerprint: str = "") -> None:
    """Save the items of `tree` ({"params", "opt_state"[, "ref"]}) and the metadata as checkpoint `step`."""
    meta = {"step": int(step), "data_step": int(step), "schedule_horizon": int(horizon), "config": to_dict(cfg)}
    if data_fingerprint:
        meta["data_fingerprint"] = data_fingerprint
    if metrics is not None:
        meta["eval"] = {k: float(v) for k, v in metrics.items()}
    items = {name: ocp.args.StandardSave(value) for name, value in tree.items()}
    mngr.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), metrics=metrics, force=True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf is finite (one small reduction per leaf, gathered once)."""
    import jax.numpy as jnp

    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """One jitted function, so each save after the first reuses its compiled reduction."""
    import jax.numpy as jnp

    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: restore places each shard directly."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, targets: dict[str, Any]) -> dict[str, Any]:
    """Restore only the items named in `targets` (e.g. {"params": abstract_params}), each into its target's
    shardings; the other items are not read."""
    items = {name: ocp.args.StandardRestore(abstract_like(t)) for name, t in targets.items()}
    out = mngr.restore(int(step), args=ocp.args.Composite(**items))
    return {name: out[name] for name in targets}


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


# What reading a damaged checkpoint raises: a file missing (OSError, Orbax's ValueError/KeyError), a truncated array
# chunk or JSON file (TensorStore's ValueError, json's ValueError), also as the cause of Orbax's bare Exception.
DAMAGED = (OSError, ValueError, KeyError)


def _damaged(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, DAMAGED):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def newest_readable(mngr: ocp.CheckpointManager, read: Callable[[int], Any]) -> tuple[int, Any] | None:
    """(step, read(step)) for the newest checkpoint that `read` reads whole, or None when there is none; each newer
    one that fails with a damaged file is set aside (`set_aside`) and said so in one line. When every checkpoint
    fails, the first error is raised: more likely a bug than damage everywhere, so none is set aside."""
    steps, failed = sorted(mngr.all_steps(), reverse=True), []
    for step in steps:
        try:
            found = step, read(step)
        except Exception as e:  # noqa: BLE001 - Orbax wraps a read error in a bare Exception; others re-raised
            if not _damaged(e):
                raise
            failed.append((step, e))
            continue
        for bad, e in failed:
            aside = set_aside(mngr, bad)
            log.warning("checkpoint %d is damaged (%s: %s); moved to %s, resuming from step %d instead",
                        bad, type(e).__name__, str(e).splitlines()[0][:300], aside, step)
        return found
    if failed:
        raise failed[0][1]
    return None


def set_aside(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
    """Move checkpoint `step` to checkpoints/damaged-<step> (process 0; every process waits for it), out of the
    manager's sight: the resumed run writes that step again."""
    src, dst = mngr.directory / str(step), mngr.directory / f"damaged-{step}"
    if jax.process_index() == 0:
        if dst.exists():
            dst.rmtree()
        src.rename(dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # only with several processes

        multihost_utils.sync_global_devices(f"dpojax-damaged-{step}")
    mngr.reload()
    return dst


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_conflicts(saved: dict, cfg: Config) -> list[str]:
    """Config keys that changed since the checkpoint in a way that would make the resumed run a different run.
    A key the checkpoint's config lacks (added to dpojax after it was written) counts as its default value."""
    before, after = {**_flat(to_dict(Config())), **_flat(saved)}, _flat(to_dict(cfg))
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed
            if not any(key == free or (free.endswith(".") and key.startswith(free)) for free in RESUME_FREE)]


def data_conflict(saved: dict, cfg: Config, fingerprint: str) -> str | None:
    """Why the train data (an online run: its prompt set) differs from the checkpoint's (its rows, their tokens), or
    None. A checkpoint saved before fingerprints were recorded has none to compare."""
    before = saved.get("data_fingerprint")
    if not before or not fingerprint or before == fingerprint:
        return None
    what = (f"the prompt set {cfg.online.prompts!r} (split {cfg.online.prompts_split!r})" if cfg.online.enabled
            else f"the train data {cfg.data.train!r} (split {cfg.data.train_split!r})")
    return (f"{what} is not the data it was trained on: "
            f"its rows or their tokens changed (fingerprint {before[:12]} -> {fingerprint[:12]}), so the batches after "
            "the checkpoint would not be the run's. Restore the original file, or start a new run (a new output_dir)")


def schedule_conflict(cfg: Config, horizon: int, total_steps: int) -> str | None:
    """Why a resumed run with `total_steps` steps cannot keep the schedule fixed at the run's first horizon, or None.

    The learning-rate schedule keeps the horizon of the run's first config: lowering train.steps stops early on
    the same schedule, and a constant schedule continues at any length; raising it past the horizon of a decaying
    schedule would change every later learning rate, so it is refused."""
    if total_steps <= horizon or cfg.optim.schedule == "constant":
        return None
    return (f"optim.schedule={cfg.optim.schedule!r} decays over the {horizon} steps this run started with; "
            f"continuing to {total_steps} steps would change every later learning rate. Start a new run "
            "(a new output_dir), or use optim.schedule=constant")


@dataclasses.dataclass
class Found:
    step: int
    path: epath.Path


def _complete(step_dir: epath.Path) -> bool:
    return step_dir.name.isdigit() and (step_dir / "params").is_dir() and ocp.utils.is_checkpoint_finalized(step_dir)


def find_checkpoint(source: str | os.PathLike) -> Found | None:
    """A run folder (newest complete checkpoint) or one checkpoint folder `.../checkpoints/<step>`."""
    source = paths.absolute(source)
    if _complete(source):
        return Found(int(source.name), source)
    root = source / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(int(p.name) for p in root.iterdir() if _complete(p))
    return Found(steps[-1], root / str(steps[-1])) if steps else None


def store_down(words: str, output_dir: str | os.PathLike, known: int | None = None) -> str:
    """The message of a run stopped by its object store (`words`: `paths.store_failure`'s or `paths.StoreWatch`'s)."""
    return (f"{words}. Nothing past the newest complete checkpoint is kept: {describe_newest(output_dir, known)}. "
            "Run the same command again once the store answers: it resumes from that checkpoint.")


def newest_saved(mngr: ocp.CheckpointManager) -> int | None:
    """The newest step `mngr` knows complete, read from its own record (not the storage: for a message about a
    store that does not answer): its steps, less the newest while that one's save is under way."""
    steps = sorted(mngr.all_steps())
    if steps and mngr.is_saving_in_progress():
        steps = steps[:-1]
    return steps[-1] if steps else None


def describe_newest(source: str | os.PathLike, known: int | None = None) -> str:
    """The newest complete checkpoint of a run folder, in words (for a message about a run that stopped). When
    the folder is on an object store that does not answer, the `known` step (`newest_saved`) instead."""
    if paths.is_remote(source) and paths.probe(source) is not None:  # a listing would read as "no checkpoint"
        if known is None:
            return "unknown now (the store does not answer)"
        return (f"step {known} ({checkpoint_dir(source) / str(known)}), the newest this run saved or found (the "
                "store does not answer)")
    try:
        found = find_checkpoint(source)
    except Exception as e:  # noqa: BLE001 - a report of the last resort: say why it is unknown
        return f"unknown ({type(e).__name__}: {e})"
    return "none yet (the run starts over)" if found is None else f"step {found.step} ({found.path})"
