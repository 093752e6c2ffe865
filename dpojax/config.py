"""Run configuration: frozen dataclasses, YAML loading, dotted overrides, validation.

Every key has a real default here and nowhere else. `load_config(path, overrides)` reads YAML, applies
`section.key=value` overrides (values parsed as YAML scalars, then coerced to the field's type), and
validates. Mistakes raise `ConfigError` naming the key, the value, and what was expected; an unknown key
names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dpojax import losses, paths  # the loss registry owns its names, traits, ranges and combinations
from dpojax.data.formats import ON_BAD_ROW, PAIRS_FROM_SCORES
from dpojax.data.packing import MODES as PACKING_MODES
from dpojax.data.tokenize import TRUNCATION_MODES
from dpojax.errors import ConfigError
from dpojax.losses import F_DIVERGENCES
from dpojax.models.attention import IMPLEMENTATIONS
from dpojax.models.transformer import REMAT_NAMES
from dpojax.online.checks import validate_online

ONLINE_PAIRS = ("best_vs_worst", "all_pairs", "ranking")  # online.pairs: how scored samples become data


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA adapters (dpojax.models.lora); defaults are PEFT's LoraConfig. The reference is the base with the
    adapters off: no second model is loaded."""

    enabled: bool = False  # train LoRA adapters only (the base is frozen and is the reference)
    rank: int = 8  # r
    alpha: float = 8.0  # lora_alpha; scale = alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # lora_dropout: on the adapter inputs in training steps, in [0, 1)
    targets: tuple[str, ...] = ()  # HF module names (PEFT's target_modules) or "all-linear"; (): PEFT's default
    rslora: bool = False  # use_rslora
    init_from: Optional[str] = None  # a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name_or_path: str = ""  # HF hub id or local folder with config.json + *.safetensors
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    tokenizer: Optional[str] = None  # tokenizer folder/id; default: name_or_path
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of activations and matmuls
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of trainable params
    attention: Literal[IMPLEMENTATIONS] = "auto"  # attention kernel
    remat: Literal[REMAT_NAMES] = "none"  # rematerialization policy of each layer (see dpojax.models.transformer)
    scan_layers: bool = True  # lax.scan over stacked layers (one compiled layer body); false: unrolled, a longer
    # compile for faster steps on CPU
    init: Literal["pretrained", "random"] = "pretrained"  # random: build from config.json alone
    seed: int = 0  # init seed for init=random
    trust_remote_code: bool = False  # never needed by dpojax's own model code; kept off
    vocab_tile: Optional[int] = None  # vocabulary entries per tile of the log-prob head (None: the whole vocabulary)
    lora: LoraSection = LoraSection()  # LoRA adapters (off unless lora.enabled)


@dataclasses.dataclass(frozen=True)
class RefModelSection:
    name_or_path: Optional[str] = None  # default: model.name_or_path
    precompute: bool = False  # run the reference once over the data and cache its log-probs
    sync_every: Optional[int] = None  # TR-DPO: every this many steps ref <- mixup_alpha*policy + (1-mixup_alpha)*ref
    mixup_alpha: float = 0.6  # TR-DPO soft-update weight of the policy (TRL's ref_model_mixup_alpha)


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str = ""  # one source of a mixture: a file, a saved dataset folder, a hub id or a datasets builder ("json")
    weight: float = 1.0  # share of the mixture's rows, relative to the other sources' weights (>= 0)
    split: Optional[str] = None  # default: data.train_split
    name: Optional[str] = None  # hub config name
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    data_files: tuple[str, ...] = ()  # hub/builder data_files


