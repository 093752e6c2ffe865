"""Context parallelism (mesh.context): a row's positions split over devices train exactly as on one device.

The same 5 AdamW steps (policy + frozen reference) run on one device with padded [N, K, T] batches and on meshes
with a context axis: per-step losses agree to 1e-6 and final parameters to 1e-5 (absolute). In `make test`: a
tiny GQA Llama on shared-prompt packed rows over (data 2, context 2, tensor 2); behind DPOJAX_SLOW_TESTS=1 the
full matrix (meshes (context 8), (fsdp 4, context 2), (data 2, context 2, tensor 2) x a Llama, a Gemma 2 with
sliding windows and soft-caps, and packed rows), splash under the axis (Pallas interpreter) and generation.
Attention alone: `attend_context` on zig-zag rows equals `attend_xla` on natural rows, rows whose length does not
divide into 2 * context blocks included (padded). cuDNN with a context axis is refused naming the kernels that work.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sharding import run_steps as sharding_steps
from trl_harness import dpojax_overrides, make_assets

from dpojax.config import config_from_dict
from dpojax.errors import ConfigError, ModelError
from dpojax.models import context as context_lib
from dpojax.models.attention import attend_xla
from dpojax.sharding import Sharder, make_mesh, resolve_mesh_shape

STEPS = 5
SLOW = os.environ.get("DPOJAX_SLOW_TESTS") != "1"
MESHES = {"c8": dict(data=1, context=8), "f4c2": dict(data=1, fsdp=4, context=2),
          "d2c2t2": dict(data=2, context=2, tensor=2)}


def _cfg(root, family: str, packing: str):
    assets = make_assets(root, family=family, n_rows=16)
    return config_from_dict(dpojax_overrides(
        assets, assets["standard"], root / "out",
        train__batch_size=8, train__steps=STEPS, data__eval=None, data__packing=packing,
        # eps 1e-6 (not 1e-8): AdamW's normalized update would turn the last-bit differences of a near-zero gradient
        # (another summation order over devices) into steps of up to lr; the 1e-3 steps of real gradients stay
        optim__name="adamw", optim__lr=1e-3, optim__weight_decay=0.01, optim__schedule="constant", optim__eps=1e-6,
    ))


def run_steps(cfg, mesh, steps=STEPS):
    """(per-step losses, final params) of `steps` training steps on `mesh` (`test_sharding.run_steps`)."""
    losses, state, _ = sharding_steps(cfg, mesh, steps)
    return losses, {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}


_SINGLE: dict = {}


def _single(root_factory, family):
    """One device, padded [N, K, T] batches (computed once per family)."""
    if family not in _SINGLE:
        cfg = _cfg(root_factory.mktemp(family), family, "none")
        _SINGLE[family] = (cfg, run_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1])))
    return _SINGLE[family]


def _check(root_factory, family, packing, mesh_kw):
    cfg, (losses_1, params_1) = _single(root_factory, family)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packing))
    mesh = make_mesh(devices=jax.devices(), **mesh_kw)
    assert mesh.shape["context"] == mesh_kw["context"]
    losses, params = run_steps(cfg, mesh)
    assert abs(losses_1[-1] - losses_1[0]) > 1e-3  # the steps moved the loss
    np.testing.assert_allclose(losses, losses_1, rtol=1e-6, atol=1e-6)
    assert params.keys() == params_1.keys()
    for name in params:
        # 1e-5 = lr x 1e-2 (Gemma 2's soft-caps with eps 1e-8: one of 4096 elements 1.2e-5 off on (fsdp 4, context 2),
        # padding-free rows)
        np.testing.assert_allclose(params[name], params_1[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_context_training_equals_single_device(tmp_path_factory):
    """Shared-prompt packed rows over (data 2, context 2, tensor 2) = one device on padded batches."""
    _check(tmp_path_factory, "llama", "shared_prompt", MESHES["d2c2t2"])


@pytest.mark.skipif(SLOW, reason="the full mesh x model matrix: DPOJAX_SLOW_TESTS=1")
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("case", [("llama", "none"), ("gemma2", "none"), ("llama", "shared_prompt"),
                                  ("gemma2", "padding_free")], ids=lambda c: "-".join(c))
def test_context_matrix(tmp_path_factory, case, mesh):
    _check(tmp_path_factory, *case, MESHES[mesh])


@pytest.mark.skipif(SLOW, reason="a mixture of experts over context and expert axes: DPOJAX_SLOW_TESTS=1")
def test_context_with_expert_axis(tmp_path_factory):
    """A Qwen3-MoE (router aux loss on) with shared-prompt packed rows over (data 2, expert 2, context 2) = one
    device: tokens split over `context` are routed and exchanged over `expert` as without the axis."""
    _check(tmp_path_factory, "qwen3_moe", "shared_prompt", dict(data=2, expert=2, context=2))


# ----------------------------------------------------------------------------------------------- attention alone
@pytest.mark.parametrize("mesh_kw", [dict(data=1, context=8), dict(data=2, context=2, tensor=2)],
                         ids=["c8", "d2c2t2"])
def test_attend_context_equals_attend_xla(mesh_kw):
    if SLOW and mesh_kw["context"] == 8:
        pytest.skip("context 8 attention alone: DPOJAX_SLOW_TESTS=1 (the training test covers the kernel)")
    """Zig-zag rows over `context` (T = 40: padded to 48 on 8 devices) against the one-device kernel, with a
    sliding window, a soft-cap, padding and two segments."""
    B, T, H, G, Dh = 2, 40, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, Dh))
    k, v = (jax.random.normal(key, (B, T, G, Dh)) for key in keys[1:])
    seg = jnp.concatenate([jnp.ones((B, 30), jnp.int32), jnp.zeros((B, 10), jnp.int32)], 1).at[1, 15:30].set(2)
    sharder = Sharder(make_mesh(devices=jax.devices(), **mesh_kw))
    C = sharder.context
    length = context_lib.padded_length(T, C)
    assert length % (2 * C) == 0 and length >= T

    @jax.jit
    def split(q, k, v, seg, window):
        to = lambda x: context_lib.to_context(x, C, length)  # noqa: E731
        out = context_lib.attend_context(to(q), to(k), to(v), to(seg), sharder=sharder, implementation="xla",
                                         scale=0.3, softcap=5.0, window=window)
        return context_lib.from_context(out, C, T)

    real = (seg > 0)[:, :, None, None]
    for window in (None, jnp.int32(7)):
        want = attend_xla(q, k, v, seg, scale=0.3, softcap=5.0, window=window)
        got = split(q, k, v, seg, window)
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)


def test_zigzag_layout_balances_causal_work():
    """Device d holds natural blocks d and 2C-1-d: every device's queries see the same number of causal keys."""
    T, C = 64, 4
    index = context_lib.zigzag_index(T, C)
    assert sorted(index.tolist()) == list(range(T))
    x = jnp.arange(T)[None]
    assert (np.asarray(context_lib.to_context(x, C, T))[0] == index).all()
    assert (np.asarray(context_lib.from_context(context_lib.to_context(x, C, T), C, T)) == np.asarray(x)).all()
    work = [int((index[d * T // C:(d + 1) * T // C] + 1).sum()) for d in range(C)]
    assert len(set(work)) == 1  # equal causal work per device


def test_context_mesh_and_kernel_errors():
    assert resolve_mesh_shape(-1, 1, 2, 8, context=2) == (2, 1, 1, 2, 2)  # data, fsdp, expert, context, tensor
    assert resolve_mesh_shape(-1, 2, 2, 8) == (2, 2, 1, 2)  # no context axis when mesh.context = 1
    assert "context" not in make_mesh(-1, 2, 2).shape
    with pytest.raises(ConfigError, match="context"):
        resolve_mesh_shape(1, 1, 1, 8, context=3)
    assert context_lib.context_attention("auto", "cudnn") == "xla"
    assert context_lib.context_attention("splash", "splash") == "splash"
    with pytest.raises(ModelError, match="'xla' on GPU/CPU or 'splash' on TPU"):
        context_lib.context_attention("cudnn", "cudnn")


@pytest.mark.skipif(SLOW, reason="the Pallas interpreter: DPOJAX_SLOW_TESTS=1")
def test_splash_context_equals_attend_xla():
    """The splash kernel (Pallas interpreter on this CPU) under context 2 (one static zig-zag mask per device, picked
    by `lax.switch`), forward and gradients, equals the one-device XLA kernel; T = 200 is padded to 512."""
    B, T, H, G, Dh = 2, 200, 2, 1, 16
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (B, T, H, Dh))
    k, v = (jax.random.normal(key, (B, T, G, Dh)) for key in keys[1:])
    seg = jnp.asarray((np.arange(T)[None] < np.array([[200], [150]])).astype(np.int32))
    sharder = Sharder(make_mesh(devices=jax.devices()[:4], data=2, context=2))
    C, length = 2, context_lib.padded_length(T, 2, "splash")
    assert length == 512
    to = lambda x: context_lib.to_context(x, C, length)  # noqa: E731
    weights = jnp.cos(jnp.arange(Dh, dtype=jnp.float32)) * (seg > 0)[:, :, None, None]

    def splash(q, k, v):
        out = context_lib.attend_context(to(q), to(k), to(v), to(seg), sharder=sharder, implementation="splash",
                                         scale=0.25, softcap=5.0)
        return jnp.sum(context_lib.from_context(out, C, T) * weights)

    def xla(q, k, v):
        return jnp.sum(attend_xla(q, k, v, seg, scale=0.25, softcap=5.0) * weights)

    np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), rtol=1e-5)
    ours = jax.jit(jax.grad(splash, argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ours, jax.grad(xla, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.skipif(SLOW, reason="two generators compiled: DPOJAX_SLOW_TESTS=1")
def test_generation_on_a_context_mesh_equals_one_device(tmp_path):
    """Prefill and KV-cache decoding of a model built for a (data 2, context 2, tensor 2) mesh (cache slots split over
    `context`, no zig-zag: XLA gathers what a step needs) give one device's greedy tokens."""
    from tiny_models import make_tiny_checkpoint

    from dpojax.generate import Generator, Sampling
    from dpojax.models import load_pretrained

    path = make_tiny_checkpoint(tmp_path / "m", "llama")
    prompts = [[5, 9, 11, 3, 7], [4, 4, 8]]
    out = []
    for sharder in (None, Sharder(make_mesh(devices=jax.devices(), **MESHES["d2c2t2"]))):
        model, cfg = load_pretrained(path, sharder=sharder)
        gen = Generator(model, cfg)
        out.append([c.tokens for c in gen.generate_ids(prompts, Sampling(max_new_tokens=6))])
    assert out[0] == out[1]
