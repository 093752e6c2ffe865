"""Sequence-classification (reward) models: the shared decoder plus transformers' linear score head.

Every supported family's `*ForSequenceClassification` (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3: transformers'
`GenericForSequenceClassification`; GPT-2 and GPT-NeoX their own copies of it) is the base model (the same weight
names as the causal LM's, prefix included, no LM head) and one weight `score.weight` [Lb, D], no bias. The logits of
a row are `score(hidden)` at ONE position: transformers takes the rightmost token whose id is not the config's
`pad_token_id` (left or right padding alike; a row of nothing but pad ids takes position 0), and the last position
when `pad_token_id` is None (then it refuses batches of more than one row). We take the rightmost real token
(segment id > 0) whose id is not `pad_token_id`, which is the same position for every row transformers accepts,
and also works without a pad id. Beware: when the pad id is also the EOS id, a row ending in EOS is scored at the
token before it, in both. Gemma 2's final logit soft-cap belongs to the LM head and is not applied, as in HF.

    model, cfg = load_score_model("path/to/reward-model")         # refuses a causal LM (no score.weight)
    graphdef, params = nnx.split(model)
    scores_B = sequence_scores(graphdef, params, ids_BxT, positions_BxT, segment_ids_BxT)   # fp32, jit-able
    scores = score_sequences(model, [[1, 5, 9], [1, 7]], batch_size=8)                     # host side: numpy [n]
    export_score_model(model, "out")            # AutoModelForSequenceClassification.from_pretrained("out")

Shapes use the glossary's letters: B rows, T positions, D width, Lb labels of the score head.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax.errors import ConfigError, DataError, ModelError
from dpojax.models import hf, layouts
from dpojax.models.config import ModelConfig
from dpojax.models.layers import make_param
from dpojax.models.transformer import Decoder
from dpojax.sharding import Sharder

SCORE_WEIGHT = "score.weight"  # transformers' name of the head, outside the base model's prefix
SCORE_AXES = (None, "embed")  # [Lb, D]: the width sharded like the embeddings', the few labels replicated
ARCHITECTURES = {  # HF model_type -> the *ForSequenceClassification class exports name in config.json
    "llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
    "gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification", "phi3": "Phi3ForSequenceClassification",
}
MIN_BUCKET = 16  # shortest length bucket of `score_sequences` (tokens)


class ScoreHead(nnx.Module):
    """`score.weight` [Lb, D] (Lb = num_labels; 1 for a reward model)."""

    def __init__(self, weight: nnx.Param):
        self.weight = weight

    @classmethod
    def init(cls, num_labels: int, D: int, *, param_dtype=jnp.float32, std: float = 0.02,
             rngs: nnx.Rngs) -> ScoreHead:
        """A new head, N(0, std^2) as transformers initializes it (std = config's initializer_range)."""
        return cls(make_param(rngs, (num_labels, D), SCORE_AXES, init="normal", param_dtype=param_dtype,
                              init_std=std))


class ScoreModel(nnx.Module):
    """A decoder without LM head, a score head, and the pad id that picks the scored token (module docstring).
    `model(ids_BxT, positions_BxT, segment_ids_BxT)` -> logits [B, Lb] in fp32."""

    def __init__(self, decoder: Decoder, score: ScoreHead, pad_token_id: int | None):
        if decoder.lm_head is not None:
            raise ModelError("internal: a score model's decoder has no LM head (build it with decoder_config).")
        self.decoder, self.score, self.pad_token_id = decoder, score, pad_token_id

    @property
    def num_labels(self) -> int:
        return self.score.weight.shape[0]

    def __call__(self, ids_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
        hidden_BxTxD = self.decoder(ids_BxT, positions_BxT, segment_ids_BxT)
        last_B = last_token_index(ids_BxT, segment_ids_BxT, self.pad_token_id)
        hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
        return jnp.einsum("bd,qd->bq", hidden_BxD.astype(jnp.float32), self.score.weight[...].astype(jnp.float32),
                          preferred_element_type=jnp.float32)


def last_token_index(ids_BxT: jax.Array, segment_ids_BxT: jax.Array, pad_token_id: int | None) -> jax.Array:
    """int32 [B]: the rightmost real token (segment id > 0) whose id is not `pad_token_id`; 0 when there is none."""
    keep_BxT = segment_ids_BxT > 0
    if pad_token_id is not None:
        keep_BxT = keep_BxT & (ids_BxT != pad_token_id)
    T = ids_BxT.shape[1]
    return jnp.max(jnp.where(keep_BxT, jnp.arange(T, dtype=jnp.int32)[None, :], 0), axis=1)


def sequence_logits(graphdef, params, ids_BxT, positions_BxT, segment_ids_BxT) -> jax.Array:
    """fp32 [B, Lb]: the head's logits at each row's scored token (pure; jit it with graphdef static)."""
    return nnx.merge(graphdef, params)(ids_BxT, positions_BxT, segment_ids_BxT)


def sequence_scores(graphdef, params, ids_BxT, positions_BxT, segment_ids_BxT) -> jax.Array:
    """fp32 [B]: the reward of each row (pure; jit it with graphdef static). A head of Lb != 1 labels is refused."""
    logits_BxLb = sequence_logits(graphdef, params, ids_BxT, positions_BxT, segment_ids_BxT)
    check_reward_head(logits_BxLb.shape[1])
    return logits_BxLb[:, 0]


def check_reward_head(num_labels: int) -> None:
    if num_labels != 1:
        raise ModelError(f"a reward model has one score (num_labels = 1); this classifier has num_labels = "
                         f"{num_labels}: use sequence_logits for its per-label logits, or a reward model.")


_scores_jit = jax.jit(sequence_scores, static_argnums=0)


# ---- loading -------------------------------------------------------------------------------------------------
def decoder_config(cfg: ModelConfig) -> ModelConfig:
    """The decoder of a classifier: the model's config without an LM head (a classifier has none, and a causal LM's
    `lm_head.weight`, when reading one, is ignored as a tied copy would be)."""
    return dataclasses.replace(cfg, tie_embeddings=True)


def config_num_labels(hf_config: dict) -> int:
    """num_labels as transformers reads config.json: the size of id2label, else num_labels, else 2."""
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels") or 2)


def _head_param(folder: pathlib.Path, stored: str, file: pathlib.Path, D: int, param_dtype,
                sharder: Sharder | None) -> nnx.Param:
    from safetensors import safe_open  # optional dependency, needed only to read checkpoints

    with safe_open(str(file), framework="numpy") as f:
        weight_LbxD = f.get_tensor(stored)
    if weight_LbxD.ndim != 2 or weight_LbxD.shape[1] != D:
        raise ModelError(f"{folder}: {SCORE_WEIGHT} has shape {weight_LbxD.shape}, expected [num_labels, {D}].")
    var = nnx.Param(jax.ShapeDtypeStruct(weight_LbxD.shape, param_dtype), logical_axes=SCORE_AXES)
    value = jax.make_array_from_callback(weight_LbxD.shape, hf.param_sharding(var, sharder),
                                         lambda index: weight_LbxD[index].astype(param_dtype))
    return nnx.Param(value, logical_axes=SCORE_AXES)


def load_score_model(name_or_path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                     attention: str = "auto", remat: str = "none", scan_layers: bool = True,
                     sharder: Sharder | None = None, revision: str | None = None) -> tuple[ScoreModel, ModelConfig]:
    """(ScoreModel, its decoder's ModelConfig) from a `*ForSequenceClassification` folder (or hub id), every param
    on its shards. ModelError for a folder without `score.weight` (a causal LM) or a head the config disagrees with.
    """
    folder = hf.resolve_model_dir(name_or_path, revision)
    hf_config = hf.read_hf_config(folder)
    cfg = decoder_config(ModelConfig.from_hf(hf_config))
    files = hf.weight_map(folder)
    if SCORE_WEIGHT not in files:
        arch = ", ".join(hf_config.get("architectures") or ["?"])
        raise ModelError(f"{folder} has no score head ({SCORE_WEIGHT}): it is not a sequence-classification (reward) "
                         f"model (architectures: {arch}). Give a *ForSequenceClassification folder, or start a new "
                         "reward model from a causal LM with init_score_model.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan_layers=scan_layers,
              sharder=sharder)
    decoder = hf.load_decoder(folder, cfg, heads=(SCORE_WEIGHT,), **kw)
    weight = _head_param(folder, SCORE_WEIGHT, files[SCORE_WEIGHT], cfg.hidden_size, param_dtype, sharder)
    if weight.shape[0] != config_num_labels(hf_config):
        raise ModelError(f"{folder}: {SCORE_WEIGHT} has {weight.shape[0]} labels but config.json says num_labels = "
                         f"{config_num_labels(hf_config)} (id2label); the folder is inconsistent.")
    return ScoreModel(decoder, ScoreHead(weight), hf_config.get("pad_token_id")), cfg


def has_score_head(name_or_path: str | pathlib.Path, revision: str | None = None) -> bool:
    """Whether a model folder (or hub id) holds a score head (`score.weight`): a sequence classifier, not a causal
    LM."""
    return SCORE_WEIGHT in hf.weight_map(hf.resolve_model_dir(name_or_path, revision))


def abstract_score_model(cfg: ModelConfig, *, num_labels: int = 1, pad_token_id: int | None = None,
                         sharder: Sharder | None = None, **decoder_kwargs):
    """(graphdef, State of ShapeDtypeStructs carrying their target shardings) of a classifier on `cfg`'s decoder
    (no memory): the restore target of a reward model's checkpoint. decoder_kwargs as for Decoder()."""
    cfg = decoder_config(cfg)
    param_dtype = decoder_kwargs.get("param_dtype", jnp.float32)
    model = nnx.eval_shape(lambda: ScoreModel(
        Decoder(cfg, rngs=nnx.Rngs(0), sharder=sharder, **decoder_kwargs),
        ScoreHead.init(num_labels, cfg.hidden_size, param_dtype=param_dtype, rngs=nnx.Rngs(0)), pad_token_id))
    graphdef, state = nnx.split(model)
    abstract = jax.tree.map(
        lambda v: v.replace(value=jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=hf.param_sharding(v, sharder))),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, abstract


def random_score_model(cfg: ModelConfig, *, seed: int = 0, num_labels: int = 1, pad_token_id: int | None = None,
                       sharder: Sharder | None = None, **decoder_kwargs) -> ScoreModel:
    """A classifier built from a config alone (model.init: random): the decoder as `hf.init_random` makes it (seed
    `seed`), the head N(0, initializer_range^2) (seed `seed` + 1)."""
    cfg = decoder_config(cfg)
    decoder = hf.init_random(cfg, seed=seed, sharder=sharder, **decoder_kwargs)
    std = float(cfg.hf_config.get("initializer_range", 0.02))
    head = _init_head(num_labels, cfg.hidden_size, decoder_kwargs.get("param_dtype", jnp.float32), std, sharder,
                      seed + 1)
    return ScoreModel(decoder, head, pad_token_id)


def init_score_model(name_or_path: str | pathlib.Path, *, num_labels: int = 1, seed: int = 0,
                     pad_token_id: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                     attention: str = "auto", remat: str = "none", scan_layers: bool = True,
                     sharder: Sharder | None = None, revision: str | None = None) -> tuple[ScoreModel, ModelConfig]:
    """A new classifier on a causal LM's decoder (its LM head dropped) with a random head, N(0, initializer_range^2)
    as transformers' `from_pretrained` of a *ForSequenceClassification on a causal LM would make it. pad_token_id:
    default the config's."""
    folder = hf.resolve_model_dir(name_or_path, revision)
    hf_config = hf.read_hf_config(folder)
    cfg = decoder_config(ModelConfig.from_hf(hf_config))
    decoder = hf.load_decoder(folder, cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat,
                              scan_layers=scan_layers, sharder=sharder)
    std = float(hf_config.get("initializer_range", 0.02))
    head = _init_head(num_labels, cfg.hidden_size, param_dtype, std, sharder, seed)
    pad = hf_config.get("pad_token_id") if pad_token_id is None else pad_token_id
    return ScoreModel(decoder, head, pad), cfg


def _init_head(num_labels: int, D: int, param_dtype, std: float, sharder: Sharder | None, seed: int) -> ScoreHead:
    abstract = nnx.eval_shape(lambda: ScoreHead.init(num_labels, D, param_dtype=param_dtype, std=std,
                                                     rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = hf.state_shardings(state, sharder)
    make = jax.jit(lambda key: nnx.split(ScoreHead.init(num_labels, D, param_dtype=param_dtype, std=std,
                                                        rngs=nnx.Rngs(key)))[1], out_shardings=shardings)
    return nnx.merge(graphdef, make(jax.random.key(seed)))


# ---- export --------------------------------------------------------------------------------------------------
def export_score_model(model: ScoreModel, out_dir: str | pathlib.Path, *,
                       tokenizer_dir: str | pathlib.Path | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write a HF `*ForSequenceClassification` folder (`hf.export_hf` plus `score.weight`, num_labels and the pad
    id in config.json) that `AutoModelForSequenceClassification.from_pretrained` loads with equal logits."""
    cfg, weight = model.decoder.cfg, model.score.weight
    head = (SCORE_WEIGHT, lambda: np.ascontiguousarray(layouts.to_host(weight[...])), tuple(weight.shape),
            weight.dtype)
    labels = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
    updates = {"architectures": [ARCHITECTURES[cfg.family]], "id2label": labels,
               "label2id": {v: int(k) for k, v in labels.items()}, "pad_token_id": model.pad_token_id}
    if "num_labels" in cfg.hf_config:  # transformers refuses a num_labels that disagrees with id2label
        updates["num_labels"] = model.num_labels
    return hf.export_hf(model.decoder, cfg, out_dir, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes,
                        heads=[head], config_updates=updates)


# ---- host side: scoring token lists in fixed-shape batches ---------------------------------------------------
def length_bucket(length: int, context: int) -> int:
    """The static length for `length` tokens: a power of two of at least MIN_BUCKET, at most the model's context."""
    return min(max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()), max(context, length))


def score_batch_arrays(rows: Sequence[Sequence[int]], batch_size: int, T: int, pad_id: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (ids, positions, segment ids) [batch_size, T] of `rows` (dummy one-token rows fill the batch)."""
    ids_BxT = np.full((batch_size, T), pad_id, np.int32)
    segment_ids_BxT = np.zeros((batch_size, T), np.int32)
    for b, r in enumerate(rows):
        ids_BxT[b, :len(r)], segment_ids_BxT[b, :len(r)] = r, 1
    segment_ids_BxT[len(rows):, 0] = 1
    positions_BxT = np.broadcast_to(np.arange(T, dtype=np.int32), (batch_size, T)).copy()
    return ids_BxT, positions_BxT, segment_ids_BxT


def score_sequences(model: ScoreModel, sequences: Sequence[Sequence[int]], *, batch_size: int = 8) -> np.ndarray:
    """fp32 [n]: the reward of each token list, `batch_size` rows at a time, right-padded to a power-of-two length
    bucket: one compile per bucket for the life of the process (the shapes never depend on the call)."""
    check_reward_head(model.num_labels)
    rows = [list(map(int, s)) for s in sequences]
    cfg, sharder = model.decoder.cfg, model.decoder.sharder
    if sharder is not None and batch_size % sharder.batch_shards:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of the {sharder.batch_shards} devices the "
                          "batch is split over.")
    context = cfg.max_position_embeddings
    for i, r in enumerate(rows):
        if not 0 < len(r) <= context:
            raise DataError(f"sequence {i} has {len(r)} tokens; a scored sequence needs 1 to {context} tokens (the "
                            "model's context): shorten it or leave it out.")
        if max(r) >= cfg.vocab_size or min(r) < 0:
            raise DataError(f"sequence {i} has token id {max(r) if max(r) >= 0 else min(r)} outside the reward "
                            f"model's vocabulary of {cfg.vocab_size}: does it share the policy's tokenizer?")
    pad_id = 0 if model.pad_token_id is None else model.pad_token_id
    graphdef, params = nnx.split(model)
    out = np.zeros(len(rows), np.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a bucket
    for lo in range(0, len(rows), batch_size):
        chunk = order[lo:lo + batch_size]
        T = length_bucket(max(len(rows[i]) for i in chunk), context)
        arrays = score_batch_arrays([rows[i] for i in chunk], batch_size, T, pad_id)
        scores_B = _scores_jit(graphdef, params, *(_place(x, sharder) for x in arrays))
        out[chunk] = np.asarray(jax.device_get(scores_B))[:len(chunk)]
    return out


def _place(x: np.ndarray, sharder: Sharder | None) -> jax.Array:
    if sharder is None:
        return jnp.asarray(x)
    return jax.device_put(x, sharder.named(("batch",) + (None,) * (x.ndim - 1), x.shape))