@dataclasses.dataclass(frozen=True)
class DataSection:
    # HF hub id or local .jsonl/.json/.parquet/.csv, or a mixture: a list of sources {path, weight, split, name,
    # revision, data_files} (dpojax.data.mixture)
    train: Union[str, tuple[DataSource, ...]] = ""
    train_split: str = "train"
    eval: Optional[str] = None  # default: no eval set (dpojax eval falls back to data.train)
    eval_split: str = "test"
    max_length: int = 1024  # tokens per sequence (prompt + completion), as TRL's DPOConfig
    truncation_mode: Literal[TRUNCATION_MODES] = "keep_start"
    on_bad_row: Literal[ON_BAD_ROW] = "error"  # a malformed row stops the run, or is dropped and counted
    cache_dir: Optional[str] = None  # tokenized-data cache; default: ~/.cache/dpojax
    num_proc: Optional[int] = None  # tokenizer workers (2: threads; more: processes); default: one per CPU
    buckets: Optional[tuple[int, ...]] = None  # padded lengths; default: powers of two up to max_length
    max_responses: int = 8  # most responses per ranked/scored row (prompt, responses[, scores]); more is a bad row
    pairs_from_scores: Literal[PAIRS_FROM_SCORES] = "none"  # expand ranked rows into pairs
    unpair: bool = False  # kto: unroll each pair into a desirable (chosen) and an undesirable (rejected) row, as TRL
    # auto | none | padding_free | shared_prompt (dpojax.data.packing); auto: shared_prompt, padding_free on TPU
    packing: Literal[PACKING_MODES] = "auto"


@dataclasses.dataclass(frozen=True)
class LossSection:
    type: tuple[str, ...] = ("sigmoid",)  # a loss name or a list combined with `weights` (MPO)
    weights: Optional[tuple[float, ...]] = None  # one per type; default all 1.0
    beta: float = 0.1  # KL strength (temperature of the implicit reward)
    label_smoothing: float = 0.0  # cDPO / robust / exo / bco noise rate
    f_divergence_type: Literal[F_DIVERGENCES] = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # alpha of the alpha-divergence
    use_weighting: bool = False  # WPO weighting of each pair
    ld_alpha: Optional[float] = None  # LD-DPO: weight of the tail beyond the shared length
    rpo_alpha: Optional[float] = None  # RPO: weight of the NLL on chosen added to the loss
    discopop_tau: float = 0.05  # DiscoPOP mixing temperature
    simpo_gamma: float = 0.5  # SimPO target reward margin
    reference_free: bool = False  # use a uniform reference (no reference model)
    desirable_weight: float = 1.0  # kto / apo_zero_unpaired: weight of the desirable (label true) rows' losses
    undesirable_weight: float = 1.0  # kto / apo_zero_unpaired: weight of the undesirable (label false) rows' losses
    # mixture-of-experts policies: weight of the router load-balancing loss added to the policy loss (TRL's
    # router_aux_loss_coef); null: the checkpoint's config.json router_aux_loss_coef; 0 disables; dense models: null/0
    router_aux_loss_coef: Optional[float] = None
    import_: tuple[str, ...] = ()  # modules or .py files that register user losses, imported first (YAML key: import)


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """Reward-model training (task: reward; docs/reward-models.md): TRL's RewardConfig keys."""

    # weight of mean((r_chosen + r_rejected)^2) added to the loss, pulling rewards towards zero mean (TRL's
    # center_rewards_coefficient, Eisenstein et al. 2023 recommend 0.01); null: off
    center_rewards_coefficient: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: Literal["adamw", "rmsprop", "sgd", "adam"] = "adamw"
    lr: float = 1e-6  # peak learning rate
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # after warm-up
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    weight_decay: float = 0.0  # decoupled (adamw) or added to the gradient (others)
    max_grad_norm: Optional[float] = 1.0  # global-norm clipping; null disables
    b1: float = 0.9  # adam beta1
    momentum: float = 0.0  # sgd / rmsprop momentum (0: none, as PyTorch's default)
    b2: float = 0.999  # adam beta2
    eps: float = 1e-8  # adam / rmsprop epsilon
    rmsprop_decay: float = 0.99  # rmsprop squared-gradient decay (PyTorch's alpha)


@dataclasses.dataclass(frozen=True)
class ProfileSection:
    """A JAX profiler trace of a few train steps, written to output_dir/profile/ (TensorBoard / Perfetto)."""

    start_step: Optional[int] = None  # first traced optimizer step (1-based); null: no profile
    steps: int = 3  # traced steps from start_step


