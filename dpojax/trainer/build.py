"""Setting a run up (no step runs here): tokenizer and models on the mesh, tokenized data, reference tables, the
step built from the config and compiled. `loop.py` runs what this builds.

Stages: mesh -> tokenizer and models -> data -> reference log-probs (precomputed, optional) -> step spec, train
state and compiled steps. `dpojax eval` and `dpojax export` of a trained run build the policy abstractly and restore
its parameters alone (no optimizer state; export loads no reference).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpojax import losses, paths
from dpojax.config import Config
from dpojax.data import unpaired
from dpojax.data.batching import PreferenceBatch, steps_per_epoch
from dpojax.data.loader import load_preferences
from dpojax.data.reward import margin_column, reward_rows
from dpojax.data.tokenize import TokenizedData, check_token_ids, pad_token_id
from dpojax.errors import ConfigError, ModelError
from dpojax.models import experts, lora
from dpojax.models.attention import resolve_attention
from dpojax.models.config import ModelConfig
from dpojax.models.expert_parallel import check_expert_axis
from dpojax.models.families import FAMILIES
from dpojax.models.hf import abstract_params, init_random, load_pretrained, read_hf_config, resolve_model_dir
from dpojax.sharding import Sharder, check_fsdp_sharded, make_mesh
from dpojax.trainer import reference, reward_task
from dpojax.trainer.step import (
    Kernels,
    StepSpec,
    TrainState,
    batch_sharding,
    compile_eval,
    compile_reference,
    compile_steps,
    compile_sync,
    init_state,
    make_spec,
    packing_of,
    run_kernels,
)

log = logging.getLogger("dpojax")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------- models and data
@dataclasses.dataclass(frozen=True)
class Models:
    """The policy and its reference as a run holds them (new values are built with `dataclasses.replace`)."""

    tokenizer: Any  # None where no data is read (`abstract_models`)
    tokenizer_dir: Path | None
    policy_cfg: ModelConfig
    policy_graphdef: Any
    policy_params: Any  # arrays, or ShapeDtypeStructs (a checkpoint's restore target, a step lowered for compile)
    kernels: Kernels  # the packing and attention the models are built for
    ref_graphdef: Any = None  # None when the loss needs no reference, or its log-probs are precomputed
    ref_params: Any = None  # the reference's (LoRA: the frozen base's, which the policy runs on too)
    ref_tables: dict | None = None  # data fingerprint -> [M, K] precomputed reference log-probs
    lora: lora.LoraSetup | None = None  # LoRA runs: base graphdef, adapted modules, scale (for exports)


# (model name, how: pretrained | random | abstract) -> (graphdef, params, ModelConfig)
Loader = Callable[[str, str], tuple[Any, Any, ModelConfig]]


def make_sharder(cfg: Config, devices=None) -> Sharder:
    """The run's mesh over `devices` (default: every device of every process)."""
    return Sharder(make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices, expert=cfg.mesh.expert))


def import_transformers_quietly() -> None:
    """Import transformers without its "PyTorch was not found" warning (dpojax uses it for tokenizers only),
    leaving its later warnings as they were."""
    if "transformers" in sys.modules:
        return
    before = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        from transformers.utils import logging as hf_logging  # heavy; only runs that read data load a tokenizer
    finally:
        if before is None:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = before
    if before is None:
        hf_logging.set_verbosity_warning()


def load_tokenizer(cfg: Config) -> tuple[Any, Path]:
    import_transformers_quietly()
    from transformers import AutoTokenizer  # heavy; imported quietly above

    name = cfg.model.tokenizer or cfg.model.name_or_path
    folder = resolve_model_dir(name, cfg.model.revision)
    try:
        return AutoTokenizer.from_pretrained(str(folder)), folder
    except (OSError, ValueError) as e:
        raise ModelError(f"tokenizer: could not load a tokenizer from '{folder}': {e}") from None


def model_kw(cfg: Config, sharder: Sharder, attention: str) -> dict:
    """The keyword arguments every model of a run is built with (`Decoder`, `abstract_params`, ...)."""
    return dict(dtype=DTYPES[cfg.model.dtype], param_dtype=DTYPES[cfg.model.param_dtype], attention=attention,
                remat=cfg.model.remat, scan_layers=cfg.model.scan_layers, sharder=sharder)


