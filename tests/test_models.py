"""Model parity with transformers (every supported family and variant), layer options, configs, FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import make_tiny_checkpoint

from dpojax.errors import ModelError
from dpojax.models import REMAT_POLICIES, Decoder, ModelConfig, abstract_decoder, load_pretrained, resolve_attention
from dpojax.models.layers import rope_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# XLA:CPU spends seconds optimizing even tiny backward passes; these tests check numerics, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VARIANTS = {
    "llama_mha_untied": ("llama", dict(num_kv_heads=4)),
    "llama_gqa_tied": ("llama", dict(tie=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3)),
    "linear_rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "dynamic_rope": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "yarn_rope": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32})),
    "mistral": ("mistral", dict()),
    "mistral_window": ("mistral", dict(sliding_window=4)),  # shorter than the 12-token test rows
    "qwen2_window_upper_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen2_bias": ("qwen2", dict(tie=True)),
    "qwen3_qknorm_headdim": ("qwen3", dict(head_dim=16, num_heads=4, num_kv_heads=1)),
}


def padded_batch(seed=0, vocab=128, lengths=(12, 9, 5, 1), T=12):
    """Right-padded batch: ids, positions, segment ids (1 on real tokens, 0 on padding)."""
    rng = np.random.default_rng(seed)
    seg_BxT = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids_BxT = np.where(seg_BxT > 0, rng.integers(3, vocab, (len(lengths), T)), 0).astype(np.int32)
    pos_BxT = np.broadcast_to(np.arange(T, dtype=np.int32), ids_BxT.shape).copy()
    return ids_BxT, pos_BxT, seg_BxT


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _logits(graphdef, state, ids_BxT, pos_BxT, seg_BxT):
    model = nnx.merge(graphdef, state)
    return model.logits(model(ids_BxT, pos_BxT, seg_BxT))


def our_logits(model, ids_BxT, pos_BxT, seg_BxT):
    graphdef, state = nnx.split(model)
    return np.asarray(_logits(graphdef, state, ids_BxT, pos_BxT, seg_BxT))


def torch_logits(path, ids_BxT, seg_BxT):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        out = model.eval()(input_ids=torch.tensor(ids_BxT, dtype=torch.long), attention_mask=torch.tensor(seg_BxT))
    return out.logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path / variant, family, **overrides)
    model, cfg = load_pretrained(path)
    ids, pos, seg = padded_batch()
    ours_BxTxV, ref_BxTxV = our_logits(model, ids, pos, seg), torch_logits(path, ids, seg)
    real = seg > 0
    assert np.abs(ref_BxTxV[real]).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours_BxTxV[real], ref_BxTxV[real], atol=1e-4, rtol=0)
    assert cfg.family == family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen3", head_dim=16, attention_bias=True)


def test_scan_loop_and_remat_agree(tiny):
    """A python loop with remat gives the same loss and gradients as the plain scan; every policy traces."""
    ids, pos, seg = padded_batch()
    base, cfg = load_pretrained(tiny, scan_layers=True)
    params = nnx.state(base)

    def value_and_grad(model):
        graphdef = nnx.graphdef(model)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(ids, pos, seg) ** 2 * seg[..., None])

        return jax.value_and_grad(loss)

    for remat in REMAT_POLICIES:  # tracing only: compiling each would be slow on CPU
        jax.make_jaxpr(value_and_grad(abstract_decoder(cfg, remat=remat, scan_layers=True)))(params)
    loss_ref, grads_ref = jax.jit(value_and_grad(base), compiler_options=FAST_COMPILE)(params)
    loop = abstract_decoder(cfg, remat="dots", scan_layers=False)
    loss, grads = jax.jit(value_and_grad(loop), compiler_options=FAST_COMPILE)(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads, grads_ref)


def test_packed_segments_equal_separate_rows(tiny):
    """Two sequences packed in one row (per-segment positions) give the same hidden states as separate rows."""
    model, _ = load_pretrained(tiny)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 128, 5), rng.integers(3, 128, 4)
    packed_ids = np.array([[*a, *b, 0]], np.int32)
    packed_pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]], np.int32)
    packed_seg = np.array([[1] * 5 + [2] * 4 + [0]], np.int32)
    sep_ids = np.array([[*a, 0, 0, 0, 0, 0], [*b, 0, 0, 0, 0, 0, 0]], np.int32)
    sep_pos = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
    sep_seg = (sep_ids > 0).astype(np.int32)
    packed = our_logits(model, packed_ids, packed_pos, packed_seg)[0]
    sep = our_logits(model, sep_ids, sep_pos, sep_seg)
    np.testing.assert_allclose(packed[:5], sep[0, :5], atol=1e-5)
    np.testing.assert_allclose(packed[5:9], sep[1, :4], atol=1e-5)


def test_bf16_compute_close_to_fp32(tiny):
    ids, pos, seg = padded_batch()
    fp32, _ = load_pretrained(tiny)
    bf16, _ = load_pretrained(tiny, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert nnx.state(bf16, nnx.Param)["layers"]["mlp"]["up_proj"]["kernel"][...].dtype == jnp.bfloat16
    a, b = our_logits(fp32, ids, pos, seg), our_logits(bf16, ids, pos, seg)
    real = seg > 0
    assert np.isfinite(b).all() and np.abs(a[real] - b[real]).max() < 0.15


def test_rope_frequencies_match_transformers():
    import torch  # noqa: F401  (transformers' rope functions return torch tensors)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 16},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "mscale": 1.0,
         "mscale_all_dim": 0.5},
    ]
    for scaling in cases:
        hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=dict(scaling)).to_dict()
        cfg = ModelConfig.from_hf(hf)
        ref_inv_freq, ref_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](LlamaConfig(**hf))
        inv_freq, scale = rope_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        np.testing.assert_allclose(inv_freq, ref_inv_freq.numpy(), rtol=1e-6)
        assert scale == pytest.approx(ref_scale, rel=1e-6)


LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.0",
    "use_cache": True, "vocab_size": 128256,
}


def test_llama31_8b_abstract_shapes_and_counts():
    cfg = ModelConfig.from_hf(LLAMA_31_8B)
    model = nnx.eval_shape(lambda: Decoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == cfg.num_params() == 8_030_261_248
    q = flat[("layers", "self_attn", "q_proj", "kernel")]
    assert q.shape == (32, 4096, 32, 128) and q.logical_axes == ("layers", "embed", "heads", "head_dim")
    assert flat[("layers", "self_attn", "k_proj", "kernel")].shape == (32, 4096, 8, 128)
    assert flat[("lm_head", "weight")].shape == (128256, 4096)
    assert all(len(v.logical_axes) == len(v.shape) for v in flat.values())
    assert cfg.rope.type == "llama3" and cfg.rope.theta == 500000.0
    # 6N-style: 6 * (matmul weights incl. lm_head) + 12 * L * H * Dh * T
    n_matmul = 8_030_261_248 - 128256 * 4096 - 32 * 2 * 4096 - 4096
    assert cfg.flops_per_token(2048) == pytest.approx(6 * n_matmul + 12 * 32 * 32 * 128 * 2048)
    assert cfg.forward_flops_per_token(2048) == pytest.approx(cfg.flops_per_token(2048) / 3)


def test_config_errors():
    with pytest.raises(ModelError, match="gemma, gemma2, gemma3_text, gpt2, gpt_neox, gpt_oss, llama, mistral, "
                                         "mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        ModelConfig.from_hf({**LLAMA_31_8B, "model_type": "falcon"})
    with pytest.raises(ModelError, match="'mrope'.*supported: default, linear, dynamic, yarn, llama3, longrope"):
        ModelConfig.from_hf({**LLAMA_31_8B, "rope_scaling": {"rope_type": "mrope", "factor": 2.0}})
    with pytest.raises(ModelError, match="hidden_act 'relu'"):
        ModelConfig.from_hf({**LLAMA_31_8B, "hidden_act": "relu"})
    mistral = ModelConfig.from_hf({**LLAMA_31_8B, "model_type": "mistral", "rope_scaling": None,
                                   "sliding_window": 4096, "max_position_embeddings": 32768})
    assert mistral.windows == (4096,) * 32
    mistral.check_seq_len(8192)  # sliding windows are implemented: longer sequences are fine
    assert mistral.forward_flops_per_token(8192) < ModelConfig.from_hf(
        {**LLAMA_31_8B, "rope_scaling": None}).forward_flops_per_token(8192)  # keys capped by the window
    qwen = ModelConfig.from_hf({**LLAMA_31_8B, "model_type": "qwen2", "rope_scaling": None, "sliding_window": 4096,
                                "use_sliding_window": False})
    assert qwen.windows == (None,) * 32 and qwen.qkv_bias and not qwen.o_bias
    upper = ModelConfig.from_hf({**LLAMA_31_8B, "model_type": "qwen2", "rope_scaling": None, "sliding_window": 4096,
                                 "use_sliding_window": True, "max_window_layers": 28})
    assert upper.windows == (None,) * 28 + (4096,) * 4
    old_style = ModelConfig.from_hf({**LLAMA_31_8B, "rope_scaling": None})
    assert old_style.rope.type == "default" and old_style.rope.theta == 500000.0


def test_attention_dispatch():
    assert resolve_attention("auto", dtype=jnp.float32, head_dim=128) == "xla"  # CPU here
    assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=128, backend="gpu") == "cudnn"
    assert resolve_attention("auto", dtype=jnp.float32, head_dim=128, backend="gpu") == "xla"
    assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=128, backend="tpu") == "splash"
    assert resolve_attention("auto", dtype=jnp.float32, head_dim=64, backend="tpu", softcap=50.0) == "splash"
    assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=128, backend="tpu", sliding_window=True) == "xla"
    assert resolve_attention("splash", dtype=jnp.float32, head_dim=8) == "splash"  # CPU: the Pallas interpreter
    with pytest.raises(ValueError, match="one of"):
        resolve_attention("flash", dtype=jnp.float32, head_dim=8)


def _full_attention(q, k, v, seg, scale, softcap, window):
    """Naive GQA attention over the whole [T, T] score matrix (what the blocked XLA kernel must equal)."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    d = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    allowed = (d >= 0) & ((d < window) if window is not None else True)
    mask = (seg[:, :, None] == seg[:, None, :]) & allowed
    s = jnp.where(mask[:, None], s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("softcap,window", [(None, None), (20.0, 50)])
def test_blocked_xla_attention_equals_full_scores(softcap, window):
    """From 256 tokens attend_xla splits queries into blocks (here 128, 128, 44 of T=300) and skips future keys;
    values and gradients equal the full [T, T] computation with right padding, GQA, soft-cap and a window."""
    from dpojax.models.attention import _query_blocks, attend_xla

    assert _query_blocks(300) == [(0, 128), (128, 256), (256, 300)] and _query_blocks(255) == [(0, 255)]
    assert len(_query_blocks(4096)) == 8
    B, T, H, K, Dh = 2, 300, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (B, T, n, Dh)) for key, n in ((kq, H), (kk, K), (kv, K)))
    seg = jnp.asarray((np.arange(T)[None] < np.array([[300], [190]])).astype(np.int32))
    w = jnp.cos(jnp.arange(T * H * Dh, dtype=jnp.float32)).reshape(T, H, Dh)
    win = None if window is None else jnp.int32(window)
    ours = lambda q, k, v: attend_xla(q, k, v, seg, scale=0.3, softcap=softcap, window=win)
    full = lambda q, k, v: _full_attention(q, k, v, seg, 0.3, softcap, window)
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), full(q, k, v), atol=1e-5)
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