@dataclasses.dataclass(frozen=True)
class WandbSection:
    project: str = "dpojax"  # W&B project
    name: Optional[str] = None  # run name; default: output_dir's folder name
    mode: Literal["auto", "online", "offline"] = "auto"  # auto: online given an API key (env, wandb login)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    batch_size: int = 64  # global prompts per optimizer step (a pair, or a ranking of K responses, each)
    micro_batch_size: Optional[int] = None  # prompts per forward/backward; default: batch_size (no accumulation)
    steps: Optional[int] = None  # optimizer steps; default: epochs * (prompts // batch_size)
    epochs: int = 1
    seed: int = 0  # data order seed
    log_every: int = 10  # steps between train records in metrics.jsonl
    eval_every: Optional[int] = None  # steps between evals; default: only at the end
    eval_batch_size: Optional[int] = None  # prompts per eval step; default: batch_size
    max_bad_steps: int = 5  # consecutive non-finite steps (each skipped) before the run stops
    # optimizer steps per dispatch of the compiled step: K > 1 runs K consecutive steps (batches of one shape) in one
    # program, a loop over them on the devices, so the host's work per dispatch is paid once per K steps (for steps
    # of a few ms: small models on GPU/TPU); the same updates and records as K = 1. log_every, eval_every,
    # checkpoint.every and ref_model.sync_every must be multiples of it
    steps_per_dispatch: int = 1
    eval_samples: int = 0  # eval prompts whose greedy completions go to samples.jsonl at each eval (0 = none)
    eval_sample_tokens: int = 64  # most new tokens of each sample
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = ()  # also send metrics.jsonl's records there (TRL's name)
    wandb: WandbSection = WandbSection()  # W&B run settings (report_to: [wandb])
    profile: ProfileSection = ProfileSection()  # profiler trace of a few steps
    # persistent XLA compilation cache (local or gs://): a resumed or repeated run loads its compiled steps instead
    # of compiling them again; null: off. The JAX_COMPILATION_CACHE_DIR environment variable, when set, wins.
    compilation_cache: Optional[str] = "~/.cache/dpojax/xla"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # data-parallel axis (-1: fill the remaining devices)
    fsdp: int = 1  # parameter/optimizer-state sharding axis
    tensor: int = 1  # tensor-parallel axis (heads, mlp, vocab)
    # expert-parallel axis (MoE models): splits the experts of each MoE layer and, like data and fsdp, the batch;
    # must divide the model's number of experts
    expert: int = 1
    # context-parallel axis: the positions of each row split over this many devices (zig-zag blocks, keys and values
    # all-gathered in attention: docs/long-context.md), for rows longer than one device holds; 1: off
    context: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """Multi-process runs (see dpojax.distributed); one process needs none of this."""

    mode: Literal["auto", "on", "off"] = "auto"  # auto: join if a coordinator is set or a multi-process job detected
    coordinator: Optional[str] = None  # host:port of process 0 (or env DPOJAX_COORDINATOR); None: detect
    num_processes: Optional[int] = None  # processes in the run (or env DPOJAX_NUM_PROCESSES); None: detect
    process_id: Optional[int] = None  # this process, 0..num_processes-1 (or env DPOJAX_PROCESS_ID); None: detect
    initialization_timeout: int = 300  # seconds to wait for every process to connect
    heartbeat_timeout: int = 30  # seconds a process may miss heartbeats (sent every timeout/2) before all stop
    shutdown_timeout: int = 300  # seconds a finishing process waits for the others at exit


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: Optional[int] = None  # steps between checkpoints; default: only at the end
    keep: int = 2  # most recent checkpoints kept
    async_: bool = True  # write in the background (YAML key: async)
    best_metric: Optional[str] = None  # also keep the best checkpoint by this eval metric (e.g. rewards/accuracies)
    best_mode: Literal["max", "min"] = "max"  # whether a larger or smaller best_metric is better
    storage_timeout: float = 300.0  # seconds a gs:// or s3:// output_dir may stay unreachable before the run stops
    # (one line, exit 2; the same command resumes once the store answers)


