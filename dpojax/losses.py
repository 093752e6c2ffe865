"""Preference losses: TRL 1.16 DPOTrainer's 15 loss types, what TRL dropped (cDPO, RPO, reference-free), SimPO, ORPO.

Every loss is a small pure function `(terms, cfg) -> per-pair loss [P]` registered in `LOSSES`;
`preference_loss` combines a list of them with weights (MPO), adds the RPO NLL term, applies WPO weights,
and returns SUMS over the real pairs plus (sum, count) metrics, so the trainer can accumulate over
micro-batches and divide once. Formulas follow `trl/trainer/dpo_trainer.py::_compute_loss` (TRL 1.16) exactly.

Batch-level losses (`sft`, the RPO/ORPO NLL, `aot`, `aot_unpaired`) are computed within one call (one
micro-batch): `sft` contributes P * (token-mean NLL of the micro-batch), `aot*` sort within the micro-batch.
Summing those over equal-size micro-batches and dividing by the total number of pairs gives the mean of the
per-micro-batch losses, which is what TRL computes under gradient accumulation.

Glossary: P pairs in the batch (N in logprobs.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from dpojax.errors import ConfigError

Array = jax.Array
MetricSums = dict[str, tuple[Array, Array]]  # name -> (sum, count); value = sum / count after accumulation

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation only cancels log Z(x) in the chosen - rejected score difference.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})  # never read reference log-probs
SORTING_LOSSES = frozenset({"aot", "aot_unpaired"})  # sort over the batch: per-pair WPO weights would misalign
RANKING_LOSSES = frozenset({"plackett_luce"})  # K-wise losses over ranked data (dpojax/ranking.py), not per pair
log_sigmoid = jax.nn.log_sigmoid


@flax.struct.dataclass
class LossInputs:
    """Per-pair [P] fp32 sums from `logprobs.sequence_stats` (chosen rows: even, rejected rows: odd)."""

    chosen_logps: Array  # policy log-prob of the chosen completion (LD-weighted when ld_alpha is set)
    rejected_logps: Array
    ref_chosen_logps: Array | None  # reference log-probs; None when the config is reference-free
    ref_rejected_logps: Array | None
    chosen_tokens: Array  # number of scored completion tokens (completion_mask[:, 1:].sum())
    rejected_tokens: Array
    chosen_len: Array | None = None  # completion_mask.sum() before the shift (TRL's IPO/sigmoid_norm); None: tokens
    rejected_len: Array | None = None
    chosen_raw_logps: Array | None = None  # sum without LD weighting (sft, RPO, SimPO, ORPO); None: chosen_logps
    rejected_raw_logps: Array | None = None
    chosen_wpo_sum: Array | None = None  # sum of (logp - log sum_v p_v^2) over scored tokens (use_weighting)
    rejected_wpo_sum: Array | None = None
    chosen_nll_logps: Array | None = None  # log-prob sum for the NLL term over another token set (ORPO: prompt+
    chosen_nll_tokens: Array | None = None  # response); None: the chosen completion (raw logps, tokens)
    pair_mask: Array | None = None  # 1.0 for real pairs, 0.0 for padding pairs; None: all real


class Terms(NamedTuple):
    """What the loss functions read: the inputs with defaults filled, log-ratios and f-divergence scores."""

    x: LossInputs  # optional fields filled; reference log-probs zero when reference-free
    chosen_logratios: Array  # log pi(y_w) - log pi_ref(y_w)
    rejected_logratios: Array
    chosen_scores: Array  # f'(pi/pi_ref) of the chosen completion (= log-ratio for reverse KL)
    rejected_scores: Array
    delta_score: Array  # chosen_scores - rejected_scores
    mask: Array  # [P] 1.0 real pair, 0.0 padding


# --------------------------------------------------------------------------------------------------- helpers


def _smoothed_sigmoid(logits: Array, eps: float) -> Array:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): conservative DPO (cDPO) / CPO label smoothing."""
    loss = -log_sigmoid(logits)
    if eps:
        loss = (1.0 - eps) * loss - eps * log_sigmoid(-logits)
    return loss