def _build_model(cfg: Config, sharder: Sharder, attention: str, name: str, how: str, *,
                 pad_token_id: int | None = None):
    """(graphdef, params, ModelConfig) of `name`: `pretrained` weights, `random` init, or `abstract` (shapes and
    shardings only: the restore target of a checkpoint). A `Loader` once the first three are given. task: reward:
    the score model (`reward_task.build_score_model`, scoring at the last token that is not `pad_token_id`)."""
    kw = model_kw(cfg, sharder, attention)
    mcfg = ModelConfig.from_hf(read_hf_config(resolve_model_dir(name, cfg.model.revision)))
    check_expert_axis(mcfg.num_experts, sharder.experts, f"'{name}'")  # before any weight is read
    if cfg.task == "reward":
        return reward_task.build_score_model(mcfg, name, how, kw, pad_token_id=pad_token_id, seed=cfg.model.seed,
                                             revision=cfg.model.revision)
    if how == "pretrained":
        reward_task.check_causal_lm(name, cfg.model.revision)
    if how == "pretrained":
        model, mcfg = load_pretrained(name, revision=cfg.model.revision, **kw)
        return (*nnx.split(model), mcfg)
    if how == "abstract":
        return (*abstract_params(mcfg, **kw), mcfg)
    return (*nnx.split(init_random(mcfg, seed=cfg.model.seed, **kw)), mcfg)


def build_models(cfg: Config, sharder: Sharder, *, policy_from_checkpoint: bool = False,
                 with_reference: bool = True) -> Models:
    """Tokenizer, policy and (unless the loss is reference-free or `with_reference` is off) the frozen reference,
    all placed on the mesh. `policy_from_checkpoint`: the policy is abstract, to be restored from a checkpoint."""
    tokenizer, tok_dir = load_tokenizer(cfg)
    kernels = run_kernels(cfg)
    pad = pad_token_id(tokenizer) if cfg.task == "reward" else None  # TRL: the classifier's pad id is the tokenizer's
    load = functools.partial(_build_model, cfg, sharder, kernels.attention, pad_token_id=pad)
    models = assemble_models(cfg, load, sharder, kernels, policy_from_checkpoint=policy_from_checkpoint,
                             with_reference=with_reference)
    return dataclasses.replace(models, tokenizer=tokenizer, tokenizer_dir=tok_dir)


def abstract_models(cfg: Config, sharder: Sharder, read_config: Callable[[str], ModelConfig], *,
                    backend: str | None = None) -> Models:
    """The models of `cfg` as a training step holds them, abstract (sharded ShapeDtypeStructs, no weights read) from
    each model's config (`read_config(name)`), for `backend`'s devices (default: this host's): what `dpojax compile`
    lowers. With precomputed reference log-probs the reference is already gone, as after `precompute_references`."""
    kernels = run_kernels(cfg, backend)
    pcfg = read_config(cfg.model.name_or_path)  # `auto` attention resolved for `backend` (not this host's devices)
    kernels = dataclasses.replace(kernels, attention=resolve_attention(
        kernels.attention, dtype=DTYPES[cfg.model.dtype], head_dim=pcfg.head_dim, backend=backend,
        softcap=pcfg.attn_softcap, sliding_window=pcfg.has_sliding_window, sinks=pcfg.attention_sinks))

    def load(name: str, how: str):  # every model abstract, whatever `how`
        mcfg = read_config(name)
        check_expert_axis(mcfg.num_experts, sharder.experts, f"'{name}'")
        if cfg.task == "reward":
            return reward_task.build_score_model(mcfg, name, "abstract", model_kw(cfg, sharder, kernels.attention),
                                                 pad_token_id=None, seed=cfg.model.seed)
        # MoE: the grouped matmul of `backend` (ragged_dot on TPU), not this host's
        grouped = experts.grouped_kernel(backend)
        return (*abstract_params(mcfg, **model_kw(cfg, sharder, kernels.attention), grouped=grouped), mcfg)

    models = assemble_models(cfg, load, sharder, kernels, policy_from_checkpoint=True, with_reference=True)
    return without_reference(models, {}) if _precomputes(cfg, models) else models


