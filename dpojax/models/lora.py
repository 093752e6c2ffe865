"""LoRA adapters on the Decoder, laid out exactly as PEFT's, so an adapter round-trips between dpojax and PEFT.

A LoRA target is a Hugging Face module (`q_proj`, `c_attn`, `query_key_value`, `gate_up_proj`, ...; the names come
from each family's weight table). PEFT gives every targeted module one A [r, in] and one B [out, r] and adds
`scale * B(A(x))` to its output, scale = alpha / r (alpha / sqrt(r) with rslora). dpojax splits fused HF weights
into several Dense layers when it loads them (GPT-2 `c_attn` into q/k/v, NeoX `query_key_value` head by head,
Phi-3 `qkv_proj` and `gate_up_proj`); their adapter keeps PEFT's shape: ONE A shared by the parts (one nnx
Variable referenced from each part, so its gradient is the sum over the parts) and B split into per-part slices
that the table's fuse rule joins back into PEFT's single B. Same function, same gradients.

How adapters run (the x-path): an attached Dense computes `y = x @ W (+ bias) + scale * (x @ A) @ B`; the base W
is never copied or differentiated, so the backward pass skips every base weight gradient. Adapters are
`LoraParam` Variables (fp32 whatever the base's param_dtype); the base keeps `nnx.Param`, so
`nnx.split(model, LoraParam, ...)` separates what trains from what stays frozen. The reference is the same base
state run through the graphdef without adapters.

Dropout (PEFT's `lora_dropout`): `scale * B(A(dropout(x)))` in training steps only. `with_dropout` gives the
traced model one `LoraKey` per adapted HF module (shared by its parts, as PEFT has one dropout per module), a
[L, key] Variable scanned with the layers; keys come from (model.seed, step, micro-batch), so a resumed run draws
the same masks, and threefry's partitionable bits make them independent of the mesh. Eval and the reference never
drop.

Shapes (per layer; every Dense is stacked with a leading `layers` axis L):
  A  [L, *in, r]    axes (layers, *in_axes of the kernel, lora_rank)
  B  [L, r, *out]   axes (layers, lora_rank, *out_axes of the kernel)   one per part of a fused module
PEFT (per layer): lora_A.weight [r, prod(in)], lora_B.weight [sum of prod(out) over the parts, r]; our in/out axes
are row-major reshapes of HF's flat in/out features, so A_peft = A.reshape(-1, r).T and B_peft = fuse(B.T parts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax import paths
from dpojax.errors import ConfigError, ModelError
from dpojax.models import layouts
from dpojax.models.config import ModelConfig
from dpojax.models.families import FAMILIES
from dpojax.models.layers import Dense, dense_matmul
from dpojax.sharding import Sharder

CONV1D_TRANSFORMS = ("identity", "flat_out_heads", "flat_in_heads")  # HF weight stored [in, out] (GPT-2 Conv1D)
PEFT_DEFAULT_TARGETS = {  # PEFT's per-model-type defaults (peft.utils.constants); Phi-3 has none there
    "gpt2": ("c_attn",), "gpt_neox": ("query_key_value",), "phi3": ("qkv_proj",),
}
PEFT_DEFAULT = ("q_proj", "v_proj")  # every other family
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoraParam(nnx.Variable):
    """A LoRA adapter weight: the only thing that trains in a LoRA run."""


class LoraKey(nnx.Variable):
    """Per-layer dropout key data [L, *key] of one adapted HF module (set inside a training step only)."""


DROPOUT_STREAM = 0x6C6F7261  # folded into key(model.seed): dropout draws apart from the adapter init's


class LoraAdapter(nnx.Module):
    """`scale * (dropout(x) @ A) @ B` for one Dense of in-rank `n_in`; `a` may be shared with the other parts of a
    fused HF module (and then its dropout key too)."""

    def __init__(self, a: LoraParam, b: LoraParam, *, n_in: int, scale: float, dtype, keep_rows: bool = False):
        self.a, self.b, self.n_in, self.scale, self.dtype = a, b, n_in, scale, dtype
        self.keep_rows = keep_rows  # as its Dense's (`dense_matmul`)
        self.dropout_rate = 0.0  # `set_dropout` sets it with the key (training steps only)
        self.dropout_key: LoraKey | None = nnx.data(None)  # per-layer dropout key data (data: a Variable); None: none

    def set_dropout(self, key: LoraKey, rate: float) -> None:
        """Drop adapter inputs at `rate` with `key` (inside a traced training step: `with_dropout`)."""
        self.dropout_key, self.dropout_rate = key, rate

    def __call__(self, x: jax.Array) -> jax.Array:  # x [..., *in] -> [..., *out]
        dtype = jnp.dtype(self.dtype)
        if self.dropout_key is not None:
            rate = self.dropout_rate
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
        u_xR = dense_matmul(x, self.a[...], self.n_in, dtype, self.keep_rows)
        return dense_matmul(u_xR, self.b[...], 1, dtype, self.keep_rows) * jnp.asarray(self.scale, dtype)


@dataclasses.dataclass(frozen=True)
class Group:
    """One HF module with an adapter: its name ("{i}" = layer), our Dense paths in part order, how its B parts
    join (a fuse rule of `dpojax.models.layouts`, None when unfused), and whether HF stores it as a Conv1D."""

    hf: str
    parts: tuple[str, ...]
    fuse: str | None
    conv1d: bool

    @property
    def leaf(self) -> str:
        return self.hf.rsplit(".", 1)[-1]


def family_groups(cfg: ModelConfig) -> list[Group]:
    """Every linear HF module of the family (what `all-linear` targets: no embedding, no LM head)."""
    by_hf: dict[str, list[tuple[int, str, tuple]]] = {}
    for path, row in FAMILIES[cfg.family].table.items():
        if path.endswith("/kernel"):
            hf, transform = row[0], row[1]
            fuse, part = (row[2], row[3]) if len(row) > 2 else (None, 0)
            by_hf.setdefault(hf.removesuffix(".weight"), []).append((part, path.removesuffix("/kernel"),
                                                                     (fuse, transform)))
    groups = []
    for hf, rows in by_hf.items():
        rows.sort()
        fuse, transform = rows[0][2]
        groups.append(Group(hf, tuple(p for _, p, _ in rows), fuse, transform in CONV1D_TRANSFORMS))
    return groups


def valid_targets(cfg: ModelConfig) -> list[str]:
    return sorted({g.leaf for g in family_groups(cfg)})


def default_targets(cfg: ModelConfig) -> tuple[str, ...]:
    return PEFT_DEFAULT_TARGETS.get(cfg.family, PEFT_DEFAULT)


def select_groups(cfg: ModelConfig, targets: tuple[str, ...], present: set[str] | None = None) -> list[Group]:
    """The groups `targets` name (PEFT's rule: a module whose name equals a target or ends with '.' + target;
    "all-linear": all of them); `present`: our Dense paths this model has (optional parts, e.g. gate_proj)."""
    targets = tuple(targets) or default_targets(cfg)
    groups = family_groups(cfg)
    if present is not None:
        groups = [dataclasses.replace(g, parts=tuple(p for p in g.parts if p in present)) for g in groups]
        groups = [g for g in groups if g.parts]
    if "all-linear" in targets:
        return groups
    valid = sorted({g.leaf for g in groups})
    unknown = [t for t in targets if not any(_matches(g.hf, t, cfg.num_layers) for g in groups)]
    if unknown:
        raise ConfigError(
            f"config: 'model.lora.targets' names {unknown}, which match no module of the {cfg.family} family; "
            f"its linear modules are {', '.join(valid)} (or 'all-linear')."
        )
    return [g for g in groups if any(_matches(g.hf, t, cfg.num_layers) for t in targets)]


def _matches(hf_module: str, target: str, num_layers: int) -> bool:
    """PEFT's suffix rule on the module's name in any layer (PEFT saves "all-linear" as full module names)."""
    names = {hf_module.format(i=i) for i in range(num_layers)}
    return any(name == target or name.endswith("." + target) for name in names)


def scale_of(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class LoraSetup:
    """What a LoRA run keeps besides the adapter State: the base graphdef (no adapters), the adapted modules and
    the scale, for the PEFT and merged exports."""

    base_graphdef: Any
    groups: tuple[Group, ...]
    scale: float


# ---- attaching adapters to a model ------------------------------------------------------------------------
def _module(model, path: str):
    for name in path.split("/"):
        model = getattr(model, name)
    return model


def _abstract(shape, axes, sharder: Sharder | None) -> LoraParam:
    sharding = sharder.named(axes, shape) if sharder is not None else jax.sharding.SingleDeviceSharding(
        jax.devices()[0])
    return LoraParam(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding), logical_axes=tuple(axes))


def attach(model, groups: list[Group], *, rank: int, scale: float, sharder: Sharder | None) -> None:
    """Give every part of every group a LoraAdapter with abstract (ShapeDtypeStruct) A and B carrying their
    target shardings; values are filled in afterwards (`init_adapters`, `load_peft`, a checkpoint)."""
    for group in groups:
        first = _module(model, group.parts[0])
        kernel = first.kernel
        L, n_in = kernel.shape[0], first.n_in
        in_shape, in_axes = tuple(kernel.shape[1:1 + n_in]), tuple(kernel.logical_axes[1:1 + n_in])
        a = _abstract((L, *in_shape, rank), ("layers", *in_axes, "lora_rank"), sharder)
        for path in group.parts:
            dense = _module(model, path)
            out_shape, out_axes = tuple(dense.kernel.shape[1 + n_in:]), tuple(dense.kernel.logical_axes[1 + n_in:])
            b = _abstract((L, rank, *out_shape), ("layers", "lora_rank", *out_axes), sharder)
            dense.set_lora(LoraAdapter(a, b, n_in=n_in, scale=scale, dtype=dense.dtype,
                                       keep_rows=dense.keep_rows))


def _flat(state) -> dict[str, Any]:
    return {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def a_path(group: Group, flat: dict[str, Any]) -> str:
    """Where the group's shared A sits in the adapter state (the first of its parts in nnx's path order)."""
    return next(f"{p}/lora/a" for p in sorted(group.parts) if f"{p}/lora/a" in flat)


def init_values(abstract_state, seed: int):
    """PEFT's init, sharded: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)), B = 0.
    Each A draws from fold_in(key(seed), its index in path order), so values do not depend on the mesh."""
    flat = sorted(_flat(abstract_state).items())

    def make():
        key = jax.random.key(seed)
        out = []
        for i, (path, var) in enumerate(flat):
            if path.endswith("/a"):
                bound = 1.0 / math.sqrt(math.prod(var.shape[1:-1]))
                out.append(jax.random.uniform(jax.random.fold_in(key, i), var.shape, jnp.float32, -bound, bound))
            else:
                out.append(jnp.zeros(var.shape, jnp.float32))
        return out

    values = jax.jit(make, out_shardings=[v.value.sharding for _, v in flat])()
    return _with_values(abstract_state, dict(zip([p for p, _ in flat], values)))


def _with_values(state, values: dict[str, Any]):
    """`state` (same tree) with every Variable's value taken from `values` by path."""
    pairs = [(path, var.replace(value=values["/".join(str(k) for k in path)]))
             for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(pairs)


def lora_model(base_graphdef, base_state, cfg: ModelConfig, lora_cfg, sharder: Sharder | None):
    """(graphdef with adapters, abstract adapter State, groups) over a base model (concrete or abstract)."""
    model = nnx.merge(base_graphdef, base_state)
    kernels = {"/".join(str(k) for k in path[:-1]) for path, _ in nnx.to_flat_state(base_state)
               if path[-1] == "kernel"}
    present = {p for p in kernels if isinstance(_module(model, p), Dense)}  # not an MoE router
    groups = select_groups(cfg, lora_cfg.targets, present)
    attach(model, groups, rank=lora_cfg.rank, scale=scale_of(lora_cfg.alpha, lora_cfg.rank, lora_cfg.rslora),
           sharder=sharder)
    graphdef, adapters, _ = nnx.split(model, LoraParam, ...)
    return graphdef, adapters, groups


def dropout_key(seed: int, step: jax.Array, micro: jax.Array) -> jax.Array:
    """The dropout key of one micro-batch of one optimizer step (a function of data only: resume is exact)."""
    key = jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM)
    return jax.random.fold_in(jax.random.fold_in(key, step), micro)


