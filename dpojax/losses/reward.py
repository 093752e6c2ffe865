"""Reward-model losses and metrics on the scores of K responses per prompt (task: reward), as sums and counts.

Pairs (K = 2, chosen first), TRL 1.16 `RewardTrainer.compute_loss`:

    loss = -log sigma(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2

(`margin`: the data's optional per-pair column, 0 without it; c: reward.center_rewards_coefficient, Eisenstein et
al. 2023, arXiv:2312.09244, Eq. 2), averaged over pairs. Rankings (K > 2, ranked or scored rows) use the
Plackett-Luce likelihood of the scores, `ranking.plackett_luce_nll` with u = r (ties as there); with K = 2 it is the
pair loss. The centering term of a ranking is c * (sum of its real responses' scores)^2, TRL's term for a pair.

Metrics, TRL's names: `loss`; `accuracy` (ordered pairs whose better response scores strictly higher: chosen >
rejected for a pair) and `margin` (mean score difference over the same ordered pairs), pooled over pairs;
`mean_reward` over every real response; `min_reward`, `max_reward`: the micro-batch's (TRL: the batch's) smallest
and largest score, averaged over micro-batches, as TRL averages them over its batches. Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax.losses.core import MetricSums
from dpojax.losses.ranking import plackett_luce_nll

Array = jax.Array
REWARD_METRICS = ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward")  # TRL's names, in order


def reward_nll(scores_NxK: Array, rank_NxK: Array, response_mask_NxK: Array, margin_N: Array | None = None) -> Array:
    """fp32 [N]: each row's negative log-likelihood of its ranking under its scores (Bradley-Terry for a pair, with
    the row's margin; Plackett-Luce for more responses)."""
    real_NxK = response_mask_NxK > 0
    if scores_NxK.shape[1] == 2:
        ordered_N = real_NxK[:, 0] & real_NxK[:, 1] & (rank_NxK[:, 0] < rank_NxK[:, 1])
        margin_N = jnp.zeros_like(scores_NxK[:, 0]) if margin_N is None else margin_N.astype(jnp.float32)
        nll_N = -jax.nn.log_sigmoid(scores_NxK[:, 0] - scores_NxK[:, 1] - margin_N)
        return jnp.where(ordered_N, nll_N, 0.0)
    return plackett_luce_nll(scores_NxK, rank_NxK, response_mask_NxK)


def reward_loss(scores_NxK: Array, rank_NxK: Array, response_mask_NxK: Array, prompt_mask_N: Array,
                margin_N: Array | None = None, center_coef: float | None = None) -> tuple[Array, MetricSums]:
    """(sum over real prompts of the loss, metric sums) of one micro-batch's scores (fp32 [N, K])."""
    scores_NxK = scores_NxK.astype(jnp.float32)
    real_NxK = (response_mask_NxK > 0) & (prompt_mask_N[:, None] > 0)
    loss_N = reward_nll(scores_NxK, rank_NxK, response_mask_NxK, margin_N)
    if center_coef:
        total_N = jnp.sum(jnp.where(real_NxK, scores_NxK, 0.0), axis=1)
        loss_N = loss_N + center_coef * total_N**2
    prompt_mask_N = prompt_mask_N.astype(jnp.float32)
    loss_sum = jnp.sum(loss_N * prompt_mask_N)
    metrics = {"loss": (jax.lax.stop_gradient(loss_sum), jnp.sum(prompt_mask_N))}
    return loss_sum, {**metrics, **jax.lax.stop_gradient(reward_metrics(scores_NxK, rank_NxK, real_NxK))}


def reward_metrics(scores_NxK: Array, rank_NxK: Array, real_NxK: Array) -> MetricSums:
    """TRL's reward metrics (module docstring) over the real responses `real_NxK` of real prompts."""
    better_NxKxK = (real_NxK[:, :, None] & real_NxK[:, None, :]
                    & (rank_NxK[:, :, None] < rank_NxK[:, None, :])).astype(jnp.float32)  # i ranked above j
    diff_NxKxK = scores_NxK[:, :, None] - scores_NxK[:, None, :]
    pairs = jnp.sum(better_NxKxK)
    real = real_NxK.astype(jnp.float32)
    any_real = jnp.any(real_NxK)
    one = any_real.astype(jnp.float32)
    low = jnp.min(jnp.where(real_NxK, scores_NxK, jnp.inf))
    high = jnp.max(jnp.where(real_NxK, scores_NxK, -jnp.inf))
    return {
        "accuracy": (jnp.sum(better_NxKxK * (diff_NxKxK > 0)), pairs),
        "margin": (jnp.sum(better_NxKxK * diff_NxKxK), pairs),
        "min_reward": (jnp.where(any_real, low, 0.0), one),
        "mean_reward": (jnp.sum(real * scores_NxK), jnp.sum(real)),
        "max_reward": (jnp.where(any_real, high, 0.0), one),
    }
