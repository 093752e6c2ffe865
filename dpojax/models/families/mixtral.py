"""Mixtral (MixtralForCausalLM, e.g. mistralai/Mixtral-8x7B-v0.1): the Mistral block (optional sliding window on
every layer) with an MoE MLP: softmax over the experts, top-k, always renormalized. The experts' width is the
config's `intermediate_size`.

Weights as on the hub and as transformers 5's save_pretrained writes them: `block_sparse_moe.gate.weight` (router,
[X, D]) and `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (gate, up, down); the `mlp.` spelling of the same
names (transformers' in-memory module name) is read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.models.families.common import Family, moe_options, refuse
from dpojax.models.families.llama import ROTARY_BUFFERS, common, llama_table

P = "model.layers.{i}.block_sparse_moe."
TABLE = llama_table(extra={
    "layers/mlp/router/kernel": (P + "gate.weight", "transpose"),
    "layers/mlp/experts/gate_proj": (P + "experts.{e}.w1.weight", "transpose"),
    "layers/mlp/experts/up_proj": (P + "experts.{e}.w3.weight", "transpose"),
    "layers/mlp/experts/down_proj": (P + "experts.{e}.w2.weight", "transpose"),
})


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse(hf, router_jitter_noise=0.0)  # transformers scales the inputs by random noise in training mode
    window = hf.get("sliding_window")
    L = int(hf["num_hidden_layers"])
    return dict(common(hf), layer_windows=() if window is None else (int(window),) * L,
                **moe_options({**hf, "norm_topk_prob": True}, expert_size_key="intermediate_size",
                              norm_topk_prob=True))


FAMILIES = {
    "mixtral": Family(parse, TABLE, "MixtralForCausalLM", ignored=ROTARY_BUFFERS,
                      renames=((r"\.mlp\.(gate|experts\.\d+\.w[123])\.weight$", r".block_sparse_moe.\1.weight"),)),
}