def with_dropout(graphdef, state, rate: float, key: jax.Array):
    """(graphdef, State) of the adapted model with dropout `rate` on every adapter input (call inside the traced
    step): each HF module (the parts sharing one A) gets LoraKey [L, *key] from fold_in(key, its index)."""
    model = nnx.merge(graphdef, state)
    modules: dict[int, list[LoraAdapter]] = {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoraAdapter):
            modules.setdefault(id(node.a), []).append(node)
    for i, parts in enumerate(modules.values()):
        keys = jax.random.split(jax.random.fold_in(key, i), parts[0].a.shape[0])
        shared = LoraKey(jax.random.key_data(keys))
        for adapter in parts:
            adapter.set_dropout(shared, rate)
    return nnx.split(model)


# ---- merging ------------------------------------------------------------------------------------------------
def merged_state(base_state, adapters, groups: list[Group], scale: float):
    """The base State with every targeted kernel replaced by W + scale * A @ B (a full-model export)."""
    base, ad = _flat(base_state), _flat(adapters)
    jobs = {f"{part}/kernel": (a_path(group, ad), f"{part}/lora/b") for group in groups for part in group.parts}
    kernels = {k: base[k].value for k in jobs}
    factors = {k: (ad[a].value, ad[b].value) for k, (a, b) in jobs.items()}
    merged = _merge_kernels(kernels, factors, scale)
    return _with_values(base_state, {**{p: v.value for p, v in base.items()}, **merged})


