"""Plackett-Luce DPO over K ranked responses, and ranking metrics, as sums and counts.

DPO paper (Rafailov et al. 2023, arXiv:2305.18290, App. A.3): under the Plackett-Luce model a ranking
y_1 > y_2 > ... > y_K of K responses to x has probability prod_k exp(u_k) / sum_{j >= k} exp(u_j), and the DPO
reparameterisation makes the implicit reward u_k = beta * (log pi(y_k|x) - log pi_ref(y_k|x)). The loss of a row is

    -sum_{k=1}^{K-1} [u_k - logsumexp(u_k, ..., u_K)]          (the k = K term is 0)

and with K = 2 it is -log sigma(u_1 - u_2), the `sigmoid` DPO loss.

Ties (scored data, see `data/ranked.py`): response k is compared with itself and the responses ranked strictly
below it, C_k = {k} + {j : rank_j > rank_k}, and the loss is -sum_k [u_k - logsumexp_{j in C_k} u_j]. Without ties
C_k = {k, ..., K} and this is the formula above; tied responses never compete with each other.

Padding responses (rows with fewer than K) are left out of every comparison and metric; their placeholders are
finite, so they add neither NaN nor gradient. Everything returns sums over real rows and counts; the trainer
divides once, after accumulation.

Glossary: `dpojax.glossary` (N prompts, K responses per prompt, best first, `rank_NxK` non-decreasing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dpojax.losses.core import LossParams, MetricSums, Terms, register_loss

Array = jax.Array


# ------------------------------------------------------------------------------------------------------ loss
def _comparisons(rank_NxK: Array, real_NxK: Array) -> Array:
    """bool [N, K, K]: j is in k's comparison set C_k (j == k, or j is real and ranked strictly below k)."""
    k = rank_NxK.shape[1]
    below_NxKxK = real_NxK[:, None, :] & (rank_NxK[:, None, :] > rank_NxK[:, :, None])
    return below_NxKxK | jnp.eye(k, dtype=bool)[None]


def plackett_luce_log_terms(u_NxK: Array, rank_NxK: Array, mask_NxK: Array) -> Array:
    """[N, K] log-probability that response k is picked first among C_k: u_k - logsumexp_{j in C_k} u_j.

    0 for padding responses and for the responses of the last tie group (C_k = {k}).
    """
    real_NxK = mask_NxK > 0
    u_NxK = jnp.where(real_NxK, u_NxK, 0.0)  # padding placeholders: finite, out of every comparison
    in_set_NxKxK = _comparisons(rank_NxK, real_NxK)
    lse_NxK = jax.nn.logsumexp(jnp.where(in_set_NxKxK, u_NxK[:, None, :], -jnp.inf), axis=-1)
    return jnp.where(real_NxK, u_NxK - lse_NxK, 0.0)


def plackett_luce_nll(u_NxK: Array, rank_NxK: Array, mask_NxK: Array) -> Array:
    """Per-row Plackett-Luce negative log-likelihood [N] of implicit rewards u under the given ranking (ties: see
    the module docstring)."""
    return -jnp.sum(plackett_luce_log_terms(u_NxK, rank_NxK, mask_NxK), axis=-1)


# --------------------------------------------------------------------------------------------------- metrics
def _pairs(rank_NxK: Array, mask_NxK: Array):
    real_NxK = mask_NxK > 0
    k = rank_NxK.shape[1]
    both_NxKxK = real_NxK[:, :, None] & real_NxK[:, None, :]
    upper_NxKxK = both_NxKxK & (jnp.arange(k)[:, None] < jnp.arange(k)[None, :])[None]
    better_NxKxK = both_NxKxK & (rank_NxK[:, :, None] < rank_NxK[:, None, :])  # i ranked strictly above j
    return upper_NxKxK, better_NxKxK


def kendall_tau(u_NxK: Array, rank_NxK: Array, mask_NxK: Array) -> Array:
    """Per-row Kendall tau-b [N] between the implicit rewards and the given ranking, over real responses.

    tau_b = (concordant - discordant) / sqrt((n0 - n_rank_ties) (n0 - n_reward_ties)), n0 = number of pairs;
    0 for a row whose rewards are all equal (e.g. policy == reference). Without ties: (C - D) / n0.
    """
    upper_NxKxK, _ = _pairs(rank_NxK, mask_NxK)
    up = upper_NxKxK.astype(jnp.float32)
    sign_rank_NxKxK = jnp.sign(rank_NxK[:, None, :] - rank_NxK[:, :, None]).astype(jnp.float32)  # + if i above j
    sign_u_NxKxK = jnp.sign(u_NxK[:, :, None] - u_NxK[:, None, :])
    s_N = jnp.sum(up * sign_rank_NxKxK * sign_u_NxKxK, axis=(1, 2))
    n0_N = jnp.sum(up, axis=(1, 2))
    rank_ties_N = jnp.sum(up * (sign_rank_NxKxK == 0), axis=(1, 2))
    u_ties_N = jnp.sum(up * (sign_u_NxKxK == 0), axis=(1, 2))
    denom_N = jnp.sqrt((n0_N - rank_ties_N) * (n0_N - u_ties_N))
    return jnp.where(denom_N > 0, s_N / jnp.maximum(denom_N, 1e-12), 0.0)


RANKING_METRICS = ("rewards/ranking_accuracy", "rewards/kendall_tau")  # what a ranked batch adds to TRL's metrics


def ranking_metrics(u_NxK: Array, rank_NxK: Array, mask_NxK: Array, row_mask_N: Array) -> MetricSums:
    """`rewards/ranking_accuracy`: correctly ordered pairs / ordered pairs (pairs of different rank), pooled over
    rows; `rewards/kendall_tau`: mean over rows of `kendall_tau`."""
    _, better_NxKxK = _pairs(rank_NxK, mask_NxK)
    better = better_NxKxK.astype(jnp.float32) * row_mask_N[:, None, None]
    correct = better * (u_NxK[:, :, None] > u_NxK[:, None, :])
    tau_N = kendall_tau(u_NxK, rank_NxK, mask_NxK)
    accuracy, tau = RANKING_METRICS
    return {accuracy: (jnp.sum(correct), jnp.sum(better)), tau: (jnp.sum(tau_N * row_mask_N), jnp.sum(row_mask_N))}


# ----------------------------------------------------------------------------------------------- registration
def _ranking_metric_sums(t: Terms, hp: LossParams) -> MetricSums:
    u_NxK = hp.beta * t.logratios_NxK
    return lax.stop_gradient(ranking_metrics(u_NxK, t.x.rank_NxK, t.x.response_mask_NxK, t.mask_N))


@register_loss(kwise=True, metrics=_ranking_metric_sums,
               metric_names=RANKING_METRICS)
def plackett_luce(t: Terms, hp: LossParams) -> Array:
    """Plackett-Luce DPO (Rafailov et al. 2023, arXiv:2305.18290, App. A.3) over K ranked responses, ties as in the
    module docstring: -sum_k [u_k - logsumexp_{j in C_k} u_j], u = beta * log-ratio; with K = 2 it is `sigmoid`.
    TRL's pair metrics are reported over (best, worst real) responses, plus `ranking_metrics`."""
    u_NxK = hp.beta * t.logratios_NxK
    return plackett_luce_nll(u_NxK, t.x.rank_NxK, t.x.response_mask_NxK)
