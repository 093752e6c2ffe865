"""Mixture-of-experts routing and the dropless expert computation: pure, jit-able functions.

Tokens are flattened to BT rows (`x_BTxD`); each row is routed to Y of the X experts of a layer, giving BT * Y
assignments (BTY). `route` scores the experts and picks each row's top-Y with its combine weights; `expert_ffn`
runs every assignment through its expert's gated MLP and sums each row's Y outputs with those weights.

Dropless grouped matmul: the BTY assignments are sorted by expert id, so that each expert's rows are contiguous;
`jax.lax.ragged_dot(lhs [BTY, D], rhs [X, D, F], group_sizes [X])` then multiplies each group of rows by its own
expert's matrix in one call (gate and up projections, then the down projection), and the outputs are unsorted
back to assignment order. Every assignment is computed (no capacity, no dropped tokens) and no dense
[tokens, experts, D] dispatch tensor is ever built: the work is the active experts' work, BTY * D * F per matrix.
`ragged_dot` is differentiable (its transpose is again a ragged_dot for the input and a grouped x^T @ g for the
weights), so training needs no custom gradient.

Glossary: `dpojax.glossary` (X experts of a layer, Y experts per token, F an expert's hidden width).
"""

from __future__ import annotations

import functools
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


def _grouped(x_BTYxD: jax.Array, w_XxDxF: jax.Array, group_sizes_X: jax.Array, dtype) -> jax.Array:
    """Each row times its expert's matrix (rows sorted by expert), accumulated in fp32, returned in `dtype`."""
    out = jax.lax.ragged_dot(x_BTYxD, w_XxDxF.astype(dtype), group_sizes_X, preferred_element_type=jnp.float32)
    return checkpoint_name(out.astype(dtype), DENSE_OUTPUT)  # the `dots` remat policies save it like a Dense


def expert_ffn(x_BTxD: jax.Array, routing: Routing, w: ExpertWeights, *, activation: str, dtype) -> jax.Array:
    """sum over each row's Y experts of weight * down(act(gate(x)) * up(x)), dropless (module docstring):
    -> y [BT, D] in `dtype`."""
    BT, D = x_BTxD.shape
    X, Y = w.gate_XxDxF.shape[0], routing.experts_BTxY.shape[1]
    experts_BTY = routing.experts_BTxY.reshape(BT * Y)
    order_BTY = jnp.argsort(experts_BTY, stable=True)  # assignment slots sorted by expert id
    sorted_experts_BTY = experts_BTY[order_BTY]
    group_sizes_X = jnp.bincount(experts_BTY, length=X).astype(jnp.int32)
    x_BTYxD = x_BTxD.astype(dtype)[order_BTY // Y]  # slot s belongs to row s // Y
    gate_BTYxF = _grouped(x_BTYxD, w.gate_XxDxF, group_sizes_X, dtype)
    up_BTYxF = _grouped(x_BTYxD, w.up_XxDxF, group_sizes_X, dtype)
    if w.gate_XxF is not None:
        gate_BTYxF = gate_BTYxF + w.gate_XxF.astype(dtype)[sorted_experts_BTY]
    if w.up_XxF is not None:
        up_BTYxF = up_BTYxF + w.up_XxF.astype(dtype)[sorted_experts_BTY]
    h_BTYxF = GATED_ACTIVATIONS[activation](gate_BTYxF, up_BTYxF)
    y_BTYxD = _grouped(h_BTYxF, w.down_XxFxD, group_sizes_X, dtype)
    if w.down_XxD is not None:
        y_BTYxD = y_BTYxD + w.down_XxD.astype(dtype)[sorted_experts_BTY]
    inverse_BTY = jnp.zeros_like(order_BTY).at[order_BTY].set(jnp.arange(BT * Y, dtype=order_BTY.dtype))
    y_BTxYxD = y_BTYxD[inverse_BTY].reshape(BT, Y, D)  # back to assignment order
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
