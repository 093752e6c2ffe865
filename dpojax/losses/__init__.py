"""Preference losses: one registry of pure functions with their traits (`core`), the pair losses of TRL 1.16 and
beyond (`pairwise`), and Plackett-Luce over K ranked responses (`ranking`). Importing this package registers them."""

from dpojax.losses import pairwise, ranking  # noqa: F401  (registers the built-in losses; KTO's: `.kto` below)
from dpojax.losses.core import (
    BASE_METRICS,
    F_DIVERGENCES,
    LOSSES,
    TRL_METRICS,
    Loss,
    LossInputs,
    LossParams,
    MetricSums,
    Terms,
    best_and_worst,
    finalize_metrics,
    is_kwise,
    is_unpaired,
    loss_inputs_from_stats,
    loss_types,
    make_terms,
    metric_names,
    needs_prompt_nll,
    per_pair_losses,
    preference_loss,
    reference_free,
    register_loss,
    reward_metrics,
    traits,
    validate_loss_config,
    worst_index,
)
from dpojax.losses.kto import KTO_METRICS, kto_loss
from dpojax.losses.ranking import RANKING_METRICS
from dpojax.losses.reward import REWARD_METRICS, reward_loss
from dpojax.losses.user import import_loss_modules

__all__ = [
    "BASE_METRICS", "F_DIVERGENCES", "KTO_METRICS", "LOSSES", "RANKING_METRICS", "REWARD_METRICS", "TRL_METRICS",
    "Loss", "LossInputs", "LossParams", "MetricSums", "Terms", "best_and_worst", "finalize_metrics", "is_kwise",
    "is_unpaired", "kto_loss", "loss_inputs_from_stats", "loss_types", "make_terms", "metric_names",
    "needs_prompt_nll", "per_pair_losses", "preference_loss", "reference_free", "register_loss", "reward_loss",
    "reward_metrics", "traits", "validate_loss_config", "worst_index", "import_loss_modules",
]
