"""gpt-oss on a tiny random checkpoint (D 64, 4 layers alternating a window of 4 with full attention, 8 experts
top-2, random sinks, YaRN): logits equal transformers' (fp32, padded batch), packed rows equal unpacked, greedy
generation equals transformers' `generate`, export round trip, MXFP4 checkpoints load to transformers'
dequantization; attention sinks equal transformers' eager gpt-oss attention (windows, segments, query blocks) and
the kernels that cannot add sinks are refused by name."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_generate import _hf_greedy
from test_hf_io import load_torch
from test_models import FAST_COMPILE, our_logits, padded_batch, torch_logits

from dpojax.errors import ModelError
from dpojax.generate import Generator, Sampling
from dpojax.models import export_hf, init_random, load_pretrained, mxfp4
from dpojax.models.attention import attend_xla, resolve_attention, segment_mask
from dpojax.sharding import Sharder, make_mesh

EOS = 2
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=32, head_dim=16, num_attention_heads=4,
            num_key_value_heads=2, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
# std of each weight kind (by name); the experts' gate/up are large enough that the SwiGLU clamps (|.| > 7) bite
STDS = (("sinks", 1.0), ("norm", 0.1), ("router", 0.5), ("gate_up_proj_bias", 0.5), ("gate_up_proj", 0.5),
        ("bias", 0.05), ("embed_tokens", 0.5), ("lm_head", 0.5), ("", 0.05))


def make_gpt_oss(path, *, seed: int = 0, qk_factor: float = 1.0):
    """A tiny random gpt-oss checkpoint (fp32 safetensors) and its transformers model; `qk_factor` sharpens the
    attention (generation: positions and windows then change argmaxes)."""
    import torch
    import transformers

    config = transformers.GptOssConfig(**TINY)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager")
    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = next(s for key, s in STDS if key in name)
            value = (1.0 if "norm" in name else 0.0) + std * gen.standard_normal(p.shape)
            if qk_factor != 1.0 and any(k in name for k in ("q_proj.weight", "k_proj.weight")):
                value = value * qk_factor
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    model.save_pretrained(path, safe_serialization=True)
    return path, model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "tiny")[0]


def test_logits_equal_transformers_and_export_round_trip(tiny, tmp_path):
    model, cfg = load_pretrained(tiny)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.attention_sinks, cfg.router_rule) == (8, 2, True,
                                                                                                "topk_softmax")
    assert cfg.windows == (4, None, 4, None) and cfg.rope.type == "yarn" and not cfg.rope.truncate
    ids, pos, seg = padded_batch()  # 12 tokens > the window of 4
    real = seg > 0
    ours = our_logits(model, ids, pos, seg)
    ref = torch_logits(tiny, ids, seg)
    assert np.abs(ref[real]).max() > 1.0
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)

    out = export_hf(model, cfg, tmp_path / "export")
    load_torch(out)  # transformers finds every weight it expects and nothing else
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], ours[real], atol=1e-4, rtol=0)
    again, cfg2 = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(our_logits(again, ids, pos, seg), ours)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _packed_logits(graphdef, state, ids, pos, seg, branch):
    model = nnx.merge(graphdef, state)
    return model.logits(model(ids, pos, seg, branch, band=16))


def test_packed_rows_equal_unpacked(tiny):
    """Row 0: two sequences (7 and 9 tokens), positions restarting. Row 1: a shared prompt (5 tokens) with two
    responses (4 and 6 tokens) that never see each other. Windows counted in positions, sinks in every softmax."""
    model, _ = load_pretrained(tiny)
    rng = np.random.default_rng(3)
    a, b, prompt, r1, r2 = (rng.integers(3, 128, n) for n in (7, 9, 5, 4, 6))
    ids, pos, seg = padded_batch(lengths=(7, 9, 9, 11), T=11)
    for i, seq in enumerate((a, b, np.concatenate([prompt, r1]), np.concatenate([prompt, r2]))):
        ids[i, :len(seq)] = seq
    want = our_logits(model, ids, pos, seg)
    row_ids = np.stack([np.concatenate([a, b, [0, 0]]), np.concatenate([prompt, r1, r2, [0, 0, 0]])]).astype(np.int32)
    row_pos = np.stack([np.r_[np.arange(7), np.arange(9), 0, 1],
                        np.r_[np.arange(9), np.arange(5, 11), 0, 1, 2]]).astype(np.int32)
    row_seg = np.asarray([[1] * 7 + [2] * 9 + [0] * 2, [1] * 15 + [0] * 3], np.int32)
    branch = np.asarray([[0] * 18, [0] * 5 + [1] * 4 + [2] * 6 + [0] * 3], np.int32)
    got = np.asarray(_packed_logits(*nnx.split(model), row_ids, row_pos, row_seg, branch))
    # another program's rounding of a residual stream far larger than the logits (the experts' outputs are large)
    for got_row, want_row in ((got[0, :7], want[0, :7]), (got[0, 7:16], want[1, :9]), (got[1, :9], want[2, :9]),
                              (got[1, 9:15], want[3, 5:11])):
        np.testing.assert_allclose(got_row, want_row, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(tmp_path):
    path, hf_model = make_gpt_oss(tmp_path / "sharp", seed=1, qk_factor=6.0)
    model, cfg = load_pretrained(path)
    prompts = [[5, 9, 17, 33, 60], [7, 3, 99, 12, 41, 8, 77, 23, 5, 61, 90], [44, 10, 6]]
    ours = Generator(model, cfg, eos_ids=(EOS,), batch_size=4).generate_ids(prompts, Sampling(max_new_tokens=16))
    assert [c.tokens for c in ours] == _hf_greedy(hf_model, prompts, new=16)


def test_clamped_swiglu_equals_transformers():
    """Both clamps bite: gate and up range over +-12 around the limit of 7."""
    import torch
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from dpojax.models.experts import GATED_ACTIVATIONS

    gate_up = np.linspace(-12, 12, 2 * 97, dtype=np.float32).reshape(97, 2)
    gate_up[:, 1] = gate_up[::-1, 1]
    experts = GptOssExperts(transformers.GptOssConfig(**TINY))
    ref = experts._apply_gate(torch.from_numpy(gate_up.reshape(1, -1))).numpy()[0]
    ours = GATED_ACTIVATIONS["gpt_oss"](jnp.asarray(gate_up[:, 0]), jnp.asarray(gate_up[:, 1]))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6, atol=1e-6)


def test_kernels_without_sinks_are_refused_for_the_model(tiny):
    from dpojax.models import ModelConfig
    from dpojax.models.hf import read_hf_config

    cfg = ModelConfig.from_hf(read_hf_config(tiny))
    with pytest.raises(ModelError, match="model.attention='xla'"):
        init_random(cfg, attention="splash")


# ---- attention sinks --------------------------------------------------------------------------------------
def _torch_sink_attention(q, k, v, mask, sinks, scale):
    """transformers' gpt-oss eager attention on [B, T, H|G, Dh] numpy inputs and a boolean [B, 1, T, T] mask."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_key_value_groups = q.shape[2] // k.shape[2]
            self.sinks = torch.nn.Parameter(torch.from_numpy(sinks))

    additive = torch.where(torch.from_numpy(np.array(mask)), 0.0, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(Stub().eval(), *(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)),
                                     additive, scaling=scale)
    return out.detach().numpy()


