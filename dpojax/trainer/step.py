"""Pure train and eval steps: policy and frozen reference log-probs, the preference loss, an Optax update.

One step for every loss and data format: a batch is [N prompts, K responses, T] (a pair is K = 2), the policy and
the reference score its B = N * K sequences, and `losses.preference_loss` turns the per-response sums into the loss
(unpaired rows, KTO: `losses.kto_loss`, a batch-level loss with its KL reference point).
`train_step(state, ref_params, batch) -> (state, metrics)` accumulates gradients over micro-batches with `lax.scan`
(sums, divided once by the number of real prompts), so `train.batch_size` prompts make one update whatever
`train.micro_batch_size` is. Metrics are `{name: (sum, count)}`; the loop divides. `make_spec` is the one step
builder (`train`, `eval` and `dpojax compile` use it); `compile_steps` jits with explicit shardings and donates
the train state. Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import einops
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpojax import losses
from dpojax.config import Config, LossSection
from dpojax.data import packing as packing_lib
from dpojax.data.batching import PreferenceBatch
from dpojax.data.packing import PackedBatch, Packing, row_length
from dpojax.errors import ConfigError
from dpojax.logprobs import (
    SeqStats,
    entry_logprobs,
    entry_sequence_stats,
    head_chunk,
    scored_mask,
    sequence_stats,
    token_logprobs,
    token_metric_sums,
)
from dpojax.losses import router
from dpojax.models import lora
from dpojax.models.attention import SEGMENT_ID_KERNELS
from dpojax.sharding import Sharder
from dpojax.trainer import reward_task
from dpojax.trainer.optim import make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What one optimizer step updates: a pytree (jit, vmap and donate it whole)."""

    step: jax.Array  # int32 scalar: batches consumed (= data position; a skipped non-finite step counts too)
    params: Any  # nnx.State of the policy
    opt_state: Any  # optax state


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How a run lays out its batches and which attention its models are built with, decided together (a kernel
    that masks by segment ids alone cannot keep a shared prompt's responses apart)."""

    packing: str  # none | padding_free | shared_prompt (never auto)
    attention: str  # model.attention as the models are built: `auto` is xla under shared-prompt packing


def resolve_kernels(packing: str, attention: str, backend: str | None = None) -> Kernels:
    """The packing and attention of a run with data.packing `packing` and model.attention `attention` on `backend`
    (default: jax.default_backend()): packing `auto` is shared_prompt (the XLA kernel masks sibling responses)
    except where the attention kernel takes segment ids only (splash on TPU, cuDNN when asked for), where it is
    padding_free; attention `auto` is then xla under shared-prompt packing (the only kernel that expresses its
    mask), else left to each model to resolve for its device (`models.attention.resolve_attention`)."""
    if packing not in packing_lib.MODES:
        raise ConfigError(f"config: 'data.packing' = {packing!r} is not one of {', '.join(packing_lib.MODES)}.")
    backend = backend or jax.default_backend()
    if packing == "shared_prompt" and attention in SEGMENT_ID_KERNELS:
        raise ConfigError(
            f"config: data.packing='shared_prompt' needs model.attention='xla' or 'auto': the {attention} kernel "
            "masks by segment ids only and cannot keep a prompt's responses apart; use data.packing='padding_free' "
            f"with model.attention='{attention}'."
        )
    if packing == "auto":
        segment_ids_only = attention in SEGMENT_ID_KERNELS or (attention == "auto" and backend == "tpu")
        packing = "padding_free" if segment_ids_only else "shared_prompt"
    return Kernels(packing, "xla" if attention == "auto" and packing == "shared_prompt" else attention)


def run_kernels(cfg: Config, backend: str | None = None) -> Kernels:
    """`resolve_kernels` of a config's data.packing and model.attention."""
    return resolve_kernels(cfg.data.packing, cfg.model.attention, backend)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static a step needs (hashable parts only)."""

    policy_graphdef: Any
    ref_graphdef: Any  # None when the loss is reference-free or the reference log-probs are precomputed
    loss: LossSection
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum: int = 1  # A micro-batches per optimizer step
    chunk_len: int = 256  # largest sequence chunk of the log-prob head (`logprobs.head_chunk` picks ~T/4 below it)
    vocab_tile: int | None = None  # vocabulary tile of the log-prob head (model.vocab_tile; None: one tile)
    sharder: Sharder | None = None
    precomputed_ref: bool = False  # reference log-probs come with the batch (batch.ref_logps_NxK)
    packing: str = "none"  # none | padding_free | shared_prompt (`resolve_kernels`; never auto)
    attention: str = "auto"  # model.attention as the models were built (`resolve_kernels`)
    band: int | None = None  # packed rows: the longest sequence (data.max_length), the attention band
    lora: bool = False  # params are LoRA adapters; the frozen base comes in the reference slot (ref_params)
    lora_dropout: float = 0.0  # model.lora.dropout: on the adapter inputs in training steps (not in eval)
    seed: int = 0  # model.seed: the dropout keys' root
    per_layer: bool = False  # layers unrolled (model.scan_layers false): the train step takes per-layer leaves
    moe: bool = False  # the policy is a mixture of experts: its forward returns router statistics (load metrics)
    router_aux_loss_coef: float = 0.0  # weight of the router load-balancing loss (`losses.router.resolve_aux_coef`)
    task: str = "preference"  # reward: the policy is a score model trained on its scores (`reward_task`)
    reward_center: float | None = None  # reward.center_rewards_coefficient (task reward)

    @property
    def unpaired(self) -> bool:  # KTO: unpaired rows with labels, a batch-level loss (`losses.kto`)
        return losses.is_unpaired(self.loss)

    @property
    def with_wpo(self) -> bool:
        return self.loss.use_weighting

    @property
    def lm_mask(self) -> bool:  # a loss whose NLL covers prompt and response (ORPO)
        return losses.needs_prompt_nll(self.loss)


def make_spec(cfg: Config, policy_graphdef, ref_graphdef, sharder: Sharder | None, *, total_steps: int,
              precomputed_ref: bool = False, kernels: Kernels | None = None, policy_cfg=None) -> StepSpec:
    """The one step builder: the StepSpec of `cfg` for `train`, `eval` and `dpojax compile` (`total_steps` is the
    learning-rate schedule's horizon; `kernels`: what the models were built with, default `run_kernels(cfg)`;
    `policy_cfg`: the policy's ModelConfig, which says whether it is a mixture of experts (None: dense))."""
    losses.validate_loss_config(cfg.loss)
    moe = policy_cfg is not None and policy_cfg.is_moe
    coef = router.resolve_aux_coef(cfg.loss.router_aux_loss_coef, num_experts=policy_cfg.num_experts if moe else 0,
                                   model_coef=policy_cfg.router_aux_loss_coef if moe else 0.0,
                                   model=cfg.model.name_or_path)
    optimizer, schedule = make_optimizer(cfg.optim, max(total_steps, 1))
    kernels = kernels or run_kernels(cfg)
    return StepSpec(policy_graphdef=policy_graphdef, ref_graphdef=None if precomputed_ref else ref_graphdef,
                    loss=cfg.loss, optimizer=optimizer, schedule=schedule, grad_accum=cfg.grad_accum_steps,
                    sharder=sharder, precomputed_ref=precomputed_ref, vocab_tile=cfg.model.vocab_tile,
                    packing=kernels.packing, attention=kernels.attention,
                    band=cfg.data.max_length, lora=cfg.model.lora.enabled,
                    lora_dropout=cfg.model.lora.dropout if cfg.model.lora.enabled else 0.0, seed=cfg.model.seed,
                    per_layer=not cfg.model.scan_layers, moe=moe, router_aux_loss_coef=coef, task=cfg.task,
                    reward_center=cfg.reward.center_rewards_coefficient)


def packing_of(spec: StepSpec, sharder: Sharder | None, *, train: bool) -> Packing | None:
    """How `spec`'s batches are packed (None: [N, K, T] batches): rows per micro-batch a multiple of the
    data-parallel devices; training batches in `spec.grad_accum` micro-batches."""
    if spec.packing == "none":
        return None
    shards = 1 if sharder is None else sharder.batch_shards
    return Packing(spec.packing, shards=shards, micro_batches=spec.grad_accum if train else 1, prompt_nll=spec.lm_mask,
                   scores=spec.task == "reward")


def sequence_logps(graphdef, params, batch: PreferenceBatch | PackedBatch, spec: StepSpec) -> SeqStats:
    """Per-sequence sums (SeqStats) of one model over a [N, K, T] batch (or the same prompts packed), flattened
    to B = N * K rows."""
    return scored_forward(graphdef, params, batch, spec)[0]


def scored_forward(graphdef, params, batch: PreferenceBatch | PackedBatch, spec: StepSpec, *,
                   with_router: bool = False):
    """(SeqStats as `sequence_logps`, the decoder's RouterStats or None). `with_router` (a mixture-of-experts
    model): its forward also sums each layer's router statistics over the batch's tokens, each token weighted by
    how many of the [N, K, T] batch's real sequences hold it (`token_weights`), so a shared prompt counts once per
    response and padding and filler prompts not at all, as in TRL's concatenated [chosen; rejected] batch."""
    if isinstance(batch, PackedBatch):
        return packed_logps(graphdef, params, batch, spec, with_router=with_router)
    n, k, t = batch.input_ids_NxKxT.shape
    fields = (batch.input_ids_NxKxT, batch.positions_NxKxT, batch.segment_ids_NxKxT, batch.completion_mask_NxKxT)
    weights_BxT = token_weights(batch) if with_router else None
    return row_logps(graphdef, params, *(x.reshape(n * k, t) for x in fields), spec, num_responses=k,
                     token_weights_BxT=weights_BxT)


def token_weights(batch: PreferenceBatch | PackedBatch) -> jax.Array:
    """fp32 weight of each computed token in MoE router statistics: how many real sequences of the [N, K, T] batch
    hold it ([B, T]; packed rows: [P, J], `PackedBatch.token_weight_PxJ`)."""
    if isinstance(batch, PackedBatch):
        return batch.token_weight_PxJ.astype(jnp.float32)
    real_NxKxT = (batch.segment_ids_NxKxT > 0) * batch.prompt_mask_N.astype(jnp.float32)[:, None, None]
    return real_NxKxT.reshape(-1, batch.segment_ids_NxKxT.shape[-1]).astype(jnp.float32)


def _decode(model, token_weights_BxT, *args, **kwargs):
    """(final hidden states, RouterStats or None): `model.forward` with the token weights when router statistics
    are asked for, else the plain call (dense models, the reference)."""
    if token_weights_BxT is None:
        return model(*args, **kwargs), None
    return model.forward(*args, **kwargs, token_weights_BxT=token_weights_BxT)


def row_logps(graphdef, params, ids_BxT, positions_BxT, seg_BxT, completion_mask_BxT, spec: StepSpec, *,
              num_responses: int = 2, token_weights_BxT=None):
    """(per-row sums (SeqStats), RouterStats or None) of one model over B sequences laid out prompt by prompt,
    K = `num_responses` each; router statistics when `token_weights_BxT` is given (`scored_forward`)."""
    model = nnx.merge(graphdef, params)
    hidden_BxTxD, stats = _decode(model, token_weights_BxT, ids_BxT, positions_BxT, seg_BxT)
    lm_mask_BxT = (seg_BxT > 0) if spec.lm_mask else None
    needed_BxT = scored_mask(completion_mask_BxT) > 0  # the head computes logits only where they are used
    if lm_mask_BxT is not None:
        needed_BxT = needed_BxT | (scored_mask(lm_mask_BxT) > 0)
    chunk = head_chunk(ids_BxT.shape[1], spec.chunk_len)
    tok = token_logprobs(hidden_BxTxD, model.unembedding(), ids_BxT, chunk_len=chunk, with_wpo=spec.with_wpo,
                         with_entropy=spec.unpaired,  # KTO logs TRL's `entropy`
                         softcap=model.final_softcap,  # Gemma 2's final logit soft-cap (None for most models)
                         needed_BxT=needed_BxT, vocab_tile=spec.vocab_tile)
    return sequence_stats(tok, completion_mask_BxT, ld_alpha=spec.loss.ld_alpha, lm_mask_BxT=lm_mask_BxT,
                          num_responses=num_responses), stats


def packed_logps(graphdef, params, batch: PackedBatch, spec: StepSpec, *, with_router: bool = False):
    """(SeqStats, RouterStats or None) of one model over packed rows: the same B = N * K rows as the [N, K, T]
    batch would give (`scored_forward`)."""
    model = nnx.merge(graphdef, params)
    length = batch.input_ids_PxJ.shape[1]
    branch_PxJ = batch.branch_ids_PxJ if spec.packing == "shared_prompt" else None
    hidden_PxJxD, stats = _decode(model, token_weights(batch) if with_router else None, batch.input_ids_PxJ,
                                  batch.positions_PxJ, batch.segment_ids_PxJ, branch_PxJ,
                                  band=min(spec.band or length, length))
    lm_PxI = batch.lm_PxI if spec.lm_mask else None
    valid_PxI = batch.completion_PxI > 0 if lm_PxI is None else (batch.completion_PxI > 0) | (lm_PxI > 0)
    tok = entry_logprobs(hidden_PxJxD, model.unembedding(), batch.src_PxI, batch.target_PxI, valid_PxI,
                         chunk_len=head_chunk(length, spec.chunk_len), with_wpo=spec.with_wpo,
                         with_entropy=spec.unpaired,  # KTO logs TRL's `entropy`
                         softcap=model.final_softcap, vocab_tile=spec.vocab_tile)
    return entry_sequence_stats(tok, batch.owner_PxI, batch.completion_PxI, batch.completion_len_NxK,
                                batch.response_mask_NxK, ld_shared_PxI=batch.ld_shared_PxI,
                                ld_alpha=spec.loss.ld_alpha, lm_PxI=lm_PxI), stats


def reference_logps(graphdef, params, batch: PreferenceBatch, spec: StepSpec) -> jax.Array:
    """[N, K] reference log-probs (LD-weighted when loss.ld_alpha is set): what `precomputed_stats` reads back."""
    stats = sequence_logps(graphdef, params, batch, spec)
    logps_B = stats.ld_logps_B if stats.ld_logps_B is not None else stats.logps_B
    return logps_B.reshape(batch.response_mask_NxK.shape)


def precomputed_stats(ref_logps_NxK: jax.Array) -> SeqStats:
    """SeqStats carrying only the (precomputed) log-prob sums, rows laid out prompt by prompt."""
    logps_B = ref_logps_NxK.reshape(-1).astype(jnp.float32)
    zeros_B = jnp.zeros_like(logps_B)
    return SeqStats(logps_B=logps_B, tokens_B=zeros_B, completion_len_B=zeros_B)


def sync_reference(params, ref_params, alpha: float):
    """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656) soft update: ref <- alpha * policy + (1 - alpha) * ref."""
    return jax.tree.map(lambda p, r: (alpha * p + (1.0 - alpha) * r).astype(r.dtype), params, ref_params)


class PerLayer(tuple):
    """A parameter stacked over the layers ([L, ...], under `layers/`) as its L per-layer arrays: how the train step
    takes and returns the policy's state when the layers are unrolled (`split_layers`)."""


jax.tree_util.register_pytree_node(PerLayer, lambda parts: (tuple(parts), None), lambda _, parts: PerLayer(parts))


def _is_per_layer(x) -> bool:
    return isinstance(x, PerLayer)


def _under_layers(path, x) -> bool:
    """A leaf with a leading dimension under `layers/` (the stacked blocks)."""
    return any(getattr(k, "key", None) == "layers" for k in path) and len(getattr(x, "shape", ())) >= 1


def stacked_layers(tree) -> int | None:
    """L, the leading dimension of the tree's parameters under `layers/` (None: it has none)."""
    return next((int(x.shape[0]) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                 if _under_layers(path, x)), None)


def split_layers(tree, num_layers: int):
    """`tree` (a TrainState, params, optimizer state) with every [L, ...] leaf under `layers/` as a `PerLayer` of
    its L slices. With unrolled layers the model reads each layer's weights by a static slice, and XLA copies
    every slice (and stacks the L gradients back) on each step, a large share of a small model's step on CPU
    (benchmarks/RESULTS.md, "Why the code is as it is"). Given the slices as separate arrays, `join_layers` stacks them
    inside the step and XLA folds each slice of that stack back into its input, forward and backward, while the
    optimizer updates each layer's leaves in place. Abstract leaves (ShapeDtypeStruct) give abstract parts."""

    def part(x, i):
        if isinstance(x, jax.ShapeDtypeStruct):
            sharding = x.sharding
            if isinstance(sharding, NamedSharding):
                sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
        return x[i]

    return jax.tree_util.tree_map_with_path(
        lambda path, x: PerLayer(part(x, i) for i in range(num_layers))
        if _under_layers(path, x) and x.shape[0] == num_layers else x,
        tree)


def join_layers(tree):
    """The inverse of `split_layers`: each `PerLayer` stacked back into its [L, ...] array (a no-op without them)."""
    return jax.tree.map(lambda x: jnp.stack(x) if _is_per_layer(x) else x, tree, is_leaf=_is_per_layer)


def batch_loss(params, ref_params, batch: PreferenceBatch, spec: StepSpec,
               hp: losses.LossParams | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, losses.MetricSums]:
    """(sum over real prompts of the loss, metric sums) for one micro-batch; the reference is frozen. `hp`: the
    loss hyper-parameters as data (default: the config's); `dropout_key`: training steps of a LoRA run with
    model.lora.dropout > 0."""
    params, ref_params = join_layers(params), join_layers(ref_params)  # per-layer leaves (`split_layers`), if any
    policy_graphdef = spec.policy_graphdef
    policy_params = nnx.merge_state(ref_params, params) if spec.lora else params  # LoRA: frozen base + adapters
    if dropout_key is not None:
        policy_graphdef, policy_params = lora.with_dropout(policy_graphdef, policy_params, spec.lora_dropout,
                                                           dropout_key)
    if spec.task == "reward":  # a score model: no log-probs, no reference
        return reward_task.reward_batch_loss(policy_graphdef, policy_params, batch, spec)
    policy, router_stats = scored_forward(policy_graphdef, policy_params, batch, spec, with_router=spec.moe)
    ref = None
    if spec.precomputed_ref:
        ref = precomputed_stats(batch.ref_logps_NxK)
    elif spec.ref_graphdef is not None:
        ref = jax.lax.stop_gradient(sequence_logps(spec.ref_graphdef, ref_params, batch, spec))
    if spec.unpaired:  # KTO: a batch-level loss over unpaired rows (`losses.kto`)
        loss_sum, metrics = unpaired_loss(policy, ref, batch, spec, hp)
    else:
        loss_sum, metrics = paired_loss(policy, ref, batch, spec, hp)
    if router_stats is not None:
        loss_sum, metrics = with_router_terms(loss_sum, metrics, router_stats, spec, batch.prompt_mask_N)
    return loss_sum, metrics


def unpaired_loss(policy: SeqStats, ref: SeqStats, batch, spec: StepSpec, hp: losses.LossParams | None):
    """(loss sum, metric sums) of KTO over one (micro-)batch of unpaired rows (column 0: each row's completion,
    column 1: its KL completion)."""
    k = batch.response_mask_NxK.shape[1]
    hp = losses.LossParams.of(spec.loss) if hp is None else hp

    def grid(v_B):
        return None if v_B is None else v_B.reshape(-1, k)

    return losses.kto_loss(grid(policy.logps_B), grid(ref.logps_B), batch.label_N, batch.prompt_mask_N, spec.loss,
                           hp, logit_sum_NxK=grid(policy.mean_logit_sum_B), tokens_NxK=grid(policy.tokens_B),
                           entropy_sum_NxK=grid(policy.entropy_sum_B))


def paired_loss(policy: SeqStats, ref: SeqStats | None, batch, spec: StepSpec, hp: losses.LossParams | None):
    """(loss sum, metric sums) of the configured preference loss over one (micro-)batch of K responses per
    prompt."""
    k = batch.response_mask_NxK.shape[1]
    inputs = losses.loss_inputs_from_stats(policy, ref, num_responses=k, prompt_mask_N=batch.prompt_mask_N,
                                           response_mask_NxK=batch.response_mask_NxK, rank_NxK=batch.rank_NxK)
    loss_sum, metrics = losses.preference_loss(inputs, spec.loss, hp)
    tok_metrics = token_metric_sums(policy, num_responses=k, response_mask_NxK=batch.response_mask_NxK,
                                    prompt_mask_N=batch.prompt_mask_N)
    return loss_sum, {**metrics, **jax.lax.stop_gradient(tok_metrics)}


def with_router_terms(loss_sum, metrics: losses.MetricSums, stats, spec: StepSpec, prompt_mask_N):
    """A mixture-of-experts forward's loss and metrics: `router_aux_loss_coef` x the load-balancing loss weighted
    by the forward's real prompts added to the loss (and to its `loss` metric, as TRL logs it), its `aux_loss`
    metric (only with a non-zero coefficient, as TRL), and the per-layer expert token counts, summed over a step's
    forwards and turned into load metrics by `losses.router.finish_load_metrics`."""
    counts_LxX, probs_LxX, tokens_L = stats  # RouterStats stacked over layers (`Decoder.forward`)
    zero = jnp.zeros((), jnp.float32)
    out = {**metrics, router.EXPERT_TOKENS: (jax.lax.stop_gradient(counts_LxX).astype(jnp.float32), zero)}
    if spec.router_aux_loss_coef:
        added, aux_metric = router.aux_loss_terms(counts_LxX, probs_LxX, tokens_L, spec.router_aux_loss_coef,
                                                  jnp.sum(prompt_mask_N))
        loss_sum = loss_sum + added
        out["loss"] = (metrics["loss"][0] + jax.lax.stop_gradient(added), metrics["loss"][1])
        out.update(aux_metric)
    return loss_sum, out


def _micro_batches(batch: PreferenceBatch, accum: int, sharder: Sharder | None) -> PreferenceBatch:
    """[N, ...] -> [A, N/A, ...]; micro-batch a takes rows a, a+A, a+2A, ... so each spans every data shard."""

    def split(x):
        x = einops.rearrange(x, "(n a) ... -> a n ...", a=accum)
        if sharder is not None:
            x = sharder.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
        return x

    return jax.tree.map(split, batch)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def train_step(state: TrainState, ref_params, batch: PreferenceBatch, spec: StepSpec,
               hp: losses.LossParams | None = None):
    """One optimizer update from a batch of `train.batch_size` prompts in `spec.grad_accum` micro-batches (pure).

    Gradients of `batch_loss` are summed over micro-batches (`lax.scan`) and divided once by the number of real
    prompts; a non-finite loss or gradient norm keeps params and optimizer state (`skipped_steps` 1). Returns
    (TrainState, {name: (sum, count)}) with `grad_norm`, `learning_rate` and `skipped_steps` added. `hp`: the loss
    hyper-parameters as data (default: the config's), e.g. vmapped for a beta sweep."""
    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

    def key_of(a):  # LoRA dropout: one key per (step, micro-batch)
        return lora.dropout_key(spec.seed, state.step, a) if spec.lora_dropout > 0 else None

    def accumulate(carry, xs):
        micro, a = xs
        (_, metrics), grads = grad_fn(state.params, ref_params, micro, spec, hp, key_of(a))
        return _add(carry, (grads, metrics)), None

    micros = _micro_batches(batch, spec.grad_accum, spec.sharder)
    first = jax.tree.map(lambda x: x[0], micros)
    shapes = jax.eval_shape(lambda: grad_fn(state.params, ref_params, first, spec, hp, key_of(0)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micros, jnp.arange(spec.grad_accum)))
    n_prompts = jnp.maximum(metrics["loss"][1], 1.0)  # real prompts in the batch: the loss's count
    grads = jax.tree.map(lambda g: g / n_prompts.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update: params and optimizer state stay as they were.
    finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
    )
    one = jnp.ones((), jnp.float32)
    metrics = {
        **router.finish_load_metrics(metrics),
        "grad_norm": (grad_norm.astype(jnp.float32), one),
        "learning_rate": (jnp.asarray(spec.schedule(state.step), jnp.float32), one),
        "skipped_steps": (1.0 - finite.astype(jnp.float32), one),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, ref_params, batch: PreferenceBatch, spec: StepSpec,
              hp: losses.LossParams | None = None) -> losses.MetricSums:
    """Metric sums {name: (sum, count)} of the policy `params` against the reference on one batch (pure)."""
    _, metrics = batch_loss(params, ref_params, batch, spec, hp)
    return router.finish_load_metrics(metrics)


def batch_sharding(sharder: Sharder) -> NamedSharding:
    """Prompts split over the data-parallel axes; the K and T axes are not split."""
    return NamedSharding(sharder.mesh, P(sharder.spec(("batch",))[0]))


def stacked_batch_sharding(sharder: Sharder) -> NamedSharding:
    """K steps' batches stacked on a leading axis (`TrainStep.many`): that axis whole, the prompts split as in
    `batch_sharding`."""
    return NamedSharding(sharder.mesh, P(None, sharder.spec(("batch",))[0]))


def shardings_of(tree) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


# XLA:CPU's default scheduler orders a program for concurrency, keeping many buffers live at once; its
# memory-optimized scheduler keeps fewer, so a step's temporaries shrink at no cost in speed (figures:
# benchmarks/RESULTS.md, "Why the code is as it is")
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(sharder: Sharder | None = None) -> dict[str, str] | None:
    """XLA options for the steps compiled for `sharder`'s devices (default: JAX's default backend): on CPU the
    memory-optimized scheduler, elsewhere none."""
    platform = sharder.mesh.devices.flat[0].platform if sharder is not None else jax.default_backend()
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


class TrainStep:
    """`train_step` jitted with explicit in/out shardings, the train state donated, over the flat leaves of the
    state and the reference: the train loop calls `flat` and keeps the state as leaves (`leaves_of`, `state_of`),
    so a step's dispatch does no Python pytree work (nnx Variables flatten and unflatten in Python, a cost per step
    comparable to a small model's whole step). With unrolled layers (`spec.per_layer`) the policy state's leaves are
    per layer (`split_layers`).
    `flat` returns the metrics stacked into one array (one read back per step; `metrics_def` unflattens them);
    `many` runs K steps in one dispatch (`train.steps_per_dispatch`: a `lax.scan` of `flat`'s step over K batches
    stacked on a leading axis, returning the K steps' metric arrays stacked); `__call__` and `lower` take and give
    the structured state and metrics."""

    def __init__(self, spec: StepSpec, state: TrainState, ref_params, sharder: Sharder):
        self.num_layers = stacked_layers(state.params) if spec.per_layer else None
        flat_state = self._split(_abstract(state))  # what `flat` takes (shapes and shardings only: nothing sliced)
        self.state_def, self.ref_def = jax.tree.structure(flat_state), jax.tree.structure(ref_params)
        self.stacked_sh = shardings_of(state)  # the structured state's shardings
        state_sh = [x.sharding for x in jax.tree.leaves(flat_state)]

        self.metrics_def = metrics_structure(spec, state, ref_params, sharder)  # what `flat`'s metric array holds

        def step(state_leaves, ref_leaves, batch):
            new, metrics = train_step(self.state_def.unflatten(state_leaves), self.ref_def.unflatten(ref_leaves),
                                      batch, spec)
            return jax.tree.leaves(new), jnp.stack(jax.tree.leaves(metrics))

        def steps(state_leaves, ref_leaves, batches):  # K steps, one per batch of `batches` (stacked on axis 0)
            return jax.lax.scan(lambda leaves, batch: step(leaves, ref_leaves, batch), state_leaves, batches)

        ref_sh = [x.sharding for x in jax.tree.leaves(ref_params)]
        self.flat = jax.jit(
            step, compiler_options=compiler_options(sharder),
            in_shardings=(state_sh, ref_sh, batch_sharding(sharder)),
            out_shardings=(state_sh, NamedSharding(sharder.mesh, P())),
            donate_argnums=(0,),
        )
        self.many = jax.jit(
            steps, compiler_options=compiler_options(sharder),
            in_shardings=(state_sh, ref_sh, stacked_batch_sharding(sharder)),
            out_shardings=(state_sh, NamedSharding(sharder.mesh, P())),
            donate_argnums=(0,),
        )
        if self.num_layers:  # the stacked state is donated into its per-layer leaves (never held twice)
            self._to_leaves = jax.jit(lambda s: jax.tree.leaves(self._split(s)), out_shardings=state_sh,
                                      donate_argnums=0)
            self._to_state = jax.jit(lambda leaves: join_layers(self.state_def.unflatten(leaves)),
                                     out_shardings=self.stacked_sh)

    def _split(self, state):
        return split_layers(state, self.num_layers) if self.num_layers else state

    def leaves_of(self, state: TrainState) -> list:
        """`flat`'s state argument for a structured (stacked) TrainState, which it consumes like `flat` does (its
        arrays are donated: do not use `state` after this)."""
        if not self.num_layers:
            return jax.tree.leaves(state)
        with warnings.catch_warnings():  # the per-layer leaves cannot reuse the stacked buffers; they are freed
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return self._to_leaves(state)

    def state_of(self, leaves: list) -> TrainState:
        """The structured TrainState of `flat`'s state leaves (a copy when the layers are split: an eval or a
        checkpoint briefly holds the state twice)."""
        return self._to_state(leaves) if self.num_layers else self.state_def.unflatten(leaves)

    def __call__(self, state: TrainState, ref_params, batch):
        leaves, metrics = self.flat(self.leaves_of(state), jax.tree.leaves(ref_params), batch)
        return self.state_of(leaves), self.metrics_def.unflatten(list(metrics))

    def lower(self, state: TrainState, ref_params, batch):
        """The lowered step for `state` (arrays or ShapeDtypeStructs with shardings; not consumed)."""
        leaves = jax.tree.leaves(self._split(_abstract(state)) if self.num_layers else state)
        return self.flat.lower(leaves, jax.tree.leaves(ref_params), batch)


def metrics_structure(spec: StepSpec, state: TrainState, ref_params, sharder: Sharder):
    """The tree structure of `train_step`'s metrics ({name: (sum, count)}: the names depend on the loss config, not
    on the batch), from its shapes on the smallest batch `spec` takes (nothing computed)."""
    batch = abstract_batch(spec, sharder, spec.grad_accum * sharder.batch_shards, 2, 8)
    shapes = jax.eval_shape(lambda s, r, b: train_step(s, r, b, spec)[1], _abstract(state), _abstract(ref_params),
                            batch)
    return jax.tree.structure(shapes)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def compile_steps(spec: StepSpec, state: TrainState, ref_params, sharder: Sharder):
    """Jitted (train_step, eval_step) with explicit in/out shardings; the train state is donated."""
    return TrainStep(spec, state, ref_params, sharder), compile_eval(spec, state.params, ref_params, sharder)


def compile_eval(spec: StepSpec, params, ref_params, sharder: Sharder):
    """Jitted eval_step (params and reference as placed, batch over the data axes, metrics replicated)."""
    return jax.jit(
        lambda p, r, b: eval_step(p, r, b, spec), compiler_options=compiler_options(sharder),
        in_shardings=(shardings_of(params), shardings_of(ref_params), batch_sharding(sharder)),
        out_shardings=NamedSharding(sharder.mesh, P()),
    )


def compile_sync(ref_params, alpha: float):
    """Jitted TR-DPO update of the reference (donated) from the policy params."""
    ref_sh = shardings_of(ref_params)
    return jax.jit(lambda p, r: sync_reference(p, r, alpha), out_shardings=ref_sh, donate_argnums=(1,))


def compile_reference(spec: StepSpec, ref_graphdef, ref_params, sharder: Sharder):
    """Jitted `(ref_params, batch) -> (prompt_index_N, ref_logps_NxK)`, replicated so every host reads all of it."""
    replicated = NamedSharding(sharder.mesh, P())
    return jax.jit(
        lambda r, b: (b.prompt_index_N, reference_logps(ref_graphdef, r, b, spec)),
        compiler_options=compiler_options(sharder),
        in_shardings=(shardings_of(ref_params), batch_sharding(sharder)),
        out_shardings=replicated,
    )


def abstract_state(params, optimizer: optax.GradientTransformation, sharder: Sharder) -> TrainState:
    """The TrainState `init_state` makes of `params` (arrays or ShapeDtypeStructs), as ShapeDtypeStructs with its
    shardings (nothing allocated): optimizer moments take their params' shardings, counters are replicated."""
    replicated = NamedSharding(sharder.mesh, P())
    abstract = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sh: sh, abstract, shardings_of(params), transform_non_params=lambda _: replicated
    )
    opt_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                             opt_shardings)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params, opt_state)


