"""Splash attention (the Pallas TPU kernel, run here by the Pallas interpreter on CPU) equals the XLA reference
attention, forward and backward, under shard_map on a mesh: GQA with 2 kv heads on a tensor axis of 4 (each
device slices the kv head its query head uses), with right padding and a length (100) that is padded up to the
kernel's 128-token block; with Gemma 2's score soft-cap; and inside a whole model (`model.attention: splash`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import make_tiny_checkpoint

from dpojax.errors import ModelError
from dpojax.models import load_pretrained
from dpojax.models.attention import attend_xla
from dpojax.models.splash import attend_splash
from dpojax.sharding import Sharder, make_mesh


@pytest.mark.parametrize("shape,softcap", [((2, 1, 4), None), ((1, 4, 2), 5.0)],
                         ids=["data2_tensor4_gqa", "fsdp4_tensor2_softcap"])
def test_splash_equals_xla_attention(shape, softcap):
    B, T, H, K, Dh = 4, 100, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, Dh))
    k = jax.random.normal(kk, (B, T, K, Dh))
    v = jax.random.normal(kv, (B, T, K, Dh))
    seg = jnp.asarray((np.arange(T)[None] < np.array([100, 70, 33, 90])[:, None]).astype(np.int32))
    sharder = Sharder(make_mesh(*shape))
    weights = jnp.cos(jnp.arange(Dh, dtype=jnp.float32))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    splash = lambda q, k, v: attend_splash(q, k, v, seg, scale=0.25, sharder=sharder, softcap=softcap)
    xla = lambda q, k, v: attend_xla(q, k, v, seg, scale=0.25, softcap=softcap)
    np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), atol=2e-5)
    ours = jax.jit(jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


def test_model_with_splash_attention_equals_xla(tmp_path):
    """`attention="splash"` routes every layer through the kernel (interpreted on this CPU mesh): the loss and
    its gradients equal the XLA attention's on a right-padded batch, on a data x tensor mesh with GQA."""
    path = make_tiny_checkpoint(tmp_path, "llama", hidden_size=64, num_heads=4, num_kv_heads=2)
    sharder = Sharder(make_mesh(2, 1, 2, devices=jax.devices()[:4]))
    T = 24
    lengths = np.array([24, 17, 9, 3])
    seg = jnp.asarray((np.arange(T)[None] < lengths[:, None]).astype(np.int32))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (4, T)) * np.asarray(seg), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (4, T))

    def loss_and_grads(attention):
        model, _ = load_pretrained(path, attention=attention, sharder=sharder)
        assert model.attention == attention
        graphdef, state = nnx.split(model)

        def loss(state):
            m = nnx.merge(graphdef, state)
            return jnp.sum(jax.nn.log_softmax(m.logits(m(ids, pos, seg)))[..., 7] * seg)

        return jax.jit(jax.value_and_grad(loss))(state)

    (loss_s, grads_s), (loss_x, grads_x) = loss_and_grads("splash"), loss_and_grads("xla")
    np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads_s, grads_x)


def test_splash_refuses_sliding_windows_and_gpu(tmp_path):
    from dpojax.models.attention import resolve_attention

    path = make_tiny_checkpoint(tmp_path, "mistral", sliding_window=4)
    with pytest.raises(ModelError, match="sliding-window"):
        load_pretrained(path, attention="splash")
    assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=64, backend="tpu", sliding_window=True) == "xla"
    with pytest.raises(ModelError, match="TPU kernel"):
        resolve_attention("splash", dtype=jnp.bfloat16, head_dim=64, backend="gpu")


def test_bf16_splash_under_highest_matmul_precision():
    """tests/conftest.py sets jax_default_matmul_precision="highest", which Mosaic refuses for bf16 dots; the
    kernel is traced with the default precision forward and backward (`_default_precision`), and bf16 results
    stay close to the fp32 XLA attention."""
    B, T, H, K, Dh = 2, 64, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (B, T, n, Dh)) for key, n in ((kq, H), (kk, K), (kv, K)))
    seg = jnp.ones((B, T), jnp.int32)
    sharder = Sharder(make_mesh(2, 1, 4))

    def loss(fn, *qkv):
        return jnp.sum(fn(*qkv).astype(jnp.float32) * jnp.sin(jnp.arange(Dh, dtype=jnp.float32)))

    splash = lambda q, k, v: attend_splash(q, k, v, seg, scale=0.25, sharder=sharder)
    xla = lambda q, k, v: attend_xla(q, k, v, seg, scale=0.25)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2)))(*bf16)
    want = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2, atol=5e-2)
