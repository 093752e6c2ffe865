"""Pallas splash attention (TPU) behind dpojax's attention signature, run per device inside `shard_map`.

`attend_splash(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, scale=, sharder=)` computes exactly what
`attention.attend_xla` computes (causal AND same segment id; padding, id 0, attends among itself) without ever
building the [B, H, T, T] scores: the kernel streams key/value blocks with an online softmax, forward and
backward. The Pallas kernel sees one device's shard, so it runs inside `shard_map` over the mesh: rows split over
the batch axes (data, fsdp), heads over `tensor`. With GQA each kv head serves a group of R = H / G query heads through
the MQA kernel; when the kv heads are replicated over `tensor` (fewer kv heads than the tensor axis), each
device slices the kv heads its query heads need. T is padded up to a multiple of the block size with an extra
segment (it attends only to itself), so every length bucket works.

Sliding windows are not supported here (dpojax passes a per-layer traced window; splash masks are static).
The kernel runs compiled when the mesh's devices are TPUs (also when lowering for a TPU topology on a CPU host)
and in the Pallas interpreter otherwise (CPU tests); `interpret=` forces either. Glossary:
`dpojax.glossary`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dpojax.sharding import Sharder

BLOCK = 512  # q and kv block (tokens); T is padded to a multiple of min(BLOCK, T rounded up to 128)
PAD_SEGMENT = -1  # segment id of the padding added here (distinct from dpojax's padding id 0)


def _block(T: int) -> tuple[int, int]:
    """(block size, padded length) for a sequence of T tokens."""
    block = min(BLOCK, -(-T // 128) * 128)
    return block, -(-T // block) * block


def _pallas():
    """(the splash kernel module, its mask module), imported when a splash kernel is built: loading Pallas costs
    every process that imports the model code a third of a second, and only TPU runs (and their tests) use it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    return splash, masks


def _kernel(group: int, T: int, block: int, softcap: float | None, interpret: bool):
    """The MQA splash kernel for `group` query heads sharing one kv head, causal over T tokens."""
    splash, masks = _pallas()
    mask = masks.MultiHeadMask([masks.CausalMask((T, T))] * group)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  attn_logits_soft_cap=softcap)


def _default_precision(fn):
    """`fn` traced, forward and backward, with the default matmul precision. Mosaic rejects a "highest"-precision
    dot on bf16 operands, which a global `jax_default_matmul_precision` would otherwise ask the kernel for; on
    16-bit inputs the setting means nothing. (The kernel's backward is traced when the gradient is, outside any
    `with` around the call, hence the custom_vjp that re-enters the context there.)"""

    @jax.custom_vjp
    def call(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def fwd(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)

    def bwd(vjp, g):
        with jax.default_matmul_precision("default"):
            return vjp(g)

    call.defvjp(fwd, bwd)
    return call


def _local_attention(q_bxTxhxDh, k_bxTxgxDh, v_bxTxgxDh, seg_bxT, *, group: int, scale: float, head_axis,
                     kv_replicated: bool, softcap: float | None, interpret: bool):
    """One device's shard: b rows, h query heads, g kv heads (all G when kv_replicated), r = h / g per kv head."""
    b, T, h, Dh = q_bxTxhxDh.shape
    if kv_replicated and head_axis is not None:  # take the kv heads this device's query heads use
        if h % group and group % h:
            raise NotImplementedError(f"splash: {h} query heads per device do not align with GQA groups of {group}; "
                                      "use attention='xla' or another mesh.tensor")
        n_kv = max(1, h // group)
        start = jax.lax.axis_index(head_axis) * h // group
        k_bxTxgxDh = jax.lax.dynamic_slice_in_dim(k_bxTxgxDh, start, n_kv, axis=2)
        v_bxTxgxDh = jax.lax.dynamic_slice_in_dim(v_bxTxgxDh, start, n_kv, axis=2)
    g = k_bxTxgxDh.shape[2]
    r = h // g
    block, Tp = _block(T)
    pad = ((0, 0), (0, Tp - T))
    seg_bxTp = jnp.pad(seg_bxT, pad, constant_values=PAD_SEGMENT)
    q_bxgxrxTpxDh = jnp.pad((q_bxTxhxDh * scale).reshape(b, T, g, r, Dh), pad + ((0, 0),) * 3).transpose(0, 2, 3, 1, 4)
    k_bxgxTpxDh = jnp.pad(k_bxTxgxDh, pad + ((0, 0),) * 2).transpose(0, 2, 1, 3)
    v_bxgxTpxDh = jnp.pad(v_bxTxgxDh, pad + ((0, 0),) * 2).transpose(0, 2, 1, 3)
    kernel = _kernel(r, Tp, block, softcap, interpret)

    def one(q_rxTpxDh, k_TpxDh, v_TpxDh, seg_Tp):
        return kernel(q_rxTpxDh, k_TpxDh, v_TpxDh, segment_ids=_pallas()[0].SegmentIds(q=seg_Tp, kv=seg_Tp))

    per_row = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
    attention = jax.vmap(per_row)
    if jnp.dtype(q_bxTxhxDh.dtype).itemsize == 2:
        attention = _default_precision(attention)
    out_bxgxrxTpxDh = attention(q_bxgxrxTpxDh, k_bxgxTpxDh, v_bxgxTpxDh, seg_bxTp)
    return out_bxgxrxTpxDh[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(b, T, h, Dh).astype(q_bxTxhxDh.dtype)


def attend_splash(q_BxTxHxDh: jax.Array, k_BxTxGxDh: jax.Array, v_BxTxGxDh: jax.Array, segment_ids_BxT: jax.Array,
                  *, scale: float, sharder: Sharder | None, softcap: float | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """Causal, segment-masked GQA attention [B, T, H, Dh] with the splash kernel, per device under shard_map;
    `softcap` caps the scaled scores, cap * tanh(s / cap), like attend_xla."""
    if interpret is None:
        device = sharder.mesh.devices.flat[0] if sharder is not None else jax.devices()[0]
        interpret = device.platform != "tpu"
    B, _, H, _ = q_BxTxHxDh.shape
    G = k_BxTxGxDh.shape[2]
    kw = dict(group=H // G, scale=scale, softcap=softcap, interpret=interpret)
    if sharder is None:
        return _local_attention(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, head_axis=None,
                                kv_replicated=False, **kw)
    rows = sharder.spec(("batch",), (B,))[0]
    heads = sharder.spec(("heads",), (H,))[0]
    kv_heads = sharder.spec(("kv_heads",), (G,))[0] if heads is not None else None
    fn = functools.partial(_local_attention, head_axis=heads, kv_replicated=kv_heads is None, **kw)
    q_spec, kv_spec = P(rows, None, heads, None), P(rows, None, kv_heads, None)
    return jax.shard_map(fn, mesh=sharder.mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows, None)),
                         out_specs=q_spec, check_vma=False)(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT)