def assemble_models(cfg: Config, load: Loader, sharder: Sharder, kernels: Kernels, *, policy_from_checkpoint: bool,
                    with_reference: bool) -> Models:
    """Policy and reference (no tokenizer) of `cfg`, each model made by `load`: the one place that decides which
    reference a run has, and how LoRA's adapters and frozen base fill the policy and reference slots."""
    if cfg.model.lora.enabled:
        return _lora_models(cfg, load, sharder, kernels, policy_from_checkpoint=policy_from_checkpoint,
                            with_base=with_reference)
    how = "abstract" if policy_from_checkpoint else ("random" if cfg.model.init == "random" else "pretrained")
    pgraph, pparams, pcfg = load(cfg.model.name_or_path, how)
    rgraph = rparams = None
    if with_reference and needs_reference(cfg):
        same = cfg.ref_name_or_path == cfg.model.name_or_path
        if same and cfg.model.init == "random":  # the reference is the policy's initial random weights
            if how == "random":
                rgraph, rparams = pgraph, jax.tree.map(jnp.copy, pparams)
            else:
                rgraph, rparams, _ = load(cfg.model.name_or_path, "random")
        else:
            rgraph, rparams, rcfg = load(cfg.ref_name_or_path, "pretrained")
            if rcfg.vocab_size != pcfg.vocab_size:
                raise ModelError(
                    f"the reference '{cfg.ref_name_or_path}' has vocab_size {rcfg.vocab_size} but the policy "
                    f"'{cfg.model.name_or_path}' has {pcfg.vocab_size}; DPO needs both to share one tokenizer."
                )
        if cfg.ref_model.sync_every and rgraph != pgraph:
            raise ConfigError(
                "config: 'ref_model.sync_every' (TR-DPO) mixes policy weights into the reference, so both must have "
                f"the same architecture; '{cfg.ref_name_or_path}' differs from '{cfg.model.name_or_path}'."
            )
    return Models(None, None, pcfg, pgraph, pparams, kernels, rgraph, rparams)


def _lora_models(cfg: Config, load: Loader, sharder: Sharder, kernels: Kernels, *, policy_from_checkpoint: bool,
                 with_base: bool) -> Models:
    """LoRA: the policy parameters are the adapters (initialized as PEFT does, read from `model.lora.init_from`, or
    abstract for a checkpoint restore); the frozen base sits in the reference slot (`ref_params`), where the step
    reads it for the policy too, and the reference is the base graphdef without adapters (None when the loss is
    reference-free). `with_base` off: the base stays abstract (a PEFT adapter export reads no base weights)."""
    how = ("random" if cfg.model.init == "random" else "pretrained") if with_base else "abstract"
    bgraph, bparams, mcfg = load(cfg.model.name_or_path, how)
    lcfg = cfg.model.lora
    if cfg.task == "reward":  # adapters on the score model's decoder, its head trained whole (PEFT's SEQ_CLS)
        def fill(adapters, groups):
            if policy_from_checkpoint:
                return adapters
            return (lora.load_peft(lcfg.init_from, adapters, groups, mcfg, lcfg) if lcfg.init_from
                    else lora.init_values(adapters, cfg.model.seed))

        pgraph, trainable, frozen, setup = reward_task.lora_score_model(bgraph, bparams, mcfg, lcfg, sharder, fill)
        return Models(None, None, mcfg, pgraph, trainable, kernels, None, frozen, lora=setup)
    if mcfg.is_moe:
        present = {"/".join(str(k) for k in path[:-1]) for path, _ in nnx.to_flat_state(bparams)
                   if path[-1] == "kernel"}
        lcfg = dataclasses.replace(lcfg, targets=moe_lora_targets(mcfg, lcfg.targets, cfg.model.name_or_path,
                                                                  present))
    pgraph, adapters, groups = lora.lora_model(bgraph, bparams, mcfg, lcfg, sharder)
    if not policy_from_checkpoint:
        adapters = (lora.load_peft(lcfg.init_from, adapters, groups, mcfg, lcfg) if lcfg.init_from
                    else lora.init_values(adapters, cfg.model.seed))
    rgraph = bgraph if needs_reference(cfg) else None
    setup = lora.LoraSetup(bgraph, tuple(groups), lora.scale_of(lcfg.alpha, lcfg.rank, lcfg.rslora))
    return Models(None, None, mcfg, pgraph, adapters, kernels, rgraph, bparams, lora=setup)