def _safe_div(num: Array, den: Array) -> Array:
    return num / jnp.maximum(den, 1.0)


def _mean_logps(t: Terms) -> tuple[Array, Array]:
    """Length-normalised log-probs sum / n_tokens (SimPO, ORPO; CPO/ORPO `average_log_prob=True`)."""
    return _safe_div(t.x.chosen_raw_logps, t.x.chosen_tokens), _safe_div(t.x.rejected_raw_logps, t.x.rejected_tokens)


def _batch_nll(logps: Array, tokens: Array, mask: Array) -> Array:
    """Token-mean NLL over the real pairs of the (micro-)batch, -sum(logps) / sum(tokens), broadcast to [P]."""
    return jnp.broadcast_to(_safe_div(-jnp.sum(logps * mask), jnp.sum(tokens * mask)), mask.shape)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _f_scores(logratios: Array, cfg) -> Array:
    """f'(u) at u = pi/pi_ref for the f-DPO divergences (Wang et al. 2023, arXiv:2309.16240, Table 1)."""
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(u) = 1 - 1/u
        return 1.0 - jnp.exp(-logratios)
    if kind == "js_divergence":  # f'(u) = log(2u / (1 + u)) = log 2 + log sigma(log u)
        return math.log(2.0) + log_sigmoid(logratios)
    alpha = cfg.f_alpha_divergence_coef  # alpha_divergence: f'(u) = (u^(alpha-1) - 1) / (alpha - 1)
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = jnp.minimum((alpha - 1.0) * logratios, 80.0)  # TRL's fp32 clamp
    return (jnp.exp(exponent) - 1.0) / (alpha - 1.0)


# ---------------------------------------------------------------------------------------- the loss functions


def sigmoid(t: Terms, cfg) -> Array:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): -log sigma(beta * Delta), Delta = s_w - s_l.

    With label_smoothing eps > 0: conservative DPO (cDPO, Mitchell 2023), -(1-eps) log sigma(beta Delta)
    - eps log sigma(-beta Delta), as TRL <= 0.x did. TRL 1.16 ignores label_smoothing for `sigmoid`.
    """
    return _smoothed_sigmoid(cfg.beta * t.delta_score, cfg.label_smoothing)


def hinge(t: Terms, cfg) -> Array:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - beta * Delta)."""
    return jax.nn.relu(1.0 - cfg.beta * t.delta_score)


def ipo(t: Terms, cfg) -> Array:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17), per-token averaged as TRL:

    (s_w / |y_w| - s_l / |y_l| - 1 / (2 beta))^2, |y| = completion_mask.sum() (unshifted), clamped to >= 1.
    """
    delta = _safe_div(t.chosen_scores, t.x.chosen_len) - _safe_div(t.rejected_scores, t.x.rejected_len)
    return (delta - 1.0 / (2.0 * cfg.beta)) ** 2


def exo_pair(t: Terms, cfg) -> Array:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, Eq. 16) for K=2, label smoothing eps in (0, 1):

    KL(q || p) with q = (sigma(beta Delta), sigma(-beta Delta)), p = (1 - eps, eps).
    """
    z = cfg.beta * t.delta_score
    eps = cfg.label_smoothing
    log_qw, log_ql = log_sigmoid(z), log_sigmoid(-z)
    return jnp.exp(log_qw) * (log_qw - math.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - math.log(eps))


def nca_pair(t: Terms, cfg) -> Array:
    """NCA (Chen et al. 2024, arXiv:2402.05369): -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l).

    r = beta * log-ratio (not f-divergence scores).
    """
    rw, rl = cfg.beta * t.chosen_logratios, cfg.beta * t.rejected_logratios
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


