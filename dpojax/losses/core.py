"""The loss registry and the one entry point every loss goes through.

A loss is a small pure function `fn(t: Terms, hp: LossParams) -> per-prompt loss [N]` registered with its traits:

    @register_loss("my_loss", reference_free=False)
    def my_loss(t, hp):
        "One line and a reference (arXiv id or TRL)."
        return -jax.nn.log_sigmoid(hp.beta * t.delta_score)

Traits (`Loss`) say what a loss needs and allows, so no other module tests loss names: `reference_free` (never reads
reference log-probs), `kwise` (reads all K responses and their ranks; otherwise a pair loss over K = 2 responses),
`f_divergence` (accepts loss.f_divergence_type other than reverse_kl), `sorts_batch` (sorts over the micro-batch,
so per-pair WPO weights would misalign), `prompt_nll` (its NLL term covers prompt + response: the step computes
that sum), `length_normalized` (works on per-token mean log-probs: rewards are reported that way and ld_alpha does
not apply), `metrics` (extra metric (sum, count) pairs) and `check` (extra config validation).

`preference_loss` combines the configured losses with their weights (MPO), adds the RPO NLL term, applies WPO weights,
and returns SUMS over the real prompts plus (sum, count) metrics, so the trainer accumulates micro-batches and
divides once. Hyper-parameters (`LossParams`: beta, label_smoothing, ...) are a pytree: a jitted or vmapped function
can take them as data (e.g. a sweep over beta in one call); the config keeps what changes the program's structure.

Glossary: `dpojax.glossary` (N prompts, K responses per prompt, best first).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from dpojax.errors import ConfigError, UserError

Array = jax.Array
MetricSums = dict[str, tuple[Array, Array]]  # name -> (sum, count); value = sum / count after accumulation
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# ------------------------------------------------------------------------------------------------------- inputs
@flax.struct.dataclass
class LossInputs:
    """Per-response fp32 sums [N, K] from `logprobs.sequence_stats`, responses best first (a pair: chosen, rejected)."""

    logps_NxK: Array  # policy log-prob of each response (LD-weighted when ld_alpha is set)
    ref_logps_NxK: Array | None  # reference log-probs; None when the config is reference-free
    tokens_NxK: Array  # number of scored response tokens (completion_mask[:, 1:].sum())
    len_NxK: Array | None = None  # completion_mask.sum() before the shift (TRL's IPO/sigmoid_norm); None: tokens
    raw_logps_NxK: Array | None = None  # sums without LD weighting (sft, RPO, SimPO, ORPO); None: logps_NxK
    wpo_sum_NxK: Array | None = None  # sum of (logp - log sum_v p_v^2) over scored tokens (use_weighting)
    nll_logps_N: Array | None = None  # log-prob sum of the best response for the NLL term over another token set
    nll_tokens_N: Array | None = None  # (ORPO: prompt + response); None: the best response (raw logps, tokens)
    response_mask_NxK: Array | None = None  # 1.0 real response, 0.0 padding response; None: all real
    rank_NxK: Array | None = None  # tie-group rank, 0 = best; None: 0, 1, ..., K-1 (a strict order)
    prompt_mask_N: Array | None = None  # 1.0 real prompt, 0.0 filler; None: all real

    @property
    def num_responses(self) -> int:
        return self.logps_NxK.shape[1]


@flax.struct.dataclass
class LossParams:
    """The numeric hyper-parameters of the losses: data for jit/vmap (see the module docstring)."""

    beta: Array | float
    label_smoothing: Array | float
    f_alpha_divergence_coef: Array | float
    discopop_tau: Array | float
    simpo_gamma: Array | float
    rpo_alpha: Array | float  # 0 when loss.rpo_alpha is unset (the term is then not built at all)
    weights: tuple  # one per loss type

    @classmethod
    def of(cls, cfg) -> LossParams:
        types = loss_types(cfg)
        weights = tuple(cfg.weights) if cfg.weights is not None else (1.0,) * len(types)
        return cls(cfg.beta, cfg.label_smoothing, cfg.f_alpha_divergence_coef, cfg.discopop_tau, cfg.simpo_gamma,
                   cfg.rpo_alpha or 0.0, weights)


class Side(NamedTuple):
    """One response column of a pair loss (the best response, or the worst real one)."""

    logps: Array
    ref_logps: Array
    tokens: Array
    len: Array
    raw_logps: Array
    wpo_sum: Array | None
    logratios: Array  # log pi(y) - log pi_ref(y)
    scores: Array  # f'(pi/pi_ref) (= log-ratio for reverse KL)


class Terms(NamedTuple):
    """What the loss functions read: the inputs with defaults filled, log-ratios and f-divergence scores [N, K],
    and pair views `w` (the best response, chosen) and `l` (the worst real one, rejected)."""

    x: LossInputs  # optional fields filled; reference log-probs zero when reference-free
    logratios_NxK: Array
    scores_NxK: Array
    mask_N: Array  # 1.0 real prompt, 0.0 filler
    w: Side
    l: Side  # noqa: E741 - l and r: the two sides of a pairwise loss, short as in its formula

    @property
    def delta_score(self) -> Array:
        return self.w.scores - self.l.scores


# ----------------------------------------------------------------------------------------------------- registry
LossFn = Callable[[Terms, LossParams], Array]


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    fn: LossFn  # (Terms, LossParams) -> per-prompt loss [N]
    reference_free: bool = False  # never reads reference log-probs
    kwise: bool = False  # reads all K responses and their ranks; False: a pair loss (K = 2)
    f_divergence: bool = False  # accepts f_divergence_type other than reverse_kl
    sorts_batch: bool = False  # sorts over the micro-batch (per-pair WPO weights would misalign)
    prompt_nll: bool = False  # its NLL term covers prompt + response tokens (nll_logps_N / nll_tokens_N)
    length_normalized: bool = False  # per-token mean log-probs (rewards reported so; ld_alpha does not apply)
    metrics: Callable[[Terms, LossParams], MetricSums] | None = None  # extra metrics, (sum, count) pairs
    metric_names: tuple[str, ...] = ()  # the names `metrics` returns (checkpoint.best_metric is checked against)
    check: Callable[[Any], str | None] | None = None  # extra config check: an error message, or None
    unpaired: bool = False  # trains on unpaired rows (prompt, completion, label) with a batch-level loss (KTO)


LOSSES: dict[str, Loss] = {}


def register_loss(name: str | LossFn | None = None, *, replace: bool = False, **traits: Any):
    """Decorator: `@register_loss("name", reference_free=True, ...)` adds `fn` to `LOSSES` with its traits (the
    fields of `Loss`); the name defaults to the function's. A name already taken raises unless `replace`."""

    if callable(name):  # bare @register_loss
        fn, name = name, None
        return register_loss()(fn)

    valid = [f.name for f in dataclasses.fields(Loss) if f.name not in ("name", "fn")]
    unknown = sorted(set(traits) - set(valid))
    if unknown:
        raise TypeError(f"register_loss({name!r}): unknown traits {unknown}; valid traits: {', '.join(valid)}")

    def add(fn: LossFn) -> LossFn:
        key = name or fn.__name__
        if not callable(fn):
            raise TypeError(f"register_loss({key!r}) decorates a function (terms, hp) -> loss [N], got {fn!r}")
        if key in LOSSES and not replace:
            raise ValueError(f"loss {key!r} is already registered; pass replace=True to redefine it")
        LOSSES[key] = Loss(key, fn, **traits)
        _validated.cache_clear()
        return fn

    return add


