"""Sharded training equals single-device training, and parameters live where the rules table says.

The same 5 AdamW steps (policy + frozen reference, tiny GQA Llama: 4 query heads, 2 kv heads) run on one device
and on meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2), (1,4,2) and (2,1,4) (kv heads 2 < tensor 4):
per-step losses and final parameters agree in fp32 (the meshes train on shared-prompt packed rows, the single
device on padded [N, K, T] batches). Parameters and AdamW moments carry exactly the sharding that
`Sharder.spec(logical_axes)` gives; FSDP splits every matrix over `fsdp`, tensor parallelism splits heads, mlp
and vocab; and `check_fsdp_sharded` refuses a mesh that would leave big parameters whole on every device.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from trl_harness import dpojax_overrides, make_assets

from dpojax import metrics as M
from dpojax.config import config_from_dict
from dpojax.errors import ConfigError
from dpojax.models.config import ModelConfig
from dpojax.models.hf import abstract_params
from dpojax.sharding import Sharder, check_fsdp_sharded, make_mesh, resolve_mesh_shape, unsharded_params
from dpojax.trainer import build, prefetch
from dpojax.trainer.step import batch_sharding

STEPS = 5
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4)]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    assets = make_assets(root, n_rows=16)  # tiny llama: D=32, 4 heads, 2 kv heads, F=64, V=128, 2 layers
    return config_from_dict(dpojax_overrides(
        assets, assets["standard"], root / "out",
        train__batch_size=8, train__steps=STEPS, data__eval=None,
        optim__name="adamw", optim__lr=1e-3, optim__weight_decay=0.01, optim__schedule="constant",
    ))


def run_steps(cfg, mesh, steps=STEPS):
    """(per-step losses, final TrainState, Sharder) of `steps` training steps on `mesh`."""
    sharder = Sharder(mesh)
    models = build.build_models(cfg, sharder)
    pairs = build.load_split(cfg, models, cfg.data.train, cfg.data.train_split)
    run, state = build.setup_train(cfg, models, sharder, steps=build.total_steps(cfg, len(pairs)))
    placement = batch_sharding(sharder)
    losses = []
    for batch in prefetch.host_batches(run, pairs, 0, steps):
        state, out = run.train_step(state, models.ref_params, build.to_device(batch, placement))
        losses.append(M.finalize(jax.device_get(out))["loss"])
    return np.asarray(losses), state, sharder


@pytest.fixture(scope="module")
def single(cfg):
    """One device, padded [N, K, T] batches: every mesh below trains on packed rows (the default)."""
    unpacked = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing="none"))
    return run_steps(unpacked, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def _flat(params) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_training_equals_single_device(cfg, single, shape):
    losses_1, state_1, _ = single
    losses, state, sharder = run_steps(cfg, make_mesh(*shape))
    assert abs(losses_1[-1] - losses_1[0]) > 1e-3  # the steps moved the loss
    np.testing.assert_allclose(losses, losses_1, rtol=1e-6, atol=1e-6)
    ours, ref = _flat(state.params), _flat(state_1.params)
    assert ours.keys() == ref.keys()
    for name in ours:
        np.testing.assert_allclose(np.asarray(ours[name][...]), np.asarray(ref[name][...]), rtol=1e-5, atol=2e-6,
                                   err_msg=name)
    _check_layout(state, sharder)


def _check_layout(state, sharder):
    """Params and AdamW moments are placed exactly as the rules table says, and really split."""
    mesh = sharder.mesh
    for name, var in _flat(state.params).items():
        expected = sharder.spec(var.logical_axes, var.shape)
        assert var[...].sharding.spec == expected, (name, var[...].sharding.spec, expected)
        shard_shape = var[...].sharding.shard_shape(var.shape)
        for dim, axes in zip(var.shape, expected):  # each device holds 1/k of a dimension split k ways
            names = () if axes is None else (axes,) if isinstance(axes, str) else axes
            k = int(np.prod([mesh.shape[a] for a in names]))
            assert dim // k in shard_shape or k == 1
        if mesh.shape["fsdp"] > 1 and "embed" in var.logical_axes:
            assert "fsdp" in expected, name  # FSDP: every matrix is split over fsdp
        if mesh.shape["tensor"] > 1:
            for axis in ("heads", "mlp", "vocab"):
                if axis in var.logical_axes:
                    assert expected[var.logical_axes.index(axis)] == "tensor", (name, axis)
            if "kv_heads" in var.logical_axes and var.shape[var.logical_axes.index("kv_heads")] % mesh.shape["tensor"]:
                assert expected[var.logical_axes.index("kv_heads")] is None  # 2 kv heads on 4: replicated
    params_sh = jax.tree.map(lambda x: x.sharding, state.params)
    for moment in ("mu", "nu"):
        tree = optax.tree_utils.tree_get(state.opt_state, moment)
        assert jax.tree.map(lambda x: x.sharding, tree) == params_sh, moment
    assert state.step.sharding.is_fully_replicated
    if mesh.shape["fsdp"] > 1:  # only the norm scales stay whole on every fsdp device
        assert all("norm" in path for path, _ in unsharded_params(state.params, mesh))
        check_fsdp_sharded(state.params, mesh)


# ---------------------------------------------------------------------------------------------------- checks
def _abstract(hidden: int, mesh) -> nnx.State:
    hf = dict(model_type="llama", vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128)
    return abstract_params(ModelConfig.from_hf(hf), sharder=Sharder(mesh))[1]


def test_check_fails_when_fsdp_leaves_matrices_replicated():
    mesh = make_mesh(1, 8, 1)
    check_fsdp_sharded(_abstract(64, mesh), mesh)  # 64 % 8 == 0: every matrix split over fsdp
    bad = _abstract(36, mesh)  # 36 % 8 != 0: the rules fall back to replicating every embed dimension
    assert {"embed_tokens/embedding", "layers/mlp/down_proj/kernel"} <= {p for p, _ in unsharded_params(bad, mesh)}
    with pytest.raises(ConfigError, match=r"mesh.fsdp=8 leaves 100.0% of the parameters unsharded"):
        check_fsdp_sharded(bad, mesh)
    check_fsdp_sharded(bad, make_mesh(8, 1, 1))  # no fsdp axis: replication is the intent


def test_mesh_shape_errors_name_the_devices():
    assert resolve_mesh_shape(-1, 2, 2, 8) == (2, 2, 1, 2)  # MESH_AXES order: data, fsdp, expert, tensor
    assert resolve_mesh_shape(1, 2, 1, 8, expert=-1) == (1, 2, 4, 1)
    with pytest.raises(ConfigError, match="8 devices"):
        resolve_mesh_shape(3, 1, 1, 8)
    with pytest.raises(ConfigError, match="at most one"):
        resolve_mesh_shape(-1, -1, 1, 8)
