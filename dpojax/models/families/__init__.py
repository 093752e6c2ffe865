"""Supported model families: HF `model_type` -> `Family` (config parser, weight table, export name).

Add a family with one small module here (a parser and a table) and one line below; the decoder is shared.
"""

from __future__ import annotations

from dpojax.models.families import gemma, gpt2, gpt_neox, gpt_oss, llama, mixtral, phi3, qwen2_moe, qwen3_moe
from dpojax.models.families.common import Family

FAMILIES: dict[str, Family] = {
    **llama.FAMILIES, **gpt2.FAMILIES, **gpt_neox.FAMILIES, **gemma.FAMILIES, **phi3.FAMILIES,
    **qwen3_moe.FAMILIES, **qwen2_moe.FAMILIES, **mixtral.FAMILIES, **gpt_oss.FAMILIES,
}

MOE_FAMILIES = ("gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe")
_MOE_HINT = "mixture-of-experts models are supported for " + ", ".join(MOE_FAMILIES)
UNSUPPORTED_MOE = ("deepseek_v2", "deepseek_v3", "olmoe", "dbrx", "jamba", "granitemoe", "phimoe", "qwen3_next",
                   "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax", "llama4", "flex_olmo", "jetmoe")

HINTS = {
    "gemma3": "gemma3 checkpoints hold the multimodal model; dpojax supports the text-only gemma3_text "
              "(e.g. google/gemma-3-1b-pt)",
    "phi": "Phi-1/2 (model_type 'phi') are not supported; Phi-3 ('phi3') is",
    **{model_type: f"{model_type} is a mixture-of-experts architecture dpojax does not implement; {_MOE_HINT}"
       for model_type in UNSUPPORTED_MOE},
}


def unsupported_model_type(model_type) -> str:
    hint = f" ({HINTS[model_type]})" if model_type in HINTS else ""
    return f"model_type {model_type!r} is not supported{hint}; supported model types: {', '.join(sorted(FAMILIES))}."


__all__ = ["FAMILIES", "Family", "unsupported_model_type"]