def needs_reference(cfg: Config) -> bool:
    """Whether a run has a reference model: a preference loss that is not reference-free (a reward model has
    none)."""
    return cfg.task == "preference" and not losses.reference_free(cfg.loss)


MOE_INTERNAL = ("layers/mlp/router", "layers/mlp/experts")  # dpojax paths of an MoE block's router and experts
FUSED_EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")  # transformers 5's in-memory expert parameters


def _moe_internal_modules(mcfg: ModelConfig) -> set[str]:
    """HF module names (layer 0, expert 0) of an MoE block's router and experts, with their parents below the layer
    (`mlp`, `mlp.experts`, ...): what a PEFT target naming them would match."""
    names = set()
    for path, row in FAMILIES[mcfg.family].table.items():
        if not path.startswith(MOE_INTERNAL):
            continue
        module = row[0].format(i=0, e=0).removesuffix(".weight")
        names.add(module)
        if "experts" in path:
            names.update(module.rsplit(".experts.", 1)[0] + "." + p for p in FUSED_EXPERT_PARAMS)
    prefixes = set()
    for name in names:
        parts = name.split(".")
        start = next(i for i, p in enumerate(parts) if p.isdigit()) + 1  # below model.layers.0
        prefixes.update(".".join(parts[: j + 1]) for j in range(start, len(parts)))
    return prefixes


def moe_lora_targets(mcfg: ModelConfig, targets: tuple[str, ...], model: str, present: set[str]) -> tuple[str, ...]:
    """The LoRA targets of a mixture-of-experts model: a target that names its experts or its router (PEFT's suffix
    rule) is refused, since dpojax adapts linear modules only and PEFT's `target_parameters` (LoRA on the experts'
    3-D weights) is not built; `all-linear` becomes every linear module but the router (PEFT's `all-linear` takes
    nn.Linear modules, and transformers' MoE routers and experts are not). `present`: the model's Dense paths."""
    internal = _moe_internal_modules(mcfg)

    def hits(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in internal)

    def unambiguous(hf_module: str) -> str:  # the shortest suffix of a module's name that names no expert
        parts = hf_module.format(i=0).split(".")
        return next(s for s in (".".join(parts[-k:]) for k in range(1, len(parts) + 1)) if not hits(s))

    allowed = tuple(sorted({unambiguous(g.hf) for g in lora.select_groups(mcfg, ("all-linear",), present)
                            if not g.parts[0].startswith(MOE_INTERNAL)}))
    named = [t for t in targets if t != "all-linear" and hits(t)]
    if named:
        raise ConfigError(
            f"config: 'model.lora.targets' = {list(targets)} names {named}, the experts or the router of the "
            f"mixture-of-experts model '{model}' ({mcfg.family}); LoRA on MoE models adapts attention and dense "
            f"modules only (LoRA on expert weights, PEFT's target_parameters, is not supported): target some of "
            f"{', '.join(allowed)} (or all-linear)."
        )
    return allowed if "all-linear" in targets else targets


def _precomputes(cfg: Config, models: Models) -> bool:
    """Whether the reference of `models` runs once before training (ref_model.precompute) rather than in the step."""
    return cfg.ref_model.precompute and models.ref_graphdef is not None


def without_reference(models: Models, tables: dict) -> Models:
    """`models` once the reference's log-probs are in `tables` (data fingerprint -> [M, K]): no reference model
    (LoRA: the frozen base stays, the policy runs on it)."""
    base = models.ref_params if models.lora is not None else None
    return dataclasses.replace(models, ref_graphdef=None, ref_params=base, ref_tables=tables)


def _reference_id(cfg: Config) -> str:
    """Fingerprint of the reference weights (precompute cache key; it reads the files): config.json and the weight
    files of the reference (LoRA: of the base), or config.json and the seed of a randomly initialised one."""
    name = cfg.model.name_or_path if cfg.model.lora.enabled else cfg.ref_name_or_path
    seed = cfg.model.seed if cfg.model.init == "random" and name == cfg.model.name_or_path else None
    folder = resolve_model_dir(name, cfg.model.revision)
    return reference.weights_fingerprint(folder, cache_dir(cfg), random_seed=seed)


