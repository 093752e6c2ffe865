"""Splash attention (the Pallas TPU kernel, run here by the Pallas interpreter on CPU) equals the XLA reference
attention, forward and backward, under shard_map on a mesh: GQA with 2 kv heads on a tensor axis of 4 (each
device slices the kv head its query head uses), with right padding and a length (100) that is padded up to the
kernel's 128-token block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax.models.attention import attend_xla
from dpojax.models.splash import attend_splash
from dpojax.sharding import Sharder, make_mesh


@pytest.mark.parametrize("shape", [(2, 1, 4)], ids=["data2_tensor4_gqa"])
def test_splash_equals_xla_attention(shape):
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

    splash = lambda q, k, v: attend_splash(q, k, v, seg, scale=0.25, sharder=sharder, interpret=True)  # noqa: E731
    xla = lambda q, k, v: attend_xla(q, k, v, seg, scale=0.25)  # noqa: E731
    np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), atol=2e-5)
    ours = jax.jit(jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")
