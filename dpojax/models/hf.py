"""Hugging Face checkpoints <-> `Decoder`: load (safetensors only), random init, export.

Loading never builds unsharded state: the model is built abstractly (`nnx.eval_shape`), the target
sharding of every parameter comes from its logical axes, and each array is created on its shards by
`jax.make_array_from_callback`, whose callback reads (memory-mapped) only the layers of the slice it
is asked for. One declarative table per family (`dpojax.models.families`) maps our parameter paths to HF
weight names plus a named transform (and, for tensors HF fuses, a named fuse rule); "{i}" in a name is the
layer index (our leading L axis), "{e}" the expert index of an MoE layer (our next axis, X); unmapped or missing
weights raise ModelError naming them. Checkpoints saved from the bare base model (hub GPT-2: `h.0.attn...`
without `transformer.`) are read too; exports always use the full names transformers writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax import paths
from dpojax.errors import ModelError
from dpojax.models import layouts, mxfp4
from dpojax.models.config import ModelConfig
from dpojax.models.families import FAMILIES
from dpojax.models.transformer import Decoder
from dpojax.sharding import Sharder


class Entry(NamedTuple):
    """One table row: our param <- HF weight `hf` (+ "{i}" layer index, "{e}" expert index) via `transform`;
    fused ones name the rule joining the params that share `hf` and this param's place among them."""

    hf: str
    transform: str
    fuse: str | None = None
    part: int = 0


def family_table(cfg: ModelConfig) -> dict[str, Entry]:
    return {path: Entry(*row) for path, row in FAMILIES[cfg.family].table.items()}


def _piece_shape(entry: Entry, our_layer_shape: tuple[int, ...]) -> tuple[int, ...]:
    return layouts.TRANSFORMS[entry.transform][1](np.empty(our_layer_shape, np.int8)).shape


def _siblings(table: Mapping[str, Entry], entry: Entry, present: Mapping[str, Any]) -> list[str]:
    """Our paths fused into `entry.hf`, in part order (only those this model has)."""
    paths = [p for p, e in table.items() if e.hf == entry.hf and p in present]
    return sorted(paths, key=lambda p: table[p].part)


def _hf_layer_shape(path: str, table: Mapping[str, Entry], shapes: Mapping[str, tuple[int, ...]],
                    cfg: ModelConfig) -> tuple[int, ...]:
    """The HF shape (one layer) of the weight that `path` maps to; `shapes` = our per-layer shapes."""
    entry = table[path]
    if entry.fuse is None:
        return _piece_shape(entry, shapes[path])
    return layouts.fused_shape(entry.fuse, [_piece_shape(table[p], shapes[p]) for p in _siblings(table, entry, shapes)])


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
    """A local folder as is; a gs:// or s3:// folder mirrored locally, and anything else a hub id downloaded
    (json, safetensors, tokenizer files only, either way)."""
    if paths.is_remote(name_or_path):
        return paths.local_copy(name_or_path, patterns=WEIGHT_PATTERNS)
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise ModelError(f"model path {str(name_or_path)!r} is not a folder with config.json and *.safetensors.")
    import huggingface_hub  # needed only to download from the hub

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
        from safetensors import safe_open  # optional dependency, needed only to read checkpoints

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
                     "safetensors only; convert pickle *.bin checkpoints with "
                     "save_pretrained(safe_serialization=True)).")