def init_state(params, optimizer: optax.GradientTransformation, sharder: Sharder) -> TrainState:
    """TrainState at step 0, placed as `abstract_state` says: optimizer moments take their params' shardings,
    counters are replicated."""
    target = abstract_state(params, optimizer, sharder)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings_of(target.opt_state))(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), target.step.sharding)
    return TrainState(step, params, opt_state)


def abstract_batch(spec: StepSpec, sharder: Sharder, n_prompts: int, num_responses: int,
                   seq_len: int) -> PreferenceBatch | PackedBatch:
    """One global batch of `n_prompts` prompts x `num_responses` responses of `seq_len` tokens as sharded
    ShapeDtypeStructs, laid out as `spec` packs it (packed: the worst case, nothing shared, every sequence `seq_len`
    long, rows balanced, in `spec.grad_accum` micro-batches)."""
    sh = batch_sharding(sharder)
    arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    nxk = (n_prompts, num_responses)
    ref_logps = arr(nxk, jnp.float32) if spec.precomputed_ref else None
    label = arr((n_prompts,), jnp.float32) if spec.unpaired else None
    if spec.packing == "none":
        shape = (n_prompts, num_responses, seq_len)
        return PreferenceBatch(
            arr(shape, jnp.int32), arr(shape, jnp.int32), arr(shape, jnp.int32), arr(shape, jnp.int32),
            arr(nxk, jnp.float32), arr(nxk, jnp.int32), arr((n_prompts,), jnp.float32), arr((n_prompts,), jnp.int32),
            ref_logps, label,
        )
    packing = packing_of(spec, sharder, train=True)
    tokens = n_prompts // packing.micro_batches * num_responses * seq_len  # per micro-batch
    rows = packing.shards * max(1, -(-tokens // (packing.shards * packing.row_capacity * seq_len)))
    rxl = (rows * packing.micro_batches, row_length(-(-tokens // rows)))
    return PackedBatch(
        *(arr(rxl, jnp.int32) for _ in range(7)), *(arr(rxl, jnp.float32) for _ in range(3)),
        arr(nxk, jnp.float32), arr(nxk, jnp.float32), arr(nxk, jnp.int32), arr((n_prompts,), jnp.float32),
        arr((n_prompts,), jnp.int32), ref_logps, token_weight_PxJ=arr(rxl, jnp.float32),
        score_at_NxK=arr(nxk, jnp.int32) if spec.task == "reward" else None, label_N=label,
    )
