"""Orbax checkpoints of the train state (params, optimizer state, step) plus JSON metadata.

`output_dir/checkpoints/<step>/` holds `state/` (the TrainState pytree) and `meta/` (resolved config, data
position, versions). Orbax writes each step to a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoint usable; `latest_step` only sees complete ones. The data position is
the step itself: batches are a pure function of (seed, step). The reference model is re-loaded, not saved.
All processes must call save/restore (Orbax coordinates them); only the metadata is host-independent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dpojax.config import Config, to_dict

# Keys whose change makes a resumed run differ from an uninterrupted one.
RESUME_CRITICAL = (
    ("model", "name_or_path"),
    ("model", "init"),
    ("model", "seed"),
    ("model", "param_dtype"),
    ("ref_model", "name_or_path"),
    ("data", "train"),
    ("data", "train_split"),
    ("data", "max_length"),
    ("data", "truncation_mode"),
    ("data", "pairs_from_scores"),
    ("train", "batch_size"),
    ("train", "seed"),
    ("optim", "name"),
)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir).absolute() / "checkpoints"


def manager(output_dir: str | Path, cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep,
        enable_async_checkpointing=cfg.checkpoint.async_,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
    )
    return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options)


def best_manager(output_dir: str | Path, cfg: Config) -> ocp.CheckpointManager:
    """Keeps the single best checkpoint by the eval metric `checkpoint.best_metric` in output_dir/best."""
    name, mode = cfg.checkpoint.best_metric, cfg.checkpoint.best_mode
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda metrics: float(metrics[name]),
        best_mode=mode,
        enable_async_checkpointing=cfg.checkpoint.async_,
        create=True,
    )
    return ocp.CheckpointManager(Path(output_dir).absolute() / "best", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, cfg: Config, metrics: dict | None = None) -> None:
    meta = {"step": int(step), "data_step": int(step), "config": to_dict(cfg)}
    if metrics is not None:
        meta["eval"] = {k: float(v) for k, v in metrics.items()}
    mngr.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf is finite (one small reduction per leaf, gathered once)."""
    import jax.numpy as jnp

    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    flags = jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves)
    return bool(flags)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: restore places each shard directly."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    out = mngr.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()),
    )
    return out.state, out.meta


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def resume_conflicts(saved: dict, cfg: Config) -> list[str]:
    """Config keys that changed since the checkpoint in a way that would make resume unsound."""
    now = to_dict(cfg)
    out = []
    for section, key in RESUME_CRITICAL:
        before = saved.get(section, {}).get(key)
        after = now.get(section, {}).get(key)
        if before != after:
            out.append(f"{section}.{key}: {before!r} -> {after!r}")
    return out


@dataclasses.dataclass
class Found:
    step: int
    path: Path


def find_checkpoint(source: str | Path) -> Found | None:
    """A run folder (newest complete checkpoint) or one checkpoint folder `.../checkpoints/<step>`."""
    source = Path(source).absolute()
    if (source / "state").is_dir() and source.name.isdigit():
        return Found(int(source.name), source)
    root = source / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    return Found(steps[-1], root / str(steps[-1])) if steps else None
