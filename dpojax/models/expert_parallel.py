"""Expert parallelism: the MoE expert FFN with the experts split over the mesh's `expert` axis (Q devices).

`expert_ffn_sharded` has the arguments and the result of `experts.expert_ffn`; it runs per device under
`jax.shard_map`. The batch is split over (data, fsdp, expert), so each device of the expert axis holds different
tokens (bt of them) and X / Q experts (Xl). Each device:

1. routes its own tokens: its bt * Y assignments sorted by expert, hence by the device that holds the expert;
2. sends each assignment's token row to that device with one `jax.lax.all_to_all` over the expert axis;
3. runs its local experts on what it received: the rows sorted by local expert, then the dropless grouped matmuls
   (`jax.lax.ragged_dot`, one group per local expert) for gate, up and down;
4. sends the results back with a second all_to_all, and combines each token's Y rows with its routing weights.

Dropless: `all_to_all` moves fixed-size buffers, so each device sends every peer a buffer sized for the worst case,
all of its assignments going to that one peer: Qr = bt * min(Y, Xl) rows (a token's Y experts are distinct, so at
most min(Y, Xl) of them live on one device). The buffers therefore hold Q * Qr rows of D (sent, and again received)
where an even routing fills bt * Y of them: memory and all-to-all volume per MoE layer are Q * bt * min(Y, Xl) * D
elements each way, min(Y, Xl) * Q / Y times what the assignments need. (`jax.lax.ragged_all_to_all` would send only
the real rows, but XLA:CPU cannot run it in jax 0.10.2 -- "HLO opcode ragged-all-to-all is not supported by
XLA:CPU" -- so it could not be tested here; its receive buffer would need the same worst-case size.)

Composition with the other axes: the expert weights' "embed" dimension, sharded over fsdp, is gathered outside the
shard_map (in_specs leave it whole; the gradient comes back reduce-scattered), and their "mlp" dimension stays split
over `tensor`: each tensor device computes its slice of F, and the partial outputs are `psum`'d over `tensor` once
per token after the combine (the down projection's bias is added by tensor device 0 only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dpojax.errors import ConfigError
from dpojax.models import experts
from dpojax.models.layers import DENSE_OUTPUT
from dpojax.sharding import Sharder

EXPERT_AXIS = "expert"


def expert_divisors(num_experts: int) -> list[int]:
    """The mesh.expert sizes that split `num_experts` experts evenly."""
    return [q for q in range(1, num_experts + 1) if num_experts % q == 0]


def check_expert_axis(num_experts: int, expert_axis: int, model: str = "the model") -> None:
    """Refuse a mesh whose expert axis cannot split the experts of `model` (a dense model has none)."""
    if expert_axis <= 1:
        return
    if num_experts <= 0:
        raise ConfigError(f"mesh: 'mesh.expert' = {expert_axis} splits the experts of an MoE model, but {model} is "
                          "dense (no experts); set mesh.expert to 1.")
    if num_experts % expert_axis:
        raise ConfigError(f"mesh: 'mesh.expert' = {expert_axis} does not divide the {num_experts} experts of {model}; "
                          f"use one of {expert_divisors(num_experts)}.")


def _weight_specs(w, tensor) -> dict:
    """PartitionSpecs (inside the shard_map) of the present fields of ExpertWeights `w`: experts over the expert
    axis, F over `tensor` (or whole), D whole (gathered from fsdp outside)."""
    specs = {"gate_XxDxF": P(EXPERT_AXIS, None, tensor), "up_XxDxF": P(EXPERT_AXIS, None, tensor),
             "down_XxFxD": P(EXPERT_AXIS, tensor, None), "gate_XxF": P(EXPERT_AXIS, tensor),
             "up_XxF": P(EXPERT_AXIS, tensor), "down_XxD": P(EXPERT_AXIS, None)}
    return {k: specs[k] for k, v in w._asdict().items() if v is not None}


def expert_ffn_sharded(x_BTxD: jax.Array, routing: experts.Routing, w: experts.ExpertWeights, *, activation: str,
                       dtype, sharder: Sharder, kernel: str | None = None) -> jax.Array:
    """`experts.expert_ffn` with the experts split over the mesh's expert axis (see the module docstring): the same
    y_BTxD in `dtype`. Rows that do not split over the batch axes (data, fsdp, expert) run `experts.expert_ffn`."""
    X, _, F = w.gate_XxDxF.shape
    check_expert_axis(X, sharder.experts)
    BT = x_BTxD.shape[0]
    rows = sharder.spec(("batch",), (BT,))[0]
    if EXPERT_AXIS not in ((rows,) if isinstance(rows, str) else tuple(rows or ())):
        # too few rows to split over the expert axis (e.g. a small generation batch): GSPMD over the sharded experts
        return experts.expert_ffn(x_BTxD, routing, w, activation=activation, dtype=dtype, kernel=kernel)
    tensor = sharder.spec(("mlp",), (F,))[0]
    fields = {k: v for k, v in w._asdict().items() if v is not None}
    local = functools.partial(_local_ffn, act=experts.GATED_ACTIVATIONS[activation], dtype=dtype,
                              Q=sharder.experts, tensor=tensor, kernel=kernel or experts.grouped_kernel())
    row_spec = P(rows, None)
    fn = jax.shard_map(local, mesh=sharder.mesh, in_specs=(row_spec, row_spec, row_spec, _weight_specs(w, tensor)),
                       out_specs=row_spec, check_vma=False)  # the blocks kernel's scan carries are unvarying
    return fn(x_BTxD, routing.weights_BTxY, routing.experts_BTxY, fields)


def _local_ffn(x_btxD, weights_btxY, experts_btxY, fields: dict, *, act, dtype, Q: int, tensor, kernel: str):
    """One device: its bt tokens out to the experts' devices, its local experts on what arrives, the results back."""
    bt, Y = experts_btxY.shape
    D = x_btxD.shape[1]
    Xl = fields["gate_XxDxF"].shape[0]
    Qr = bt * min(Y, Xl)
    expert_btY = experts_btxY.reshape(bt * Y).astype(jnp.int32)
    order_btY = jnp.argsort(expert_btY, stable=True)  # by expert, so by the device holding it
    sorted_btY = expert_btY[order_btY]
    dest_btY = sorted_btY // Xl
    counts_Q = jnp.zeros((Q,), jnp.int32).at[dest_btY].add(1)
    slot_btY = jnp.arange(bt * Y, dtype=jnp.int32) - (jnp.cumsum(counts_Q) - counts_Q)[dest_btY]
    x_btxD = x_btxD.astype(dtype)
    send_QxQrxD = jnp.zeros((Q, Qr, D), dtype).at[dest_btY, slot_btY].set(x_btxD[order_btY // Y])
    ids_QxQr = jnp.full((Q, Qr), Xl, jnp.int32).at[dest_btY, slot_btY].set(sorted_btY % Xl)  # Xl: an empty slot
    recv_QxQrxD = jax.lax.all_to_all(send_QxQrxD, EXPERT_AXIS, 0, 0)
    recv_ids_QxQr = jax.lax.all_to_all(ids_QxQr, EXPERT_AXIS, 0, 0)
    w = experts.ExpertWeights(**fields)
    if tensor is not None and w.down_XxD is not None:  # the down bias once, not once per slice of F
        w = w._replace(down_XxD=jnp.where(jax.lax.axis_index(tensor) == 0, w.down_XxD, 0))
    y_QQrxD = local_experts(recv_QxQrxD.reshape(Q * Qr, D), recv_ids_QxQr.reshape(Q * Qr), w, act=act, dtype=dtype,
                           kernel=kernel)
    back_QxQrxD = jax.lax.all_to_all(y_QQrxD.reshape(Q, Qr, D), EXPERT_AXIS, 0, 0)
    y_btYxD = jnp.zeros((bt * Y, D), dtype).at[order_btY].set(back_QxQrxD[dest_btY, slot_btY])
    y_btxD = jnp.einsum("tyd,ty->td", y_btYxD.reshape(bt, Y, D).astype(jnp.float32), weights_btxY)
    if tensor is not None:  # each tensor device holds a slice of every expert's F: partial sums
        y_btxD = jax.lax.psum(y_btxD, tensor)
    return y_btxD.astype(dtype)


def local_experts(x_RxD: jax.Array, ids_R: jax.Array, w: experts.ExpertWeights, *, act, dtype,
                  kernel: str) -> jax.Array:
    """Row r of `x_RxD` through local expert ids_R[r] of `w` (Xl experts; an id of Xl marks an empty slot, whose
    output row is never read): the dropless grouped matmuls of `experts.expert_ffn`, op for op (rows sorted by
    expert, `experts.grouped_matmul` by `kernel`, fp32 accumulation rounded to `dtype`, biases in `dtype`)."""
    Xl = w.gate_XxDxF.shape[0]
    order_R = jnp.argsort(ids_R, stable=True)
    ids_R = ids_R[order_R]
    sizes_Xl = jnp.zeros((Xl,), jnp.int32).at[ids_R].add(1, mode="drop")  # empty slots fall outside every group
    bias_ids_R = jnp.minimum(ids_R, Xl - 1)
    xs_RxD = x_RxD[order_R].astype(dtype)

    def grouped(h, w_XxAxB, bias):
        out = experts.grouped_matmul(h, w_XxAxB.astype(dtype), sizes_Xl, preferred_element_type=jnp.float32,
                                     kernel=kernel)
        out = checkpoint_name(out.astype(dtype), DENSE_OUTPUT)  # saved by the `dots` remat policies, as unsharded
        return out if bias is None else out + bias.astype(dtype)[bias_ids_R]

    h_RxF = act(grouped(xs_RxD, w.gate_XxDxF, w.gate_XxF), grouped(xs_RxD, w.up_XxDxF, w.up_XxF))
    y_RxD = grouped(h_RxF, w.down_XxFxD, w.down_XxD)
    return jnp.zeros_like(y_RxD).at[order_R].set(y_RxD)
