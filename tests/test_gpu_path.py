"""The GPU path decided on CPU: `attention: auto` picks cuDNN flash attention where cuDNN runs the model (dtype,
soft-cap, head_dim per GPU generation), XLA otherwise; the GPU configs resolve to it."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from dpojax.config import load_config
from dpojax.models import ModelConfig, resolve_attention
from dpojax.models.attention import cudnn_allows

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype, head_dim, softcap, capability, expected", [
    (jnp.bfloat16, 64, None, "9.0", "cudnn"),  # H100 / H200
    (jnp.float16, 128, None, "8.0", "cudnn"),  # A100
    (jnp.bfloat16, 256, None, "9.0", "cudnn"),  # Gemma's head_dim on Hopper
    (jnp.bfloat16, 256, None, "8.0", "xla"),  # ... but not on Ampere (cuDNN: <= 128 before Hopper)
    (jnp.bfloat16, 72, None, "9.0", "cudnn"),
    (jnp.bfloat16, 100, None, "9.0", "xla"),  # not a multiple of 8
    (jnp.float32, 64, None, "9.0", "xla"),  # cuDNN flash attention is bf16/fp16 only
    (jnp.bfloat16, 256, 50.0, "9.0", "xla"),  # Gemma 2's soft-capped scores
])
def test_auto_attention_on_gpu(dtype, head_dim, softcap, capability, expected):
    got = resolve_attention("auto", dtype=dtype, head_dim=head_dim, softcap=softcap, backend="gpu",
                            gpu_capability=capability)
    assert got == expected
    assert cudnn_allows(dtype=dtype, head_dim=head_dim, softcap=softcap, capability=capability) == (got == "cudnn")
    assert resolve_attention("auto", dtype=dtype, head_dim=head_dim, softcap=softcap, backend="cpu") == "xla"


@pytest.mark.parametrize("name, hf_config", [
    ("demo_gpu.yaml", REPO / "configs/demo/model/config.json"),
    ("llama-3.2-1b_ultrafeedback_h200.yaml", REPO / "tests/assets/hf_configs/Llama-3.2-1B-Instruct/config.json"),
    ("llama-3.1-8b_ultrafeedback_8xh100.yaml", REPO / "tests/assets/hf_configs/Llama-3.1-8B-Instruct/config.json"),
])
def test_gpu_configs_use_cudnn_on_a_gpu(name, hf_config):
    cfg = load_config(REPO / "configs" / name)
    model = ModelConfig.from_hf(json.loads(hf_config.read_text()))
    assert cfg.model.dtype == "bfloat16" and cfg.model.attention == "auto"
    assert resolve_attention(cfg.model.attention, dtype=jnp.bfloat16, head_dim=model.head_dim, backend="gpu",
                             gpu_capability="9.0", softcap=model.attn_softcap) == "cudnn"