def cache_dir(cfg: Config):
    """data.cache_dir (a local folder or a gs:// / s3:// URL), by default ~/.cache/dpojax."""
    return paths.path(cfg.data.cache_dir or Path.home() / ".cache" / "dpojax")


def load_split(cfg: Config, models: Models, spec: str, split: str, *, train: bool = False) -> TokenizedData:
    """Tokenized rows of one data split, checked against the policy's vocabulary. Unpaired rows (KTO) get their KL
    completions (`data.unpaired`); `train`: the training split, whose rows must hold both classes."""
    data = load_preferences(
        spec, models.tokenizer, split=split, max_length=cfg.data.max_length,
        truncation_mode=cfg.data.truncation_mode, cache_dir=str(cache_dir(cfg)), on_bad_row=cfg.data.on_bad_row,
        max_responses=cfg.data.max_responses, pairs_from_scores=cfg.data.pairs_from_scores,
        ranking_loss=None if cfg.task == "reward" else losses.is_kwise(cfg.loss),
        unpaired_loss=cfg.task != "reward" and losses.is_unpaired(cfg.loss), unpair=cfg.data.unpair,
    )
    data = check_token_ids(data, models.policy_cfg.vocab_size, models.tokenizer,
                           f"the policy '{cfg.model.name_or_path}'")
    if cfg.task == "reward":
        return reward_rows(data, cfg.data.max_length, margin_column(spec, split))
    if data.labels is None:
        return data
    if train:
        unpaired.check_balance(data, cfg.loss.desirable_weight, cfg.loss.undesirable_weight)
    if losses.kto.uses_kl(cfg.loss.type[0]):
        data = unpaired.with_kl_completions(data, cfg.micro_batch_size)
    return data


def precompute_references(cfg: Config, models: Models, sharder: Sharder, datasets: list[TokenizedData]) -> Models:
    """Run the reference once over each data set (cached on disk); the models without it (`without_reference`),
    or `models` as they were when nothing is precomputed. A reward model has no reference: its data's margin
    columns take the tables' place (`reward_task.margin_tables`)."""
    if cfg.task == "reward":
        return dataclasses.replace(models, ref_tables=reward_task.margin_tables(datasets))
    if not _precomputes(cfg, models):
        return models
    spec = make_spec(cfg, models.policy_graphdef, models.ref_graphdef, sharder, total_steps=1, kernels=models.kernels,
                     policy_cfg=models.policy_cfg)
    forward = compile_reference(spec, models.ref_graphdef, models.ref_params, sharder)
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    sharding = batch_sharding(sharder)
    settings = {"ld_alpha": cfg.loss.ld_alpha, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype}
    weights = _reference_id(cfg)
    tables = {}
    for data in datasets:
        key = reference.cache_key(data, weights, settings)
        tables[data.fingerprint] = reference.load_or_compute(
            cache_dir(cfg) / f"ref-{key}.npz",
            functools.partial(reference.precompute, forward, models.ref_params, data, bs,
                              lambda b: to_device(b, sharding), batch_kw=batch_kw(cfg, spec, sharder, train=False)),
        )
    return without_reference(models, tables)


