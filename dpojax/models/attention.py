"""Attention kernels behind one signature, chosen by name: "xla" | "cudnn" | "splash" | "auto".

`attend(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, implementation=..., scale=..., softcap=None,
window=None, sharder=None, sinks_H=None) -> out_BxTxHxDh`.
Masking is always: causal (by index) AND only between equal segment ids AND, with a sliding `window`
(a traced int32 scalar, so it can differ per scanned layer), only keys with query_index - key_index < window
(transformers' rule; in packed rows: query_position - key_position). Segment id 0 marks padding; padding tokens
attend among themselves (never to real tokens, and real tokens never to them), so no row is fully masked and no
NaN can appear. Shared-prompt packing (`dpojax.data.packing`) adds branch ids: a response's tokens see their
prompt and themselves, never a sibling response; only the XLA kernel expresses that (cuDNN and splash take
segment ids alone, which is enough for padding-free packing). `softcap` caps the scaled scores,
cap * tanh(s / cap), before the mask (Gemma 2). `sinks_H` (gpt-oss): a learned logit per query head that joins
every softmax denominator as one more key without a value, p_k = exp(s_k) / (sum_j exp(s_j) + exp(sink)); only the
XLA kernel (and the KV-cache decode step) takes it.

- "xla": einsum, scores and softmax in fp32; the reference implementation, runs everywhere. From 256 tokens on
  the queries go in (up to 8) blocks that skip the key blocks causality masks anyway.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; bf16/fp16 only); the segment
  mask is passed as a boolean mask (materialized [B, 1, T, T]; fine for padding, a packing-aware
  offsets layout is a later optimization).
- "splash": the Pallas splash kernel (`dpojax.models.splash`) per device under `shard_map` on TPU: never builds
  the [B, H, T, T] scores, forward or backward. No sliding windows (its masks are static, our windows are
  per-layer data). On a CPU mesh it runs in the Pallas interpreter (tests; slow); refused on GPU.
- with `mesh.context` > 1 the decoder calls `dpojax.models.context.attend_context` instead (rows split over the
  context axis, keys/values all-gathered): xla or splash; cudnn is refused there.
- "auto": xla for models with attention sinks; splash on TPU unless a layer has a sliding window; cudnn on GPU when
  `cudnn_allows` (bf16/fp16, no soft-cap, head_dim a multiple of 8 up to 256 on Hopper, 128 on Ampere); else xla.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpojax.errors import ModelError
from dpojax.models.splash import attend_splash
from dpojax.sharding import Sharder

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SEGMENT_ID_KERNELS = ("splash", "cudnn")  # kernels that mask by segment ids only (no shared-prompt branches)


def cudnn_allows(*, dtype, head_dim: int, softcap: float | None = None, capability: str | None = None) -> bool:
    """Whether cuDNN flash attention runs this model: bf16/fp16, no soft-cap, head_dim a multiple of 8 and at most
    256 on Hopper and later (compute capability >= 9.0), 128 before (A100: 8.0); unknown capability: Hopper."""
    major = int(str(capability).split(".")[0]) if capability else 9
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and softcap is None
            and head_dim % 8 == 0 and head_dim <= (256 if major >= 9 else 128))


def _gpu_capability() -> str | None:
    return getattr(jax.devices()[0], "compute_capability", None)


def resolve_attention(name: str, *, dtype, head_dim: int, backend: str | None = None,
                      softcap: float | None = None, sliding_window: bool = False,
                      gpu_capability: str | None = None, sinks: bool = False) -> str:
    """The concrete implementation for `name` on `backend` (default: jax.default_backend()); `sliding_window`:
    some layer of the model has one; `gpu_capability`: e.g. "9.0" (default: the first device's, on GPU);
    `sinks`: the model has attention sinks (gpt-oss), which only 'xla' computes."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if sinks and name in ("cudnn", "splash"):
        raise ModelError(f"model.attention={name!r} cannot add this model's attention sinks (gpt-oss's per-head "
                         "sink logits) to the softmax; use model.attention='xla' (or 'auto', which picks it).")
    if sinks:
        return "xla"
    if name == "cudnn" and softcap is not None:
        raise ModelError("model.attention='cudnn' cannot soft-cap attention scores (Gemma 2's "
                         "attn_logit_softcapping); use 'xla' or 'auto'.")
    backend = backend or jax.default_backend()
    if name == "splash":
        if sliding_window:
            raise ModelError("model.attention='splash' does not support sliding-window layers (this model has "
                             "them); use 'xla' or 'auto'.")
        if backend in ("gpu", "cuda", "rocm"):
            raise ModelError("model.attention='splash' is a TPU kernel; on GPU use 'cudnn', 'xla' or 'auto'.")
    if name != "auto":
        return name
    if backend == "tpu":
        return "xla" if sliding_window else "splash"
    if backend in ("gpu", "cuda") and cudnn_allows(dtype=dtype, head_dim=head_dim, softcap=softcap,
                                                   capability=gpu_capability or _gpu_capability()):
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


CAUSAL_BLOCK = 128  # attend_xla: query block length from which it skips the all-masked (future) key blocks
MAX_BLOCKS = 32  # attend_xla with a band: at most this many query blocks (unrolled)


def _query_blocks(T: int, band: int | None = None) -> list[tuple[int, int]]:
    """[start, end) query ranges. Without a band: one block below 2 * CAUSAL_BLOCK tokens, else at most 8 blocks of
    at least CAUSAL_BLOCK tokens (the last may be shorter). With a band (packed rows): blocks of about band / 4
    (at least CAUSAL_BLOCK, at most MAX_BLOCKS of them), each reading only the keys of its band."""
    if band is None or T <= band:
        if T < 2 * CAUSAL_BLOCK:
            return [(0, T)]
        size = max(CAUSAL_BLOCK, -(-T // 8))
    else:
        size = max(CAUSAL_BLOCK, band // 4, -(-T // MAX_BLOCKS))
    return [(s, min(s + size, T)) for s in range(0, T, size)]


def _slices(x_BxGxTxZ: jax.Array, ranges: tuple[tuple[int, int], ...]) -> tuple[jax.Array, ...]:
    """`windows` differentiated as plain slices."""
    return tuple(x_BxGxTxZ[:, :, a:b] for a, b in ranges)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def windows(x_BxGxTxZ: jax.Array, ranges: tuple[tuple[int, int], ...]) -> tuple[jax.Array, ...]:
    """x[:, :, a:b] for each static (a, b) of `ranges` (the last ends at T). Its backward adds each window's
    gradient into one [B, G, T, ...] buffer in place, so its cost follows the windows' lengths; differentiating the
    slices themselves pads every window's gradient to the full length and sums those: with packed rows' overlapping
    key windows (tens of query blocks) that sum cost about a tenth of a train step on CPU."""
    return _slices(x_BxGxTxZ, ranges)


def _windows_fwd(x_BxGxTxZ, ranges):
    return windows(x_BxGxTxZ, ranges), None


def _windows_bwd(ranges, _, grads):
    if all(a == b_prev for (a, _), (_, b_prev) in zip(ranges[1:], ranges[:-1])) and ranges[0][0] == 0:
        return (jnp.concatenate(grads, axis=2),)  # disjoint, in order, from 0 to T: the gradient is their concatenation
    g = grads[0]
    acc = jnp.zeros((*g.shape[:2], ranges[-1][1], *g.shape[3:]), g.dtype)
    for (a, b), g in zip(ranges, grads):
        acc = jax.lax.dynamic_update_slice_in_dim(acc, jax.lax.slice_in_dim(acc, a, b, axis=2) + g, a, axis=2)
    return (acc,)


windows.defvjp(_windows_fwd, _windows_bwd)


def attend_xla(q_BxTxHxDh: jax.Array, k_BxTxGxDh: jax.Array, v_BxTxGxDh: jax.Array,
               segment_ids_BxT: jax.Array, *, scale: float, softcap: float | None = None,
               window: jax.Array | None = None, branch_ids_BxT: jax.Array | None = None,
               positions_BxT: jax.Array | None = None, band: int | None = None,
               sinks_H: jax.Array | None = None) -> jax.Array:
    """Queries in blocks, each against only the keys up to its last position (causality masks the rest, so
    the result is the same): about half the score FLOPs and memory of the full [T, T] at long lengths.

    Packed rows (`dpojax.data.packing`) add three things. `band`: no segment is longer than this many tokens, so
    a query block starting at s reads keys from s - band + 1 on (static slices: the cost grows with T * band, not
    T^2). `branch_ids_BxT`: a key of another response of the same prompt is masked (keys on the shared prompt,
    branch 0, and on the query's own branch are kept). `positions_BxT`: sliding windows count positions within a
    sequence, not row indices. `sinks_H`: attention sinks (module docstring).

    Layout: heads move ahead of positions once ([B, G, T, R, Dh], a copy of whole R*Dh rows), so both
    products are plain batched matmuls over (B, G) whose rows are the R query heads of a kv head at each of
    the S positions; a query block is a contiguous run of those rows."""
    B, T, H, Dh = q_BxTxHxDh.shape
    G = k_BxTxGxDh.shape[2]
    R = H // G
    q_BxGxTxRxDh = q_BxTxHxDh.reshape(B, T, G, R, Dh).transpose(0, 2, 1, 3, 4)
    k_BxGxTxDh, v_BxGxTxDh = k_BxTxGxDh.transpose(0, 2, 1, 3), v_BxTxGxDh.transpose(0, 2, 1, 3)
    batch = ((0, 1), (0, 1))
    sink_1xGx1xRx1 = None if sinks_H is None else sinks_H.astype(jnp.float32).reshape(1, G, 1, R, 1)
    outs = []
    blocks = _query_blocks(T, band)
    # keys before `first` share no segment with the block
    keys = tuple((0 if band is None else max(0, start - band + 1), end) for start, end in blocks)
    # packed rows: tens of overlapping key bands, whose slices' own backward (full-length pads, summed) is slow;
    # unpacked: at most 8 nested key prefixes, sliced plainly (XLA fuses them into the dots: windows' slices would be
    # materialized, ~5% more temporaries in a remat step at T 4096)
    cut = windows if band is not None else _slices
    q_blocks, k_blocks, v_blocks = (cut(q_BxGxTxRxDh, tuple(blocks)), cut(k_BxGxTxDh, keys), cut(v_BxGxTxDh, keys))
    for i, ((start, end), (first, _)) in enumerate(zip(blocks, keys)):
        S, E = end - start, end - first
        q_BxGxSRxDh = q_blocks[i].reshape(B, G, S * R, Dh)
        k_BxGxExDh, v_BxGxExDh = k_blocks[i], v_blocks[i]
        scores_BxGxSRxE = jax.lax.dot_general(q_BxGxSRxDh, k_BxGxExDh, ((3, 3), batch),
                                              preferred_element_type=jnp.float32) * scale
        scores_BxGxSxRxE = scores_BxGxSRxE.reshape(B, G, S, R, E)
        if softcap is not None:
            scores_BxGxSxRxE = jnp.tanh(scores_BxGxSxRxE / softcap) * softcap
        index_distance_SxE = jnp.arange(start, end)[:, None] - jnp.arange(first, end)[None, :]
        mask_BxSxE = (segment_ids_BxT[:, start:end, None] == segment_ids_BxT[:, None, first:end]) \
            & (index_distance_SxE >= 0)[None]
        if window is not None:
            if positions_BxT is None:
                mask_BxSxE = mask_BxSxE & (index_distance_SxE < window)[None]
            else:
                distance_BxSxE = positions_BxT[:, start:end, None] - positions_BxT[:, None, first:end]
                mask_BxSxE = mask_BxSxE & (distance_BxSxE < window)
        if branch_ids_BxT is not None:
            key_branch_Bx1xE = branch_ids_BxT[:, None, first:end]
            mask_BxSxE = mask_BxSxE & ((key_branch_Bx1xE == 0)
                                       | (key_branch_Bx1xE == branch_ids_BxT[:, start:end, None]))
        mask_Bx1xSx1xE = mask_BxSxE[:, None, :, None, :]
        scores_BxGxSxRxE = jnp.where(mask_Bx1xSx1xE, scores_BxGxSxRxE, jnp.finfo(jnp.float32).min)
        probs_BxGxSxRxE = softmax_with_sink(scores_BxGxSxRxE, sink_1xGx1xRx1)
        probs_BxGxSRxE = probs_BxGxSxRxE.astype(v_BxTxGxDh.dtype).reshape(B, G, S * R, E)
        outs.append(jax.lax.dot_general(probs_BxGxSRxE, v_BxGxExDh, ((3, 2), batch)))  # [B, G, S*R, Dh]
    out_BxGxTRxDh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out_BxGxTRxDh.reshape(B, G, T, R, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


def softmax_with_sink(scores: jax.Array, sink: jax.Array | None) -> jax.Array:
    """Softmax over the last axis; with a `sink` (broadcastable to scores[..., :1]) the sink's exp joins the
    denominator, as gpt-oss's extra key column that is dropped after the softmax (fp32; the max subtracted)."""
    if sink is None:
        return jax.nn.softmax(scores, axis=-1)
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink))  # the result ignores it
    exp = jnp.exp(scores - top)
    return exp / (jnp.sum(exp, axis=-1, keepdims=True) + jnp.exp(sink - top))


def attend_cudnn(q_BxTxHxDh: jax.Array, k_BxTxGxDh: jax.Array, v_BxTxGxDh: jax.Array,
                 segment_ids_BxT: jax.Array, *, scale: float, window: jax.Array | None = None) -> jax.Array:
    return jax.nn.dot_product_attention(
        q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, mask=segment_mask(segment_ids_BxT, window), scale=scale,
        is_causal=True, implementation="cudnn",
    )


def attend(q_BxTxHxDh: jax.Array, k_BxTxGxDh: jax.Array, v_BxTxGxDh: jax.Array, segment_ids_BxT: jax.Array,
           *, implementation: str, scale: float, softcap: float | None = None,
           window: jax.Array | None = None, sharder: Sharder | None = None, branch_ids_BxT: jax.Array | None = None,
           positions_BxT: jax.Array | None = None, band: int | None = None,
           sinks_H: jax.Array | None = None) -> jax.Array:
    """Causal, segment-masked (optionally sliding-window, soft-capped) attention with GQA (H a multiple of G);
    returns [B, T, H, Dh] in q's dtype. `sharder`: the mesh the activations live on (splash runs per device).
    Packed rows: `branch_ids_BxT` (shared-prompt packing; the XLA kernel only), `positions_BxT` (windows in
    positions) and `band` (the longest segment), see `attend_xla`. `sinks_H`: attention sinks (the XLA kernel
    only)."""
    if implementation == "xla":
        return attend_xla(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, scale=scale, softcap=softcap,
                          window=window, branch_ids_BxT=branch_ids_BxT, positions_BxT=positions_BxT, band=band,
                          sinks_H=sinks_H)
    if sinks_H is not None:
        raise ModelError(f"attention={implementation!r} cannot add attention sinks to the softmax; use "
                         "model.attention='xla'.")
    if branch_ids_BxT is not None:
        raise ModelError(f"attention={implementation!r} cannot mask the responses of a shared prompt from each other "
                         "(data.packing='shared_prompt'); use model.attention='xla' or data.packing='padding_free'.")
    if implementation == "cudnn":
        if softcap is not None:
            raise NotImplementedError("cuDNN attention cannot soft-cap scores; use attention='xla'.")
        return attend_cudnn(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, scale=scale, window=window)
    if implementation == "splash":
        if window is not None:
            raise ModelError("attention='splash' does not support sliding windows; use 'xla'.")
        return attend_splash(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, scale=scale, sharder=sharder,
                             softcap=softcap)
    raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
