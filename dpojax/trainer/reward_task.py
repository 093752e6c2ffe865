"""Reward-model training (config `task: reward`): the score model a run trains, and the scores and loss of one
micro-batch, as TRL 1.16's `RewardTrainer` computes them (docs/reward-models.md).

The policy slot of a run holds a `ScoreModel` (the shared decoder and its `score.weight` head, `models.score`): read
from a `*ForSequenceClassification` folder, or started from a causal LM with a new head as transformers and TRL
start one (`init_score_model`). There is no reference model. Each sequence (prompt + response) gets one score, the
head at its last real token: the rightmost token whose id is not the pad id (TRL sets the model's pad id to the
tokenizer's pad token, else its EOS token, and so does dpojax). Unpacked batches score their B = N * K rows
(`ScoreModel.__call__`); packed rows run the decoder once over each row (a shared prompt computed once) and read
the hidden state at each sequence's scored position (`PackedBatch.score_at_NxK`). The loss and metrics are
`losses.reward_loss` (Bradley-Terry on pairs, Plackett-Luce on rankings). A pair's `margin` (TRL's optional
column, `data.reward`) comes with the batch in the per-prompt table slot that precomputed reference log-probs use
(`ref_logps_NxK`, column 0; a reward model has no reference): `margin_tables` makes the tables, and the loop and
eval attach them as they attach reference tables.

LoRA (`model.lora`), as PEFT's SEQ_CLS task (`modules_to_save` = the score head): adapters on the decoder's targeted
modules, the head trained whole; the policy parameters are the adapters and the head, the frozen decoder sits in
the reference slot, and the export is the classifier with the adapters merged. Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax import losses
from dpojax.data.batching import PreferenceBatch
from dpojax.data.packing import PackedBatch
from dpojax.data.tokenize import TokenizedData
from dpojax.errors import ModelError
from dpojax.models import lora, score
from dpojax.models.config import ModelConfig


def build_score_model(mcfg: ModelConfig, name: str, how: str, kw: dict, *, pad_token_id: int | None, seed: int,
                      revision: str | None = None):
    """(graphdef, params, decoder ModelConfig) of a run's reward model: `pretrained` (a classifier folder's head,
    or a new head on a causal LM), `random` (config.json alone) or `abstract` (a checkpoint's restore target). `kw`:
    the run's model keyword arguments (`build.model_kw`)."""
    if how == "abstract":
        return (*score.abstract_score_model(mcfg, pad_token_id=pad_token_id, **kw), score.decoder_config(mcfg))
    if how == "random":
        model = score.random_score_model(mcfg, seed=seed, pad_token_id=pad_token_id, **kw)
        return (*nnx.split(model), score.decoder_config(mcfg))
    if score.has_score_head(name, revision):
        model, dcfg = score.load_score_model(name, revision=revision, **kw)
        score.check_reward_head(model.num_labels)
        model = score.ScoreModel(model.decoder, model.score, pad_token_id)  # TRL: the tokenizer's pad id
    else:
        model, dcfg = score.init_score_model(name, seed=seed, pad_token_id=pad_token_id, revision=revision, **kw)
    return (*nnx.split(model), dcfg)


def lora_score_model(graphdef, params, mcfg: ModelConfig, lora_cfg, sharder, fill):
    """(policy graphdef, trainable State: the decoder's adapters and the score head, frozen State: the decoder,
    LoraSetup) of a score model (graphdef, params) with LoRA on its decoder. `fill(adapters, groups)` gives the
    adapters their values (PEFT's init, a PEFT folder; identity for a checkpoint's abstract restore target)."""
    model = nnx.merge(graphdef, params)
    base_graphdef, base = nnx.split(model.decoder)
    adapted_graphdef, adapters, groups = lora.lora_model(base_graphdef, base, mcfg, lora_cfg, sharder)
    decoder = nnx.merge(adapted_graphdef, fill(adapters, groups), base)
    scored = score.ScoreModel(decoder, model.score, model.pad_token_id)
    policy_graphdef, trainable, frozen = nnx.split(scored, nnx.Any(lora.LoraParam, nnx.PathContains("score")), ...)
    setup = lora.LoraSetup(base_graphdef, tuple(groups), lora.scale_of(lora_cfg.alpha, lora_cfg.rank,
                                                                       lora_cfg.rslora))
    return policy_graphdef, trainable, frozen, setup


def merged_score_model(policy_graphdef, trainable, frozen, setup: lora.LoraSetup) -> score.ScoreModel:
    """The score model of a LoRA run with its adapters merged into the decoder's kernels (for an export)."""
    model = nnx.merge(policy_graphdef, nnx.merge_state(frozen, trainable))
    _, adapters, base = nnx.split(model.decoder, lora.LoraParam, ...)
    decoder = nnx.merge(setup.base_graphdef, lora.merged_state(base, adapters, list(setup.groups), setup.scale))
    return score.ScoreModel(decoder, model.score, model.pad_token_id)


def check_trained_head(name: str, revision: str | None = None) -> None:
    """ModelError unless `name` holds a trained score head: evaluating a reward model whose head a causal LM would
    get at random measures nothing."""
    if not score.has_score_head(name, revision):
        raise ModelError(
            f"{name} has no score head (score.weight): it is a causal LM, not a reward model, so there is nothing to "
            "evaluate (its head would be random). Point model.name_or_path at a *ForSequenceClassification folder "
            "(e.g. a reward run's export/), or at the output_dir of a reward run with checkpoints.")


def margin_tables(datasets: list[TokenizedData]) -> dict[str, np.ndarray] | None:
    """{data fingerprint: float32 [M, 2], each row's margin in column 0} when a data set has a margin column (the
    others get zeros), else None (no margins: no table in the batch)."""
    if all(d.margins is None for d in datasets):
        return None
    tables = {}
    for d in datasets:
        table = np.zeros((len(d), 2), np.float32)
        if d.margins is not None:
            table[:, 0] = d.margins
        tables[d.fingerprint] = table
    return tables


def check_causal_lm(name: str, revision: str | None = None) -> None:
    """ModelError when `name`, read as a preference run's policy or reference, is a sequence classifier (a reward
    model has a score head and no LM head: no log-probs)."""
    if score.has_score_head(name, revision):
        raise ModelError(
            f"{name} is a sequence classifier (score.weight, no LM head), a reward model: it has no log-probs for "
            "preference optimization. Train or evaluate it with task: reward, or give a causal LM.")


def batch_scores(graphdef, params, batch: PreferenceBatch | PackedBatch, spec) -> jax.Array:
    """fp32 [N, K]: the score of each sequence of one micro-batch (unpacked or packed; `spec`: the StepSpec)."""
    model = nnx.merge(graphdef, params)
    n, k = batch.response_mask_NxK.shape
    if isinstance(batch, PackedBatch):
        length = batch.input_ids_PxJ.shape[1]
        branch_PxJ = batch.branch_ids_PxJ if spec.packing == "shared_prompt" else None
        hidden_PxJxD = model.decoder(batch.input_ids_PxJ, batch.positions_PxJ, batch.segment_ids_PxJ, branch_PxJ,
                                     band=min(spec.band or length, length))
        hidden_BxD = jnp.take(hidden_PxJxD.reshape(-1, hidden_PxJxD.shape[-1]), batch.score_at_NxK.reshape(-1),
                              axis=0)
        logits_BxLb = jnp.einsum("bd,qd->bq", hidden_BxD.astype(jnp.float32),
                                 model.score.weight[...].astype(jnp.float32), preferred_element_type=jnp.float32)
    else:
        t = batch.input_ids_NxKxT.shape[-1]
        fields = (batch.input_ids_NxKxT, batch.positions_NxKxT, batch.segment_ids_NxKxT)
        logits_BxLb = model(*(x.reshape(n * k, t) for x in fields))
    return logits_BxLb[:, 0].reshape(n, k)


def reward_batch_loss(graphdef, params, batch: PreferenceBatch | PackedBatch, spec):
    """(sum over real prompts of the reward loss, metric sums) of one micro-batch (`losses.reward_loss`)."""
    scores_NxK = batch_scores(graphdef, params, batch, spec)
    margin_N = None if batch.ref_logps_NxK is None else batch.ref_logps_NxK[:, 0]
    return losses.reward_loss(scores_NxK, batch.rank_NxK, batch.response_mask_NxK, batch.prompt_mask_N,
                              margin_N=margin_N, center_coef=spec.reward_center)
