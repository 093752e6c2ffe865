"""Attention kernels behind one signature, chosen by name: "xla" | "cudnn" | "splash" | "auto".

`attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, implementation=...) -> out_BxTxHxDh`.
Masking is always: causal (by index) AND only between equal segment ids. Segment id 0 marks padding;
padding tokens attend among themselves (never to real tokens, and real tokens never to them), so no
row is fully masked and no NaN can appear. This covers right padding now and packing later.

- "xla": einsum, scores and softmax in fp32; the reference implementation, runs everywhere.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; bf16/fp16 only); the segment
  mask is passed as a boolean mask (materialized [B, 1, T, T]; fine for padding, a packing-aware
  offsets layout is a later optimization).
- "splash": Pallas splash attention on TPU: not implemented yet (raises NotImplementedError).
- "auto": cudnn on GPU when the dtype and head_dim allow it, else xla (splash on TPU once implemented).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def resolve_attention(name: str, *, dtype, head_dim: int, backend: str | None = None) -> str:
    """The concrete implementation for `name` on `backend` (default: jax.default_backend())."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    cudnn_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 256
    if backend in ("gpu", "cuda") and cudnn_ok:
        return "cudnn"
    return "xla"


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """Boolean [B, 1, T, T] (query, key): causal and same segment."""
    T = segment_ids_BxT.shape[1]
    causal_TxT = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (same_BxTxT & causal_TxT[None])[:, None]


def attend_xla(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
               segment_ids_BxT: jax.Array, *, scale: float) -> jax.Array:
    B, T, H, Dh = q_BxTxHxDh.shape
    K = k_BxTxKxDh.shape[2]
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxTxKxDh,
                                  preferred_element_type=jnp.float32) * scale
    mask_Bx1x1xTxS = segment_mask(segment_ids_BxT)[:, :, None]
    scores_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxTxKxDh.dtype)
    out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxTxKxDh)
    return out_BxTxKxGxDh.reshape(B, T, H, Dh)


def attend_cudnn(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
                 segment_ids_BxT: jax.Array, *, scale: float) -> jax.Array:
    return jax.nn.dot_product_attention(
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=segment_mask(segment_ids_BxT), scale=scale,
        is_causal=True, implementation="cudnn",
    )


def attend(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array, segment_ids_BxT: jax.Array,
           *, implementation: str, scale: float) -> jax.Array:
    """Causal, segment-masked attention with GQA (H a multiple of K); returns [B, T, H, Dh] in q's dtype."""
    if implementation == "xla":
        return attend_xla(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, scale=scale)
    if implementation == "cudnn":
        return attend_cudnn(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, scale=scale)
    if implementation == "splash":
        raise NotImplementedError(
            "attention='splash' (Pallas splash attention for TPU, inside shard_map) is not implemented yet; "
            "use attention='xla' (or 'auto', which picks xla on TPU for now)."
        )
    raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