def loss_types(cfg) -> tuple[str, ...]:
    """`cfg.type` as a tuple of names (a single name is accepted)."""
    return (cfg.type,) if isinstance(cfg.type, str) else tuple(cfg.type)


def traits(cfg) -> list[Loss]:
    return [LOSSES[name] for name in dict.fromkeys(loss_types(cfg))]


def reference_free(cfg) -> bool:
    """Whether no reference model is needed: `reference_free=True`, or only reference-free losses."""
    return bool(cfg.reference_free) or all(loss.reference_free for loss in traits(cfg))


def is_kwise(cfg) -> bool:
    """Whether the configured loss trains on whole rankings of K responses (then the data must be ranked)."""
    return any(loss.kwise for loss in traits(cfg))


def is_unpaired(cfg) -> bool:
    """Whether the configured loss trains on unpaired rows (KTO: `losses.kto`); then the data must be unpaired."""
    return any(loss.unpaired for loss in traits(cfg))


def needs_prompt_nll(cfg) -> bool:
    return any(loss.prompt_nll for loss in traits(cfg))


# TRL's metric names: the one list (the summary, `metric_names` and the TRL parity tests read it)
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
BASE_METRICS = (*TRL_METRICS, "logits/chosen", "logits/rejected")  # every run records these (logits: per token)