def robust(t: Terms, cfg) -> Array:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8), flip rate eps in [0, 0.5):

    (-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)) / (1 - 2 eps).
    """
    z, eps = cfg.beta * t.delta_score, cfg.label_smoothing
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair(t: Terms, cfg) -> Array:
    """BCO pair (Jung et al. 2024, arXiv:2404.04656) as TRL: -log sigma(r_w) - log sigma(-r_l), r = beta log-ratio."""
    return -log_sigmoid(cfg.beta * t.chosen_logratios) - log_sigmoid(-cfg.beta * t.rejected_logratios)


def sppo_hard(t: Terms, cfg) -> Array:
    """SPPO, hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P=1/0):

    (log-ratio_w - 1/(2 beta))^2 + (log-ratio_l + 1/(2 beta))^2.
    """
    half = 0.5 / cfg.beta
    return (t.chosen_logratios - half) ** 2 + (t.rejected_logratios + half) ** 2


def _sort_real_first(values: Array, mask: Array) -> Array:
    """Sort the real entries ascending; padding entries get one large value, so they sort last and pair up."""
    return jnp.sort(jnp.where(mask > 0, values, jnp.float32(1e30)))


def _aot_from_sorted(delta_by_rank: Array, t: Terms, cfg) -> Array:
    """Smoothed -log sigma(beta * delta) of the real ranks, placed on the real pairs' positions (padding: 0).

    Only the sum over pairs is meaningful for AOT; placing rank k on the k-th real pair keeps padding at 0.
    """
    n_real = jnp.sum(t.mask)
    real_rank = jnp.arange(t.mask.shape[0]) < n_real
    loss_by_rank = _smoothed_sigmoid(cfg.beta * jnp.where(real_rank, delta_by_rank, 0.0), cfg.label_smoothing)
    loss_by_rank = jnp.where(real_rank, loss_by_rank, 0.0)
    real_positions = jnp.argsort(t.mask <= 0, stable=True)  # real pairs first, in order
    return jnp.zeros_like(loss_by_rank).at[real_positions].set(loss_by_rank)


def aot(t: Terms, cfg) -> Array:
    """AOT paired (Melnyk et al. 2024, arXiv:2406.05882): sort (log pi_w - log pi_l) and the reference's over the
    batch, then smoothed -log sigma(beta * (sorted_policy - sorted_ref)). Sorts within one micro-batch.
    """
    x = t.x
    policy = _sort_real_first(x.chosen_logps - x.rejected_logps, t.mask)
    ref = _sort_real_first(x.ref_chosen_logps - x.ref_rejected_logps, t.mask)
    return _aot_from_sorted(policy - ref, t, cfg)


def aot_unpaired(t: Terms, cfg) -> Array:
    """AOT unpaired (Melnyk et al. 2024, arXiv:2406.05882): sort chosen and rejected log-ratios separately over
    the batch, then smoothed -log sigma(beta * (sorted_w - sorted_l)). Sorts within one micro-batch.
    """
    chosen = _sort_real_first(t.chosen_logratios, t.mask)
    rejected = _sort_real_first(t.rejected_logratios, t.mask)
    return _aot_from_sorted(chosen - rejected, t, cfg)


def apo_zero(t: Terms, cfg) -> Array:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7): 1 - sigma(r_w) + sigma(r_l), r = beta ratio."""
    return 1.0 - jax.nn.sigmoid(cfg.beta * t.chosen_logratios) + jax.nn.sigmoid(cfg.beta * t.rejected_logratios)


def apo_down(t: Terms, cfg) -> Array:
    """APO-down (arXiv:2408.06266, Eq. 8): sigma(r_w) + 1 - sigma(r_w - r_l), r = beta * log-ratio."""
    rw, rl = cfg.beta * t.chosen_logratios, cfg.beta * t.rejected_logratios
    return jax.nn.sigmoid(rw) + 1.0 - jax.nn.sigmoid(rw - rl)