def to_device(batch: PreferenceBatch, sharding) -> PreferenceBatch:
    """Host batch (this process's rows) -> global jax.Arrays sharded over the data axes. One process: one batched
    transfer of every field (a call per field costs host time on every step)."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def process_kw() -> dict:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def batch_kw(cfg: Config, spec: StepSpec, sharder: Sharder | None, *, train: bool) -> dict:
    """Keyword arguments of `train_batches` / `eval_batches` for a run: buckets, packing, this host's share."""
    return {"buckets": cfg.data.buckets, "packing": packing_of(spec, sharder, train=train), **process_kw()}


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass(frozen=True)
class Run:
    cfg: Config
    sharder: Sharder
    models: Models
    spec: StepSpec
    train_step: Any  # None for an eval-only run
    eval_step: Any
    total_steps: int  # optimizer steps of this run
    horizon: int  # steps of the learning-rate schedule (the run's first config's total)
    sync_reference: Any = None  # jitted TR-DPO update, when ref_model.sync_every is set

    def checkpoint_tree(self, state: TrainState, ref_params=None) -> dict[str, Any]:
        """The checkpoint items: params and optimizer state, plus the reference when TR-DPO changes it (`ref_params`:
        the reference as the loop has moved it; default: the run's own, e.g. as a restore target)."""
        tree = {"params": state.params, "opt_state": state.opt_state}
        if not self.sync_reference:
            return tree
        return {**tree, "ref": self.models.ref_params if ref_params is None else ref_params}

    def from_checkpoint_tree(self, tree: dict[str, Any], step: int) -> tuple[Run, TrainState]:
        """The run (with TR-DPO: its restored reference) and the train state of a restored checkpoint tree."""
        run = self
        if self.sync_reference:
            run = dataclasses.replace(self, models=dataclasses.replace(self.models, ref_params=tree["ref"]))
        replicated = NamedSharding(self.sharder.mesh, P())
        return run, TrainState(jax.device_put(jnp.asarray(step, jnp.int32), replicated), tree["params"],
                               tree["opt_state"])


def total_steps(cfg: Config, n_train_rows: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return cfg.train.epochs * steps_per_epoch(n_train_rows, cfg.train.batch_size)


def check_batch(cfg: Config, sharder: Sharder) -> None:
    n_data = sharder.batch_shards
    if cfg.micro_batch_size % n_data:
        key = "train.micro_batch_size" if cfg.train.micro_batch_size else "train.batch_size"
        raise ConfigError(
            f"config: '{key}' = {cfg.micro_batch_size} pairs must be divisible by the {n_data} "
            "devices that split the batch (mesh.data * mesh.fsdp * mesh.expert), so every device gets whole pairs; "
            "change the batch or the mesh."
        )
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    if eval_bs % n_data:
        raise ConfigError(
            f"config: 'train.eval_batch_size' = {eval_bs} must be divisible by the {n_data} "
            "devices that split the batch (mesh.data * mesh.fsdp * mesh.expert)."
        )


def step_spec(cfg: Config, models: Models, sharder: Sharder, *, horizon: int) -> StepSpec:
    """The StepSpec of a run of `models` on `sharder`'s mesh (`horizon`: the learning-rate schedule's length), its
    batch checked against the data-parallel devices: what `train`, `eval` and `dpojax compile` step with."""
    check_batch(cfg, sharder)
    return make_spec(cfg, models.policy_graphdef, models.ref_graphdef, sharder, total_steps=horizon,
                     precomputed_ref=models.ref_tables is not None, kernels=models.kernels,
                     policy_cfg=models.policy_cfg)


def check_sharded(models: Models, sharder: Sharder) -> None:
    """No big parameter silently whole on every device (the policy's, or with LoRA the frozen base's)."""
    check_fsdp_sharded(models.ref_params if models.lora is not None else models.policy_params, sharder.mesh)


def setup_train(cfg: Config, models: Models, sharder: Sharder, *, steps: int,
                horizon: int | None = None) -> tuple[Run, TrainState]:
    """The compiled train and eval steps and the train state at step 0 (the policy parameters move into it: the
    run's models hold none); `horizon`: the learning-rate schedule's length (default `steps`)."""
    horizon = steps if horizon is None else horizon
    spec = step_spec(cfg, models, sharder, horizon=horizon)
    check_sharded(models, sharder)
    state = init_state(models.policy_params, spec.optimizer, sharder)
    models = dataclasses.replace(models, policy_params=None)  # the state owns (and donates) them now
    train, evaluate = compile_steps(spec, state, models.ref_params, sharder)
    sync = compile_sync(models.ref_params, cfg.ref_model.mixup_alpha) if cfg.ref_model.sync_every else None
    return Run(cfg, sharder, models, spec, train, evaluate, steps, horizon, sync), state


def setup_eval(cfg: Config, models: Models, sharder: Sharder) -> Run:
    """An eval-only run: the compiled eval step, no optimizer state."""
    spec = step_spec(cfg, models, sharder, horizon=1)
    evaluate = compile_eval(spec, models.policy_params, models.ref_params, sharder)
    return Run(cfg, sharder, models, spec, None, evaluate, 0, 1)
