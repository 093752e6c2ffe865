"""Hugging Face checkpoints <-> `Decoder`: load (safetensors only), random init, export.

Loading never builds unsharded state: the model is built abstractly (`nnx.eval_shape`), the target
sharding of every parameter comes from its logical axes, and each array is created on its shards by
`jax.make_array_from_callback`, whose callback reads (memory-mapped) only the layers of the slice it
is asked for. One declarative table per family maps our parameter paths to HF weight names plus a
named transform; unmapped or missing weights raise ModelError naming them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax.errors import ModelError
from dpojax.models.config import ModelConfig
from dpojax.models.transformer import Decoder
from dpojax.sharding import Sharder

# ---- transforms: (HF array, our shape) -> ours, and ours -> HF -----------------------------------------
# HF nn.Linear weights are [out, in]; ours are [in..., out...] with heads split out of the flat dims.
ToOurs = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
ToHF = Callable[[np.ndarray], np.ndarray]
TRANSFORMS: dict[str, tuple[ToOurs, ToHF]] = {
    "identity": (lambda x, shape: x, lambda x: x),
    "transpose": (lambda x, shape: x.T, lambda x: x.T),  # [out, in] <-> [in, out]
    "split_out_heads": (  # [N*Dh, D] <-> [D, N, Dh]   (q/k/v)
        lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T),
    "split_in_heads": (  # [D, H*Dh] <-> [H, Dh, D]    (o)
        lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T),
    "split_heads": (lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1)),  # [N*Dh] <-> [N, Dh]
}

# ---- mapping tables: our path -> (HF name, "{i}" = layer index for stacked params, transform) -----------
LLAMA_TABLE: dict[str, tuple[str, str]] = {
    "embed_tokens/embedding": ("model.embed_tokens.weight", "identity"),
    "layers/input_layernorm/weight": ("model.layers.{i}.input_layernorm.weight", "identity"),
    "layers/post_attention_layernorm/weight": ("model.layers.{i}.post_attention_layernorm.weight", "identity"),
    **{f"layers/self_attn/{p}_proj/kernel": (f"model.layers.{{i}}.self_attn.{p}_proj.weight", "split_out_heads")
       for p in "qkv"},
    **{f"layers/self_attn/{p}_proj/bias": (f"model.layers.{{i}}.self_attn.{p}_proj.bias", "split_heads")
       for p in "qkv"},
    "layers/self_attn/o_proj/kernel": ("model.layers.{i}.self_attn.o_proj.weight", "split_in_heads"),
    "layers/self_attn/o_proj/bias": ("model.layers.{i}.self_attn.o_proj.bias", "identity"),
    "layers/self_attn/q_norm/weight": ("model.layers.{i}.self_attn.q_norm.weight", "identity"),
    "layers/self_attn/k_norm/weight": ("model.layers.{i}.self_attn.k_norm.weight", "identity"),
    **{f"layers/mlp/{p}_proj/kernel": (f"model.layers.{{i}}.mlp.{p}_proj.weight", "transpose")
       for p in ("gate", "up", "down")},
    **{f"layers/mlp/{p}_proj/bias": (f"model.layers.{{i}}.mlp.{p}_proj.bias", "identity")
       for p in ("gate", "up", "down")},
    "norm/weight": ("model.norm.weight", "identity"),
    "lm_head/weight": ("lm_head.weight", "identity"),
}
# HF weights that carry no information for us (regex): old checkpoints' cached RoPE tables.
IGNORED_HF_KEYS = (r".*rotary_emb\.inv_freq$",)

# family -> (table, HF architecture name written on export)
FAMILY_TABLES: dict[str, tuple[dict[str, tuple[str, str]], str]] = {
    "llama": (LLAMA_TABLE, "LlamaForCausalLM"),
    "mistral": (LLAMA_TABLE, "MistralForCausalLM"),
    "qwen2": (LLAMA_TABLE, "Qwen2ForCausalLM"),
    "qwen3": (LLAMA_TABLE, "Qwen3ForCausalLM"),
}

WEIGHT_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


# ---- abstract model and shardings ----------------------------------------------------------------------


def abstract_decoder(cfg: ModelConfig, **decoder_kwargs) -> Decoder:
    """The Decoder with ShapeDtypeStruct params (no memory); decoder_kwargs as for Decoder()."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **decoder_kwargs))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_params(cfg: ModelConfig, *, sharder: Sharder | None = None, **decoder_kwargs):
    """(graphdef, State of Params whose values are ShapeDtypeStructs carrying their target sharding),
    e.g. the restore target of an Orbax checkpoint. decoder_kwargs as for Decoder()."""
    graphdef, state = nnx.split(abstract_decoder(cfg, sharder=sharder, **decoder_kwargs))
    abstract = jax.tree.map(
        lambda v: v.replace(value=jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sharding(v, sharder))),
        state, is_leaf=_is_var)
    return graphdef, abstract