def metric_names(cfg) -> tuple[str, ...]:
    """Every eval metric a run with this loss config records (TRL's names, then each loss's own)."""
    names = [] if is_unpaired(cfg) else list(BASE_METRICS)  # unpaired losses name all of theirs
    types = loss_types(cfg)
    if len(set(types)) > 1:
        names += [f"loss/{name}" for name in dict.fromkeys(types)]
    if cfg.rpo_alpha is not None:
        names.append("nll_loss")
    for loss in traits(cfg):
        names += loss.metric_names
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------- validation
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"loss: {message}")


def validate_loss_config(cfg) -> None:
    """Raise ConfigError for unknown names and invalid combinations; runs once per distinct config (cached)."""
    _validated(cfg)


@functools.lru_cache(maxsize=256)
def _validated(cfg) -> bool:
    types, eps = loss_types(cfg), cfg.label_smoothing
    valid = ", ".join(LOSSES)
    _check(len(types) > 0, f"loss.type is empty; valid types: {valid}.")
    for name in types:
        _check(name in LOSSES, f"unknown loss type {name!r}; valid types: {valid}.")
    chosen = traits(cfg)
    kwise = [loss.name for loss in chosen if loss.kwise]
    _check(not kwise or len(types) == 1,
           f"{kwise} rank K responses and cannot be combined with other loss types; got {list(types)}.")
    if cfg.weights is not None:
        _check(len(cfg.weights) == len(types),
               f"'loss.weights' has {len(cfg.weights)} entries but 'loss.type' names {len(types)} losses "
               f"{list(types)}; give one weight per loss.")
    _check(cfg.beta > 0, f"'loss.beta' = {cfg.beta} must be > 0.")
    for loss in chosen:  # a loss's own rules first: they name the loss
        message = loss.check(cfg) if loss.check else None
        _check(message is None, message or "")
    if not any(loss.unpaired for loss in chosen):
        _check(getattr(cfg, "desirable_weight", 1.0) == 1.0 and getattr(cfg, "undesirable_weight", 1.0) == 1.0,
               f"'loss.desirable_weight' / 'loss.undesirable_weight' weigh KTO's unpaired rows; loss.type="
               f"{list(types)} does not read them: unset them, or use loss.type=kto.")
    if kwise:
        modifiers = {"label_smoothing": eps != 0.0, "use_weighting": cfg.use_weighting,
                     "ld_alpha": cfg.ld_alpha is not None, "rpo_alpha": cfg.rpo_alpha is not None,
                     "f_divergence_type": cfg.f_divergence_type != "reverse_kl"}
        bad = [key for key, on in modifiers.items() if on]
        _check(not bad, f"{kwise[0]} does not support {bad} (pair-loss options); unset them.")
    _check(0.0 <= eps < 0.5, f"loss.label_smoothing (the probability that a label is flipped) must be in [0, 0.5), "
                             f"got {eps}.")
    _check(cfg.f_divergence_type in F_DIVERGENCES,
           f"loss.f_divergence_type must be one of {list(F_DIVERGENCES)}, got {cfg.f_divergence_type!r}.")
    if cfg.f_divergence_type != "reverse_kl":
        bad = [loss.name for loss in chosen if not loss.f_divergence]
        ok = sorted(name for name, loss in LOSSES.items() if loss.f_divergence)
        _check(not bad, f"f_divergence_type={cfg.f_divergence_type!r} only works with {ok}; use 'reverse_kl' with "
                        f"{sorted(bad)}.")
    if cfg.use_weighting:
        bad = sorted(loss.name for loss in chosen if loss.sorts_batch)
        _check(not bad, f"use_weighting (WPO) does not work with {bad}: they sort pairs over the batch.")
    if cfg.ld_alpha is not None:
        _check(0.0 <= cfg.ld_alpha <= 1.0, f"loss.ld_alpha must be in [0, 1], got {cfg.ld_alpha}.")
        bad = sorted(loss.name for loss in chosen if loss.length_normalized)
        _check(not bad, f"ld_alpha does not apply to {bad}: they already normalise by length.")
    return True


# ------------------------------------------------------------------------------------------------------- terms
def _safe_div(num: Array, den: Array) -> Array:
    return num / jnp.maximum(den, 1.0)


