"""GPT-NeoX / Pythia: parallel residual, partial rotary (`rotary_pct`), LayerNorm with bias, plain GELU MLP,
untied `embed_out`.

HF fuses q, k, v in `attention.query_key_value` laid out per head: rows [H, (q, k, v), Dh] (rule "per_head").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.models.families.common import Family, activation, decoder_sizes, parse_rope, rotary_dim

P = "gpt_neox.layers.{i}."
TABLE = {
    "embed_tokens/embedding": ("gpt_neox.embed_in.weight", "identity"),
    "layers/input_layernorm/weight": (P + "input_layernorm.weight", "identity"),
    "layers/input_layernorm/bias": (P + "input_layernorm.bias", "identity"),
    **{f"layers/self_attn/{p}_proj/kernel": (P + "attention.query_key_value.weight", "split_out_heads", "per_head", j)
       for j, p in enumerate("qkv")},
    **{f"layers/self_attn/{p}_proj/bias": (P + "attention.query_key_value.bias", "split_heads", "per_head", j)
       for j, p in enumerate("qkv")},
    "layers/self_attn/o_proj/kernel": (P + "attention.dense.weight", "split_in_heads"),
    "layers/self_attn/o_proj/bias": (P + "attention.dense.bias", "identity"),
    "layers/post_attention_layernorm/weight": (P + "post_attention_layernorm.weight", "identity"),
    "layers/post_attention_layernorm/bias": (P + "post_attention_layernorm.bias", "identity"),
    "layers/mlp/up_proj/kernel": (P + "mlp.dense_h_to_4h.weight", "transpose"),
    "layers/mlp/up_proj/bias": (P + "mlp.dense_h_to_4h.bias", "identity"),
    "layers/mlp/down_proj/kernel": (P + "mlp.dense_4h_to_h.weight", "transpose"),
    "layers/mlp/down_proj/bias": (P + "mlp.dense_4h_to_h.bias", "identity"),
    "norm/weight": ("gpt_neox.final_layer_norm.weight", "identity"),
    "norm/bias": ("gpt_neox.final_layer_norm.bias", "identity"),
    "lm_head/weight": ("embed_out.weight", "identity"),
}


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    sizes = decoder_sizes({**hf, "head_dim": None})  # NeoX's head size is always hidden // heads
    bias = bool(hf.get("attention_bias", True))
    theta_hf = {**hf, "rope_theta": hf.get("rope_theta", hf.get("rotary_emb_base"))}
    return dict(
        sizes, norm_eps=float(hf.get("layer_norm_eps", 1e-5)), rope=parse_rope(theta_hf),
        rotary_dim=rotary_dim(hf, sizes["head_dim"], default_factor=0.25),  # HF's default rotary_pct
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias, mlp_bias=True,
        activation=activation(hf.get("hidden_act", "gelu")), norm="layer", mlp="plain",
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
    )


FAMILIES = {
    "gpt_neox": Family(parse, TABLE, "GPTNeoXForCausalLM", prefix="gpt_neox.",
                       ignored=(r".*\.attention\.(masked_)?bias$", r".*rotary_emb\.inv_freq$"),
                       renames=((r"^lm_head\.weight$", "embed_out.weight"),)),  # transformers 5's in-memory name
}
