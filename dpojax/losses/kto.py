"""KTO on unpaired (thumbs-up / thumbs-down) rows, with TRL 1.16 KTOTrainer's semantics
(`trl/trainer/kto_trainer.py::_compute_loss`; Ethayarajh et al. 2024, arXiv:2402.01306).

Each row of a batch is one prompt with K responses: column 0 is the row's own completion, labelled desirable
(label 1) or undesirable (0); for `kto`, column 1 is its KL completion, another row's completion after this
prompt (`dpojax.data.unpaired`). With r = log pi(y|x) - log pi_ref(y|x) of the own completion:

    z0   = max(0, mean over the batch's rows of (log pi - log pi_ref) of the KL completions), no gradient
    kto:               desirable 1 - sigma(beta (r - z0)),   undesirable 1 - sigma(beta (z0 - r))
    apo_zero_unpaired: desirable 1 - sigma(beta r),          undesirable sigma(beta r)   (no KL completion)

each weighted by `loss.desirable_weight` / `loss.undesirable_weight`, and averaged over the batch's rows (not over
the weights). The KL term couples the rows of one forward, so this is a batch-level loss: `kto_loss` gets one
(micro-)batch and returns the SUM of its rows' losses (the step divides by the number of rows, as for every loss).
z0 is estimated per (micro-)batch, as TRL does per device batch and gradient-accumulation step; on a mesh the batch
is the global one (TRL gathers the per-device means and averages them).

Metrics follow TRL's: each is the (micro-)batch's value with count 1 (0 when the batch has no row of that class), so
summing over micro-batches, steps and eval batches and dividing gives TRL's mean of per-batch values. `loss` is the
exception: (sum over rows, rows), as the Trainer weighs eval losses by batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dpojax.losses.core import LossParams, MetricSums, register_loss

Array = jax.Array
UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")
KTO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected", "kl", "entropy")
OPTIONS = ("label_smoothing", "use_weighting", "ld_alpha", "rpo_alpha", "f_divergence_type", "reference_free")


def uses_kl(name: str) -> bool:
    """Whether the loss estimates the KL reference point (then every row carries a KL completion)."""
    return name == "kto"


def _batch_only(name: str, doc: str):
    def fn(t, hp):
        raise ValueError(f"{name} is a batch-level loss over unpaired rows: use losses.kto.kto_loss")

    fn.__doc__ = doc
    return fn


def _check(cfg) -> str | None:
    if cfg.desirable_weight < 0 or cfg.undesirable_weight < 0 or cfg.desirable_weight + cfg.undesirable_weight == 0:
        return (f"'loss.desirable_weight' = {cfg.desirable_weight} and 'loss.undesirable_weight' = "
                f"{cfg.undesirable_weight} must be >= 0, and not both 0.")
    defaults = {"label_smoothing": 0.0, "use_weighting": False, "ld_alpha": None, "rpo_alpha": None,
                "f_divergence_type": "reverse_kl", "reference_free": False}
    bad = [key for key in OPTIONS if getattr(cfg, key) != defaults[key]]
    types = (cfg.type,) if isinstance(cfg.type, str) else tuple(cfg.type)
    if len(types) > 1:
        return f"{types[0]} (unpaired rows) cannot be combined with other loss types; got {list(types)}."
    if bad:
        return f"{types[0]} does not support {bad} (pair-loss options, not in TRL's KTOTrainer); unset them."
    return None


DOCS = {
    "kto": "KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired rows, as TRL's KTOTrainer: `kto_loss`.",
    "apo_zero_unpaired": "APO-zero on unpaired rows (D'Oosterlinck et al. 2024, arXiv:2408.06266), as TRL's "
                         "KTOTrainer(loss_type='apo_zero_unpaired'): `kto_loss`.",
}
for _name in UNPAIRED_LOSSES:
    register_loss(_name, unpaired=True, metric_names=KTO_METRICS, check=_check)(_batch_only(_name, DOCS[_name]))


def _mean_with_count(values_N: Array, mask_N: Array) -> tuple[Array, Array]:
    """(mean of values over the mask, 1) or (0, 0) when the mask is empty: one batch's TRL-style value."""
    n = jnp.sum(mask_N)
    present = (n > 0).astype(jnp.float32)
    return lax.stop_gradient(jnp.sum(values_N * mask_N) / jnp.maximum(n, 1.0)), present


