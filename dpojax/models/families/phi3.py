"""Phi-3 (mini/small/medium, 3.5-mini, Phi-4-mini): the Llama block with fused `qkv_proj` ([q; k; v] rows) and
`gate_up_proj` ([gate; up] rows), optional partial rotary, LongRoPE (`su`/`longrope`) scaling and a sliding window
on every layer when `sliding_window` is set.

LongRoPE follows transformers: the short factors while the longest position in the batch is within
`original_max_position_embeddings`, the long factors beyond it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.errors import ModelError
from dpojax.models.families.common import Family, activation, decoder_sizes, parse_rope, rope_params, rotary_dim
from dpojax.models.families.llama import ROTARY_BUFFERS, llama_table

P = "model.layers.{i}."
TABLE = llama_table(extra={
    **{f"layers/self_attn/{p}_proj/kernel": (P + "self_attn.qkv_proj.weight", "split_out_heads", "cat_first", j)
       for j, p in enumerate("qkv")},
    "layers/mlp/gate_proj/kernel": (P + "mlp.gate_up_proj.weight", "transpose", "cat_first", 0),
    "layers/mlp/up_proj/kernel": (P + "mlp.gate_up_proj.weight", "transpose", "cat_first", 1),
})


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    sizes = decoder_sizes(hf)
    params = rope_params(hf)
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type == "yarn":  # transformers' Phi-3 reads a "yarn" entry as LongRoPE factors
        params = {**params, "rope_type": "longrope"}
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ModelError("phi3: biases are not part of the Phi-3 architecture in transformers.")
    window = hf.get("sliding_window")
    return dict(
        sizes, norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope=parse_rope(hf, params),
        rotary_dim=rotary_dim(hf, sizes["head_dim"]), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation=activation(hf.get("hidden_act", "silu")),
        layer_windows=() if window is None else (int(window),) * sizes["num_layers"],
    )


FAMILIES = {"phi3": Family(parse, TABLE, "Phi3ForCausalLM", ignored=ROTARY_BUFFERS)}
