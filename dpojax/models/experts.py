"""Mixture-of-experts routing and the dropless expert computation: pure, jit-able functions.

Tokens are flattened to BT rows (`x_BTxD`); each row is routed to Y of the X experts of a layer, giving BT * Y
assignments (BTY). `route` scores the experts and picks each row's top-Y with its combine weights; `expert_ffn`
runs every assignment through its expert's gated MLP and sums each row's Y outputs with those weights.

Dropless grouped matmul: the BTY assignments are sorted by expert id, so that each expert's rows are contiguous;
a grouped matmul then multiplies each group of rows by its own expert's matrix (gate and up projections, then the
down projection), and the outputs are unsorted back to assignment order. Every assignment is computed (no capacity,
no dropped tokens) and no dense [tokens, experts, D] dispatch tensor is ever built: the work is the active
experts' work, BTY * D * F per matrix. The kernel is chosen per backend in one place, `grouped_kernel`:
`jax.lax.ragged_dot` on TPU (a native grouped matmul) and on GPU with XLA's ragged-dot fusion flag (cuDNN); the
`blocks` kernel elsewhere (`block_matmul`: a loop over the experts and, within, over each expert's sorted rows in
blocks read in place, a custom VJP), because XLA lowers a ragged dot on CPU, and on GPU without the flag, to a
masked dense product over all X experts. Both give the same values and gradients (tests/test_grouped_matmul.py).

Glossary: `dpojax.glossary` (X experts of a layer, Y experts per token, F an expert's hidden width).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dpojax.models.config import ROUTER_RULES
from dpojax.models.layers import DENSE_OUTPUT, gated_activation


class Routing(NamedTuple):
    """Where each token goes: `weights_BTxY` (fp32 combine weights), `experts_BTxY` (int32 expert ids),
    `probs_BTxX` (fp32 softmax of the router logits over all experts, as transformers' load-balancing loss uses
    them) and `logits_BTxX` (fp32)."""

    weights_BTxY: jax.Array
    experts_BTxY: jax.Array
    probs_BTxX: jax.Array
    logits_BTxX: jax.Array


class ExpertWeights(NamedTuple):
    """One layer's experts: gate/up [X, D, F], down [X, F, D]; biases (None when absent) per expert."""

    gate_XxDxF: jax.Array
    up_XxDxF: jax.Array
    down_XxFxD: jax.Array
    gate_XxF: jax.Array | None = None
    up_XxF: jax.Array | None = None
    down_XxD: jax.Array | None = None


class RouterStats(NamedTuple):
    """Router statistics of one MoE layer over the real tokens (token weight 0 on padding): `counts_X` (sum of
    token_weight * number of the token's top-Y slots that chose each expert), `probs_X` (sum of token_weight *
    router probability of each expert) and `tokens` (sum of token weights). `Decoder.forward` returns them
    stacked over layers: each field then has a leading L axis."""

    counts_X: jax.Array
    probs_X: jax.Array
    tokens: jax.Array


