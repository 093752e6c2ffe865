"""Llama 2/3, Mistral, Qwen2/2.5, Qwen3: pre-norm RMSNorm blocks, SwiGLU, RoPE, GQA; HF names kept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.models.families.common import Family, activation, decoder_sizes, layer_windows, parse_rope


def llama_table(*, extra: Mapping[str, tuple] | None = None) -> dict[str, tuple]:
    """The Llama weight names (also the base of Gemma's and Phi-3's tables)."""
    table = {
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
    table.update(extra or {})
    return table


LLAMA_TABLE = llama_table()
ROTARY_BUFFERS = (r".*rotary_emb\.inv_freq$",)  # old checkpoints' cached RoPE tables


def common(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Fields shared by the Llama-like families."""
    return dict(decoder_sizes(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=parse_rope(hf),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                activation=activation(hf.get("hidden_act", "silu")))


def parse_llama(hf: Mapping[str, Any]) -> dict[str, Any]:
    # transformers' Llama has no sliding window (it ignores layer_types), and neither do we.
    bias = bool(hf.get("attention_bias", False))
    return dict(common(hf), qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def parse_mistral(hf: Mapping[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    L = hf["num_hidden_layers"]
    return dict(common(hf), layer_windows=() if window is None else (int(window),) * L)


def _qwen_windows(hf: Mapping[str, Any]) -> tuple[int | None, ...]:
    """HF's rule: with use_sliding_window, layers i >= max_window_layers slide (unless layer_types says)."""
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
        return ()
    L = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention" for i in range(L)]
    return layer_windows(types, hf["sliding_window"], L)


def parse_qwen2(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(common(hf), qkv_bias=True, layer_windows=_qwen_windows(hf))


def parse_qwen3(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return dict(common(hf), qkv_bias=bias, o_bias=bias, qk_norm=True, layer_windows=_qwen_windows(hf))


FAMILIES = {
    "llama": Family(parse_llama, LLAMA_TABLE, "LlamaForCausalLM", ignored=ROTARY_BUFFERS),
    "mistral": Family(parse_mistral, LLAMA_TABLE, "MistralForCausalLM", ignored=ROTARY_BUFFERS),
    "qwen2": Family(parse_qwen2, LLAMA_TABLE, "Qwen2ForCausalLM", ignored=ROTARY_BUFFERS),
    "qwen3": Family(parse_qwen3, LLAMA_TABLE, "Qwen3ForCausalLM", ignored=ROTARY_BUFFERS),
}