@functools.partial(jax.jit, static_argnums=2)
def _merge_kernels(kernels: dict, factors: dict, scale: float) -> dict:
    def merge(kernel, a, b):
        L, r = a.shape[0], a.shape[-1]
        delta = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1), precision="highest") * scale
        return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)

    return {k: merge(kernels[k], *factors[k]) for k in kernels}


# ---- PEFT folders -------------------------------------------------------------------------------------------
def _b_rule(fuse: str | None) -> str | None:
    """The fuse rule of PEFT's B [out, r], whose output rows are the fused axis ("cat_last" of a Conv1D's
    columns is "cat_first" of B's rows)."""
    return "cat_first" if fuse == "cat_last" else fuse


def peft_tensors(adapters, groups: list[Group], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors entries (fp32 numpy), `base_model.model.<module>.lora_{A,B}.weight`."""
    flat = _flat(adapters)
    out = {}
    for group in groups:
        a = layouts.to_host(flat[a_path(group, flat)].value)  # [L, *in, r]
        bs = [layouts.to_host(flat[f"{p}/lora/b"].value) for p in group.parts]  # [L, r, *out]
        r = a.shape[-1]
        for i in range(cfg.num_layers):
            name = "base_model.model." + group.hf.format(i=i)
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            pieces = [b[i].reshape(r, -1).T for b in bs]
            fused = pieces[0] if group.fuse is None else layouts.fuse(_b_rule(group.fuse), pieces, cfg)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(fused)
    return out


def adapter_config(lora_cfg, groups: list[Group], base_name: str) -> dict[str, Any]:
    """PEFT's adapter_config.json for these groups."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.rslora, "target_modules": sorted({g.leaf for g in groups}),
        "fan_in_fan_out": any(g.conv1d for g in groups), "bias": "none", "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft(out_dir, adapters, groups: list[Group], cfg: ModelConfig, lora_cfg, base_name: str):
    """Write a PEFT adapter folder (local or gs://: dpojax.paths); every process must call it (gathers), only
    process 0 writes. Returns its `epath.Path`."""
    from safetensors.numpy import save  # optional dependency, needed only to write a PEFT folder

    out = paths.path(out_dir)
    tensors = peft_tensors(adapters, groups, cfg)
    if jax.process_index() == 0:
        paths.makedirs(out)
        config = adapter_config(lora_cfg, groups, base_name)
        paths.write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        paths.write_bytes(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    return out


def read_peft_config(folder: pathlib.Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"model.lora.init_from: '{folder}' is not a PEFT adapter folder (it needs {ADAPTER_CONFIG} "
                         f"and {ADAPTER_WEIGHTS}).")
    return json.loads(path.read_text())


def check_peft_config(peft: dict[str, Any], lora_cfg, cfg: ModelConfig, groups: list[Group], folder) -> None:
    """The adapter in `folder` must be the one the config describes: a plain LoRA on the same modules."""
    where = f"model.lora.init_from: the adapter in '{folder}'"
    if peft.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{where} is a {peft.get('peft_type')} adapter; only LoRA adapters load.")
    for key, harmless in (("bias", "none"), ("use_dora", False), ("modules_to_save", None),
                          ("layers_to_transform", None), ("rank_pattern", {}), ("alpha_pattern", {})):
        if peft.get(key) not in (harmless, None):
            raise ModelError(f"{where} sets {key}={peft[key]!r}, which dpojax does not support ({harmless!r} only).")
    theirs = peft.get("target_modules") or []
    theirs = [theirs] if isinstance(theirs, str) else list(theirs)
    their_groups = {g.hf for g in select_groups(cfg, tuple(theirs))} if theirs else None
    wanted = {"model.lora.rank": (peft.get("r"), lora_cfg.rank), "model.lora.alpha": (peft.get("lora_alpha"),
              lora_cfg.alpha), "model.lora.rslora": (bool(peft.get("use_rslora", False)), lora_cfg.rslora)}
    diffs = [f"{k}={theirs_v!r}" for k, (theirs_v, ours) in wanted.items() if theirs_v != ours]
    if their_groups is not None and their_groups != {g.hf for g in groups}:
        diffs.append(f"model.lora.targets={sorted(theirs)}")
    if diffs:
        raise ConfigError(f"config: {where} was made with other settings; set {', '.join(diffs)} to load it.")


def load_peft(folder, abstract_adapters, groups: list[Group], cfg: ModelConfig, lora_cfg):
    """The adapter State (shapes and shardings of `abstract_adapters`) read from a PEFT adapter folder."""
    from safetensors.numpy import load_file  # optional dependency, needed only to read a PEFT folder

    folder = paths.local_copy(folder, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])  # a gs:// folder: its local mirror
    check_peft_config(read_peft_config(folder), lora_cfg, cfg, groups, folder)
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in tensors.items()}
    flat = _flat(abstract_adapters)
    values, used = {}, set()
    for group in groups:
        a_var = flat[a_path(group, flat)]
        b_vars = [flat[f"{p}/lora/b"] for p in group.parts]
        r = a_var.shape[-1]
        a_layers, b_layers = [], [[] for _ in group.parts]
        for i in range(cfg.num_layers):
            name = "base_model.model." + group.hf.format(i=i)
            a_hf, b_hf = _tensor(tensors, f"{name}.lora_A.weight", folder), _tensor(tensors, f"{name}.lora_B.weight",
                                                                                  folder)
            used.update((f"{name}.lora_A.weight", f"{name}.lora_B.weight"))
            _check_shape(a_hf, (r, math.prod(a_var.shape[1:-1])), name, folder)
            a_layers.append(a_hf.T.reshape(a_var.shape[1:]))
            piece_shapes = [(math.prod(b.shape[2:]), r) for b in b_vars]
            _check_shape(b_hf, (sum(s[0] for s in piece_shapes), r), name, folder)
            pieces = [b_hf] if group.fuse is None else layouts.unfuse(_b_rule(group.fuse), b_hf, piece_shapes, cfg)
            for k, (piece, b) in enumerate(zip(pieces, b_vars)):
                b_layers[k].append(piece.T.reshape(b.shape[1:]))
        values[a_path(group, flat)] = _place(np.stack(a_layers), a_var)
        for p, b, layers in zip(group.parts, b_vars, b_layers):
            values[f"{p}/lora/b"] = _place(np.stack(layers), b)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ModelError(f"model.lora.init_from: '{folder}' holds weights for modules outside model.lora.targets "
                         f"({extra[:4]}{' ...' if len(extra) > 4 else ''}); set model.lora.targets to match.")
    return _with_values(abstract_adapters, values)


def _tensor(tensors: dict, name: str, folder) -> np.ndarray:
    if name not in tensors:
        raise ModelError(f"model.lora.init_from: '{folder}' has no weight {name}; the adapter was made for another "
                         "model or other target modules.")
    return tensors[name].astype(np.float32)


def _check_shape(x: np.ndarray, shape: tuple[int, ...], name: str, folder) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ModelError(f"model.lora.init_from: '{folder}': {name} has shape {list(x.shape)}, expected "
                         f"{list(shape)} for this model and model.lora.rank.")


def _place(x: np.ndarray, var) -> jax.Array:
    sharding = var.value.sharding
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