@pytest.mark.parametrize("T,window", [(12, 4), (300, None), (300, 50)])
def test_sinks_equal_transformers_eager_attention(T, window):
    """Segments (padding: segment 0), GQA, a window shorter than the sequence, and T = 300 (queries in blocks)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(T)
    B, H, G, Dh = 2, 4, 2, 8
    q, k, v = (rng.standard_normal((B, T, n, Dh)).astype(np.float32) for n in (H, G, G))
    sinks = (2.0 * rng.standard_normal(H)).astype(np.float32)
    seg = np.ones((B, T), np.int32)
    seg[1, T // 3:] = 2
    seg[1, T - 3:] = 0
    w = None if window is None else jnp.asarray(window, jnp.int32)
    ours = attend_xla(q, k, v, seg, scale=0.3, window=w, sinks_H=jnp.asarray(sinks))
    ref = _torch_sink_attention(q, k, v, segment_mask(seg, w), sinks, 0.3)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-5, rtol=0)
    without = attend_xla(q, k, v, seg, scale=0.3, window=w)
    assert np.abs(np.asarray(without) - ref)[real].max() > 1e-2  # the sinks matter


def test_sink_gradients_equal_torch_autograd():
    """What training differentiates: d(loss)/d(q, k, v, sinks) through the sink softmax, against torch's autograd
    of transformers' eager attention (a window of 3, padding)."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    rng = np.random.default_rng(1)
    B, T, H, G, Dh = 2, 10, 4, 2, 8
    q, k, v = (rng.standard_normal((B, T, n, Dh)).astype(np.float32) for n in (H, G, G))
    sinks, cot = rng.standard_normal(H).astype(np.float32), rng.standard_normal((B, T, H, Dh)).astype(np.float32)
    seg = np.ones((B, T), np.int32)
    seg[1, 7:] = 0
    cot[seg == 0] = 0.0
    w = jnp.asarray(3, jnp.int32)

    def loss(q, k, v, sinks):
        return jnp.sum(attend_xla(q, k, v, seg, scale=0.3, window=w, sinks_H=sinks) * cot)

    ours = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_key_value_groups = H // G
            self.sinks = torch.nn.Parameter(torch.from_numpy(sinks))

    stub = Stub().eval()
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    additive = torch.where(torch.from_numpy(np.array(segment_mask(seg, w))), 0.0, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(stub, tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), additive,
                                     scaling=0.3)
    (out * torch.from_numpy(cot)).sum().backward()
    for got, want in zip(ours, (tq.grad, tk.grad, tv.grad, stub.sinks.grad)):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(ours[3])).min() > 1e-4  # every head's sink gets a gradient