class _Reader:
    """Memory-mapped safetensors handles, opened once per file; weights asked for by their canonical name.
    `packed`: MXFP4 weights (virtual name -> (blocks, scales) names, `dpojax.models.mxfp4`), read dequantized."""

    def __init__(self, files: Mapping[str, pathlib.Path], stored: Mapping[str, str], stack: contextlib.ExitStack,
                 packed: Mapping[str, tuple[str, str]] | None = None):
        from safetensors import safe_open  # optional dependency, needed only to read checkpoints

        self.files, self.stored, self.packed = files, stored, packed or {}
        self.handles = {p: stack.enter_context(safe_open(str(p), framework="numpy")) for p in set(files.values())}

    def get(self, name: str) -> np.ndarray:
        if name in self.packed:
            return self.get_slice(name)[()]
        return self.handles[self.files[name]].get_tensor(self.stored[name])

    def get_slice(self, name: str):
        if name in self.packed:
            return mxfp4.PackedSlice(*(self.get_slice(part) for part in self.packed[name]))
        return self.handles[self.files[name]].get_slice(self.stored[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get_slice(name).get_shape())


def canonical_names(files: Mapping[str, pathlib.Path], cfg: ModelConfig) -> dict[str, str]:
    """canonical (full transformers) name -> stored name. A checkpoint saved from the bare base model has no
    name starting with the family's prefix (hub GPT-2: `wte.weight`): the prefix is added back; a family's
    `renames` map other spellings (GPT-NeoX `lm_head.weight` -> `embed_out.weight`)."""
    family = FAMILIES[cfg.family]

    def rename(name: str) -> str:
        for pattern, replacement in family.renames:
            name = re.sub(pattern, replacement, name)
        return name

    if not family.prefix or any(name.startswith(family.prefix) for name in files):
        return {rename(name): name for name in files}
    outside = {e.hf for e in family_table(cfg).values() if not e.hf.startswith(family.prefix)}  # e.g. lm_head
    return {rename(name if rename(name) in outside else family.prefix + name): name for name in files}


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF weight name -> shape, as `export_hf` writes them for this architecture (abstract: no memory)."""
    table = family_table(cfg)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_decoder(cfg), nnx.Param))}
    shapes = _layer_shapes(flat, table)
    return {name: _hf_layer_shape(p, table, shapes, cfg) for p in flat for name in _hf_names(p, cfg, table)}


# ---- loading -------------------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _stacked_axes(hf_name: str) -> int:
    """Leading axes of our param that the HF name indexes: layers ("{i}"), then experts ("{e}")."""
    return ("{i}" in hf_name) + ("{e}" in hf_name)


def _hf_names(path: str, cfg: ModelConfig, table: Mapping[str, Entry]) -> list[str]:
    name = table[path].hf
    layers = range(cfg.num_layers) if "{i}" in name else [0]
    experts = range(cfg.num_experts) if "{e}" in name else [0]
    return list(dict.fromkeys(name.format(i=i, e=e) for i in layers for e in experts))


def _layer_shapes(flat: Mapping[str, Any], table: Mapping[str, Entry]) -> dict[str, tuple[int, ...]]:
    """Our shape of every present param per HF tensor (the leading L axis, and X for per-expert tensors, dropped)."""
    return {p: tuple(v.shape[_stacked_axes(table[p].hf):]) for p, v in flat.items() if p in table}


def _check_keys(paths: list[str], files: Mapping[str, Any], cfg: ModelConfig) -> None:
    table = family_table(cfg)
    unknown = [p for p in paths if p not in table]
    if unknown:  # a model parameter without a table entry: a bug in dpojax, not in the checkpoint
        raise ModelError(f"internal: no HF mapping for parameters {unknown} of family {cfg.family!r}.")
    needed = {n for p in paths for n in _hf_names(p, cfg, table)}
    missing = sorted(needed - set(files))
    ignored = [re.compile(p) for p in FAMILIES[cfg.family].ignored]
    if cfg.tie_embeddings and "lm_head/weight" in table:  # some tied checkpoints store the copy; HF ignores it too
        ignored.append(re.compile(re.escape(table["lm_head/weight"].hf) + "$"))
    unexpected = sorted(k for k in set(files) - needed if not any(r.match(k) for r in ignored))
    if missing or unexpected:
        raise ModelError(
            f"checkpoint does not match the {cfg.family} architecture in config.json: "
            f"missing weights {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unmapped weights {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}."
        )


# Transforms whose HF slice for an index of ours is known: read only that part of the file.
SLICEABLE = {"identity": lambda index: index, "transpose": lambda index: index[::-1]}


def _load_param(var: nnx.Variable, path: str, cfg: ModelConfig, reader: _Reader, sharder: Sharder | None,
                shapes: Mapping[str, tuple[int, ...]]) -> jax.Array:
    """One parameter, created on its shards; for stacked params each callback reads only its layers (and
    experts)."""
    table = family_table(cfg)
    entry = table[path]
    to_ours = layouts.TRANSFORMS[entry.transform][0]
    stacked, per_expert = "{i}" in entry.hf, "{e}" in entry.hf
    shape, dtype, layer_shape = tuple(var.shape), var.dtype, shapes[path]
    hf_shape = _hf_layer_shape(path, table, shapes, cfg)
    for name in _hf_names(path, cfg, table):
        if reader.shape(name) != hf_shape:
            raise ModelError(f"weight {name} has shape {reader.shape(name)}, expected {hf_shape} for {path} "
                             "(config.json and the safetensors disagree).")
    if entry.fuse is not None:
        siblings = _siblings(table, entry, shapes)
        piece_shapes = [_piece_shape(table[p], shapes[p]) for p in siblings]
        part = siblings.index(path)

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Our layer-level `index` of HF weight `name`, in our layout."""
        if entry.fuse == "interleave_last" and entry.transform == "identity":  # read only the columns of `index`
            n, (start, stop, _) = len(piece_shapes), index[-1].indices(layer_shape[-1])
            return reader.get_slice(name)[(*index[:-1], slice(n * start, n * stop))][..., part::n]
        if entry.fuse is not None:
            piece = layouts.unfuse(entry.fuse, reader.get(name), piece_shapes, cfg)[part]
            return to_ours(piece, layer_shape)[index]
        if entry.transform in SLICEABLE:  # memory-mapped partial read
            x = reader.get_slice(name)[SLICEABLE[entry.transform](index)]
            return x if entry.transform == "identity" else x.T
        return to_ours(reader.get(name), layer_shape)[index]

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.ascontiguousarray(read(entry.hf, index)).astype(dtype)
        layers = range(*index[0].indices(shape[0]))
        if not per_expert:
            return np.stack([read(entry.hf.format(i=i), index[1:]).astype(dtype) for i in layers])
        experts = range(*index[1].indices(shape[1]))
        return np.stack([np.stack([read(entry.hf.format(i=i, e=e), index[2:]).astype(dtype) for e in experts])
                         for i in layers])

    return jax.make_array_from_callback(shape, param_sharding(var, sharder), callback)


def load_pretrained(name_or_path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention: str = "auto", remat: str = "none", scan_layers: bool = True,
                    sharder: Sharder | None = None, revision: str | None = None) -> tuple[Decoder, ModelConfig]:
    """(Decoder, ModelConfig) from a local HF folder or a hub id, each param placed directly on its shards.
    MXFP4 checkpoints (config.json `quantization_config.quant_method: mxfp4`, gpt-oss) are dequantized to
    `param_dtype` as they are read (`dpojax.models.mxfp4`)."""
    folder = resolve_model_dir(name_or_path, revision)
    hf_config = read_hf_config(folder)
    cfg = ModelConfig.from_hf(hf_config)
    files = weight_map(folder)
    graphdef, abstract_state = nnx.split(abstract_decoder(
        cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan_layers=scan_layers,
        sharder=sharder))
    flat = list(nnx.to_flat_state(abstract_state))
    stored = canonical_names(files, cfg)
    files = {name: files[old] for name, old in stored.items()}
    packed = mxfp4.packed_weights(files) if mxfp4.is_mxfp4(hf_config) else {}
    parts = {part for pair in packed.values() for part in pair}
    _check_keys([_path_str(p) for p, _ in flat], {n: None for n in [*files, *packed] if n not in parts}, cfg)
    shapes = _layer_shapes({_path_str(p): v for p, v in flat}, family_table(cfg))
    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stored, stack, packed)
        loaded = [(p, v.replace(value=_load_param(v, _path_str(p), cfg, reader, sharder, shapes)))
                  for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(loaded)), cfg


