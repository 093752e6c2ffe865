"""Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen/Qwen3-30B-A3B): the Qwen3 attention block (q/k norm) with an MoE MLP:
softmax over the experts, top-k, renormalized when `norm_topk_prob`; no shared expert.

Weights are stored per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`, as on the hub and as transformers 5's
save_pretrained writes them); the router is `mlp.gate.weight` [X, D].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.models.families.common import Family, moe_options
from dpojax.models.families.llama import ROTARY_BUFFERS, common, llama_table

P = "model.layers.{i}.mlp."


def moe_table(*, shared_expert: bool) -> dict[str, tuple]:
    """The Llama table with the Qwen MoE MLP names (also Qwen2-MoE's, with its shared expert)."""
    extra = {
        "layers/mlp/router/kernel": (P + "gate.weight", "transpose"),
        **{f"layers/mlp/experts/{p}_proj": (P + f"experts.{{e}}.{p}_proj.weight", "transpose")
           for p in ("gate", "up", "down")},
    }
    if shared_expert:
        extra.update({f"layers/mlp/shared_expert/{p}_proj/kernel": (P + f"shared_expert.{p}_proj.weight", "transpose")
                      for p in ("gate", "up", "down")})
        extra["layers/mlp/shared_expert_gate/kernel"] = (P + "shared_expert_gate.weight", "transpose")
    return llama_table(extra=extra)


def sliding_all_layers(hf: Mapping[str, Any]) -> tuple[int | None, ...]:
    """Qwen3-MoE's rule: with use_sliding_window, every layer slides."""
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or not window:
        return ()
    return (int(window),) * int(hf["num_hidden_layers"])


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return dict(common(hf), qkv_bias=bias, o_bias=bias, qk_norm=True, layer_windows=sliding_all_layers(hf),
                **moe_options(hf, expert_size_key="moe_intermediate_size", norm_topk_prob=False))


FAMILIES = {"qwen3_moe": Family(parse, moe_table(shared_expert=False), "Qwen3MoeForCausalLM", ignored=ROTARY_BUFFERS)}
