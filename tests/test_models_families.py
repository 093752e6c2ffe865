"""GPT-2, GPT-NeoX/Pythia, Gemma 1/2/3 and Phi-3: logits equal transformers' (fp32, padded batches) on tiny
random checkpoints, export round trips, hub-style configs and weight names, full-size shapes and shardings
without memory, and clear errors for what is not supported."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_hf_io import load_torch
from test_models import our_logits, padded_batch, torch_logits
from tiny_models import _longrope_factors, make_tiny_checkpoint

from dpojax.errors import ModelError
from dpojax.models import (
    Decoder,
    ModelConfig,
    abstract_decoder,
    abstract_params,
    export_hf,
    init_random,
    load_pretrained,
)
from dpojax.models.hf import hf_weight_shapes
from dpojax.sharding import Sharder, check_fsdp_sharded, make_mesh

# name -> (family, make_tiny_checkpoint overrides, config.json edits written afterwards: the older key names
# real hub checkpoints carry, which transformers still reads; None deletes a key)
VARIANTS = {
    "gpt2": ("gpt2", {}, {}),
    "gpt2_untied_erf_gelu_4x_mlp": ("gpt2", dict(tie=False, activation_function="gelu", n_inner=None), {}),
    "neox_parallel_rotary_half": ("gpt_neox", {}, {}),
    "pythia_style_config_sequential_quarter_rotary": (
        "gpt_neox", dict(use_parallel_residual=False, attention_bias=False),
        {"rope_parameters": None, "rotary_pct": 0.25, "rotary_emb_base": 10000}),
    "gemma": ("gemma", {}, {}),
    "gemma_mqa_legacy_gelu_name": ("gemma", dict(num_kv_heads=1), {"hidden_act": "gelu"}),
    "gemma2_window4_softcaps": ("gemma2", {}, {}),  # windows of 4 < 12 tokens, both soft-caps bending values
    "gemma2_no_caps_default_layer_types": ("gemma2", dict(num_layers=3, sliding_window=6),
                                           {"layer_types": None, "attn_logit_softcapping": None,
                                            "final_logit_softcapping": None}),
    "gemma3_local_global_rope": ("gemma3_text", {}, {}),
    "gemma3_hub_style_config": (
        "gemma3_text", dict(num_layers=4),
        {"rope_parameters": None, "layer_types": None, "rope_theta": 50_000.0, "rope_local_base_freq": 5_000.0,
         "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "sliding_window_pattern": 2}),
    "phi3_longrope_short": ("phi3", {}, {}),  # 12 tokens within original_max_position_embeddings = 16
    "phi3_longrope_long": ("phi3", dict(original_max_position_embeddings=8), {}),  # 12 > 8: long factors
    "phi3_hub_style_partial_rotary_window": (  # rope_scaling {"type": "longrope"} as Phi-3-mini-128k's config
        "phi3", dict(sliding_window=5, rope_parameters={"rope_type": "longrope", "partial_rotary_factor": 0.5,
                                                        **_longrope_factors(2, 0)}),
        {"rope_parameters": None, "partial_rotary_factor": 0.5, "rope_theta": 10_000.0,
         "rope_scaling": {"type": "longrope", **_longrope_factors(2, 0)}}),
}


def build(tmp_path, variant):
    family, overrides, edits = VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path / variant, family, **overrides)
    if edits:
        hf = json.loads((path / "config.json").read_text())
        hf.update(edits)
        hf = {k: v for k, v in hf.items() if v is not None or k not in edits}
        (path / "config.json").write_text(json.dumps(hf))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_export_round_trip(variant, tmp_path):
    path = build(tmp_path, variant)
    model, cfg = load_pretrained(path)
    ids, pos, seg = padded_batch()
    real = seg > 0
    ours = our_logits(model, ids, pos, seg)
    ref = torch_logits(path, ids, seg)
    assert np.abs(ref[real]).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert cfg.family == VARIANTS[variant][0]

    out = export_hf(model, cfg, tmp_path / "export")
    load_torch(out)  # transformers finds every weight it expects and nothing else
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], ours[real], atol=1e-4, rtol=0)
    again, cfg2 = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(our_logits(again, ids, pos, seg), ours)


def _with(model, cfg, **changes):
    """The same weights under a config with `changes` (options that add or remove no parameter)."""
    changed = dataclasses.replace(cfg, **changes)
    return nnx.merge(nnx.graphdef(abstract_decoder(changed)), nnx.state(model))


@pytest.mark.parametrize("variant,changes", [
    ("gemma2_window4_softcaps", dict(layer_windows=())),
    ("gemma2_window4_softcaps", dict(attn_softcap=None)),
    ("gemma2_window4_softcaps", dict(final_softcap=None)),
    ("gemma3_local_global_rope", dict(local_rope=None)),
    ("neox_parallel_rotary_half", dict(rotary_dim=None)),
    ("neox_parallel_rotary_half", dict(parallel_residual=False)),
    ("phi3_longrope_long", dict(original_max_position_embeddings=32)),
], ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_each_feature_changes_the_logits(variant, changes, tmp_path):
    """The parity above means something: switching one tested feature off moves the logits well past 1e-4."""
    model, cfg = load_pretrained(build(tmp_path, variant))
    if "original_max_position_embeddings" in changes:  # phi3: the short factors instead of the long ones
        changes = {"rope": dataclasses.replace(cfg.rope, **changes)}
    ids, pos, seg = padded_batch()
    real = seg > 0
    diff = np.abs(our_logits(model, ids, pos, seg) - our_logits(_with(model, cfg, **changes), ids, pos, seg))
    assert diff[real].max() > 1e-2, (variant, changes, diff[real].max())


def test_scan_and_loop_agree_with_per_layer_data(tmp_path):
    """Windows and RoPE tables per layer are data: the unrolled loop gives the scan's logits."""
    model, cfg = load_pretrained(build(tmp_path, "gemma3_hub_style_config"))
    assert cfg.windows == (4, None, 4, None) and cfg.local_rope is not None
    loop = nnx.merge(nnx.graphdef(abstract_decoder(cfg, scan_layers=False)), nnx.state(model))
    ids, pos, seg = padded_batch()
    np.testing.assert_allclose(our_logits(loop, ids, pos, seg), our_logits(model, ids, pos, seg), atol=1e-5)