# ---- export --------------------------------------------------------------------------------------------


def hf_tensors(model: Decoder, cfg: ModelConfig) -> list[tuple[str, Callable[[], np.ndarray], tuple, Any]]:
    """[(HF name, thunk -> numpy array in HF layout, HF shape, dtype)] in table order; thunks fetch lazily.
    Fused weights (several of our params in one HF tensor) are joined by their table's fuse rule."""
    table = family_table(cfg)
    flat = dict((_path_str(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shapes = _layer_shapes(flat, table)
    out, done = [], set()
    for path, entry in table.items():
        if path not in flat or entry.hf in done:
            continue
        done.add(entry.hf)
        paths = _siblings(table, entry, flat) if entry.fuse else [path]
        values = [flat[p][...] for p in paths]
        to_hf = [layouts.TRANSFORMS[table[p].transform][1] for p in paths]
        hf_shape, dtype = _hf_layer_shape(path, table, shapes, cfg), values[0].dtype

        def thunk(*index, values=values, to_hf=to_hf, fuse=entry.fuse):
            pieces = [f(layouts.to_host(v[index] if index else v)) for f, v in zip(to_hf, values)]
            return np.ascontiguousarray(pieces[0] if fuse is None else layouts.fuse(fuse, pieces, cfg))

        if "{i}" not in entry.hf:
            out.append((entry.hf, thunk, hf_shape, dtype))
            continue
        for i in range(cfg.num_layers):
            if "{e}" not in entry.hf:
                out.append((entry.hf.format(i=i), functools.partial(thunk, i), hf_shape, dtype))
                continue
            for e in range(cfg.num_experts):
                out.append((entry.hf.format(i=i, e=e), functools.partial(thunk, i, e), hf_shape, dtype))
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
              tokenizer_dir: str | pathlib.Path | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write a HF folder (config.json, safetensors shards, tokenizer files) loadable by transformers.

    Tensors are saved in the model's param dtype; every process must call this (gathers are collective),
    only process 0 writes. Host memory holds at most one shard. `out_dir` may be a gs:// or s3:// URL: each
    shard is written to a local temporary file, then uploaded.
    """
    from safetensors.numpy import save_file  # optional dependency, needed only to export

    out = paths.path(out_dir)
    tensors = hf_tensors(model, cfg)
    dtype_name = jnp.dtype(tensors[0][3]).name
    shards = _plan_shards(tensors, max_shard_bytes)
    write = jax.process_index() == 0
    if write:
        paths.makedirs(out)
        paths.write_text(out / "config.json", json.dumps(export_config(cfg, dtype_name), indent=2, sort_keys=True)
                         + "\n")
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_files: dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        arrays = {name: thunk() for name, thunk, _, _ in shard}
        if write and paths.is_remote(out):
            with tempfile.TemporaryDirectory() as tmp:
                save_file(arrays, f"{tmp}/{file_name}", metadata={"format": "pt"})
                paths.copy_file(f"{tmp}/{file_name}", out / file_name)
        elif write:
            save_file(arrays, str(out / file_name), metadata={"format": "pt"})
        weight_files.update({name: file_name for name in arrays})
        del arrays
    if write and len(shards) > 1:
        total = sum(int(np.prod(t[2])) * jnp.dtype(t[3]).itemsize for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_files}
        paths.write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    if write and tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(tokenizer_dir, out) -> None:
    """The tokenizer files of `tokenizer_dir` into `out` (either may be a gs:// URL: dpojax.paths)."""
    for name in TOKENIZER_FILES:
        src = paths.path(tokenizer_dir) / name
        if src.is_file():
            paths.copy_file(src, paths.path(out) / name)


def export_config(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
    """The original HF config dict with the saved dtype (and the architecture name when absent); the weights are
    written unquantized, so a `quantization_config` (MXFP4 gpt-oss) is dropped."""
    hf = dict(cfg.hf_config)
    hf.pop("quantization_config", None)
    hf["dtype"] = dtype_name
    if "torch_dtype" in hf:
        hf["torch_dtype"] = dtype_name
    hf.setdefault("architectures", [FAMILIES[cfg.family].architecture])
    return hf