def discopop(t: Terms, cfg) -> Array:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5), z = beta * Delta:

    (1 - sigma(z / tau)) * (-log sigma(z)) + sigma(z / tau) * exp(-z).
    """
    z = cfg.beta * t.delta_score
    mix = jax.nn.sigmoid(z / cfg.discopop_tau)
    return (1.0 - mix) * -log_sigmoid(z) + mix * jnp.exp(-z)


def sft(t: Terms, cfg) -> Array:
    """SFT term of MPO (Wang et al. 2024, arXiv:2411.10442): token-mean NLL of the chosen completions over the
    (micro-)batch, the same value for every pair (TRL). Uses raw log-probs (no LD weighting).
    """
    return _batch_nll(t.x.chosen_raw_logps, t.x.chosen_tokens, t.mask)


def sigmoid_norm(t: Terms, cfg) -> Array:
    """Length-normalised DPO (TRL `sigmoid_norm`): -log sigma(beta * (s_w / |y_w| - s_l / |y_l|)),

    |y| = completion_mask.sum() (unshifted), clamped to >= 1.
    """
    delta = _safe_div(t.chosen_scores, t.x.chosen_len) - _safe_div(t.rejected_scores, t.x.rejected_len)
    return -log_sigmoid(cfg.beta * delta)


def simpo(t: Terms, cfg) -> Array:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), reference-free, as TRL's CPOTrainer (cpo_alpha=0):

    -(1-eps) log sigma(z) - eps log sigma(-z), z = beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma.
    """
    mean_w, mean_l = _mean_logps(t)
    return _smoothed_sigmoid(cfg.beta * (mean_w - mean_l - cfg.simpo_gamma / cfg.beta), cfg.label_smoothing)


def _orpo_log_odds(t: Terms) -> Array:
    """log odds(y_w) - log odds(y_l), odds(y) = P/(1-P), P = exp(mean log-prob) (ORPO Eq. 4, 7)."""
    mean_w, mean_l = _mean_logps(t)
    return (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))


def _orpo_nll(t: Terms) -> Array:
    return _batch_nll(t.x.chosen_nll_logps, t.x.chosen_nll_tokens, t.mask)