def test_kernels_without_sinks_are_refused():
    import jax.numpy as jnp

    for name in ("cudnn", "splash"):
        with pytest.raises(ModelError, match="model.attention='xla'"):
            resolve_attention(name, dtype=jnp.bfloat16, head_dim=64, backend="gpu", sinks=True)
    for backend in ("gpu", "tpu", "cpu"):
        assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=64, backend=backend, sinks=True) == "xla"
    assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=64, backend="gpu") == "cudnn"


# ---- MXFP4 -------------------------------------------------------------------------------------------------
def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) of `w` [..., C, R] in the released gpt-oss layout (`dpojax.models.mxfp4`): per group of 32
    values along C the smallest power of two that fits the group's largest magnitude under 6, each value rounded
    to the nearest FP4 code, two codes a byte (low nibble first)."""
    rows = np.swapaxes(np.asarray(w, np.float32), -1, -2)  # [..., R, C]
    groups = rows.reshape(*rows.shape[:-1], -1, mxfp4.GROUP)
    top = np.max(np.abs(groups), axis=-1, keepdims=True)
    exponent = np.where(top > 0, np.ceil(np.log2(np.maximum(top, 1e-30) / 6.0)), 0).astype(np.int32)
    scaled = groups / np.ldexp(np.float32(1), exponent)
    codes = np.argmin(np.abs(np.abs(scaled)[..., None] - mxfp4.FP4_VALUES[:8]), axis=-1).astype(np.uint8)
    codes |= np.where(scaled < 0, 8, 0).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (exponent[..., 0] + mxfp4.SCALE_BIAS).astype(np.uint8)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)  # safetensors writes the raw buffer


def test_dequantize_equals_transformers():
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)  # every code, both nibbles
    scales = rng.integers(100, 140, (3, 10, 4), dtype=np.uint8)
    ours = mxfp4.dequantize(blocks, scales)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert ours.shape == (3, 128, 10)
    np.testing.assert_array_equal(ours, ref.numpy())
    w = (rng.standard_normal((2, 64, 6)) * 0.3).astype(np.float32)
    round_trip = mxfp4.dequantize(*quantize_mxfp4(w))
    assert np.abs(round_trip - w).max() <= 0.25 * np.abs(w).max()  # the test quantizer is a real one
    np.testing.assert_array_equal(mxfp4.dequantize(*quantize_mxfp4(round_trip)), round_trip)


def _quantize_checkpoint(src, dst):
    """`src` with every layer's expert matrices in MXFP4 (`*_blocks`, `*_scales`) and config.json saying so."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(tensors.pop(name))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(hf))
    return tensors