def f_scores(logratios: Array, kind: str, alpha) -> Array:
    """f'(u) at u = pi/pi_ref for the f-DPO divergences (Wang et al. 2023, arXiv:2309.16240, Table 1)."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(u) = 1 - 1/u
        return 1.0 - jnp.exp(-logratios)
    if kind == "js_divergence":  # f'(u) = log(2u / (1 + u)) = log 2 + log sigma(log u)
        return jnp.log(2.0) + jax.nn.log_sigmoid(logratios)
    near_one = jnp.abs(alpha - 1.0) < 1e-6  # alpha_divergence: f'(u) = (u^(alpha-1) - 1) / (alpha - 1)
    a1 = jnp.where(near_one, 1.0, alpha - 1.0)
    exponent = jnp.minimum(a1 * logratios, 80.0)  # TRL's fp32 clamp
    return jnp.where(near_one, logratios, (jnp.exp(exponent) - 1.0) / a1)


def _fill(x: LossInputs, ref_free: bool) -> LossInputs:
    """Fill optional fields with their documented defaults; zero reference log-probs when reference-free.

    Filler prompts and padding responses get harmless values (log-probs -1, counts 1): no NaN reaches a sum or a
    gradient."""
    n, k = x.logps_NxK.shape
    if ref_free:
        x = x.replace(ref_logps_NxK=jnp.zeros_like(x.logps_NxK))
    elif x.ref_logps_NxK is None:
        raise ValueError("reference log-probs are required unless the loss config is reference-free")
    raw = x.logps_NxK if x.raw_logps_NxK is None else x.raw_logps_NxK
    x = x.replace(
        len_NxK=x.tokens_NxK if x.len_NxK is None else x.len_NxK,
        raw_logps_NxK=raw,
        nll_logps_N=raw[:, 0] if x.nll_logps_N is None else x.nll_logps_N,
        nll_tokens_N=x.tokens_NxK[:, 0] if x.nll_tokens_N is None else x.nll_tokens_N,
        response_mask_NxK=jnp.ones((n, k), jnp.float32) if x.response_mask_NxK is None else x.response_mask_NxK,
        rank_NxK=jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k)) if x.rank_NxK is None else x.rank_NxK,
        prompt_mask_N=jnp.ones((n,), jnp.float32) if x.prompt_mask_N is None else x.prompt_mask_N,
    )
    real_N = x.prompt_mask_N > 0
    real_NxK = (x.response_mask_NxK > 0) & real_N[:, None]
    safe = {}
    for f in dataclasses.fields(x):
        v = getattr(x, f.name)
        if v is None or f.name in ("response_mask_NxK", "rank_NxK", "prompt_mask_N"):
            continue
        fill = 1.0 if "tokens" in f.name or f.name.startswith("len") else -1.0
        safe[f.name] = jnp.where(real_NxK if v.ndim == 2 else real_N, v, fill)
    return x.replace(prompt_mask_N=real_N.astype(jnp.float32), response_mask_NxK=real_NxK.astype(jnp.float32), **safe)


def worst_index(response_mask_NxK: Array) -> Array:
    """[N] index of each row's last real response (the worst; 1 for a pair)."""
    return jnp.maximum(jnp.sum(response_mask_NxK > 0, axis=-1) - 1, 0)


def best_and_worst(x_NxK: Array, response_mask_NxK: Array) -> tuple[Array, Array]:
    """x of the best response (index 0) and of the worst (the last real one), each [N]."""
    last_N = worst_index(response_mask_NxK)
    return x_NxK[:, 0], jnp.take_along_axis(x_NxK, last_N[:, None], axis=-1)[:, 0]


def make_terms(inputs: LossInputs, cfg, hp: LossParams) -> Terms:
    """Log-ratios and f-divergence scores of the (filled) inputs, and the pair views."""
    x = _fill(inputs, reference_free(cfg))
    logratios = x.logps_NxK - x.ref_logps_NxK
    scores = f_scores(logratios, cfg.f_divergence_type, hp.f_alpha_divergence_coef)
    worst_Nx1 = worst_index(x.response_mask_NxK)[:, None]

    def side(pick) -> Side:
        wpo = None if x.wpo_sum_NxK is None else pick(x.wpo_sum_NxK)
        return Side(pick(x.logps_NxK), pick(x.ref_logps_NxK), pick(x.tokens_NxK), pick(x.len_NxK),
                    pick(x.raw_logps_NxK), wpo, pick(logratios), pick(scores))

    return Terms(x, logratios, scores, x.prompt_mask_N, side(lambda v: v[:, 0]),
                 side(lambda v: jnp.take_along_axis(v, worst_Nx1, axis=-1)[:, 0]))


