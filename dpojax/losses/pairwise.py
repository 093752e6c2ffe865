"""Pair losses over (chosen, rejected) = (best, worst) responses: TRL 1.16 DPOTrainer's 15 loss types, cDPO label
smoothing, SimPO and ORPO. Formulas follow `trl/trainer/dpo_trainer.py::_compute_loss` (TRL 1.16) exactly.

Batch-level losses (`sft`, the RPO/ORPO NLL, `aot`, `aot_unpaired`) are computed within one call (one micro-batch):
`sft` contributes N * (token-mean NLL of the micro-batch), `aot*` sort within the micro-batch. Summing those over
equal-size micro-batches and dividing by the total number of prompts gives the mean of the per-micro-batch losses,
which is what TRL computes under gradient accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax.losses.core import LossParams, MetricSums, Terms, _safe_div, batch_nll, prompt_sums, register_loss

Array = jax.Array
log_sigmoid = jax.nn.log_sigmoid


def smoothed_sigmoid(logits: Array, eps) -> Array:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): conservative DPO (cDPO) / CPO label smoothing."""
    return (1.0 - eps) * -log_sigmoid(logits) - eps * log_sigmoid(-logits)


def mean_logps(t: Terms) -> tuple[Array, Array]:
    """Length-normalised log-probs sum / n_tokens (SimPO, ORPO; CPO/ORPO `average_log_prob=True`)."""
    return _safe_div(t.w.raw_logps, t.w.tokens), _safe_div(t.l.raw_logps, t.l.tokens)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _need_smoothing(name: str, low_open: bool):
    def check(cfg) -> str | None:
        eps = cfg.label_smoothing
        ok = (0.0 < eps < 0.5) if low_open else (0.0 <= eps < 0.5)
        bound = "0 < label_smoothing < 0.5 (the paper uses 1e-3)" if low_open else \
            "label_smoothing (the flip rate) in [0, 0.5)"
        return None if ok else f"{name} needs {bound}, got {eps}."

    return check


@register_loss(f_divergence=True)
def sigmoid(t: Terms, hp: LossParams) -> Array:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): -log sigma(beta * Delta), Delta = s_w - s_l.

    With label_smoothing eps > 0: conservative DPO (cDPO, Mitchell 2023), -(1-eps) log sigma(beta Delta)
    - eps log sigma(-beta Delta), as TRL <= 0.x did. TRL 1.16 ignores label_smoothing for `sigmoid`.
    """
    return smoothed_sigmoid(hp.beta * t.delta_score, hp.label_smoothing)


@register_loss(f_divergence=True)
def hinge(t: Terms, hp: LossParams) -> Array:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - beta * Delta)."""
    return jax.nn.relu(1.0 - hp.beta * t.delta_score)


@register_loss(f_divergence=True)
def ipo(t: Terms, hp: LossParams) -> Array:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17), per-token averaged as TRL:

    (s_w / |y_w| - s_l / |y_l| - 1 / (2 beta))^2, |y| = completion_mask.sum() (unshifted), clamped to >= 1.
    """
    delta = _safe_div(t.w.scores, t.w.len) - _safe_div(t.l.scores, t.l.len)
    return (delta - 1.0 / (2.0 * hp.beta)) ** 2


@register_loss(f_divergence=True, check=_need_smoothing("exo_pair", low_open=True))
def exo_pair(t: Terms, hp: LossParams) -> Array:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, Eq. 16) for K=2, label smoothing eps in (0, 1):

    KL(q || p) with q = (sigma(beta Delta), sigma(-beta Delta)), p = (1 - eps, eps).
    """
    z = hp.beta * t.delta_score
    eps = hp.label_smoothing
    log_qw, log_ql = log_sigmoid(z), log_sigmoid(-z)
    return jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))


@register_loss
def nca_pair(t: Terms, hp: LossParams) -> Array:
    """NCA (Chen et al. 2024, arXiv:2402.05369): -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l).

    r = beta * log-ratio (not f-divergence scores).
    """
    rw, rl = hp.beta * t.w.logratios, hp.beta * t.l.logratios
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


