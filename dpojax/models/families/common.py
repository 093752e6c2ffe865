"""What every family module shares: the `Family` record and helpers that read HF config dicts.

A family module defines `parse(hf) -> ModelConfig fields` and one declarative weight table
`our param path -> entry`, where an entry is `(hf_name, transform)` or, for weights HF fuses into one
tensor, `(hf_name, transform, fuse, part)`: the parts sharing `hf_name` are joined by the named `fuse`
rule in `part` order ("cat_first" / "cat_last": concatenated along the first / last axis; "interleave_last":
alternating columns of the last axis, gpt-oss's gate_up_proj; "per_head": interleaved head by head, GPT-NeoX's
[H * (q, k, v) * Dh] layout). "{i}" in a name is the layer index.
Transforms and fuse rules are implemented in `dpojax.models.layouts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from dpojax.errors import ModelError
from dpojax.models.rope_config import ROPE_TYPES, RopeConfig

Table = Mapping[str, tuple]


@dataclasses.dataclass(frozen=True)
class Family:
    parse: Callable[[Mapping[str, Any]], dict[str, Any]]  # HF config dict -> ModelConfig fields
    table: Table  # our parameter path -> HF weight entry
    architecture: str  # HF class name written to config.json on export when absent
    prefix: str = "model."  # base-model prefix; checkpoints saved from the base model omit it (hub GPT-2)
    ignored: tuple[str, ...] = ()  # regexes of HF weights that carry nothing for us (cached buffers)
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement): other spellings of a weight's name


def require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ModelError(f"config.json of model_type {hf.get('model_type')!r} lacks required key {key!r}.")
    return hf[key]


def first(hf: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first key present and not None (HF renamed several keys over the years)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def refuse(hf: Mapping[str, Any], **options: Any) -> None:
    """ModelError when an option we do not implement is set to anything but its harmless value."""
    for key, harmless in options.items():
        if hf.get(key) not in (None, harmless):
            raise ModelError(f"{hf.get('model_type')}: {key}={hf[key]!r} is not supported by dpojax.")


HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ModelError(f"hidden_act {name!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The flat RoPE parameter dict (transformers-5 `rope_parameters` or the older `rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ModelError(f"{hf.get('model_type')}: per-layer-type RoPE parameters (nested rope_parameters) "
                         "are not supported for this family.")
    return params


def parse_rope(hf: Mapping[str, Any], params: Mapping[str, Any] | None = None, *,
               default_theta: float = 10_000.0) -> RopeConfig:
    """RoPE from `params` (default: the model's flat rope parameters) with top-level keys as fallbacks."""
    params = rope_params(hf) if params is None else dict(params)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first name for LongRoPE
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
    theta = params.get("rope_theta", hf.get("rope_theta")) or default_theta
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn", "longrope") and original is None:
        original = require(hf, "max_position_embeddings")
    if rope_type in ("linear", "dynamic", "llama3") and params.get("factor") is None:
        raise ModelError(f"RoPE type {rope_type!r} needs a 'factor'.")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ModelError(f"RoPE type 'llama3' needs {key!r}.")
    factor = params.get("factor")
    if rope_type in ("yarn", "longrope") and factor is None:
        factor = require(hf, "max_position_embeddings") / original
    short, long = params.get("short_factor"), params.get("long_factor")
    return RopeConfig(
        type=rope_type, theta=float(theta), factor=None if factor is None else float(factor),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=params.get("low_freq_factor"), high_freq_factor=params.get("high_freq_factor"),
        beta_fast=params.get("beta_fast"), beta_slow=params.get("beta_slow"),
        attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
        short_factor=None if short is None else tuple(float(x) for x in short),
        long_factor=None if long is None else tuple(float(x) for x in long),
    )


def rotary_dim(hf: Mapping[str, Any], head_dim: int, *, default_factor: float = 1.0) -> int | None:
    """Rotated dims per head from `partial_rotary_factor` (HF: int(head_dim * factor)); None when all rotate."""
    params = rope_params(hf)
    factor = first(params, "partial_rotary_factor", default=None)
    factor = first(hf, "partial_rotary_factor", "rotary_pct", default=default_factor) if factor is None else factor
    dim = int(head_dim * float(factor))
    return None if dim == head_dim else dim


def layer_windows(layer_types: Any, window: Any, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows from HF `layer_types` ("sliding_attention" layers use `window`); () when none slide."""
    if window is None or not layer_types:
        return ()
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise ModelError(f"layer_types has {len(layer_types)} entries for {num_layers} layers.")
    known = {"sliding_attention", "full_attention"}
    if not set(layer_types) <= known:
        raise ModelError(f"layer types {sorted(set(layer_types) - known)} are not supported "
                         "(only sliding_attention and full_attention).")
    if "sliding_attention" not in layer_types:
        return ()
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def decoder_sizes(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes under the Llama-style key names (most families)."""
    D, H = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    return dict(
        vocab_size=require(hf, "vocab_size"), hidden_size=D, intermediate_size=require(hf, "intermediate_size"),
        num_layers=require(hf, "num_hidden_layers"), num_heads=H,
        num_kv_heads=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or D // H,
        max_position_embeddings=require(hf, "max_position_embeddings"),
    )


def moe_options(hf: Mapping[str, Any], *, expert_size_key: str, norm_topk_prob: bool) -> dict[str, Any]:
    """The mixture-of-experts fields shared by the MoE families (`norm_topk_prob`: the family's default). Every
    layer must be an MoE layer: interleaved dense MLP layers (`decoder_sparse_step` > 1, `mlp_only_layers`) are
    refused."""
    model_type = hf.get("model_type")
    num_experts = first(hf, "num_experts", "num_local_experts", default=0)
    if not num_experts:
        raise ModelError(f"{model_type}: num_experts is 0 (no expert layers); load it as its dense family instead.")
    step, only = hf.get("decoder_sparse_step", 1), list(hf.get("mlp_only_layers") or [])
    if step not in (None, 1) or only:
        raise ModelError(f"{model_type}: dense MLP layers between the MoE layers (decoder_sparse_step={step}, "
                         f"mlp_only_layers={only}) are not supported; dpojax needs every layer to be an MoE layer "
                         "(decoder_sparse_step 1, mlp_only_layers []).")
    return dict(num_experts=int(num_experts), experts_per_token=int(require(hf, "num_experts_per_tok")),
                expert_intermediate_size=int(require(hf, expert_size_key)),
                norm_topk_prob=bool(hf.get("norm_topk_prob", norm_topk_prob)),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
                output_router_logits=bool(hf.get("output_router_logits", False)))
