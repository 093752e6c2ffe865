"""The key/value cache of incremental decoding, and attention that reads and writes it.

A batch of B prompts is LEFT-padded into one cache of Z slots per layer: row b's real tokens start at slot
`start_B[b]` (its padding before that is never attended to), and every row writes its next token at the same
slot `index`, so one `dynamic_update_slice` serves the batch. A row's RoPE/learned positions count its real
tokens only (slot - start), as transformers' `generate` does with left padding; the distance between two
slots equals the distance between their positions, so sliding windows (q - k < window) apply to slots.

Two calls, told apart by the static number of new tokens T:
  prefill  (T > 1)  tokens fill slots [0, T) of an empty cache; attention among them is the training path's
                    `attend` (any implementation: splash/cudnn/xla), with segment ids 1 for real, 0 for padding.
  step     (T = 1)  one token per row at slot `index`; it attends to slots [start, index] (within the window).

Shapes (glossary letters): k/v per layer [B, Z, G, Dh]; stacked over layers [L, B, Z, G, Dh]. Logical axes
("layers", "batch", "length", "kv_heads", "head_dim"), so the cache is sharded by the same rules table as the
activations (batch over data/fsdp, kv heads over tensor).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpojax.models.attention import attend, softmax_with_sink
from dpojax.sharding import Sharder, constrain

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # one layer's k or v; stacked: ("layers", *CACHE_AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v [L, B, Z, G, Dh]; start_B int32 [B] (first real slot of each row); index int32 [] (the slot the
    next single-token step writes)."""

    k_LxBxZxGxDh: jax.Array
    v_LxBxZxGxDh: jax.Array
    start_B: jax.Array
    index: jax.Array

    @property
    def slots(self) -> int:
        return self.k_LxBxZxGxDh.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's slice of a KVCache (what a block sees inside the scan over layers)."""

    k_BxZxGxDh: jax.Array
    v_BxZxGxDh: jax.Array
    start_B: jax.Array
    index: jax.Array


def empty_cache(num_layers: int, batch: int, slots: int, num_kv_heads: int, head_dim: int, start_B: jax.Array,
                dtype, sharder: Sharder | None = None) -> KVCache:
    """Zeros [L, B, Z, G, Dh] for k and v, sharded by the logical rules; index 0."""
    shape = (num_layers, batch, slots, num_kv_heads, head_dim)
    zeros = constrain(jnp.zeros(shape, dtype), sharder, ("layers", *CACHE_AXES))
    return KVCache(zeros, zeros, jnp.asarray(start_B, jnp.int32), jnp.zeros((), jnp.int32))


def attend_cached(q_BxTxHxDh: jax.Array, k_BxTxGxDh: jax.Array, v_BxTxGxDh: jax.Array, cache: LayerCache, *,
                  implementation: str, scale: float, softcap: float | None, window: jax.Array | None,
                  sharder: Sharder | None, sinks_H: jax.Array | None = None) -> tuple[jax.Array, LayerCache]:
    """Writes the new k/v into the cache and attends (prefill for T > 1, one step for T = 1; module docstring).
    `sinks_H`: attention sinks (`dpojax.models.attention`). Returns out [B, T, H, Dh] and the updated cache."""
    T = q_BxTxHxDh.shape[1]
    if T > 1:  # prefill from slot 0: the training path's attention over the new tokens alone
        segment_ids_BxT = (jnp.arange(T)[None, :] >= cache.start_B[:, None]).astype(jnp.int32)
        out_BxTxHxDh = attend(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, implementation=implementation,
                              scale=scale, softcap=softcap, window=window, sharder=sharder, sinks_H=sinks_H)
        index = jnp.zeros((), jnp.int32)
    else:
        out_BxTxHxDh = None
        index = cache.index
    k_BxZxGxDh = constrain(jax.lax.dynamic_update_slice_in_dim(
        cache.k_BxZxGxDh, k_BxTxGxDh.astype(cache.k_BxZxGxDh.dtype), index, axis=1), sharder, CACHE_AXES)
    v_BxZxGxDh = constrain(jax.lax.dynamic_update_slice_in_dim(
        cache.v_BxZxGxDh, v_BxTxGxDh.astype(cache.v_BxZxGxDh.dtype), index, axis=1), sharder, CACHE_AXES)
    new = LayerCache(k_BxZxGxDh, v_BxZxGxDh, cache.start_B, cache.index)
    if out_BxTxHxDh is None:
        out_BxTxHxDh = _attend_one(q_BxTxHxDh, new, scale=scale, softcap=softcap, window=window, sinks_H=sinks_H)
    return out_BxTxHxDh, new


def _attend_one(q_Bx1xHxDh: jax.Array, cache: LayerCache, *, scale: float, softcap: float | None,
                window: jax.Array | None, sinks_H: jax.Array | None = None) -> jax.Array:
    """One query per row (at slot cache.index) against the cache's slots [start, index]; scores in fp32."""
    B, _, H, Dh = q_Bx1xHxDh.shape
    Z, G = cache.k_BxZxGxDh.shape[1], cache.k_BxZxGxDh.shape[2]
    q_BxGxRxDh = q_Bx1xHxDh.reshape(B, G, H // G, Dh)
    scores_BxGxRxZ = jnp.einsum("bgrd,bzgd->bgrz", q_BxGxRxDh, cache.k_BxZxGxDh.astype(q_Bx1xHxDh.dtype),
                                preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores_BxGxRxZ = jnp.tanh(scores_BxGxRxZ / softcap) * softcap
    slot_Z = jnp.arange(Z)
    allowed_BxZ = (slot_Z[None, :] >= cache.start_B[:, None]) & (slot_Z[None, :] <= cache.index)
    if window is not None:
        allowed_BxZ = allowed_BxZ & (cache.index - slot_Z[None, :] < window)
    scores_BxGxRxZ = jnp.where(allowed_BxZ[:, None, None, :], scores_BxGxRxZ, jnp.finfo(jnp.float32).min)
    sink_1xGxRx1 = None if sinks_H is None else sinks_H.astype(jnp.float32).reshape(1, G, H // G, 1)
    probs_BxGxRxZ = softmax_with_sink(scores_BxGxRxZ, sink_1xGxRx1).astype(q_Bx1xHxDh.dtype)
    out_BxGxRxDh = jnp.einsum("bgrz,bzgd->bgrd", probs_BxGxRxZ, cache.v_BxZxGxDh.astype(q_Bx1xHxDh.dtype))
    return out_BxGxRxDh.reshape(B, 1, H, Dh)
