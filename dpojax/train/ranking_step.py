"""The ranking batch loss: all K responses of each prompt in one forward, Plackett-Luce over the implicit rewards.

`ranking_batch_loss(params, ref_params, batch: RankedBatch, spec) -> (loss sum, metric sums)` is the `loss_fn` of
`step.StepSpec` when the loss is a ranking loss; `step.train_step` (gradient accumulation, one division by the
number of real rows, the non-finite skip) and `step.eval_step` run it unchanged. The policy and the frozen
reference score the [N*K, T] rows with `step.row_logps` (chunked head, fp32 sums), exactly as for pairs.

Glossary: N ranked rows (prompts), K responses per row, T tokens, B = N*K rows laid out row by row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax import ranking
from dpojax.data.ranked_batching import RankedBatch
from dpojax.logprobs import SeqStats, token_metric_sums
from dpojax.train.step import MetricSums, StepSpec, row_logps


def ranked_logps(graphdef, params, batch: RankedBatch, spec: StepSpec) -> SeqStats:
    """Per-sequence sums of one model over the [N, K, T] batch, flattened to B = N*K rows."""
    n, k, t = batch.input_ids_NxKxT.shape
    fields = (batch.input_ids_NxKxT, batch.positions_NxKxT, batch.segment_ids_NxKxT, batch.completion_mask_NxKxT)
    return row_logps(graphdef, params, *(x.reshape(n * k, t) for x in fields), spec)


def _best_worst_token_metrics(policy: SeqStats, batch: RankedBatch) -> MetricSums:
    """TRL's `logits/chosen`, `logits/rejected` over the (best, worst) response of each real row."""
    n, k = batch.response_mask_NxK.shape
    real_N = batch.row_mask_N

    def pick(x_B):  # [N*K] -> [2N] laid out best0, worst0, best1, worst1, ...
        best_N, worst_N = ranking.best_and_worst(x_B.reshape(n, k), batch.response_mask_NxK)
        return jnp.stack([best_N * real_N, worst_N * real_N], axis=1).reshape(2 * n)

    pair = SeqStats(
        logps_B=pick(policy.logps_B),
        tokens_B=pick(policy.tokens_B),
        completion_len_B=pick(policy.completion_len_B),
        mean_logit_sum_B=None if policy.mean_logit_sum_B is None else pick(policy.mean_logit_sum_B),
    )
    return token_metric_sums(pair)


def ranking_batch_loss(params, ref_params, batch: RankedBatch, spec: StepSpec) -> tuple[jax.Array, MetricSums]:
    """(sum over real rows of the Plackett-Luce loss, metric sums) for one micro-batch; the reference is frozen."""
    n, k, _ = batch.input_ids_NxKxT.shape
    policy = ranked_logps(spec.policy_graphdef, params, batch, spec)
    ref_logps_NxK = None
    if spec.ref_graphdef is not None:
        ref = jax.lax.stop_gradient(ranked_logps(spec.ref_graphdef, ref_params, batch, spec))
        ref_logps_NxK = ref.logps_B.reshape(n, k)
    loss_sum, metrics = ranking.ranking_loss(
        policy.logps_B.reshape(n, k), ref_logps_NxK, batch.rank_NxK, batch.response_mask_NxK, batch.row_mask_N,
        spec.loss,
    )  # fmt: skip
    return loss_sum, {**metrics, **jax.lax.stop_gradient(_best_worst_token_metrics(policy, batch))}
