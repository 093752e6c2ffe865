"""gpt-oss (GptOssForCausalLM): the Llama block with biases on q/k/v/o, a learned attention sink per query head,
sliding-window and full attention alternating (`layer_types`), YaRN RoPE, and an MoE MLP in every layer.

The MoE MLP: a router with a bias and the "topk_softmax" rule (the top-k logits, then a softmax over those k), and
X experts whose clamped SwiGLU has biases: glu = min(gate, limit) * sigmoid(alpha * min(gate, limit)),
h = (clip(up, -limit, limit) + 1) * glu (`experts.GATED_ACTIVATIONS["gpt_oss"]`, alpha 1.702, limit 7.0).
HF stores each layer's experts stacked: `gate_up_proj` [X, D, 2F] with gate and up in alternating columns (rule
"interleave_last"), `gate_up_proj_bias` [X, 2F] likewise, `down_proj` [X, F, D], `down_proj_bias` [X, D]; the
router as a Linear, `router.weight` [X, D]. Released checkpoints store the two expert matrices in MXFP4
(`*_blocks` / `*_scales`), which the loader dequantizes (`dpojax.models.mxfp4`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpojax.errors import ModelError
from dpojax.models.families.common import Family, decoder_sizes, layer_windows, moe_options, parse_rope, rope_params
from dpojax.models.families.llama import llama_table

P = "model.layers.{i}."
E = P + "mlp.experts."
TABLE = llama_table(extra={
    "layers/self_attn/sinks": (P + "self_attn.sinks", "identity"),
    "layers/mlp/router/kernel": (P + "mlp.router.weight", "transpose"),
    "layers/mlp/router/bias": (P + "mlp.router.bias", "identity"),
    "layers/mlp/experts/gate_proj": (E + "gate_up_proj", "identity", "interleave_last", 0),
    "layers/mlp/experts/up_proj": (E + "gate_up_proj", "identity", "interleave_last", 1),
    "layers/mlp/experts/gate_proj_bias": (E + "gate_up_proj_bias", "identity", "interleave_last", 0),
    "layers/mlp/experts/up_proj_bias": (E + "gate_up_proj_bias", "identity", "interleave_last", 1),
    "layers/mlp/experts/down_proj": (E + "down_proj", "identity"),
    "layers/mlp/experts/down_proj_bias": (E + "down_proj_bias", "identity"),
})
# transformers' defaults when config.json has no rope_parameters (GptOssConfig.__post_init__)
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}  # the clamped SwiGLU dpojax implements (every release)


def parse(hf: Mapping[str, Any]) -> dict[str, Any]:
    sizes = decoder_sizes({**hf, "head_dim": hf.get("head_dim", 64)})
    for key, value in SWIGLU.items():
        if float(hf.get(key, value)) != value:
            raise ModelError(f"gpt_oss: {key}={hf[key]} is not supported; dpojax implements the clamped SwiGLU of "
                             f"the released models ({', '.join(f'{k}={v}' for k, v in SWIGLU.items())}).")
    L = sizes["num_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    bias = bool(hf.get("attention_bias", True))
    return dict(
        sizes, norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope=parse_rope(hf, rope_params(hf) or DEFAULT_ROPE, default_theta=150_000.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias, mlp_bias=True,
        activation="gpt_oss", layer_windows=layer_windows(types, hf.get("sliding_window", 128), L),
        attention_sinks=True, router_rule="topk_softmax", router_bias=True,
        **moe_options({"num_experts_per_tok": 4, "router_aux_loss_coef": 0.001, **hf},
                      expert_size_key="intermediate_size", norm_topk_prob=False),
    )


FAMILIES = {"gpt_oss": Family(parse, TABLE, "GptOssForCausalLM")}
