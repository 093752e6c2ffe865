"""Attention kernels behind one signature, chosen by name: "xla" | "cudnn" | "splash" | "auto".

`attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, implementation=..., scale=..., softcap=None,
window=None) -> out_BxTxHxDh`.
Masking is always: causal (by index) AND only between equal segment ids AND, with a sliding `window`
(a traced int32 scalar, so it can differ per scanned layer), only keys with query_index - key_index < window
(transformers' rule). Segment id 0 marks padding; padding tokens attend among themselves (never to real
tokens, and real tokens never to them), so no row is fully masked and no NaN can appear. This covers right
padding now and packing later. `softcap` caps the scaled scores, cap * tanh(s / cap), before the mask (Gemma 2).

- "xla": einsum, scores and softmax in fp32; the reference implementation, runs everywhere.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; bf16/fp16 only); the segment
  mask is passed as a boolean mask (materialized [B, 1, T, T]; fine for padding, a packing-aware
  offsets layout is a later optimization).
- "splash": Pallas splash attention on TPU: not implemented yet (raises NotImplementedError).
- "auto": cudnn on GPU when the dtype and head_dim allow it and no soft-cap is needed, else xla (splash on TPU
  once implemented).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax.errors import ModelError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def resolve_attention(name: str, *, dtype, head_dim: int, backend: str | None = None,
                      softcap: float | None = None) -> str:
    """The concrete implementation for `name` on `backend` (default: jax.default_backend())."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if name == "cudnn" and softcap is not None:
        raise ModelError("model.attention='cudnn' cannot soft-cap attention scores (Gemma 2's "
                         "attn_logit_softcapping); use 'xla' or 'auto'.")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    cudnn_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 256 and softcap is None
    if backend in ("gpu", "cuda") and cudnn_ok:
        return "cudnn"
    return "xla"


def segment_mask(segment_ids_BxT: jax.Array, window: jax.Array | None = None) -> jax.Array:
    """Boolean [B, 1, T, T] (query, key): causal, same segment and (with a window) q - k < window."""
    T = segment_ids_BxT.shape[1]
    distance_TxT = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    allowed_TxT = distance_TxT >= 0
    if window is not None:
        allowed_TxT = allowed_TxT & (distance_TxT < window)
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (same_BxTxT & allowed_TxT[None])[:, None]


def attend_xla(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
               segment_ids_BxT: jax.Array, *, scale: float, softcap: float | None = None,
               window: jax.Array | None = None) -> jax.Array:
    B, T, H, Dh = q_BxTxHxDh.shape
    K = k_BxTxKxDh.shape[2]
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxTxKxDh,
                                  preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores_BxKxGxTxS = jnp.tanh(scores_BxKxGxTxS / softcap) * softcap
    mask_Bx1x1xTxS = segment_mask(segment_ids_BxT, window)[:, :, None]
    scores_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxTxKxDh.dtype)
    out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxTxKxDh)
    return out_BxTxKxGxDh.reshape(B, T, H, Dh)


def attend_cudnn(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array,
                 segment_ids_BxT: jax.Array, *, scale: float, window: jax.Array | None = None) -> jax.Array:
    return jax.nn.dot_product_attention(
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=segment_mask(segment_ids_BxT, window), scale=scale,
        is_causal=True, implementation="cudnn",
    )


def attend(q_BxTxHxDh: jax.Array, k_BxTxKxDh: jax.Array, v_BxTxKxDh: jax.Array, segment_ids_BxT: jax.Array,
           *, implementation: str, scale: float, softcap: float | None = None,
           window: jax.Array | None = None) -> jax.Array:
    """Causal, segment-masked (optionally sliding-window, soft-capped) attention with GQA (H a multiple of K);
    returns [B, T, H, Dh] in q's dtype."""
    if implementation == "xla":
        return attend_xla(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, scale=scale, softcap=softcap,
                          window=window)
    if implementation == "cudnn":
        if softcap is not None:
            raise NotImplementedError("cuDNN attention cannot soft-cap scores; use attention='xla'.")
        return attend_cudnn(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, scale=scale, window=window)
    if implementation == "splash":
        raise NotImplementedError(
            "attention='splash' (Pallas splash attention for TPU, inside shard_map) is not implemented yet; "
            "use attention='xla' (or 'auto', which picks xla on TPU for now)."
        )
    raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
