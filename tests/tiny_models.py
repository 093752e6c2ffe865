"""Tiny random Hugging Face checkpoints built locally with torch (no network), for parity tests.

`make_tiny_checkpoint(path, family, ...)` writes `config.json` + `model.safetensors` (fp32) with
non-trivial weights (random norm scales and biases), deterministic from `seed`.
Families: llama, mistral, qwen2, qwen3; anything else in `hf_overrides` goes to the HF config
(e.g. rope_scaling=..., head_dim=..., attention_bias=True, mlp_bias=True).
"""

from __future__ import annotations

import pathlib

import numpy as np

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def make_tiny_checkpoint(path, family: str = "llama", *, seed: int = 0, vocab_size: int = 128, hidden_size: int = 32,
                         num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, tie: bool = False,
                         **hf_overrides) -> pathlib.Path:
    import torch
    import transformers

    path = pathlib.Path(path)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  tie_word_embeddings=tie, max_position_embeddings=128, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(hf_overrides)
    config = getattr(transformers, CONFIG_CLASSES[family])(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _randomize(model, seed: int) -> None:
    """Non-trivial weights: matrices ~ N(0, 0.05^2) (embeddings and lm_head std 0.5),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2)."""
    import torch

    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                value = 1.0 + 0.1 * gen.standard_normal(p.shape)
            elif name.endswith("bias"):
                value = 0.05 * gen.standard_normal(p.shape)
            elif "embed_tokens" in name or "lm_head" in name:
                value = 0.5 * gen.standard_normal(p.shape)
            else:
                value = 0.05 * gen.standard_normal(p.shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    if model.config.tie_word_embeddings:
        model.tie_weights()