def _gated(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def act(gate: jax.Array, up: jax.Array) -> jax.Array:
        return gated_activation(gate, up, name)

    return act


def clamped_swiglu(gate: jax.Array, up: jax.Array, *, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's expert activation: gate clamped above, up on both sides at `limit`, then
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


# act(gate) * up per activation name (the names of `layers.ACTIVATION_FNS`), and gpt-oss's clamped SwiGLU with the
# parameters of every released gpt-oss (its family refuses others)
GATED_ACTIVATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    **{name: _gated(name) for name in ("silu", "gelu", "gelu_tanh")},
    "gpt_oss": functools.partial(clamped_swiglu, alpha=1.702, limit=7.0)}


def route(x_BTxD: jax.Array, kernel_DxX: jax.Array, bias_X: jax.Array | None, *, top_k: int, rule: str,
          norm_topk_prob: bool) -> Routing:
    """Score the experts (x @ kernel in x's dtype, accumulated in fp32) and pick each row's top-k.

    rule "softmax_topk": softmax over all experts, then the top-k probabilities (renormalized to sum to 1 when
    `norm_topk_prob`): Mixtral (always renormalized), Qwen2-MoE, Qwen3-MoE. "topk_softmax": the top-k logits,
    then a softmax over those k (gpt-oss)."""
    logits_BTxX = jnp.dot(x_BTxD, kernel_DxX.astype(x_BTxD.dtype), preferred_element_type=jnp.float32)
    if bias_X is not None:
        logits_BTxX = logits_BTxX + bias_X.astype(jnp.float32)
    probs_BTxX = jax.nn.softmax(logits_BTxX, axis=-1)
    if rule == "softmax_topk":
        weights_BTxY, experts_BTxY = jax.lax.top_k(probs_BTxX, top_k)
        if norm_topk_prob:
            weights_BTxY = weights_BTxY / jnp.sum(weights_BTxY, axis=-1, keepdims=True)
    elif rule == "topk_softmax":
        top_BTxY, experts_BTxY = jax.lax.top_k(logits_BTxX, top_k)
        weights_BTxY = jax.nn.softmax(top_BTxY, axis=-1)
    else:
        raise ValueError(f"unknown router rule {rule!r}; known: {', '.join(ROUTER_RULES)}")
    return Routing(weights_BTxY, experts_BTxY.astype(jnp.int32), probs_BTxX, logits_BTxX)


# ---- the grouped matmul ---------------------------------------------------------------------------------------
GROUPED_KERNELS = ("ragged_dot", "blocks")
RAGGED_DOT_FUSION_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"
BLOCK_ROWS = 128  # rows of a block of the `blocks` kernel (benchmarks/RESULTS.md, "Mixture of experts")


def grouped_kernel(backend: str | None = None, xla_flags: str | None = None) -> str:
    """The grouped matmul of `backend` (default: jax.default_backend()), decided here only: "ragged_dot" on TPU
    (a native grouped matmul) and on GPU when XLA_FLAGS (default: the environment's) holds
    RAGGED_DOT_FUSION_FLAG (cuDNN's grouped matmul); "blocks" elsewhere, where XLA expands a ragged dot into a
    masked dense product over all X experts (CPU always, GPU without the flag)."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "ragged_dot"
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    if backend in ("gpu", "cuda", "rocm") and RAGGED_DOT_FUSION_FLAG in flags.split():
        return "ragged_dot"
    return "blocks"


def block_rows(rows: int, num_experts: int, block: int = BLOCK_ROWS) -> int:
    """Rows of a block for `rows` sorted rows over `num_experts` groups: `block`, or less when the groups are
    small (the power of two at or above the mean group size: decoding a few tokens over many experts), so that
    the masked tail of each group's last block stays cheap."""
    per_group = -(-rows // num_experts)
    return min(block, 1 << max(per_group - 1, 0).bit_length())


class BlockLayout(NamedTuple):
    """Rows sorted by expert, each expert's group padded to whole blocks of `block` rows (the blocks `block_matmul`
    multiplies, which it reads in place from the unpadded rows; its work is `rows` rows at most): `shift_X` (a sorted
    row i of expert e sits at padded row i + shift_X[e]), `block_experts` (the expert of each block, [rows // block];
    blocks past the last group belong to expert X - 1 and hold only zero rows) and `rows` (padded rows, static:
    sum over experts of ceil(n_e / block) <= (BTY + X * (block - 1)) // block blocks)."""

    shift_X: jax.Array
    block_experts: jax.Array
    rows: int
    block: int


def block_layout(group_sizes_X: jax.Array, rows: int, block: int) -> BlockLayout:
    """The BlockLayout of `rows` sorted rows in groups of `group_sizes_X` rows (sum <= rows)."""
    X = group_sizes_X.shape[0]
    blocks_X = (group_sizes_X + block - 1) // block
    ends_X = jnp.cumsum(blocks_X)
    shift_X = (ends_X - blocks_X) * block - (jnp.cumsum(group_sizes_X) - group_sizes_X)
    num_blocks = (rows + X * (block - 1)) // block
    block_experts = jnp.minimum(jnp.searchsorted(ends_X, jnp.arange(num_blocks), side="right"), X - 1)
    return BlockLayout(shift_X.astype(jnp.int32), block_experts.astype(jnp.int32), num_blocks * block, block)


def _windows(group_sizes_X: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(starts_X, ends_X): the first and one-past-the-last sorted row of each expert's group."""
    ends_X = jnp.cumsum(group_sizes_X).astype(jnp.int32)
    return ends_X - group_sizes_X.astype(jnp.int32), ends_X


def _window(start: jax.Array, end: jax.Array, i: jax.Array, rows: int, block: int) -> tuple[jax.Array, jax.Array]:
    """Block i of the group [start, end): (the first row of the `block` rows read, clamped so that they stay inside
    the `rows`; a [block, 1] mask of the rows that are the block's own: from start + i * block up to the group's
    end, so that a clamped last block counts none of its group's rows twice and no row of another group)."""
    first = start + i * block
    read = jnp.minimum(first, rows - block)
    r = read + jnp.arange(block, dtype=jnp.int32)
    return read, ((r >= first) & (r < end))[:, None]


def _masked_update(buf: jax.Array, new: jax.Array, mask: jax.Array, at: jax.Array) -> jax.Array:
    """buf with rows [at, at + len(new)) replaced by `new` where `mask`, kept elsewhere (in place in a loop)."""
    old = jax.lax.dynamic_slice_in_dim(buf, at, new.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(mask, new, old), at, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def block_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes_X: jax.Array, block: int, out_dtype) -> jax.Array:
    """lhs [rows, d_in] sorted by group -> [rows, d_out] in `out_dtype` (rows past the groups: zeros): a loop over
    the X experts, and within one over its group's rows in blocks of `block` (ceil(n_e / block) blocks, the last
    one masked to the group's rows), each block times the expert's rhs [d_in, d_out], accumulated in fp32. The rows
    are read and written in place (no padded copy of them); an expert's matrix is sliced once for all its blocks.
    Gradients (custom VJP): the same loops (d lhs of a block = g @ rhs[e]^T; d rhs[e] = the sum over e's blocks
    of lhs_block^T @ g_block, accumulated in fp32 in one [d_in, d_out] buffer per expert)."""
    rows, d_out = lhs.shape[0], rhs.shape[2]
    starts_X, ends_X = _windows(group_sizes_X)

    def expert(out, xs):
        rhs_e, start, end = xs

        def one_block(i, out):
            read, mask = _window(start, end, i, rows, block)
            y = jnp.dot(jax.lax.dynamic_slice_in_dim(lhs, read, block), rhs_e, preferred_element_type=jnp.float32)
            return _masked_update(out, y.astype(out_dtype), mask, read)

        return jax.lax.fori_loop(0, (end - start + block - 1) // block, one_block, out), None

    out, _ = jax.lax.scan(expert, jnp.zeros((rows, d_out), out_dtype), (rhs, starts_X, ends_X))
    return out


def _block_matmul_fwd(lhs, rhs, group_sizes_X, block, out_dtype):
    return block_matmul(lhs, rhs, group_sizes_X, block, out_dtype), (lhs, rhs, group_sizes_X)


def _block_matmul_bwd(block, out_dtype, res, g):
    lhs, rhs, group_sizes_X = res
    rows = lhs.shape[0]
    starts_X, ends_X = _windows(group_sizes_X)

    def expert(dlhs, xs):
        rhs_e, start, end = xs

        def one_block(i, carry):
            dlhs, drhs_e = carry
            read, mask = _window(start, end, i, rows, block)
            # only the block's own rows: exact where the caller rounds the output to lhs.dtype (expert_ffn does)
            g_b = jnp.where(mask, jax.lax.dynamic_slice_in_dim(g, read, block).astype(lhs.dtype), 0)
            dx_b = jax.lax.dot_general(g_b, rhs_e, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            drhs_e = drhs_e + jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(lhs, read, block), g_b,
                                                  (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return _masked_update(dlhs, dx_b.astype(lhs.dtype), mask, read), drhs_e

        dlhs, drhs_e = jax.lax.fori_loop(0, (end - start + block - 1) // block, one_block,
                                         (dlhs, jnp.zeros(rhs_e.shape, jnp.float32)))
        return dlhs, drhs_e.astype(rhs.dtype)

    dlhs, drhs = jax.lax.scan(expert, jnp.zeros(lhs.shape, lhs.dtype), (rhs, starts_X, ends_X))
    return dlhs, drhs, None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes_X: jax.Array, *, preferred_element_type=None,
                   kernel: str | None = None, block: int = BLOCK_ROWS) -> jax.Array:
    """`jax.lax.ragged_dot`'s result: lhs [rows, d_in] sorted by group, rhs [X, d_in, d_out], group_sizes_X
    (sum <= rows; rows past the groups give zeros) -> [rows, d_out] in `preferred_element_type` (default
    lhs.dtype), by `kernel` (default: `grouped_kernel()`). "blocks": `block_matmul` on blocks of `block_rows`."""
    out_dtype = preferred_element_type or lhs.dtype
    kernel = kernel or grouped_kernel()
    if kernel == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes_X, preferred_element_type=out_dtype)
    if kernel != "blocks":
        raise ValueError(f"unknown grouped matmul kernel {kernel!r}; known: {', '.join(GROUPED_KERNELS)}")
    rows, X = lhs.shape[0], rhs.shape[0]
    return block_matmul(lhs, rhs, group_sizes_X, min(block_rows(rows, X, block), max(rows, 1)), out_dtype)


# ---- the experts' MLP ------------------------------------------------------------------------------------------
class _Sorted(NamedTuple):
    """The BTY assignments sorted by expert id: `source` (the token row of each sorted row), `slot_rows_BTY` (the
    sorted row of each assignment slot), `row_experts` (the expert of each sorted row) and `matmul(h, w_XxAxB)`
    (the grouped matmul of the sorted rows by `kernel`, in fp32)."""

    source: jax.Array
    slot_rows_BTY: jax.Array
    row_experts: jax.Array
    matmul: Callable[[jax.Array, jax.Array], jax.Array]


def _sort_by_expert(experts_BTY: jax.Array, X: int, Y: int, kernel: str) -> _Sorted:
    """Sort the assignments by expert id (stable): each expert's rows contiguous, no padding (both kernels)."""
    BTY = experts_BTY.shape[0]
    order_BTY = jnp.argsort(experts_BTY, stable=True)  # assignment slots sorted by expert id
    group_sizes_X = jnp.bincount(experts_BTY, length=X).astype(jnp.int32)
    inverse_BTY = jnp.zeros_like(order_BTY).at[order_BTY].set(jnp.arange(BTY, dtype=order_BTY.dtype))
    return _Sorted(order_BTY // Y, inverse_BTY, experts_BTY[order_BTY], lambda h, w: grouped_matmul(
        h, w, group_sizes_X, preferred_element_type=jnp.float32, kernel=kernel))


def expert_ffn(x_BTxD: jax.Array, routing: Routing, w: ExpertWeights, *, activation: str, dtype,
               kernel: str | None = None) -> jax.Array:
    """sum over each row's Y experts of weight * down(act(gate(x)) * up(x)), dropless (module docstring):
    -> y [BT, D] in `dtype`. The grouped matmul is `kernel`'s (default: `grouped_kernel()`, this host's backend's;
    a step compiled for another backend passes that backend's)."""
    BT, D = x_BTxD.shape
    X, Y = w.gate_XxDxF.shape[0], routing.experts_BTxY.shape[1]
    s = _sort_by_expert(routing.experts_BTxY.reshape(BT * Y), X, Y, kernel or grouped_kernel())

    def grouped(h, w_XxAxB):  # accumulated in fp32, returned in `dtype`, named like a Dense output for remat
        return checkpoint_name(s.matmul(h, w_XxAxB.astype(dtype)).astype(dtype), DENSE_OUTPUT)

    x_sorted = jnp.take(x_BTxD.astype(dtype), s.source, axis=0, mode="fill", fill_value=0)
    gate, up = grouped(x_sorted, w.gate_XxDxF), grouped(x_sorted, w.up_XxDxF)
    if w.gate_XxF is not None:
        gate = gate + w.gate_XxF.astype(dtype)[s.row_experts]
    if w.up_XxF is not None:
        up = up + w.up_XxF.astype(dtype)[s.row_experts]
    y_sorted = grouped(GATED_ACTIVATIONS[activation](gate, up), w.down_XxFxD)
    if w.down_XxD is not None:
        y_sorted = y_sorted + w.down_XxD.astype(dtype)[s.row_experts]
    y_BTxYxD = y_sorted[s.slot_rows_BTY].reshape(BT, Y, D)  # back to assignment order
    combined_BTxD = jnp.einsum("tyd,ty->td", y_BTxYxD.astype(jnp.float32), routing.weights_BTxY)
    return combined_BTxD.astype(dtype)


def router_stats(routing: Routing, token_weights_BT: jax.Array) -> RouterStats:
    """RouterStats of one layer; `token_weights_BT` is 0 on padding."""
    X = routing.probs_BTxX.shape[1]
    tw_BT = token_weights_BT.astype(jnp.float32)
    Y = routing.experts_BTxY.shape[1]
    counts_X = jax.ops.segment_sum(jnp.repeat(tw_BT, Y), routing.experts_BTxY.reshape(-1), num_segments=X)
    probs_X = tw_BT @ routing.probs_BTxX
    return RouterStats(jax.lax.stop_gradient(counts_X), probs_X, jax.lax.stop_gradient(jnp.sum(tw_BT)))