def param_sharding(var: nnx.Variable, sharder: Sharder | None) -> jax.sharding.Sharding:
    """Target sharding of one (abstract) parameter from its logical axes; one default device without a sharder."""
    if sharder is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharder.named(var.logical_axes, var.shape)


def state_shardings(state: nnx.State, sharder: Sharder | None) -> nnx.State:
    """Same tree as `state` (e.g. `nnx.split(model)[1]`), each Variable's value replaced by its sharding."""
    return jax.tree.map(lambda v: v.replace(value=param_sharding(v, sharder)), state, is_leaf=_is_var)


def init_random(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                attention: str = "auto", remat: str = "none", scan_layers: bool = True,
                sharder: Sharder | None = None) -> Decoder:
    """A randomly initialized Decoder (HF-style init: N(0, 0.02^2), norms 1, biases 0), created sharded.

    Values depend on the seed only (threefry is partitionable), and one compile serves every seed.
    """
    kw = (("dtype", dtype), ("param_dtype", param_dtype), ("attention", attention), ("remat", remat),
          ("scan_layers", scan_layers), ("sharder", sharder))
    graphdef, make_state = _init_fn(cfg, kw)
    return nnx.merge(graphdef, make_state(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: ModelConfig, kw: tuple[tuple[str, Any], ...]):
    graphdef, abstract_state = nnx.split(abstract_decoder(cfg, **dict(kw)))
    shardings = state_shardings(abstract_state, dict(kw)["sharder"])

    def make_state(key):
        return nnx.split(Decoder(cfg, rngs=nnx.Rngs(key), **dict(kw)))[1]

    return graphdef, jax.jit(make_state, out_shardings=shardings)


# ---- locating and reading checkpoints ------------------------------------------------------------------


def resolve_model_dir(name_or_path: str | pathlib.Path, revision: str | None = None) -> pathlib.Path:
    """A local folder as is; anything else is a hub id downloaded (json, safetensors, tokenizer files only)."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise ModelError(f"model path {str(name_or_path)!r} is not a folder with config.json and *.safetensors.")
    import huggingface_hub

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(str(name_or_path), revision=revision,
                                                              allow_patterns=list(WEIGHT_PATTERNS)))
    except Exception as e:  # network, auth, unknown repo: one clear message
        raise ModelError(f"could not fetch {str(name_or_path)!r} from the Hugging Face hub: {e}") from e


def read_hf_config(folder: pathlib.Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no config.json.")
    return json.loads(config_path.read_text())


def weight_map(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF weight name -> safetensors file; refuses pickle-only folders (never unpickles)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in names.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    if pickles:
        raise ModelError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); dpojax never unpickles. Convert to "
            "safetensors first, e.g. AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
            "safe_serialization=True)."
        )
    raise ModelError(f"{folder} has no model.safetensors or model.safetensors.index.json (dpojax reads "
                     "safetensors only; convert pickle *.bin checkpoints with save_pretrained(safe_serialization=True)).")


class _Reader:
    """Memory-mapped safetensors handles, opened once per file."""

    def __init__(self, files: Mapping[str, pathlib.Path], stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.files = files
        self.handles = {p: stack.enter_context(safe_open(str(p), framework="numpy")) for p in set(files.values())}

    def get(self, name: str) -> np.ndarray:
        return self.handles[self.files[name]].get_tensor(name)

    def get_slice(self, name: str):
        return self.handles[self.files[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())


# ---- loading -------------------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _hf_names(path: str, num_layers: int, table: Mapping[str, tuple[str, str]]) -> list[str]:
    name, _ = table[path]
    return [name.format(i=i) for i in range(num_layers)] if "{i}" in name else [name]


def _check_keys(flat: list, files: Mapping[str, Any], cfg: ModelConfig) -> None:
    table, _ = FAMILY_TABLES[cfg.family]
    unknown = [_path_str(p) for p, _ in flat if _path_str(p) not in table]
    if unknown:  # a model parameter without a table entry: a bug in dpojax, not in the checkpoint
        raise ModelError(f"internal: no HF mapping for parameters {unknown} of family {cfg.family!r}.")
    needed = {n for p, _ in flat for n in _hf_names(_path_str(p), cfg.num_layers, table)}
    missing = sorted(needed - set(files))
    ignored = [re.compile(p) for p in IGNORED_HF_KEYS]
    if cfg.tie_embeddings:
        ignored.append(re.compile(r"lm_head\.weight$"))  # some tied checkpoints store the copy; HF ignores it too
    unexpected = sorted(k for k in set(files) - needed if not any(r.match(k) for r in ignored))
    if missing or unexpected:
        raise ModelError(
            f"checkpoint does not match the {cfg.family} architecture in config.json: "
            f"missing weights {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unmapped weights {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}."
        )


# Transforms whose HF slice for an index of ours is known: read only that part of the file.
SLICEABLE = {"identity": lambda index: index, "transpose": lambda index: index[::-1]}


def _load_param(var: nnx.Variable, path: str, cfg: ModelConfig, reader: _Reader, sharder: Sharder | None) -> jax.Array:
    """One parameter, created on its shards; for stacked params each callback reads only its layers."""
    table, _ = FAMILY_TABLES[cfg.family]
    hf_name, transform = table[path]
    to_ours, to_hf = TRANSFORMS[transform]
    stacked = "{i}" in hf_name
    shape, dtype = tuple(var.shape), var.dtype
    layer_shape = shape[1:] if stacked else shape
    hf_shape = to_hf(np.empty(layer_shape, np.int8)).shape
    for name in _hf_names(path, cfg.num_layers, table):
        if reader.shape(name) != hf_shape:
            raise ModelError(f"weight {name} has shape {reader.shape(name)}, expected {hf_shape} for {path} "
                             "(config.json and the safetensors disagree).")

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Our layer-level `index` of HF weight `name`, in our layout."""
        if transform in SLICEABLE:  # memory-mapped partial read
            x = reader.get_slice(name)[SLICEABLE[transform](index)]
            return x if transform == "identity" else x.T
        return to_ours(reader.get(name), layer_shape)[index]

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.ascontiguousarray(read(hf_name, index)).astype(dtype)
        layers = range(*index[0].indices(shape[0]))
        return np.stack([read(hf_name.format(i=i), index[1:]).astype(dtype) for i in layers])

    return jax.make_array_from_callback(shape, param_sharding(var, sharder), callback)


def load_pretrained(name_or_path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention: str = "auto", remat: str = "none", scan_layers: bool = True,
                    sharder: Sharder | None = None, revision: str | None = None) -> tuple[Decoder, ModelConfig]:
    """(Decoder, ModelConfig) from a local HF folder or a hub id, each param placed directly on its shards."""
    folder = resolve_model_dir(name_or_path, revision)
    cfg = ModelConfig.from_hf(read_hf_config(folder))
    files = weight_map(folder)
    graphdef, abstract_state = nnx.split(abstract_decoder(
        cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan_layers=scan_layers,
        sharder=sharder))
    flat = list(nnx.to_flat_state(abstract_state))
    _check_keys(flat, files, cfg)
    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)
        loaded = [(p, v.replace(value=_load_param(v, _path_str(p), cfg, reader, sharder))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(loaded)), cfg


# ---- export --------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(model: Decoder, cfg: ModelConfig) -> list[tuple[str, Callable[[], np.ndarray], tuple, Any]]:
    """[(HF name, thunk -> numpy array in HF layout, HF shape, dtype)] in table order; thunks fetch lazily."""
    table, _ = FAMILY_TABLES[cfg.family]
    flat = dict((_path_str(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = []
    for path, (hf_name, transform) in table.items():
        if path not in flat:
            continue
        to_hf, value = TRANSFORMS[transform][1], flat[path][...]
        stacked = "{i}" in hf_name
        layer_shape = value.shape[1:] if stacked else value.shape
        hf_shape = to_hf(np.empty(layer_shape, np.int8)).shape
        if not stacked:
            out.append((hf_name, lambda v=value, f=to_hf: np.ascontiguousarray(f(_to_host(v))), hf_shape, value.dtype))
            continue
        for i in range(cfg.num_layers):
            out.append((hf_name.format(i=i), lambda v=value, f=to_hf, i=i: np.ascontiguousarray(f(_to_host(v[i]))),
                        hf_shape, value.dtype))
    return out


def _plan_shards(tensors: list, max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[2])) * jnp.dtype(t[3]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def export_hf(model: Decoder, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
              tokenizer_dir: str | pathlib.Path | None = None, max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Write a HF folder (config.json, safetensors shards, tokenizer files) loadable by transformers.

    Tensors are saved in the model's param dtype; every process must call this (gathers are collective),
    only process 0 writes. Host memory holds at most one shard.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    tensors = hf_tensors(model, cfg)
    dtype_name = jnp.dtype(tensors[0][3]).name
    shards = _plan_shards(tensors, max_shard_bytes)
    write = jax.process_index() == 0
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(export_config(cfg, dtype_name), indent=2, sort_keys=True) + "\n")
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_files: dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        arrays = {name: thunk() for name, thunk, _, _ in shard}
        if write:
            save_file(arrays, str(out / file_name), metadata={"format": "pt"})
        weight_files.update({name: file_name for name in arrays})
        del arrays
    if write and len(shards) > 1:
        total = sum(int(np.prod(t[2])) * jnp.dtype(t[3]).itemsize for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_files}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if write and tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = pathlib.Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out


def export_config(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
    """The original HF config dict with the saved dtype (and the architecture name when absent)."""
    hf = dict(cfg.hf_config)
    hf["dtype"] = dtype_name
    if "torch_dtype" in hf:
        hf["torch_dtype"] = dtype_name
    hf.setdefault("architectures", [FAMILY_TABLES[cfg.family][1]])
    return hf
