"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM, e.g. Qwen/Qwen1.5-MoE-A2.7B): the Qwen2 block (q/k/v biases) with
an MoE MLP plus an always-on shared expert scaled by a sigmoid gate: y = sum_k w_k expert_k(x) +
sigmoid(x @ shared_expert_gate) * shared_expert(x). Top-k probabilities are not renormalized by default
(`norm_topk_prob` false).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.models.families.common import Family, layer_windows, moe_options, require
from dpojax.models.families.llama import ROTARY_BUFFERS, common
from dpojax.models.families.qwen3_moe import moe_table


def _windows(hf: Mapping[str, Any]) -> tuple[int | None, ...]:
    """transformers' rule: with use_sliding_window, `layer_types` (default: even layers below max_window_layers
    slide)."""
    if not hf.get("use_sliding_window", False) or not hf.get("sliding_window"):
        return ()
    L = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(L)]
    return layer_windows(types, hf["sliding_window"], L)


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(common(hf), qkv_bias=bool(hf.get("qkv_bias", True)), layer_windows=_windows(hf),
                shared_expert_size=int(require(hf, "shared_expert_intermediate_size")),
                **moe_options(hf, expert_size_key="moe_intermediate_size", norm_topk_prob=False))


FAMILIES = {"qwen2_moe": Family(parse, moe_table(shared_expert=True), "Qwen2MoeForCausalLM", ignored=ROTARY_BUFFERS)}
