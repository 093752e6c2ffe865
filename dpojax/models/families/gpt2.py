"""GPT-2: learned absolute positions, LayerNorm with bias, biases everywhere, plain GELU(tanh) MLP, tied head.

HF stores GPT-2's projections as Conv1D weights, [in, out] (already our orientation), and fuses q, k, v
into `attn.c_attn` ([D, 3D], q | k | v along the output axis). Hub checkpoints were saved from the base
model: names lack the `transformer.` prefix and carry the old causal-mask buffers `attn.bias`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.models.families.common import Family, activation, first, refuse, require

P = "transformer.h.{i}."
TABLE = {
    "embed_tokens/embedding": ("transformer.wte.weight", "identity"),
    "embed_positions/embedding": ("transformer.wpe.weight", "identity"),
    "layers/input_layernorm/weight": (P + "ln_1.weight", "identity"),
    "layers/input_layernorm/bias": (P + "ln_1.bias", "identity"),
    **{f"layers/self_attn/{p}_proj/kernel": (P + "attn.c_attn.weight", "flat_out_heads", "cat_last", j)
       for j, p in enumerate("qkv")},
    **{f"layers/self_attn/{p}_proj/bias": (P + "attn.c_attn.bias", "split_heads", "cat_last", j)
       for j, p in enumerate("qkv")},
    "layers/self_attn/o_proj/kernel": (P + "attn.c_proj.weight", "flat_in_heads"),
    "layers/self_attn/o_proj/bias": (P + "attn.c_proj.bias", "identity"),
    "layers/post_attention_layernorm/weight": (P + "ln_2.weight", "identity"),
    "layers/post_attention_layernorm/bias": (P + "ln_2.bias", "identity"),
    "layers/mlp/up_proj/kernel": (P + "mlp.c_fc.weight", "identity"),
    "layers/mlp/up_proj/bias": (P + "mlp.c_fc.bias", "identity"),
    "layers/mlp/down_proj/kernel": (P + "mlp.c_proj.weight", "identity"),
    "layers/mlp/down_proj/bias": (P + "mlp.c_proj.bias", "identity"),
    "norm/weight": ("transformer.ln_f.weight", "identity"),
    "norm/bias": ("transformer.ln_f.bias", "identity"),
    "lm_head/weight": ("lm_head.weight", "identity"),
}


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse(hf, add_cross_attention=False, scale_attn_by_inverse_layer_idx=False)
    D, H = first(hf, "n_embd", "hidden_size"), first(hf, "n_head", "num_attention_heads")
    if D is None or H is None:
        require(hf, "n_embd"), require(hf, "n_head")
    # reorder_and_upcast_attn only changes the precision of HF's scores; ours are always fp32.
    return dict(
        vocab_size=require(hf, "vocab_size"), hidden_size=D, intermediate_size=first(hf, "n_inner", default=4 * D),
        num_layers=first(hf, "n_layer", "num_hidden_layers"), num_heads=H, num_kv_heads=H, head_dim=D // H,
        max_position_embeddings=first(hf, "n_positions", "max_position_embeddings", "n_ctx"),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True, o_bias=True, mlp_bias=True, activation=activation(hf.get("activation_function", "gelu_new")),
        norm="layer", mlp="plain", position="learned",
        query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )


FAMILIES = {
    "gpt2": Family(parse, TABLE, "GPT2LMHeadModel", prefix="transformer.",
                   ignored=(r"(.*\.)?h\.\d+\.(attn|crossattention)\.(masked_)?bias$",)),
}
