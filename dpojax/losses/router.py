"""Mixture-of-experts router terms: the load-balancing auxiliary loss TRL 1.16's DPOTrainer adds to the policy loss,
and per-step expert load metrics. Pure functions of a decoder's per-layer router statistics (`RouterStats`:
`counts_LxX`, `probs_LxX`, `tokens_L`, sums over the tokens of a forward weighted by each token's weight).

The auxiliary loss is transformers' `load_balancing_loss_func` (Switch Transformer, Fedus et al. 2021, eqs. 4-6) as
Mixtral and Qwen3-MoE compute it when asked for `output_router_logits`: every layer's router softmax and top-k
choices pooled over the real tokens of the forward (its attention mask; in TRL the concatenated [chosen; rejected]
batch, so a prompt's tokens count once per response),

    aux = X * sum_x (sum_l counts_lx / sum_l n_l) * (sum_l probs_lx / sum_l n_l),

where counts_lx is how many of the top-k slots of layer l's tokens chose expert x (so sum_x counts_lx = Y * n_l)
and probs_lx the sum of their router probabilities for x. A uniform router gives Y (the top-k).
Glossary: `dpojax.glossary` (X experts, Y experts per token, L layers).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dpojax.errors import ConfigError

Array = jax.Array

LOAD_METRICS = ("moe/load_max_over_mean", "moe/load_max_over_mean_worst", "moe/load_min_over_mean_worst")
EXPERT_TOKENS = "moe/expert_tokens"  # the raw per-layer counts a step accumulates (popped by `finish_load_metrics`)


def resolve_aux_coef(coef: Optional[float], *, num_experts: int, model_coef: float, model: str) -> float:
    """The router auxiliary-loss coefficient of a run, as TRL 1.16's DPOTrainer resolves it: `loss.
    router_aux_loss_coef` when set, else the checkpoint's `router_aux_loss_coef` (config.json; 0.0 when absent).
    Whether config.json sets `output_router_logits` does not matter: TRL asks every MoE model for its router logits
    whenever the coefficient is not 0. A non-zero coefficient on a dense model is a ConfigError; a dense model's is
    0."""
    if num_experts <= 0:
        if coef:
            raise ConfigError(
                f"config: 'loss.router_aux_loss_coef' = {coef} but the policy '{model}' is not a mixture-of-experts "
                "model, so there is no router auxiliary loss to weight; remove the key (or set it to 0)."
            )
        return 0.0
    return float(model_coef if coef is None else coef)


def load_balancing_loss(counts_LxX: Array, probs_LxX: Array, tokens_L: Array) -> Array:
    """transformers' `load_balancing_loss_func` from per-layer sums (module docstring); 0 without tokens."""
    num_experts = counts_LxX.shape[-1]
    total = jnp.sum(tokens_L.astype(jnp.float32))
    denom = jnp.where(total > 0, total, 1.0)
    tokens_per_expert_X = jnp.sum(counts_LxX.astype(jnp.float32), axis=0) / denom
    prob_per_expert_X = jnp.sum(probs_LxX.astype(jnp.float32), axis=0) / denom
    return num_experts * jnp.sum(tokens_per_expert_X * prob_per_expert_X)


def aux_loss_terms(counts_LxX: Array, probs_LxX: Array, tokens_L: Array, coef: float,
                   real_prompts: Array) -> tuple[Array, dict[str, tuple[Array, Array]]]:
    """(what one forward adds to the summed loss, its `aux_loss` metric) for a forward over `real_prompts` prompts.

    The trainer sums the loss over real prompts and divides once by the step's prompts, so the forward's
    `coef * aux` is weighted by its real prompts: with equally full micro-batches the step's loss gains
    coef * (the mean of the micro-batches' aux losses), TRL's per-forward average under gradient accumulation.
    The metric is (aux * prompts, prompts): its value is the same prompt-weighted mean (TRL's `aux_loss`)."""
    aux = load_balancing_loss(counts_LxX, probs_LxX, tokens_L)
    weight = real_prompts.astype(jnp.float32)
    return coef * aux * weight, {"aux_loss": (jax.lax.stop_gradient(aux) * weight, weight)}


def load_metrics(counts_LxX: Array) -> dict[str, tuple[Array, Array]]:
    """Expert load of one step's token assignments per layer, as (value, 1): the busiest expert's tokens over the
    mean per expert, averaged over layers (`moe/load_max_over_mean`, 1.0 = perfectly balanced, X = one expert takes
    everything) and in the worst layer (`moe/load_max_over_mean_worst`), and the idlest expert's over the mean in
    the worst layer (`moe/load_min_over_mean_worst`, 0.0 = an expert got no token)."""
    counts_LxX = jax.lax.stop_gradient(counts_LxX).astype(jnp.float32)
    mean_L = jnp.mean(counts_LxX, axis=-1)
    safe_L = jnp.where(mean_L > 0, mean_L, 1.0)
    max_ratio_L = jnp.where(mean_L > 0, jnp.max(counts_LxX, axis=-1) / safe_L, 1.0)
    min_ratio_L = jnp.where(mean_L > 0, jnp.min(counts_LxX, axis=-1) / safe_L, 1.0)
    one = jnp.ones((), jnp.float32)
    return {
        "moe/load_max_over_mean": (jnp.mean(max_ratio_L), one),
        "moe/load_max_over_mean_worst": (jnp.max(max_ratio_L), one),
        "moe/load_min_over_mean_worst": (jnp.min(min_ratio_L), one),
    }


def finish_load_metrics(metrics: dict) -> dict:
    """`metrics` with the accumulated per-layer counts (`EXPERT_TOKENS`, summed over a step's forwards) replaced by
    `load_metrics` (a no-op for dense models, whose metrics hold none)."""
    if EXPERT_TOKENS not in metrics:
        return metrics
    rest = {k: v for k, v in metrics.items() if k != EXPERT_TOKENS}
    return {**rest, **load_metrics(metrics[EXPERT_TOKENS][0])}