# ------------------------------------------------------------------------------------------------ entry points
def wpo_weights(t: Terms) -> Array:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2) as TRL: exp(mean_t (log p_t - log sum_v p_v^2)) of the
    chosen times the rejected response, without gradient."""
    if t.w.wpo_sum is None:
        raise ValueError("use_weighting needs wpo sums (token_logprobs(with_wpo=True))")
    log_w = _safe_div(t.w.wpo_sum, t.w.tokens) + _safe_div(t.l.wpo_sum, t.l.tokens)
    return lax.stop_gradient(jnp.exp(log_w))


def batch_nll(logps: Array, tokens: Array, mask: Array) -> Array:
    """Token-mean NLL over the real prompts of the (micro-)batch, -sum(logps) / sum(tokens), broadcast to [N]."""
    return jnp.broadcast_to(_safe_div(-jnp.sum(logps * mask), jnp.sum(tokens * mask)), mask.shape)


def _per_prompt(t: Terms, cfg, hp: LossParams) -> tuple[Array, dict[str, Array]]:
    types = loss_types(cfg)
    parts = {name: _checked(name, LOSSES[name].fn(t, hp), t) for name in dict.fromkeys(types)}
    total = sum(w * parts[name] for name, w in zip(types, hp.weights, strict=True))
    if cfg.rpo_alpha is not None:  # RPO (Pang et al. 2024, arXiv:2404.19733): + alpha * NLL(chosen), as TRL 0.x
        parts["rpo_nll"] = batch_nll(t.w.raw_logps, t.w.tokens, t.mask_N)
        total = total + hp.rpo_alpha * parts["rpo_nll"]
    if cfg.use_weighting:
        total = total * wpo_weights(t)
    return total, parts


def _checked(name: str, out, t: Terms) -> Array:
    """A loss's output as the registry promises it: a float array [N] (one loss per prompt). Checked when the step is
    traced (shapes and dtypes are static), so a user loss with the wrong output fails with one line naming it."""
    n = t.mask_N.shape[0]
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != (n,) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        what = f"shape {shape} and dtype {dtype}" if shape is not None else f"a {type(out).__name__}"
        raise LossOutputError(
            f"loss {name!r} returned {what}; a loss returns one float value per prompt, shape [N] = ({n},) "
            f"(K = {t.logratios_NxK.shape[1]} responses each); reduce over K inside the loss, not over N.")
    return out


class LossOutputError(UserError, ValueError):
    """A registered loss function returned something other than a float array [N]."""


def _check_shape(inputs: LossInputs, cfg) -> None:
    pair = [loss.name for loss in traits(cfg) if not loss.kwise]
    if pair and inputs.num_responses != 2:
        raise ValueError(f"pair losses {pair} need K = 2 responses per prompt, got K = {inputs.num_responses}")


def per_pair_losses(inputs: LossInputs, cfg, hp: LossParams | None = None) -> tuple[Array, dict[str, Array]]:
    """Per-prompt total loss [N] (weighted sum over types, + rpo_alpha * NLL, times WPO weights) and each part [N].

    Filler prompts are not zeroed here (except by `aot*`); batch-level parts repeat their batch value."""
    validate_loss_config(cfg)
    _check_shape(inputs, cfg)
    hp = LossParams.of(cfg) if hp is None else hp
    return _per_prompt(make_terms(inputs, cfg, hp), cfg, hp)


def prompt_sums(mask_N: Array):
    """v [N] -> (sum over real prompts, number of real prompts), without gradient: a metric."""
    n = jnp.sum(mask_N)
    return lambda v: (lax.stop_gradient(jnp.sum(v * mask_N)), n)


def preference_loss(inputs: LossInputs, cfg, hp: LossParams | None = None) -> tuple[Array, MetricSums]:
    """Sum over real prompts of the configured loss, and metric (sum, count) pairs.

    Divide the sum by the total number of real prompts after accumulating micro-batches. Metrics: `loss`,
    `reward_metrics`, `loss/<type>` when several types are combined, `nll_loss` (sft / RPO), and each loss's own
    (ORPO's `log_odds_ratio`, `log_odds_chosen`; Plackett-Luce's ranking metrics). `hp` defaults to the config's
    numbers; pass a LossParams of arrays to jit or vmap over them."""
    validate_loss_config(cfg)
    _check_shape(inputs, cfg)
    hp = LossParams.of(cfg) if hp is None else hp
    t = make_terms(inputs, cfg, hp)
    per_prompt, parts = _per_prompt(t, cfg, hp)
    prompt_sum = prompt_sums(t.mask_N)
    metrics: MetricSums = {"loss": prompt_sum(per_prompt)}
    metrics.update(_reward_metrics(t, cfg, hp))
    types = loss_types(cfg)
    if len(set(types)) > 1:
        metrics.update({f"loss/{name}": prompt_sum(parts[name]) for name in dict.fromkeys(types)})
    if "rpo_nll" in parts:
        metrics["nll_loss"] = prompt_sum(parts["rpo_nll"])
    for loss in traits(cfg):
        if loss.metrics is not None:
            metrics.update(loss.metrics(t, hp))
    return jnp.sum(per_prompt * t.mask_N), metrics


def _reward_metrics(t: Terms, cfg, hp: LossParams) -> MetricSums:
    if all(loss.length_normalized for loss in traits(cfg)):
        logp_w, logp_l = _safe_div(t.w.raw_logps, t.w.tokens), _safe_div(t.l.raw_logps, t.l.tokens)
        reward_w, reward_l = hp.beta * logp_w, hp.beta * logp_l
    else:
        logp_w, logp_l = t.w.logps, t.l.logps
        reward_w, reward_l = hp.beta * t.w.logratios, hp.beta * t.l.logratios
    prompt_sum = prompt_sums(t.mask_N)
    return {
        "rewards/chosen": prompt_sum(reward_w),
        "rewards/rejected": prompt_sum(reward_l),
        "rewards/accuracies": prompt_sum((reward_w > reward_l).astype(jnp.float32)),
        "rewards/margins": prompt_sum(reward_w - reward_l),
        "logps/chosen": prompt_sum(logp_w),
        "logps/rejected": prompt_sum(logp_l),
    }


def reward_metrics(inputs: LossInputs, cfg, hp: LossParams | None = None) -> MetricSums:
    """TRL's reward metrics as (sum over real prompts, number of real prompts), over the best (chosen) and the
    worst real (rejected) response: rewards/chosen = beta * (log pi(y_w) - log pi_ref(y_w)) (reference zero when
    reference-free), rewards/accuracies = [reward_w > reward_l], rewards/margins, logps/* the policy sums. With
    only length-normalised losses (SimPO/ORPO) the log-probs are per-token means (TRL's CPO/ORPO trainers)."""
    hp = LossParams.of(cfg) if hp is None else hp
    return _reward_metrics(make_terms(inputs, cfg, hp), cfg, hp)


def finalize_metrics(sums: MetricSums) -> dict[str, Array]:
    """(sum, count) -> sum / count (0 where count is 0)."""
    return {k: jnp.where(c > 0, s / jnp.maximum(c, 1e-12), 0.0) for k, (s, c) in sums.items()}


def loss_inputs_from_stats(policy, ref=None, *, num_responses: int = 2, prompt_mask_N: Array | None = None,
                           response_mask_NxK: Array | None = None, rank_NxK: Array | None = None) -> LossInputs:
    """LossInputs from `logprobs.SeqStats` of B = N * K sequences laid out prompt by prompt (policy and optional
    reference). The LD-weighted sums are used when present; raw sums feed sft/RPO/SimPO/ORPO."""
    k = num_responses

    def grid(v):
        return None if v is None else v.reshape(-1, k)

    def logps(stats):
        return grid(stats.ld_logps_B if stats.ld_logps_B is not None else stats.logps_B)

    nll_logps = grid(policy.lm_logps_B)
    nll_tokens = grid(policy.lm_tokens_B)
    return LossInputs(
        logps_NxK=logps(policy), ref_logps_NxK=None if ref is None else logps(ref), tokens_NxK=grid(policy.tokens_B),
        len_NxK=grid(policy.completion_len_B), raw_logps_NxK=grid(policy.logps_B), wpo_sum_NxK=grid(policy.wpo_sum_B),
        nll_logps_N=None if nll_logps is None else nll_logps[:, 0],
        nll_tokens_N=None if nll_tokens is None else nll_tokens[:, 0],
        response_mask_NxK=response_mask_NxK, rank_NxK=rank_NxK, prompt_mask_N=prompt_mask_N,
    )