def _rewrite_weights(path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = edit(load_file(str(path / "model.safetensors")))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_hub_weight_layouts_load(tmp_path):
    """Hub GPT-2 (names without `transformer.`, old causal-mask buffers, no lm_head copy) and a GPT-NeoX saved
    under transformers 5's in-memory head name `lm_head.weight` load like the canonical layouts."""
    def gpt2_hub(tensors):
        hub = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
        for i in range(2):
            hub[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
            hub[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
        return hub

    def neox_lm_head(tensors):
        return {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in tensors.items()}

    ids, pos, seg = padded_batch()
    real = seg > 0
    for variant, edit in (("gpt2", gpt2_hub), ("neox_parallel_rotary_half", neox_lm_head)):
        path = build(tmp_path, variant)
        expected = our_logits(load_pretrained(path)[0], ids, pos, seg)
        _rewrite_weights(path, edit)
        np.testing.assert_array_equal(our_logits(load_pretrained(path)[0], ids, pos, seg)[real], expected[real])


def test_random_init_matches_checkpoint_tree(tmp_path):
    """init: random builds the same tree; identity norms: LayerNorm (1, 0), Gemma's (1 + w) with w = 0."""
    for variant, norm_value in (("gpt2", 1.0), ("gemma2_window4_softcaps", 0.0)):
        loaded, cfg = load_pretrained(build(tmp_path, variant))
        params = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(init_random(cfg), nnx.Param))}
        assert set(params) == {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
        np.testing.assert_array_equal(params["layers/input_layernorm/weight"], norm_value)
        if cfg.norm == "layer":
            np.testing.assert_array_equal(params["layers/input_layernorm/bias"], 0.0)


# ---- full-size configs (as on the hub), abstractly: shapes, counts, names, shardings -------------------------

GPT2_LARGE = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "bos_token_id": 50256,
              "eos_token_id": 50256, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1280,
              "n_head": 20, "n_layer": 36, "n_positions": 1024, "vocab_size": 50257}
PYTHIA_2_8B = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
               "hidden_size": 2560, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
               "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 32,
               "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
               "use_parallel_residual": True, "vocab_size": 50304}
GEMMA_7B = {"architectures": ["GemmaForCausalLM"], "head_dim": 256, "hidden_act": "gelu", "hidden_size": 3072,
            "intermediate_size": 24576, "max_position_embeddings": 8192, "model_type": "gemma",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0, "vocab_size": 256000}
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0, "cache_implementation": "hybrid",
             "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "intermediate_size": 14336,
             "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 16,
             "num_hidden_layers": 42, "num_key_value_heads": 8, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
             "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000}
