"""Expert parallelism (mesh.expert): the all_to_all expert FFN equals the unsharded one, and so does training.

`expert_ffn_sharded` (experts split over the expert axis, tokens exchanged with all_to_all) gives the values and
gradients of `experts.expert_ffn` on meshes (expert 8), (fsdp 2, expert 4) and (data 2, expert 2, tensor 2), with
biases and with a skewed routing that sends every token to the experts of one device (the worst case the dropless
buffers are sized for). Then 5 AdamW steps of a tiny Qwen3-MoE (8 experts, top-2) on those meshes give the losses
and parameters of one device, with the experts really split over the expert axis. A mesh.expert that does not divide
the experts, or one on a dense model, is refused with a message.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sharding import run_steps
from trl_harness import dpojax_overrides, make_assets

from dpojax.config import config_from_dict
from dpojax.errors import ConfigError
from dpojax.models import experts
from dpojax.models.expert_parallel import check_expert_axis, expert_divisors, expert_ffn_sharded
from dpojax.sharding import Sharder, make_mesh

MESHES = {"expert8": dict(data=1, fsdp=1, expert=8, tensor=1),
          "fsdp2-expert4": dict(data=1, fsdp=2, expert=4, tensor=1),
          "data2-expert2-tensor2": dict(data=2, fsdp=1, expert=2, tensor=2)}
X, Y, D, F, BT = 8, 2, 16, 8, 64


def _problem(seed: int, *, skewed: bool):
    k = jax.random.split(jax.random.key(seed), 8)
    w = experts.ExpertWeights(*(0.3 * jax.random.normal(k[i], s) for i, s in enumerate(
        [(X, D, F), (X, D, F), (X, F, D), (X, F), (X, F), (X, D)])))
    x_BTxD = jax.random.normal(k[6], (BT, D))
    logits_BTxX = jax.random.normal(k[7], (BT, X))
    if skewed:  # every token to experts 0 and 1: one device of the expert axis receives everything
        logits_BTxX = logits_BTxX.at[:, :2].add(100.0)
    top_BTxY, ids_BTxY = jax.lax.top_k(logits_BTxX, Y)
    routing = experts.Routing(jax.nn.softmax(top_BTxY), ids_BTxY.astype(jnp.int32), None, None)
    return x_BTxD, routing, w


def _loss(ffn, activation, x_BTxD, weights_BTxY, w, routing):
    y_BTxD = ffn(x_BTxD, routing._replace(weights_BTxY=weights_BTxY), w, activation=activation, dtype=jnp.float32)
    return jnp.sum(jnp.sin(y_BTxD))  # a cotangent that differs per row and column


CASES = [(mesh, skew, "silu") for mesh in MESHES for skew in (False, True)] + [
    ("data2-expert2-tensor2", False, "gpt_oss")]  # gpt-oss's clamped SwiGLU (biases, F split over tensor)


@pytest.mark.parametrize(("mesh", "skewed", "activation"), CASES,
                         ids=[f"{m}-{'skewed' if s else 'random'}-{a}" for m, s, a in CASES])
def test_sharded_expert_ffn_equals_unsharded(mesh, skewed, activation):
    x_BTxD, routing, w = _problem(0, skewed=skewed)
    sharder = Sharder(make_mesh(**MESHES[mesh]))
    sharded = functools.partial(expert_ffn_sharded, sharder=sharder)
    args = (x_BTxD, routing.weights_BTxY, w, routing)
    want, want_grads = jax.value_and_grad(functools.partial(_loss, experts.expert_ffn, activation),
                                          argnums=(0, 1, 2))(*args)
    got, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, sharded, activation), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    y = jax.jit(lambda x, r, w: sharded(x, r, w, activation=activation, dtype=jnp.float32))(x_BTxD, routing, w)
    np.testing.assert_allclose(y, experts.expert_ffn(x_BTxD, routing, w, activation=activation, dtype=jnp.float32),
                               rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weights", *w._fields), jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert np.abs(b).max() > 0, name  # every input gets a gradient
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_expert_axis_refusals_and_too_few_rows():
    assert expert_divisors(8) == [1, 2, 4, 8]
    with pytest.raises(ConfigError, match=r"'mesh.expert' = 3 does not divide the 8 experts .*\[1, 2, 4, 8\]"):
        check_expert_axis(8, 3)
    with pytest.raises(ConfigError, match="is dense"):
        check_expert_axis(0, 2)
    check_expert_axis(0, 1)  # dense model, no expert axis
    x_BTxD, routing, w = _problem(0, skewed=False)  # 4 rows on 8 devices: the unsharded expert_ffn runs instead
    few = routing._replace(weights_BTxY=routing.weights_BTxY[:4], experts_BTxY=routing.experts_BTxY[:4])
    sharder = Sharder(make_mesh(data=1, fsdp=1, expert=8, tensor=1))
    np.testing.assert_allclose(
        expert_ffn_sharded(x_BTxD[:4], few, w, activation="silu", dtype=jnp.float32, sharder=sharder),
        experts.expert_ffn(x_BTxD[:4], few, w, activation="silu", dtype=jnp.float32), rtol=1e-6)


# ------------------------------------------------------------------------------------------------- training
STEPS = 5


@pytest.fixture(scope="module")
def moe_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_parallel")
    assets = make_assets(root, family="qwen3_moe", n_rows=16)  # 8 experts, top-2, D=32, 2 layers
    return config_from_dict(dpojax_overrides(
        assets, assets["standard"], root / "out",
        train__batch_size=8, train__steps=STEPS, data__eval=None,
        optim__name="adamw", optim__lr=1e-3, optim__weight_decay=0.01, optim__schedule="constant",
    ))


@pytest.fixture(scope="module")
def single(moe_cfg):
    unpacked = dataclasses.replace(moe_cfg, data=dataclasses.replace(moe_cfg.data, packing="none"))
    return run_steps(unpacked, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def _flat(params) -> dict:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_expert_parallel_training_equals_single_device(moe_cfg, single, mesh):
    losses_1, state_1, _ = single
    cfg = dataclasses.replace(moe_cfg, mesh=dataclasses.replace(moe_cfg.mesh, **MESHES[mesh]))
    losses, state, sharder = run_steps(cfg, make_mesh(**MESHES[mesh]))
    assert abs(losses_1[-1] - losses_1[0]) > 1e-3  # the steps moved the loss
    np.testing.assert_allclose(losses, losses_1, rtol=1e-6, atol=1e-6)
    ours, ref = _flat(state.params), _flat(state_1.params)
    assert ours.keys() == ref.keys()
    for name in ours:
        np.testing.assert_allclose(np.asarray(ours[name][...]), np.asarray(ref[name][...]), rtol=1e-5, atol=2e-6,
                                   err_msg=name)
    Q = MESHES[mesh]["expert"]
    gate = ours["layers/mlp/experts/gate_proj"][...]
    assert gate.sharding.spec[1] == "expert" and gate.sharding.shard_shape(gate.shape)[1] == X // Q


def test_train_refuses_a_mesh_expert_that_does_not_split_the_experts(moe_cfg, tmp_path):
    from dpojax.trainer import build

    cfg = dataclasses.replace(moe_cfg, mesh=dataclasses.replace(moe_cfg.mesh, data=1, expert=8))
    dense = make_assets(tmp_path, n_rows=4)
    with pytest.raises(ConfigError, match="is dense"):
        build.build_models(dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name_or_path=str(dense["policy"]))), build.make_sharder(cfg))
    bad = dataclasses.replace(moe_cfg, mesh=dataclasses.replace(moe_cfg.mesh, data=2, expert=3))
    with pytest.raises(ConfigError, match=r"does not divide the 8 experts .*\[1, 2, 4, 8\]"):
        build.build_models(bad, build.make_sharder(bad, jax.devices()[:6]))
