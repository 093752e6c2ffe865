"""HF tensor layouts, shared by full checkpoints (`hf`) and PEFT adapters (`lora`): the transforms between our
parameter layout and HF's, the fuse rules that join several of our params into one HF tensor (named by each
family's weight table, `dpojax.models.families`), and gathering a parameter to host numpy.
Glossary: `dpojax.glossary` (H: here any heads axis, query heads H or kv heads G)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpojax.models.config import ModelConfig

# ---- transforms: (HF array, our shape) -> ours, and ours -> HF -----------------------------------------
# HF nn.Linear weights are [out, in]; ours are [in..., out...] with heads split out of the flat dims.
ToOurs = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
ToHF = Callable[[np.ndarray], np.ndarray]
TRANSFORMS: dict[str, tuple[ToOurs, ToHF]] = {
    "identity": (lambda x, shape: x, lambda x: x),
    "transpose": (lambda x, shape: x.T, lambda x: x.T),  # [out, in] <-> [in, out]
    "split_out_heads": (  # [H*Dh, D] <-> [D, H, Dh]   (q/k/v)
        lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T),
    "split_in_heads": (  # [D, H*Dh] <-> [H, Dh, D]    (o)
        lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T),
    "split_heads": (lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1)),  # [H*Dh] <-> [H, Dh]
    "flat_out_heads": (  # [D, H*Dh] <-> [D, H, Dh]   (Conv1D q/k/v: GPT-2)
        lambda x, shape: x.reshape(shape), lambda x: x.reshape(x.shape[0], -1)),
    "flat_in_heads": (  # [H*Dh, D] <-> [H, Dh, D]    (Conv1D o: GPT-2)
        lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1, x.shape[-1])),
}


# ---- fuse rules: several of our params (each in its HF piece layout) <-> one HF tensor ---------------------
def fuse(rule: str, pieces: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """One HF tensor from our pieces (each in its HF piece layout), joined by the family's fuse `rule`."""
    if rule == "cat_first":
        return np.concatenate(pieces, axis=0)
    if rule == "cat_last":
        return np.concatenate(pieces, axis=-1)
    if rule == "interleave_last":  # column c of piece j -> column c * n + j (gpt-oss gate_up_proj: gate, up, ...)
        return np.stack(pieces, axis=-1).reshape(*pieces[0].shape[:-1], -1)
    if rule == "per_head":  # [H*Dh, ...] pieces -> [H, (piece 0, piece 1, ...), Dh, ...] rows
        H = cfg.num_heads
        heads = [p.reshape(H, -1, *p.shape[1:]) for p in pieces]
        return np.concatenate(heads, axis=1).reshape(-1, *pieces[0].shape[1:])
    raise ValueError(f"unknown fuse rule {rule!r}")


def fused_shape(rule: str, piece_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape `fuse(rule, pieces)` returns, computed without building it (expert tensors are large): every rule
    joins its pieces along the first axis (cat_first, per_head) or the last (cat_last, interleave_last)."""
    if rule not in ("cat_first", "per_head", "cat_last", "interleave_last"):
        raise ValueError(f"unknown fuse rule {rule!r}")
    axis = 0 if rule in ("cat_first", "per_head") else len(piece_shapes[0]) - 1
    joined = sum(shape[axis] for shape in piece_shapes)
    return tuple(joined if a == axis else n for a, n in enumerate(piece_shapes[0]))


def unfuse(rule: str, x: np.ndarray, piece_shapes: list[tuple[int, ...]], cfg: ModelConfig) -> list[np.ndarray]:
    """The pieces (of `piece_shapes`, HF piece layout) of a fused HF tensor `x`: the inverse of `fuse`."""
    if rule in ("cat_first", "cat_last"):
        axis = 0 if rule == "cat_first" else x.ndim - 1
        bounds = np.cumsum([s[axis] for s in piece_shapes])[:-1]
        return np.split(x, bounds, axis=axis)
    if rule == "interleave_last":
        return [x[..., j::len(piece_shapes)] for j in range(len(piece_shapes))]
    if rule == "per_head":
        H = cfg.num_heads
        heads = x.reshape(H, -1, *x.shape[1:])
        bounds = np.cumsum([s[0] // H for s in piece_shapes])[:-1]
        return [p.reshape(-1, *x.shape[1:]) for p in np.split(heads, bounds, axis=1)]
    raise ValueError(f"unknown fuse rule {rule!r}")


def to_host(x: jax.Array) -> np.ndarray:
    """`x` as one host numpy array (gathered from every process when it spans several)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