def _hf_dequantized(tensors, name, dtype):
    """transformers' dequantization of MXFP4 weight `name` (fp32 numpy of the `dtype` values)."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    pair = (torch.from_numpy(tensors[name + suffix]) for suffix in ("_blocks", "_scales"))
    return convert_moe_packed_tensors(*pair, dtype=dtype).float().numpy()


def _torch_mxfp4_logits(path, ids_BxT, seg_BxT):
    """transformers' logits of an MXFP4 folder, dequantized by its own loader (fp32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    with torch.no_grad():
        out = model.eval()(input_ids=torch.tensor(ids_BxT, dtype=torch.long), attention_mask=torch.tensor(seg_BxT))
    return out.logits.numpy()


def test_mxfp4_checkpoint_loads_as_transformers_dequantizes_it(tiny, tmp_path):
    import torch

    path = tmp_path / "mxfp4"
    tensors = _quantize_checkpoint(tiny, path)
    for param_dtype, torch_dtype in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        model, cfg = load_pretrained(path, param_dtype=param_dtype)
        experts = model.layers.mlp.experts
        for i in range(cfg.num_layers):
            name = f"model.layers.{i}.mlp.experts."
            gate_up = _hf_dequantized(tensors, name + "gate_up_proj", torch_dtype)  # [X, D, 2F] interleaved
            np.testing.assert_array_equal(np.asarray(experts.gate_proj[i], np.float32), gate_up[..., 0::2])
            np.testing.assert_array_equal(np.asarray(experts.up_proj[i], np.float32), gate_up[..., 1::2])
            np.testing.assert_array_equal(np.asarray(experts.down_proj[i], np.float32),
                                          _hf_dequantized(tensors, name + "down_proj", torch_dtype))
    model, cfg = load_pretrained(path)
    # on a (fsdp 4, tensor 2) mesh each shard reads and dequantizes only its part of D and F: the same values
    sharded, _ = load_pretrained(path, sharder=Sharder(make_mesh(data=1, fsdp=4, tensor=2)))
    gate = sharded.layers.mlp.experts.gate_proj
    assert gate[...].addressable_shards[0].data.shape == (cfg.num_layers, cfg.num_experts, 64 // 4, 32 // 2)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(sharded, nnx.Param), nnx.state(model, nnx.Param))
    ids, pos, seg = padded_batch()
    real = seg > 0
    ours = our_logits(model, ids, pos, seg)
    np.testing.assert_allclose(ours[real], _torch_mxfp4_logits(path, ids, seg)[real], atol=1e-4, rtol=0)
    assert np.abs(ours - our_logits(load_pretrained(tiny)[0], ids, pos, seg))[real].max() > 1e-3  # quantized
    out = export_hf(model, cfg, tmp_path / "export")  # unquantized, loadable by transformers
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    load_torch(out)
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], ours[real], atol=1e-4, rtol=0)


GPT_OSS_20B = {  # the hub's openai/gpt-oss-20b config.json
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}


def test_full_size_config_names_and_sizes():
    """gpt-oss-20b's config.json, abstractly: 20.91B parameters, 3.61B of them active (the model card's figures);
    the weights dpojax exports are transformers' (names, shapes, count); other SwiGLU settings are refused."""
    import dataclasses

    import torch
    import transformers

    from dpojax.models import ModelConfig
    from dpojax.models.hf import hf_weight_shapes

    cfg = ModelConfig.from_hf(GPT_OSS_20B)
    assert cfg.windows == (128, None) * 12 and cfg.rope == dataclasses.replace(
        cfg.rope, type="yarn", theta=150_000.0, factor=32.0, original_max_position_embeddings=4096, truncate=False)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_intermediate_size) == (32, 4, 2880)
    assert abs(cfg.num_params() - 20.91e9) < 0.01e9
    two = {**GPT_OSS_20B, "num_hidden_layers": 2, "layer_types": GPT_OSS_20B["layer_types"][:2]}  # quicker in torch
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig(
            **{k: v for k, v in two.items() if k != "quantization_config"}))
    shapes = {name: tuple(p.shape) for name, p in reference.state_dict().items()}
    assert hf_weight_shapes(ModelConfig.from_hf(two)) == shapes
    assert ModelConfig.from_hf(two).num_params() == sum(p.numel() for p in reference.parameters())
    # the model card's 3.61B active parameters leave the input embedding table out
    assert abs(cfg.active_params() - cfg.vocab_size * cfg.hidden_size - 3.61e9) < 0.01e9
    with pytest.raises(ModelError, match="swiglu_limit"):
        ModelConfig.from_hf({**GPT_OSS_20B, "swiglu_limit": 10.0})