def orpo(t: Terms, cfg) -> Array:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eq. 6), reference-free, as TRL's ORPOTrainer:

    NLL(chosen) - beta * log sigma(log odds(y_w) - log odds(y_l)), beta = the paper's lambda. The NLL is the
    micro-batch token mean over `chosen_nll_*` (TRL: prompt+response tokens; pass `lm_mask` for that).
    """
    return _orpo_nll(t) - cfg.beta * log_sigmoid(_orpo_log_odds(t))


LossFn = Callable[[Terms, object], Array]
LOSSES: dict[str, LossFn] = {
    fn.__name__: fn
    for fn in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero,
               apo_down, discopop, sft, sigmoid_norm, simpo, orpo)
}


# ------------------------------------------------------------------------------------------ config handling


def loss_types(cfg) -> tuple[str, ...]:
    """`cfg.type` as a tuple of names (a single name is accepted)."""
    return (cfg.type,) if isinstance(cfg.type, str) else tuple(cfg.type)


def reference_free(cfg) -> bool:
    """Whether no reference model is needed: `reference_free=True`, or only SimPO / ORPO losses."""
    return bool(cfg.reference_free) or set(loss_types(cfg)) <= REFERENCE_FREE_LOSSES


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"loss: {message}")


def validate_loss_config(cfg) -> None:
    """Raise ConfigError for unknown names and the combinations TRL rejects (or documents as invalid)."""
    types, eps = loss_types(cfg), cfg.label_smoothing
    valid = ", ".join([*LOSSES, *sorted(RANKING_LOSSES)])
    _check(len(types) > 0, f"loss.type is empty; valid types: {valid}.")
    for name in types:
        _check(name in LOSSES or name in RANKING_LOSSES, f"unknown loss type {name!r}; valid types: {valid}.")
    if set(types) & RANKING_LOSSES:
        _validate_ranking(cfg, types)
    if cfg.weights is not None:
        _check(len(cfg.weights) == len(types),
               f"loss.weights has {len(cfg.weights)} values for the {len(types)} loss types {list(types)}.")
    _check(cfg.beta > 0, f"loss.beta must be > 0, got {cfg.beta}.")
    _check(0.0 <= eps <= 1.0, f"loss.label_smoothing must be in [0, 1], got {eps}.")
    _check(cfg.f_divergence_type in F_DIVERGENCES,
           f"loss.f_divergence_type must be one of {list(F_DIVERGENCES)}, got {cfg.f_divergence_type!r}.")
    if cfg.f_divergence_type != "reverse_kl":
        bad = sorted(set(types) - F_DIVERGENCE_LOSSES)
        _check(not bad, f"f_divergence_type={cfg.f_divergence_type!r} only works with "
                        f"{sorted(F_DIVERGENCE_LOSSES)}; use 'reverse_kl' with {bad}.")
    if cfg.use_weighting:
        bad = sorted(set(types) & SORTING_LOSSES)
        _check(not bad, f"use_weighting (WPO) does not work with {bad}: they sort pairs over the batch.")
    if "exo_pair" in types:
        _check(0.0 < eps < 1.0, f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {eps}.")
    if "robust" in types:
        _check(eps < 0.5, f"robust needs label_smoothing (the flip rate) in [0, 0.5), got {eps}.")
    if "discopop" in types:
        _check(cfg.discopop_tau > 0, f"loss.discopop_tau must be > 0, got {cfg.discopop_tau}.")
    if cfg.ld_alpha is not None:
        _check(0.0 <= cfg.ld_alpha <= 1.0, f"loss.ld_alpha must be in [0, 1], got {cfg.ld_alpha}.")
        bad = sorted(set(types) & REFERENCE_FREE_LOSSES)
        _check(not bad, f"ld_alpha does not apply to {bad}: they already normalise by length.")


def _validate_ranking(cfg, types: tuple[str, ...]) -> None:
    """A K-wise loss trains alone, with beta and optionally reference_free: the pair modifiers have no K-wise form."""
    _check(len(types) == 1, f"{sorted(set(types) & RANKING_LOSSES)} rank K responses and cannot be combined with "
                            f"other loss types; got {list(types)}.")
    modifiers = {"label_smoothing": cfg.label_smoothing != 0.0, "use_weighting": cfg.use_weighting,
                 "ld_alpha": cfg.ld_alpha is not None, "rpo_alpha": cfg.rpo_alpha is not None,
                 "f_divergence_type": cfg.f_divergence_type != "reverse_kl"}
    bad = [name for name, on in modifiers.items() if on]
    _check(not bad, f"{types[0]} does not support {bad} (pair-loss options); unset them.")


# ----------------------------------------------------------------------------------------------- entry points


def _fill(x: LossInputs, ref_free: bool) -> LossInputs:
    """Fill optional fields with their documented defaults; zero reference log-probs when reference-free.

    Padding pairs get harmless values (log-probs -1, counts 1), so no NaN reaches a sum or a gradient.
    """
    if ref_free:
        zeros = jnp.zeros_like(x.chosen_logps)
        x = x.replace(ref_chosen_logps=zeros, ref_rejected_logps=zeros)
    elif x.ref_chosen_logps is None or x.ref_rejected_logps is None:
        raise ValueError("reference log-probs are required unless the loss config is reference-free")
    raw_c = x.chosen_logps if x.chosen_raw_logps is None else x.chosen_raw_logps
    x = x.replace(
        chosen_len=x.chosen_tokens if x.chosen_len is None else x.chosen_len,
        rejected_len=x.rejected_tokens if x.rejected_len is None else x.rejected_len,
        chosen_raw_logps=raw_c,
        rejected_raw_logps=x.rejected_logps if x.rejected_raw_logps is None else x.rejected_raw_logps,
        chosen_nll_logps=raw_c if x.chosen_nll_logps is None else x.chosen_nll_logps,
        chosen_nll_tokens=x.chosen_tokens if x.chosen_nll_tokens is None else x.chosen_nll_tokens,
    )
    if x.pair_mask is None:
        return x.replace(pair_mask=jnp.ones_like(x.chosen_logps))
    real = x.pair_mask > 0
    safe = {
        f.name: jnp.where(real, getattr(x, f.name), 1.0 if f.name.endswith(("tokens", "len")) else -1.0)
        for f in dataclasses.fields(x)
        if f.name != "pair_mask" and getattr(x, f.name) is not None
    }
    return x.replace(pair_mask=real.astype(jnp.float32), **safe)


def make_terms(inputs: LossInputs, cfg) -> Terms:
    """Log-ratios and f-divergence scores of the (filled) inputs."""
    x = _fill(inputs, reference_free(cfg))
    chosen_logratios = x.chosen_logps - x.ref_chosen_logps
    rejected_logratios = x.rejected_logps - x.ref_rejected_logps
    chosen_scores, rejected_scores = _f_scores(chosen_logratios, cfg), _f_scores(rejected_logratios, cfg)
    return Terms(
        x, chosen_logratios, rejected_logratios, chosen_scores, rejected_scores, chosen_scores - rejected_scores,
        x.pair_mask,
    )


def wpo_weights(x: LossInputs) -> Array:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2) as TRL: exp(mean_t (log p_t - log sum_v p_v^2)) of the
    chosen times the rejected completion, without gradient.
    """
    if x.chosen_wpo_sum is None or x.rejected_wpo_sum is None:
        raise ValueError("use_weighting needs chosen_wpo_sum and rejected_wpo_sum (token_logprobs(with_wpo=True))")
    log_w = _safe_div(x.chosen_wpo_sum, x.chosen_tokens) + _safe_div(x.rejected_wpo_sum, x.rejected_tokens)
    return lax.stop_gradient(jnp.exp(log_w))