GEMMA3_1B = {"architectures": ["Gemma3ForCausalLM"], "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
             "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
             "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
             "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
             "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144}
PHI3_MINI_128K = {"architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
                  "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3",
                  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                  "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
                  "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "vocab_size": 32064}
FULL_SIZE = {"gpt2-large": GPT2_LARGE, "pythia-2.8b": PYTHIA_2_8B, "gemma-7b": GEMMA_7B, "gemma-2-9b": GEMMA2_9B,
             "gemma-3-1b": GEMMA3_1B, "phi-3-mini-128k": PHI3_MINI_128K}
KNOWN_COUNTS = {"gpt2-large": 774_030_080, "pythia-2.8b": 2_775_208_960}  # GPT-2 and Pythia papers / model cards


def _hf_meta_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """transformers' own weight names and shapes for `hf`, built on the meta device (no memory)."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    saved = {"lm_head.weight": "embed_out.weight"} if hf["model_type"] == "gpt_neox" else {}  # renamed on save
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return {saved.get(k, k): tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_shapes_names_and_shardings(name):
    hf = FULL_SIZE[name]
    cfg = ModelConfig.from_hf(hf)
    model = nnx.eval_shape(lambda: Decoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert all(len(v.logical_axes) == len(v.shape) for v in flat.values())
    count = sum(int(np.prod(v.shape)) for v in flat.values())
    assert count == cfg.num_params() == KNOWN_COUNTS.get(name, count)
    theirs = _hf_meta_shapes(hf)
    assert hf_weight_shapes(cfg) == theirs  # export writes exactly transformers' names and shapes
    assert count == sum(int(np.prod(s)) for s in theirs.values())
    # sharding: logical axes cover every parameter; fsdp splits all but a few norm/bias vectors
    sharder = Sharder(make_mesh(data=1, fsdp=4, tensor=2))
    _, params = abstract_params(cfg, sharder=sharder, param_dtype=jnp.bfloat16)
    check_fsdp_sharded(params, sharder.mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert cfg.flops_per_token(1024) > 6 * count * 0.9


def test_full_size_options():
    gemma2 = ModelConfig.from_hf(GEMMA2_9B)
    assert gemma2.windows == (4096, None) * 21 and gemma2.attn_softcap == 50.0 and gemma2.final_softcap == 30.0
    assert gemma2.attention_scale == 256**-0.5 and gemma2.sandwich_norms and gemma2.norm_offset == 1.0
    gemma3 = ModelConfig.from_hf(GEMMA3_1B)
    assert gemma3.windows == ((512,) * 5 + (None,)) * 4 + (512, 512)
    assert (gemma3.rope.theta, gemma3.local_rope.theta) == (1_000_000.0, 10_000.0) and gemma3.qk_norm
    pythia = ModelConfig.from_hf(PYTHIA_2_8B)
    assert (pythia.rotary_dims, pythia.head_dim, pythia.parallel_residual) == (20, 80, True)
    phi3 = ModelConfig.from_hf(PHI3_MINI_128K)
    assert phi3.rope.type == "longrope" and phi3.rope.factor == 32.0 and phi3.windows == (262144,) * 32
    # the first Phi-3 configs named LongRoPE "su" (transformers 5.24 itself no longer loads those)
    su = {**PHI3_MINI_128K, "rope_scaling": {**PHI3_MINI_128K["rope_scaling"], "type": "su"}}
    assert ModelConfig.from_hf(su) == phi3
    gpt2 = ModelConfig.from_hf(GPT2_LARGE)
    assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.activation, gpt2.tie_embeddings) == (
        "learned", "layer", "plain", "gelu_tanh", True)


def test_unsupported_options_are_named():
    def error(hf, match):
        with pytest.raises(ModelError, match=match):
            ModelConfig.from_hf(hf)

    error({**GPT2_LARGE, "add_cross_attention": True}, "add_cross_attention")
    error({**GPT2_LARGE, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx")
    error({**GEMMA3_1B, "use_bidirectional_attention": True}, "use_bidirectional_attention")
    error({**GEMMA3_1B, "model_type": "gemma3"}, "gemma3_text")
    error({**PYTHIA_2_8B, "hidden_act": "relu"}, "hidden_act 'relu'")
    error({**GEMMA2_9B, "layer_types": ["chunked_attention"] * 42}, "chunked_attention")
    error({**PHI3_MINI_128K, "rope_scaling": {"type": "su", "short_factor": [1.0] * 47, "long_factor": [1.0] * 48}},
          "48 entries")
    with pytest.raises(ModelError, match="1024 learned positions.*2048 tokens"):
        ModelConfig.from_hf(GPT2_LARGE).check_seq_len(2048)
    with pytest.raises(ModelError, match="cudnn.*soft-cap"):
        abstract_decoder(ModelConfig.from_hf(GEMMA2_9B), attention="cudnn")