@dataclasses.dataclass(frozen=True)
class OnlineSamplingSection:
    """How the policy samples its K responses per prompt (dpojax.generate's rules: temperature, then top-k, then
    top-p). The shapes are fixed for a run: every step samples max_new_tokens tokens for N x K rows."""

    temperature: float = 1.0  # > 0: on-policy sampling needs distinct responses (0 would make K copies)
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    max_new_tokens: int = 64  # tokens sampled per response; a response cut here has no EOS
    stop: tuple[str, ...] = ()  # stop strings: a response ends with the token that completes the first one


@dataclasses.dataclass(frozen=True)
class OnlineSection:
    """On-policy preference optimization (docs/online.md): the policy samples K responses per prompt, a reward
    scores them, and the scored samples become the preference batch the step trains on."""

    enabled: bool = False  # sample the training data from the policy instead of reading data.train
    # online: every optimizer step samples from the current policy; iterative: rounds of (sample a round's prompts,
    # score, train epochs_per_round epochs on them)
    schedule: Literal["online", "iterative"] = "online"
    prompts: str = ""  # prompt set: a file (.jsonl/.json/.parquet/.csv), a saved dataset folder or a hub id
    prompts_split: str = "train"  # split of a hub data set or saved DatasetDict
    samples_per_prompt: int = 4  # K >= 2 responses sampled per prompt
    sampling: OnlineSamplingSection = OnlineSamplingSection()  # temperature, top_k, top_p, max_new_tokens, stop
    # reward function 'module:function' or 'path/to/file.py:function', called as fn(prompts, completions,
    # **row_fields) -> list[float] (row_fields: the prompt rows' other columns, one list each)
    reward: Optional[str] = None
    reward_model: Optional[str] = None  # or a *ForSequenceClassification reward model (folder or hub id), scored in JAX
    # how a prompt's scored samples become data: best_vs_worst (one pair: highest vs lowest reward), all_pairs
    # (every pair of different rewards), ranking (the K samples ranked by reward, for a ranking loss); a prompt
    # whose samples all score the same is dropped and counted
    pairs: Literal[ONLINE_PAIRS] = "best_vs_worst"
    seed: int = 0  # sampling seed: step s samples with key (seed, s)
    rounds: int = 2  # iterative: rounds of sample -> score -> train
    prompts_per_round: Optional[int] = None  # iterative: prompts sampled per round; default: the whole prompt set
    epochs_per_round: int = 1  # iterative: epochs over a round's samples
    reference: Literal["initial", "previous_round"] = "initial"  # iterative: the reference of each round


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run's configuration, one frozen section per YAML section; build it with `config_from_dict` or
    `load_config` (which validate), never half-filled."""

    # preference: train a policy on preferences (DPO and the other losses); reward: train a reward model (a score
    # head on the decoder, Bradley-Terry on pairs, Plackett-Luce on rankings; no reference, no loss.* keys)
    task: Literal["preference", "reward"] = "preference"
    model: ModelSection = ModelSection()
    ref_model: RefModelSection = RefModelSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    reward: RewardSection = RewardSection()  # task: reward only
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    distributed: DistributedSection = DistributedSection()
    online: OnlineSection = OnlineSection()
    output_dir: str = "runs/default"  # run folder (local or gs://): config.yaml, metrics.jsonl, checkpoints/, export/

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.train.batch_size // self.micro_batch_size

    @property
    def ref_name_or_path(self) -> str:
        return self.ref_model.name_or_path or self.model.name_or_path


_ALIASES = {"async": "async_", "import": "import_"}  # YAML key -> field name (python keywords)


def _yaml_key(name: str) -> str:
    return {v: k for k, v in _ALIASES.items()}.get(name, name)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{where}{close[0]}'?" if close else ""
    return ConfigError(f"config: unknown key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Coerce a YAML value to the annotated type, or raise naming the key, value and expected type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config: '{key}' = {value!r} is not valid; expected {_type_name(tp)}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is tuple:
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        return tuple(_coerce(v, typing.get_args(tp)[0], key) for v in items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "path" in _fields(tp):  # a bare path in a list of sources
            value = {"path": value}
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: '{where.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}.")
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        if name not in fields:
            raise _unknown_key(str(key), [_yaml_key(n) for n in fields], where)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{where}{key}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config: override '{dotted}': '{part}' is not a section.")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"config: override '{text}' must look like section.key=value (e.g. optim.lr=1e-5).")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated Config from a dict of sections as in the YAML (`{"loss": {"beta": 0.1}, ...}`) plus dotted
    `section.key=value` overrides; raises ConfigError naming the key. Imports `loss.import` modules first."""
    raw = dict(raw or {})
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`config_from_dict` of a YAML file; errors name the file too."""
    path = paths.path(path)
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' not found.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: '{path}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: '{path}' must hold a mapping of sections (model:, data:, ...).")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


def validate(cfg: Config) -> None:
    """Cross-field checks that a type annotation cannot express."""
    t = cfg.train
    if not cfg.model.name_or_path:
        raise ConfigError("config: 'model.name_or_path' is required (a HF hub id or a local model folder).")
    if t.batch_size <= 0:
        raise ConfigError(f"config: 'train.batch_size' = {t.batch_size} must be positive.")
    if cfg.micro_batch_size <= 0 or t.batch_size % cfg.micro_batch_size:
        raise ConfigError(
            f"config: 'train.batch_size' = {t.batch_size} must be a multiple of 'train.micro_batch_size' = "
            f"{cfg.micro_batch_size} (gradient accumulation runs batch_size / micro_batch_size micro-steps)."
        )
    if cfg.data.max_length < 2:
        raise ConfigError(f"config: 'data.max_length' = {cfg.data.max_length} must be at least 2.")
    if t.steps is not None and t.steps <= 0:
        raise ConfigError(f"config: 'train.steps' = {t.steps} must be positive.")
    if t.epochs <= 0 or t.log_every <= 0:
        raise ConfigError("config: 'train.epochs' and 'train.log_every' must be positive.")
    if cfg.optim.lr < 0 or cfg.optim.warmup_steps < 0 or cfg.optim.weight_decay < 0:
        raise ConfigError("config: 'optim.lr', 'optim.warmup_steps' and 'optim.weight_decay' must be >= 0.")
    _validate_sections(cfg)
    _validate_task(cfg)
    _validate_lora(cfg)
    losses.import_loss_modules(cfg.loss.import_)  # user losses register themselves before their names are checked
    losses.validate_loss_config(cfg.loss)
    _validate_with_losses(cfg)
    validate_online(cfg)  # dpojax.online.checks
    d = cfg.distributed
    if min(d.initialization_timeout, d.heartbeat_timeout, d.shutdown_timeout) <= 0:
        raise ConfigError("config: 'distributed.*_timeout' values are seconds and must be positive.")
    if cfg.model.trust_remote_code:
        raise ConfigError("config: 'model.trust_remote_code' is not needed: dpojax runs its own model code.")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"config: {message}")


def _validate_sections(cfg: Config) -> None:
    t, o, c, d = cfg.train, cfg.optim, cfg.checkpoint, cfg.data
    for key, value in (("train.eval_every", t.eval_every), ("train.eval_batch_size", t.eval_batch_size),
                       ("checkpoint.every", c.every), ("train.micro_batch_size", t.micro_batch_size)):
        _require(value is None or value > 0, f"'{key}' = {value} must be positive (or null).")
    coef = cfg.loss.router_aux_loss_coef
    _require(coef is None or coef >= 0, f"'loss.router_aux_loss_coef' = {coef} must be >= 0 (or null).")
    r = cfg.ref_model
    _require(r.sync_every is None or r.sync_every > 0, f"'ref_model.sync_every' = {r.sync_every} must be positive.")
    _require(0 < r.mixup_alpha <= 1, f"'ref_model.mixup_alpha' = {r.mixup_alpha} must be in (0, 1].")
    _require(not (r.precompute and r.sync_every),
             "'ref_model.precompute' and 'ref_model.sync_every' (TR-DPO) exclude each other: a reference that "
             "changes during training cannot be precomputed.")
    _require(t.eval_samples >= 0 and t.eval_sample_tokens >= 1, f"'train.eval_samples' = {t.eval_samples} must be "
             f">= 0 and 'train.eval_sample_tokens' = {t.eval_sample_tokens} >= 1.")
    _require(t.max_bad_steps >= 1, f"'train.max_bad_steps' = {t.max_bad_steps} must be at least 1.")
    k = t.steps_per_dispatch
    _require(k >= 1, f"'train.steps_per_dispatch' = {k} must be at least 1.")
    for key, value in (("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                       ("checkpoint.every", c.every), ("ref_model.sync_every", r.sync_every)):
        _require(value is None or value % k == 0,
                 f"'{key}' = {value} must be a multiple of 'train.steps_per_dispatch' = {k}: records, evals, "
                 f"checkpoints and reference syncs fall where a dispatch of {k} steps ends (set {key} to a multiple "
                 f"of {k}, or lower train.steps_per_dispatch).")
    _require(t.profile.start_step is None or (t.profile.start_step >= 1 and t.profile.steps >= 1),
             f"'train.profile.start_step' = {t.profile.start_step} and 'train.profile.steps' = {t.profile.steps} "
             "must be at least 1 (start_step: null turns profiling off).")
    _require(d.max_responses >= 2, f"'data.max_responses' = {d.max_responses} must be at least 2 (a ranking).")
    _require(c.keep >= 1, f"'checkpoint.keep' = {c.keep} must be at least 1.")
    _require(c.storage_timeout > 0, f"'checkpoint.storage_timeout' = {c.storage_timeout} must be > 0 (seconds).")
    _require(cfg.model.vocab_tile is None or cfg.model.vocab_tile > 0,
             f"'model.vocab_tile' = {cfg.model.vocab_tile} must be a positive number of vocabulary entries (or null).")
    _require(cfg.model.vocab_tile is None or cfg.mesh.tensor == 1,
             f"'model.vocab_tile' = {cfg.model.vocab_tile} slices the vocabulary that mesh.tensor = {cfg.mesh.tensor} "
             "splits over devices, so every device would gather the whole unembedding; leave it null with tensor "
             "parallelism.")
    _require(c.best_metric is None or d.eval is not None,
             "'checkpoint.best_metric' needs an eval set: set 'data.eval' too.")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"'optim.b1' = {o.b1} and 'optim.b2' = {o.b2} must be in [0, 1).")
    _require(0 < o.rmsprop_decay < 1, f"'optim.rmsprop_decay' = {o.rmsprop_decay} must be in (0, 1).")
    _require(o.eps > 0 and 0 <= o.momentum < 1, "'optim.eps' must be positive and 'optim.momentum' in [0, 1).")
    _require(o.max_grad_norm is None or o.max_grad_norm > 0,
             f"'optim.max_grad_norm' = {o.max_grad_norm} must be positive (null disables clipping).")
    if d.buckets is not None:
        _require(all(b > 0 for b in d.buckets), f"'data.buckets' = {list(d.buckets)} must be positive lengths.")
        _require(max(d.buckets) >= d.max_length,
                 f"'data.buckets' = {list(d.buckets)} must reach data.max_length = {d.max_length} (add it).")
    for key in ("data", "fsdp", "expert", "context", "tensor"):
        value = getattr(cfg.mesh, key)
        _require(value == -1 or value > 0, f"'mesh.{key}' = {value} must be positive or -1 (fill).")


def _changed(section) -> list[str]:
    """The keys of a config section that differ from their defaults (nested sections by their own keys)."""
    out = []
    for f in dataclasses.fields(section):
        value, default = getattr(section, f.name), f.default
        if dataclasses.is_dataclass(value):
            out += [f"{_yaml_key(f.name)}.{k}" for k in _changed(value)]
        elif value != default:
            out.append(_yaml_key(f.name))
    return out


def _validate_task(cfg: Config) -> None:
    """task: reward trains a reward model: keys that only mean something to preference optimization are refused;
    the reward section is refused for a preference run."""
    if cfg.task == "preference":
        _require(not _changed(cfg.reward), f"'reward.{(_changed(cfg.reward) or [''])[0]}' is set, but it belongs to "
                 "reward-model training; set task=reward, or remove it.")
        return
    for name in ("loss", "ref_model", "online"):
        changed = _changed(getattr(cfg, name))
        _require(not changed, f"'{name}.{(changed or [''])[0]}' is set, but task=reward trains a reward model "
                 f"(Bradley-Terry / Plackett-Luce on its scores: no {name.replace('_', ' ')} section is read); remove "
                 f"it, or set task=preference to train a policy.")
    coef = cfg.reward.center_rewards_coefficient
    _require(coef is None or coef >= 0, f"'reward.center_rewards_coefficient' = {coef} must be >= 0 (or null).")
    _require(cfg.train.eval_samples == 0, "'train.eval_samples' samples completions from a policy; a reward model "
             "generates nothing: set it to 0 with task=reward.")


def _validate_lora(cfg: Config) -> None:
    lora = cfg.model.lora
    if not lora.enabled:
        changed = [f.name for f in dataclasses.fields(lora) if getattr(lora, f.name) != f.default]
        _require(not changed, f"'model.lora.{changed[0] if changed else ''}' is set but 'model.lora.enabled' is "
                              "false; set model.lora.enabled=true to train LoRA adapters.")
        return
    _require(lora.rank > 0, f"'model.lora.rank' = {lora.rank} must be positive.")
    _require(lora.alpha > 0, f"'model.lora.alpha' = {lora.alpha} must be positive.")
    _require(0 <= lora.dropout < 1, f"'model.lora.dropout' = {lora.dropout} must be in [0, 1).")
    _require(cfg.ref_model.name_or_path in (None, cfg.model.name_or_path),
             f"'ref_model.name_or_path' = {cfg.ref_model.name_or_path!r}: with LoRA the reference is the base model "
             "'model.name_or_path' with the adapters off (no second model is loaded); remove ref_model.name_or_path.")
    _require(not cfg.ref_model.sync_every,
             "'ref_model.sync_every' (TR-DPO) moves the reference towards the policy, but with LoRA the reference is "
             "the frozen base; remove ref_model.sync_every.")


def _validate_with_losses(cfg: Config) -> None:
    """Checks that need the loss registry's traits."""
    d, c = cfg.data, cfg.checkpoint
    kwise = losses.is_kwise(cfg.loss)
    _require(not (kwise and d.pairs_from_scores != "none"),
             f"'data.pairs_from_scores' = {d.pairs_from_scores!r} turns rankings into pairs, but loss.type="
             f"{cfg.loss.type[0]} trains on whole rankings; set data.pairs_from_scores=none or use a pair loss.")
    unpaired = losses.is_unpaired(cfg.loss)
    _require(not d.unpair or unpaired,
             f"'data.unpair' turns pairs into unpaired rows, which only loss.type=kto or apo_zero_unpaired trains "
             f"on (loss.type={list(cfg.loss.type)}); unset data.unpair or use loss.type=kto.")
    if unpaired:
        _require(not cfg.online.enabled, f"loss.type={cfg.loss.type[0]} trains on unpaired rows, which online "
                                         "sampling does not make; use a pair loss with online.enabled.")
        _require(cfg.loss.type[0] != "kto" or cfg.micro_batch_size >= 2,
                 f"loss.type=kto estimates its KL term from the other rows of a (micro-)batch, so it needs at least 2 "
                 f"rows per micro-batch (as TRL); got {cfg.micro_batch_size}: raise train.micro_batch_size.")
    if c.best_metric is not None:
        names = losses.REWARD_METRICS if cfg.task == "reward" else losses.metric_names(cfg.loss)
        _require(c.best_metric in names,
                 f"'checkpoint.best_metric' = {c.best_metric!r} is not an eval metric of this run; choose one of "
                 f"{', '.join(names)}.")


def to_dict(cfg: Any) -> dict:
    """Plain dict with YAML key names (for the run folder's resolved config.yaml)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[_yaml_key(f.name)] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