@register_loss(f_divergence=True, check=_need_smoothing("robust", low_open=False))
def robust(t: Terms, hp: LossParams) -> Array:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8), flip rate eps in [0, 0.5):

    (-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)) / (1 - 2 eps).
    """
    z, eps = hp.beta * t.delta_score, hp.label_smoothing
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


@register_loss
def bco_pair(t: Terms, hp: LossParams) -> Array:
    """BCO pair (Jung et al. 2024, arXiv:2404.04656) as TRL: -log sigma(r_w) - log sigma(-r_l), r = beta log-ratio."""
    return -log_sigmoid(hp.beta * t.w.logratios) - log_sigmoid(-hp.beta * t.l.logratios)


@register_loss
def sppo_hard(t: Terms, hp: LossParams) -> Array:
    """SPPO, hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P=1/0):

    (log-ratio_w - 1/(2 beta))^2 + (log-ratio_l + 1/(2 beta))^2.
    """
    half = 0.5 / hp.beta
    return (t.w.logratios - half) ** 2 + (t.l.logratios + half) ** 2


def _sort_real_first(values: Array, mask: Array) -> Array:
    """Sort the real entries ascending; filler entries get one large value, so they sort last and pair up."""
    return jnp.sort(jnp.where(mask > 0, values, jnp.float32(1e30)))


def _aot_from_sorted(delta_by_rank: Array, t: Terms, hp: LossParams) -> Array:
    """Smoothed -log sigma(beta * delta) of the real ranks, placed on the real prompts' positions (fillers: 0).

    Only the sum over prompts is meaningful for AOT; placing rank k on the k-th real prompt keeps fillers at 0.
    """
    n_real = jnp.sum(t.mask_N)
    real_rank = jnp.arange(t.mask_N.shape[0]) < n_real
    loss_by_rank = smoothed_sigmoid(hp.beta * jnp.where(real_rank, delta_by_rank, 0.0), hp.label_smoothing)
    loss_by_rank = jnp.where(real_rank, loss_by_rank, 0.0)
    real_positions = jnp.argsort(t.mask_N <= 0, stable=True)  # real prompts first, in order
    return jnp.zeros_like(loss_by_rank).at[real_positions].set(loss_by_rank)


@register_loss(sorts_batch=True)
def aot(t: Terms, hp: LossParams) -> Array:
    """AOT paired (Melnyk et al. 2024, arXiv:2406.05882): sort (log pi_w - log pi_l) and the reference's over the
    batch, then smoothed -log sigma(beta * (sorted_policy - sorted_ref)). Sorts within one micro-batch.
    """
    policy = _sort_real_first(t.w.logps - t.l.logps, t.mask_N)
    ref = _sort_real_first(t.w.ref_logps - t.l.ref_logps, t.mask_N)
    return _aot_from_sorted(policy - ref, t, hp)


@register_loss(sorts_batch=True)
def aot_unpaired(t: Terms, hp: LossParams) -> Array:
    """AOT unpaired (Melnyk et al. 2024, arXiv:2406.05882): sort chosen and rejected log-ratios separately over
    the batch, then smoothed -log sigma(beta * (sorted_w - sorted_l)). Sorts within one micro-batch.
    """
    chosen = _sort_real_first(t.w.logratios, t.mask_N)
    rejected = _sort_real_first(t.l.logratios, t.mask_N)
    return _aot_from_sorted(chosen - rejected, t, hp)


@register_loss
def apo_zero(t: Terms, hp: LossParams) -> Array:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7): 1 - sigma(r_w) + sigma(r_l), r = beta ratio."""
    return 1.0 - jax.nn.sigmoid(hp.beta * t.w.logratios) + jax.nn.sigmoid(hp.beta * t.l.logratios)


@register_loss
def apo_down(t: Terms, hp: LossParams) -> Array:
    """APO-down (arXiv:2408.06266, Eq. 8): sigma(r_w) + 1 - sigma(r_w - r_l), r = beta * log-ratio."""
    rw, rl = hp.beta * t.w.logratios, hp.beta * t.l.logratios
    return jax.nn.sigmoid(rw) + 1.0 - jax.nn.sigmoid(rw - rl)


