"""Decoder-only LMs in Flax NNX with Hugging Face checkpoint I/O: Llama, Mistral, Qwen2, Qwen3, GPT-2,
GPT-NeoX/Pythia, Gemma 1/2/3 (text), Phi-3 (`FAMILIES`), one shared decoder.

    model, cfg = load_pretrained("path/or/hub-id", dtype=jnp.bfloat16, sharder=sharder)
    graphdef, params = nnx.split(model)                    # pure-function form for jit
    hidden_BxTxD = nnx.merge(graphdef, params)(ids_BxT, positions_BxT, segment_ids_BxT)
"""

from dpojax.models.attention import IMPLEMENTATIONS, attend, resolve_attention
from dpojax.models.config import ModelConfig, RopeConfig
from dpojax.models.families import FAMILIES
from dpojax.models.hf import (
    abstract_decoder,
    abstract_params,
    export_hf,
    init_random,
    load_pretrained,
    param_sharding,
    state_shardings,
)
from dpojax.models.transformer import REMAT_POLICIES, Decoder

__all__ = [
    "FAMILIES", "IMPLEMENTATIONS", "REMAT_POLICIES", "Decoder", "ModelConfig", "RopeConfig", "abstract_decoder",
    "abstract_params", "attend", "export_hf", "init_random", "load_pretrained", "param_sharding", "resolve_attention",
    "state_shardings",
]