def _per_pair(t: Terms, cfg) -> tuple[Array, dict[str, Array]]:
    types = loss_types(cfg)
    weights = cfg.weights if cfg.weights is not None else (1.0,) * len(types)
    parts = {name: LOSSES[name](t, cfg) for name in dict.fromkeys(types)}
    total = sum(w * parts[name] for name, w in zip(types, weights, strict=True))
    if cfg.rpo_alpha is not None:  # RPO (Pang et al. 2024, arXiv:2404.19733): + alpha * NLL(chosen), as TRL 0.x
        parts["rpo_nll"] = sft(t, cfg)
        total = total + cfg.rpo_alpha * parts["rpo_nll"]
    if cfg.use_weighting:
        total = total * wpo_weights(t.x)
    return total, parts


def per_pair_losses(inputs: LossInputs, cfg) -> tuple[Array, dict[str, Array]]:
    """Per-pair total loss [P] (weighted sum over types, + rpo_alpha * NLL, times WPO weights) and each part [P].

    Padding pairs are not zeroed here (except for `aot*`); batch-level parts repeat their batch value.
    """
    validate_loss_config(cfg)
    return _per_pair(make_terms(inputs, cfg), cfg)


def _pair_sums(t: Terms):
    n_pairs = jnp.sum(t.mask)

    def pair_sum(v: Array) -> tuple[Array, Array]:
        return lax.stop_gradient(jnp.sum(v * t.mask)), n_pairs

    return pair_sum


def preference_loss(inputs: LossInputs, cfg) -> tuple[Array, MetricSums]:
    """Sum over real pairs of the configured loss, and metric (sum, count) pairs.

    Divide `loss_sum` by the total number of real pairs after accumulating micro-batches. Metrics include
    `loss`, `reward_metrics(...)`, and the parts of composite losses: `loss/<type>` when several types are
    combined, `nll_loss` (sft / RPO / ORPO NLL), `log_odds_ratio` and `log_odds_chosen` (ORPO, TRL's names).
    """
    validate_loss_config(cfg)
    t = make_terms(inputs, cfg)
    per_pair, parts = _per_pair(t, cfg)
    loss_sum = jnp.sum(per_pair * t.mask)
    pair_sum = _pair_sums(t)
    metrics: MetricSums = {"loss": pair_sum(per_pair)}
    metrics.update(_reward_metrics(t, cfg))
    types = loss_types(cfg)
    if len(set(types)) > 1:
        metrics.update({f"loss/{name}": pair_sum(parts[name]) for name in dict.fromkeys(types)})
    if "orpo" in types:
        log_odds = _orpo_log_odds(t)
        metrics["nll_loss"] = pair_sum(_orpo_nll(t))
        metrics["log_odds_ratio"] = pair_sum(log_sigmoid(log_odds))
        metrics["log_odds_chosen"] = pair_sum(log_odds)
    elif "rpo_nll" in parts or "sft" in types:
        metrics["nll_loss"] = pair_sum(parts["rpo_nll"] if "rpo_nll" in parts else parts["sft"])
    return loss_sum, metrics


