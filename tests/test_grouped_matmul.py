"""The grouped matmul of the MoE experts (`dpojax.models.experts`): the `blocks` kernel gives `jax.lax.ragged_dot`'s
values and gradients (experts that receive no row, groups smaller than a block, groups of several blocks, rows past
the groups), `expert_ffn` equals a per-token dense reference (values and gradients, with biases), and each platform
gets its kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax.models import experts
from dpojax.models.experts import ExpertWeights, Routing

# groups of 8-row blocks: empty experts (1, 4), groups smaller than a block (3, 1), several blocks (20 = 3 blocks,
# the last partial), and 6 rows past the groups
GROUP_SIZES = (3, 0, 20, 1, 0, 16)
ROWS, D_IN, D_OUT = 46, 12, 20


def _dense_reference(lhs, rhs, group_sizes):
    """Row by row: each row of a group times its expert's matrix; rows past the groups give zeros (numpy, fp64)."""
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for e, n in enumerate(group_sizes):
        out[start:start + n] = np.asarray(lhs[start:start + n], np.float64) @ np.asarray(rhs[e], np.float64)
        start += n
    return out


def _operands(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    lhs = jax.random.normal(k1, (ROWS, D_IN), dtype)
    rhs = jax.random.normal(k2, (len(GROUP_SIZES), D_IN, D_OUT), dtype)
    cot = jax.random.normal(k3, (ROWS, D_OUT), jnp.float32)
    return lhs, rhs, jnp.array(GROUP_SIZES, jnp.int32), cot


def test_blocks_equal_ragged_dot_and_a_dense_reference_values_and_grads():
    lhs, rhs, sizes, cot = _operands()

    def run(kernel):
        def f(lhs, rhs):
            return experts.grouped_matmul(lhs, rhs, sizes, preferred_element_type=jnp.float32, kernel=kernel,
                                          block=8)

        out, vjp = jax.vjp(jax.jit(f), lhs, rhs)
        return out, vjp(cot)

    out, (dlhs, drhs) = run("blocks")
    assert experts.block_rows(ROWS, len(GROUP_SIZES), 8) == 8  # the groups above span 1, 3 and 2 blocks
    ref = _dense_reference(lhs, rhs, GROUP_SIZES)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert np.all(np.asarray(out)[sum(GROUP_SIZES):] == 0)
    ref_out, (ref_dlhs, ref_drhs) = run("ragged_dot")
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dlhs, ref_dlhs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(drhs, ref_drhs, atol=1e-4, rtol=0)
    # the gradients by hand: d lhs = g @ rhs[e]^T on a group's rows (0 past the groups); d rhs[e] = lhs^T g per group
    starts = np.cumsum((0,) + GROUP_SIZES)
    for e, n in enumerate(GROUP_SIZES):
        rows = slice(starts[e], starts[e] + n)
        np.testing.assert_allclose(drhs[e], np.asarray(lhs[rows]).T @ np.asarray(cot[rows]), atol=1e-4, rtol=0)
        np.testing.assert_allclose(dlhs[rows], np.asarray(cot[rows]) @ np.asarray(rhs[e]).T, atol=1e-4, rtol=0)
    assert np.all(np.asarray(drhs)[[1, 4]] == 0) and np.all(np.asarray(dlhs)[sum(GROUP_SIZES):] == 0)


def test_blocks_in_bf16_equal_ragged_dot():
    lhs, rhs, sizes, _ = _operands(jnp.bfloat16)
    outs = [experts.grouped_matmul(lhs, rhs, sizes, preferred_element_type=jnp.float32, kernel=k, block=8)
            for k in ("blocks", "ragged_dot")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3, rtol=1e-3)
    assert experts.grouped_matmul(lhs, rhs, sizes, kernel="blocks").dtype == jnp.bfloat16


def test_few_rows_over_many_experts_use_one_row_blocks():
    lhs, rhs, _, _ = _operands()
    sizes = (1, 0, 2, 0, 0, 0)  # decoding: fewer rows than experts
    assert experts.block_rows(4, len(sizes)) == 1
    out = experts.grouped_matmul(lhs[:4], rhs, jnp.array(sizes, jnp.int32), kernel="blocks")
    np.testing.assert_allclose(out, _dense_reference(lhs[:4], rhs, sizes), atol=1e-4, rtol=0)


def test_block_layout_bounds_the_padded_rows():
    sizes = jnp.array([1, 1, 1, 1, 0], jnp.int32)  # every group one row: each its own block, the worst case
    layout = experts.block_layout(sizes, rows=4, block=8)
    assert layout.rows == (4 + 5 * 7) // 8 * 8 == 32
    np.testing.assert_array_equal(layout.block_experts, [0, 1, 2, 3])
    np.testing.assert_array_equal(np.arange(4) + np.asarray(layout.shift_X)[:4], [0, 8, 16, 24])
    layout = experts.block_layout(jnp.array([0, 17, 0], jnp.int32), rows=20, block=8)
    np.testing.assert_array_equal(layout.block_experts, [1, 1, 1, 2, 2])  # blocks past the groups: the last expert


def test_each_platform_gets_its_kernel():
    assert experts.grouped_kernel("tpu") == "ragged_dot"
    assert experts.grouped_kernel("cpu", xla_flags=experts.RAGGED_DOT_FUSION_FLAG) == "blocks"
    assert experts.grouped_kernel("gpu", xla_flags="") == "blocks"
    assert experts.grouped_kernel("cuda", xla_flags=f"--xla_dump_to=/tmp {experts.RAGGED_DOT_FUSION_FLAG}") == (
        "ragged_dot")
    with pytest.raises(ValueError, match="unknown grouped matmul kernel"):
        experts.grouped_matmul(*_operands()[:3], kernel="dense")


def _ffn_reference(x_BTxD, weights_BTxY, experts_BTxY, w: ExpertWeights):
    """Token by token, each of its Y experts' gated MLP (silu) with biases, summed with the routing weights."""
    def one(x_D, e):
        gate = x_D @ w.gate_XxDxF[e] + w.gate_XxF[e]
        up = x_D @ w.up_XxDxF[e] + w.up_XxF[e]
        return (jax.nn.silu(gate) * up) @ w.down_XxFxD[e] + w.down_XxD[e]

    y_BTxYxD = jax.vmap(lambda x_D, e_Y: jax.vmap(lambda e: one(x_D, e))(e_Y))(x_BTxD, experts_BTxY)
    return jnp.einsum("tyd,ty->td", y_BTxYxD, weights_BTxY)


def test_expert_ffn_equals_a_per_token_reference_values_and_grads():
    X, BT, D, F = 6, 21, 8, 10
    ks = jax.random.split(jax.random.PRNGKey(1), 9)
    w = ExpertWeights(*(0.5 * jax.random.normal(k, s) for k, s in zip(
        ks[:6], [(X, D, F), (X, D, F), (X, F, D), (X, F), (X, F), (X, D)], strict=True)))
    x_BTxD = jax.random.normal(ks[6], (BT, D))
    # experts 0 and 5 receive no row; expert 2 gets most rows (more than one block of 8), the others a few
    experts_BTxY = jnp.stack([jnp.where(jnp.arange(BT) % 3 == 0, 1, 2),
                              jnp.where(jnp.arange(BT) % 2 == 0, 3, 4)], axis=1).astype(jnp.int32)
    weights_BTxY = jax.nn.softmax(jax.random.normal(ks[7], (BT, 2)), axis=-1)
    assert experts.grouped_kernel() == "blocks" and experts.block_rows(BT * 2, X) == 8

    def ours(x_BTxD, w):
        routing = Routing(weights_BTxY, experts_BTxY, jnp.zeros((BT, X)), jnp.zeros((BT, X)))
        return experts.expert_ffn(x_BTxD, routing, w, activation="silu", dtype=jnp.float32)

    cot = jax.random.normal(ks[8], (BT, D))
    out, vjp = jax.vjp(jax.jit(ours), x_BTxD, w)
    ref, ref_vjp = jax.vjp(lambda x, w: _ffn_reference(x, weights_BTxY, experts_BTxY, w), x_BTxD, w)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    (dx, dw), (ref_dx, ref_dw) = vjp(cot), ref_vjp(cot)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-4, rtol=1e-5)
    for name, got, want in zip(ExpertWeights._fields, dw, ref_dw, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=name)
    assert np.all(np.asarray(dw.gate_XxDxF)[[0, 5]] == 0) and np.abs(np.asarray(dw.gate_XxDxF)[2]).max() > 0
