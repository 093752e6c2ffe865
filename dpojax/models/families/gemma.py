"""Gemma 1, Gemma 2 and Gemma 3 (text): RMSNorm scaled by (1 + w), embeddings times sqrt(D), GeGLU (tanh),
tied head, head_dim independent of D / H.

Gemma 2 adds sandwich norms (on the attention and MLP outputs too), attention and final logit soft-caps,
`query_pre_attn_scalar`, and alternating sliding-window / global layers; Gemma 3 adds q/k norms and a
separate RoPE (base `rope_local_base_freq`, never scaled) for the sliding layers. Which layer slides is
data (`ModelConfig.layer_windows`), scanned with the stacked parameters.

HF's Gemma 2/3 `post_attention_layernorm` is the norm on the attention OUTPUT (ours: `attn_output_norm`);
their `pre_feedforward_layernorm` is our `post_attention_layernorm` (the norm before the MLP, Llama's name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.errors import ModelError
from dpojax.models.families.common import (
    Family,
    activation,
    decoder_sizes,
    layer_windows,
    parse_rope,
    refuse,
    rope_params,
)
from dpojax.models.families.llama import llama_table

P = "model.layers.{i}."
SANDWICH_TABLE = llama_table(extra={
    "layers/attn_output_norm/weight": (P + "post_attention_layernorm.weight", "identity"),
    "layers/post_attention_layernorm/weight": (P + "pre_feedforward_layernorm.weight", "identity"),
    "layers/mlp_output_norm/weight": (P + "post_feedforward_layernorm.weight", "identity"),
})


def _common(hf: Mapping[str, Any], act: str) -> dict[str, Any]:
    refuse(hf, use_bidirectional_attention=False)
    bias = bool(hf.get("attention_bias", False))
    return dict(decoder_sizes(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_offset=1.0, embed_scale=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), activation=activation(act),
                qkv_bias=bias, o_bias=bias)


def _softcap(hf: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = hf.get(key, default)
    return None if value is None else float(value)


def parse_gemma(hf: Mapping[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # as transformers: Gemma's "gelu" meant the tanh form
    return dict(_common(hf, act), rope=parse_rope(hf))


def parse_gemma2(hf: Mapping[str, Any]) -> dict[str, Any]:
    L = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    return dict(
        _common(hf, hf.get("hidden_activation") or "gelu_pytorch_tanh"), rope=parse_rope(hf), sandwich_norms=True,
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=_softcap(hf, "attn_logit_softcapping", 50.0),
        final_softcap=_softcap(hf, "final_logit_softcapping", 30.0),
        layer_windows=layer_windows(types, hf.get("sliding_window", 4096), L),
    )


def _gemma3_ropes(hf: Mapping[str, Any]):
    """(global RoPE, local RoPE) from nested rope_parameters or the older rope_theta/rope_local_base_freq."""
    nested = hf.get("rope_parameters")
    if isinstance(nested, Mapping) and nested and all(isinstance(v, Mapping) for v in nested.values()):
        unknown = set(nested) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ModelError(f"gemma3_text: rope_parameters for unknown layer types {sorted(unknown)}.")
        full, local = nested.get("full_attention") or {}, nested.get("sliding_attention") or {}
        return (parse_rope(hf, {"rope_theta": 1_000_000.0, **full}),
                parse_rope(hf, {"rope_theta": 10_000.0, **local}))
    full = {"rope_theta": hf.get("rope_theta") or 1_000_000.0, **rope_params(hf)}
    local = {"rope_theta": hf.get("rope_local_base_freq") or 10_000.0}
    return parse_rope(hf, full), parse_rope(hf, local)


def parse_gemma3_text(hf: Mapping[str, Any]) -> dict[str, Any]:
    L = hf["num_hidden_layers"]
    pattern = int(hf.get("sliding_window_pattern") or 6)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    rope, local_rope = _gemma3_ropes(hf)
    return dict(
        _common(hf, hf.get("hidden_activation") or "gelu_pytorch_tanh"), rope=rope,
        local_rope=None if local_rope == rope else local_rope, sandwich_norms=True, qk_norm=True,
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=_softcap(hf, "attn_logit_softcapping", None),
        final_softcap=_softcap(hf, "final_logit_softcapping", None),
        layer_windows=layer_windows(types, hf.get("sliding_window", 4096), L),
    )


LLAMA_NAMES = llama_table()
FAMILIES = {
    "gemma": Family(parse_gemma, LLAMA_NAMES, "GemmaForCausalLM"),
    "gemma2": Family(parse_gemma2, SANDWICH_TABLE, "Gemma2ForCausalLM"),
    "gemma3_text": Family(parse_gemma3_text, SANDWICH_TABLE, "Gemma3ForCausalLM"),
}