def _discopop_tau(cfg) -> str | None:
    return None if cfg.discopop_tau > 0 else f"loss.discopop_tau must be > 0, got {cfg.discopop_tau}."


@register_loss(f_divergence=True, check=_discopop_tau)
def discopop(t: Terms, hp: LossParams) -> Array:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5), z = beta * Delta:

    (1 - sigma(z / tau)) * (-log sigma(z)) + sigma(z / tau) * exp(-z).
    """
    z = hp.beta * t.delta_score
    mix = jax.nn.sigmoid(z / hp.discopop_tau)
    return (1.0 - mix) * -log_sigmoid(z) + mix * jnp.exp(-z)


def _nll_metric(t: Terms, hp: LossParams) -> MetricSums:
    return {"nll_loss": prompt_sums(t.mask_N)(batch_nll(t.w.raw_logps, t.w.tokens, t.mask_N))}


@register_loss(f_divergence=True, metrics=_nll_metric, metric_names=("nll_loss",))
def sft(t: Terms, hp: LossParams) -> Array:
    """SFT term of MPO (Wang et al. 2024, arXiv:2411.10442): token-mean NLL of the chosen completions over the
    (micro-)batch, the same value for every pair (TRL). Uses raw log-probs (no LD weighting).
    """
    return batch_nll(t.w.raw_logps, t.w.tokens, t.mask_N)


@register_loss(f_divergence=True)
def sigmoid_norm(t: Terms, hp: LossParams) -> Array:
    """Length-normalised DPO (TRL `sigmoid_norm`): -log sigma(beta * (s_w / |y_w| - s_l / |y_l|)),

    |y| = completion_mask.sum() (unshifted), clamped to >= 1.
    """
    delta = _safe_div(t.w.scores, t.w.len) - _safe_div(t.l.scores, t.l.len)
    return -log_sigmoid(hp.beta * delta)


@register_loss(reference_free=True, length_normalized=True)
def simpo(t: Terms, hp: LossParams) -> Array:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), reference-free, as TRL's CPOTrainer (cpo_alpha=0):

    -(1-eps) log sigma(z) - eps log sigma(-z), z = beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma.
    """
    mean_w, mean_l = mean_logps(t)
    return smoothed_sigmoid(hp.beta * (mean_w - mean_l - hp.simpo_gamma / hp.beta), hp.label_smoothing)


def _orpo_log_odds(t: Terms) -> Array:
    """log odds(y_w) - log odds(y_l), odds(y) = P/(1-P), P = exp(mean log-prob) (ORPO Eq. 4, 7)."""
    mean_w, mean_l = mean_logps(t)
    return (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))


def _orpo_nll(t: Terms) -> Array:
    return batch_nll(t.x.nll_logps_N, t.x.nll_tokens_N, t.mask_N)


def _orpo_metrics(t: Terms, hp: LossParams) -> MetricSums:
    log_odds, prompt_sum = _orpo_log_odds(t), prompt_sums(t.mask_N)
    return {"nll_loss": prompt_sum(_orpo_nll(t)), "log_odds_ratio": prompt_sum(log_sigmoid(log_odds)),
            "log_odds_chosen": prompt_sum(log_odds)}


@register_loss(reference_free=True, length_normalized=True, prompt_nll=True, metrics=_orpo_metrics,
               metric_names=("nll_loss", "log_odds_ratio", "log_odds_chosen"))
def orpo(t: Terms, hp: LossParams) -> Array:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eq. 6), reference-free, as TRL's ORPOTrainer:

    NLL(chosen) - beta * log sigma(log odds(y_w) - log odds(y_l)), beta = the paper's lambda. The NLL is the
    micro-batch token mean over prompt + response of the chosen rows (`nll_logps_N`, the step's lm mask).
    """
    return _orpo_nll(t) - hp.beta * log_sigmoid(_orpo_log_odds(t))
