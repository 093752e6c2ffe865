"""Tiny random Hugging Face checkpoints built locally with torch (no network), for parity tests.

`make_tiny_checkpoint(path, family, ...)` writes `config.json` + `model.safetensors` (fp32) with
non-trivial weights (random norm scales and biases), deterministic from `seed`.
Families: llama, mistral, qwen2, qwen3, gpt2, gpt_neox, gemma, gemma2, gemma3_text, phi3, and the mixture-of-
experts families qwen3_moe, mixtral, qwen2_moe (8 experts, top-2; qwen2_moe with its shared expert). Each family's
defaults exercise what sets it apart (FAMILY_DEFAULTS): NeoX partial rotary and parallel residual, Gemma 2
sliding windows shorter than the test sequences and both soft-caps, Gemma 3 local/global RoPE, Phi-3
LongRoPE. Anything in `hf_overrides` goes to the HF config (e.g. rope_scaling=..., head_dim=...,
attention_bias=True, sliding_window=None). `xla_flags(devices)`: the session's XLA flags for a test's subprocess.
"""

from __future__ import annotations

import pathlib

import numpy as np

CONFIG_CLASSES = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
    "gpt2": "GPT2Config", "gpt_neox": "GPTNeoXConfig", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config", "qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
TIED_BY_DEFAULT = ("gpt2", "gemma", "gemma2", "gemma3_text")


def _longrope_factors(n: int, seed: int) -> dict:
    gen = np.random.default_rng(100 + seed)
    return {"short_factor": [float(x) for x in 1.0 + gen.random(n)],
            "long_factor": [float(x) for x in 2.0 + 4.0 * gen.random(n)]}


def _family_kwargs(family: str, *, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, tie, seed) -> dict:
    """HF config kwargs (under each family's own key names) for a tiny model with the family's features on."""
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie)
    if family == "gpt2":
        return dict(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                    n_positions=128, n_inner=2 * hidden_size, activation_function="gelu_new",
                    layer_norm_epsilon=1e-5, **ids)
    if family == "gpt_neox":
        return dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                    num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=128,
                    rotary_pct=0.5, use_parallel_residual=True, layer_norm_eps=1e-5, hidden_act="gelu", **ids)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=128, rms_norm_eps=1e-5, **ids)
    if family in ("mistral", "mixtral"):
        kwargs["sliding_window"] = None
    if family in MOE_FAMILIES:  # 8 experts, top-2; Mixtral's experts are intermediate_size wide
        kwargs.update(num_experts_per_tok=2, router_aux_loss_coef=0.01)
        kwargs.update({"num_local_experts": 8} if family == "mixtral" else
                      {"num_experts": 8, "moe_intermediate_size": hidden_size})
    if family == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = 3 * hidden_size // 2
    if family.startswith("gemma"):
        kwargs.update(head_dim=16)  # independent of hidden / heads = 8
    if family in ("gemma2", "gemma3_text"):
        # windows shorter than test sequences; a soft-cap small enough to bend random scores
        kwargs.update(query_pre_attn_scalar=24, sliding_window=4,
                      layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)])
    if family == "gemma2":
        kwargs.update(attn_logit_softcapping=0.2, final_logit_softcapping=4.0)
    if family == "gemma3_text":
        kwargs.update(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 1_000_000.0}})
    if family == "phi3":  # LongRoPE: short factors up to 16 positions, long ones beyond
        head_dim = hidden_size // num_heads
        kwargs.update(original_max_position_embeddings=16,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                                       **_longrope_factors(head_dim // 2, seed)})
    return kwargs


def make_tiny_checkpoint(path, family: str = "llama", *, seed: int = 0, vocab_size: int = 128, hidden_size: int = 32,
                         num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, tie: bool | None = None,
                         **hf_overrides) -> pathlib.Path:
    import torch
    import transformers

    path = pathlib.Path(path)
    tie = family in TIED_BY_DEFAULT if tie is None else tie
    kwargs = _family_kwargs(family, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                            num_heads=num_heads, num_kv_heads=num_kv_heads, tie=tie, seed=seed)
    kwargs.update(hf_overrides)
    config = getattr(transformers, CONFIG_CLASSES[family])(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return path


EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")
ROUTERS = (".mlp.gate.weight", "shared_expert_gate.weight")  # MoE routers: std 0.5, clear top-k choices
NORMS = ("norm", "ln_")


def _randomize(model, seed: int) -> None:
    """Non-trivial weights: matrices ~ N(0, 0.05^2) (embeddings and heads std 0.5),
    norm scales ~ 1 + N(0, 0.1^2) (Gemma's (1 + w) scales: w ~ N(0, 0.1^2)), biases ~ N(0, 0.05^2)."""
    import torch

    gen = np.random.default_rng(seed)
    offset_norms = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in NORMS) and name.endswith("weight"):
                value = (0.0 if offset_norms else 1.0) + 0.1 * gen.standard_normal(p.shape)
            elif name.endswith("bias"):
                value = 0.05 * gen.standard_normal(p.shape)
            elif any(k in name for k in EMBEDDINGS) or name.endswith(ROUTERS):
                value = 0.5 * gen.standard_normal(p.shape)
            else:
                value = 0.05 * gen.standard_normal(p.shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    if model.config.tie_word_embeddings:
        model.tie_weights()


def tiny_run_files(root: pathlib.Path, *, rows: int, data_seed: int, model_seed: int = 0, **checkpoint_kw) -> dict:
    """What a small training run reads, under `root`: a tiny Llama checkpoint (`make_tiny_checkpoint`), the test
    tokenizer, `rows` standard preference rows as JSONL, and a data cache folder; as config-ready strings."""
    import json

    from tiny_tokenizer import make_pref_rows, make_tokenizer

    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(rows, "standard", seed=data_seed)))
    return {"policy": str(make_tiny_checkpoint(root / "policy", seed=model_seed, **checkpoint_kw)),
            "tok": str(make_tokenizer(root / "tok")), "data": str(data), "cache": str(root / "cache")}


def xla_flags(devices: int | None) -> str:
    """The session's XLA_FLAGS (conftest's compile flags included) with `devices` fake CPU devices, for a test's
    subprocess; None: the one CPU device a user's run has."""
    import os

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_")]
    return " ".join(flags + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))