def kl_estimate(logps_N: Array, ref_logps_N: Array, real_N: Array) -> Array:
    """z0: max(0, mean over real rows of the KL completions' log-ratios), without gradient (TRL's `kl`)."""
    mean = jnp.sum((logps_N - ref_logps_N) * real_N) / jnp.maximum(jnp.sum(real_N), 1.0)
    return lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(logps_NxK: Array, ref_logps_NxK: Array, label_N: Array, prompt_mask_N: Array, cfg, hp: LossParams, *,
             logit_sum_NxK: Array | None = None, tokens_NxK: Array | None = None,
             entropy_sum_NxK: Array | None = None) -> tuple[Array, MetricSums]:
    """(sum over the real rows of the weighted KTO loss, TRL's metrics) of one (micro-)batch of unpaired rows.

    `logps_NxK` / `ref_logps_NxK`: policy and reference log-prob sums of each row's own completion (column 0) and,
    for `kto`, its KL completion (column 1); `label_N`: 1 desirable, 0 undesirable; `prompt_mask_N`: 1 real row,
    0 filler. `logit_sum_NxK` / `tokens_NxK`: sums of the mean logit over the scored tokens and their number
    (TRL's `logits/chosen|rejected`); `entropy_sum_NxK`: entropy summed over them (TRL's `entropy`, every row)."""
    name = cfg.type if isinstance(cfg.type, str) else cfg.type[0]
    real_N = (prompt_mask_N > 0).astype(jnp.float32)
    desirable_N = real_N * (label_N > 0)
    undesirable_N = real_N * (label_N <= 0)
    ref_N = jnp.where(real_N > 0, ref_logps_NxK[:, 0], 0.0)
    logps_N = jnp.where(real_N > 0, logps_NxK[:, 0], 0.0)
    logratio_N = logps_N - ref_N
    if uses_kl(name):
        z0 = kl_estimate(jnp.where(real_N > 0, logps_NxK[:, 1], 0.0), jnp.where(real_N > 0, ref_logps_NxK[:, 1], 0.0),
                         real_N)
        chosen_N = 1.0 - jax.nn.sigmoid(hp.beta * (logratio_N - z0))
        rejected_N = 1.0 - jax.nn.sigmoid(hp.beta * (z0 - logratio_N))
    else:  # apo_zero_unpaired: no KL reference point (TRL logs kl = 0)
        z0 = jnp.zeros((), jnp.float32)
        chosen_N = 1.0 - jax.nn.sigmoid(hp.beta * logratio_N)
        rejected_N = jax.nn.sigmoid(hp.beta * logratio_N)
    per_row_N = desirable_N * cfg.desirable_weight * chosen_N + undesirable_N * cfg.undesirable_weight * rejected_N
    loss_sum = jnp.sum(per_row_N)
    rewards_N = hp.beta * logratio_N
    one = jnp.ones((), jnp.float32)
    metrics: MetricSums = {
        "loss": (lax.stop_gradient(loss_sum), jnp.sum(real_N)),
        "rewards/chosen": _mean_with_count(rewards_N, desirable_N),
        "rewards/rejected": _mean_with_count(rewards_N, undesirable_N),
        "logps/chosen": _mean_with_count(logps_N, desirable_N),
        "logps/rejected": _mean_with_count(logps_N, undesirable_N),
        "kl": (z0, one),
    }
    both = metrics["rewards/chosen"][1] * metrics["rewards/rejected"][1]
    metrics["rewards/margins"] = ((metrics["rewards/chosen"][0] - metrics["rewards/rejected"][0]) * both, both)
    if logit_sum_NxK is not None and tokens_NxK is not None:
        for key, mask_N in (("logits/chosen", desirable_N), ("logits/rejected", undesirable_N)):
            tokens = jnp.sum(tokens_NxK[:, 0] * mask_N)
            total = jnp.sum(jnp.where(mask_N > 0, logit_sum_NxK[:, 0], 0.0))
            present = (tokens > 0).astype(jnp.float32)
            metrics[key] = (lax.stop_gradient(total / jnp.maximum(tokens, 1.0)), present)
    if entropy_sum_NxK is not None and tokens_NxK is not None:
        tokens = jnp.sum(tokens_NxK[:, 0] * real_N)
        total = jnp.sum(jnp.where(real_N > 0, entropy_sum_NxK[:, 0], 0.0))
        metrics["entropy"] = (lax.stop_gradient(total / jnp.maximum(tokens, 1.0)), one)
    return loss_sum, metrics