def _reward_metrics(t: Terms, cfg) -> MetricSums:
    if set(loss_types(cfg)) <= REFERENCE_FREE_LOSSES:
        logp_w, logp_l = _mean_logps(t)
        reward_w, reward_l = cfg.beta * logp_w, cfg.beta * logp_l
    else:
        logp_w, logp_l = t.x.chosen_logps, t.x.rejected_logps
        reward_w, reward_l = cfg.beta * t.chosen_logratios, cfg.beta * t.rejected_logratios
    pair_sum = _pair_sums(t)
    return {
        "rewards/chosen": pair_sum(reward_w),
        "rewards/rejected": pair_sum(reward_l),
        "rewards/accuracies": pair_sum((reward_w > reward_l).astype(jnp.float32)),
        "rewards/margins": pair_sum(reward_w - reward_l),
        "logps/chosen": pair_sum(logp_w),
        "logps/rejected": pair_sum(logp_l),
    }


def reward_metrics(inputs: LossInputs, cfg) -> MetricSums:
    """TRL's reward metrics as (sum over real pairs, number of real pairs).

    rewards/chosen = beta * (log pi(y_w) - log pi_ref(y_w)) (reference zero when reference-free),
    rewards/accuracies = [reward_w > reward_l], rewards/margins = reward_w - reward_l, logps/* the policy sums.
    With only SimPO/ORPO losses, the log-probs are length-normalised first (TRL's CPO/ORPO trainers).
    """
    return _reward_metrics(make_terms(inputs, cfg), cfg)


def finalize_metrics(sums: MetricSums) -> dict[str, Array]:
    """(sum, count) -> sum / count (0 where count is 0)."""
    return {k: jnp.where(c > 0, s / jnp.maximum(c, 1e-12), 0.0) for k, (s, c) in sums.items()}


def loss_inputs_from_stats(policy, ref=None, *, pair_mask_P: Array | None = None) -> LossInputs:
    """LossInputs from `logprobs.SeqStats` of rows c0, r0, c1, r1, ... (policy and optional reference).

    The LD-weighted sums are used when present (sequence_stats(ld_alpha=...)); raw sums feed sft/RPO/SimPO/ORPO.
    """

    def split(v):
        return (None, None) if v is None else (v[0::2], v[1::2])

    logps = split(policy.ld_logps_B if policy.ld_logps_B is not None else policy.logps_B)
    ref_logps = (None, None) if ref is None else split(ref.ld_logps_B if ref.ld_logps_B is not None else ref.logps_B)
    tokens, lens, raw, wpo = (split(v) for v in (policy.tokens_B, policy.completion_len_B, policy.logps_B,
                                                  policy.wpo_sum_B))
    nll_logps, nll_tokens = split(policy.lm_logps_B), split(policy.lm_tokens_B)
    return LossInputs(
        chosen_logps=logps[0], rejected_logps=logps[1],
        ref_chosen_logps=ref_logps[0], ref_rejected_logps=ref_logps[1],
        chosen_tokens=tokens[0], rejected_tokens=tokens[1],
        chosen_len=lens[0], rejected_len=lens[1],
        chosen_raw_logps=raw[0], rejected_raw_logps=raw[1],
        chosen_wpo_sum=wpo[0], rejected_wpo_sum=wpo[1],
        chosen_nll_logps=nll_logps[0], chosen_nll_tokens=nll_tokens[0],
        pair_mask=pair_mask_P,
    )
