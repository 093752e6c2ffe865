"""Context parallelism: the positions of each row split over the mesh's `context` axis (mesh.context = C > 1).

Layout (zig-zag): a row of T tokens (padded to a multiple of 2C) is cut into 2C blocks of T / 2C tokens; device d
holds blocks d and 2C - 1 - d, so under the causal mask every device has the same share of the work (one early
block, one late block). The decoder permutes its inputs into this order once (`to_context`: ids, positions, segment
ids, branch ids, token weights, all alike) and its final hidden states back (`from_context`), so everything
outside the decoder (the log-prob head, the losses, packing) sees rows in their natural order. Between the two,
every per-token op (embeddings, RoPE from explicit positions, norms, MLPs) is unchanged by a permutation, and
attention masks by each token's natural index, segment id and (packed rows) position and branch id, never by
where a token sits in the permuted row.

Attention (`attend_context`) runs per device under `shard_map`: the device's queries stay local, its keys and
values (and their segment / position / branch ids) are all-gathered over `context` (the backward reduce-scatters
their gradients), and each query block is masked by natural indices:
  - "xla": one static branch per device index (`lax.switch`): device d's early query block (natural block d)
    against natural key blocks 0..d, its late block (2C - 1 - d) against blocks 0..2C-1-d, the only ones causality
    lets them see: 2C + 1 of the 4C key blocks a full product would compute, the same on every device; scores in
    fp32 as in `attention.attend_xla`, recomputed in the backward (each branch is checkpointed).
  - "splash" (TPU): the Pallas splash kernel on the local queries against the gathered keys, with a static mask
    per device (`lax.switch` over the device index: the kernel's masks are static), so it skips exactly the key
    blocks causality masks: (2C + 1) / 4C of the full product, balanced. Soft-caps are supported, sliding windows
    and shared-prompt branches are not (as without context parallelism).
Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dpojax.errors import ModelError
from dpojax.models import splash as splash_lib
from dpojax.models.attention import softmax_with_sink
from dpojax.sharding import Sharder

AXIS = "context"
SPLASH_UNIT = 128  # splash under context: each zig-zag block a multiple of this many tokens (the kernel's tiles)


def padded_length(T: int, C: int, implementation: str = "xla") -> int:
    """T rounded up so that it splits into 2C equal blocks (for splash, blocks of a multiple of SPLASH_UNIT)."""
    unit = 2 * C * (SPLASH_UNIT if implementation == "splash" else 1)
    return -(-T // unit) * unit


def block_order(C: int) -> list[int]:
    """The natural block held at each zig-zag slot: device d holds blocks d and 2C - 1 - d."""
    return [b for d in range(C) for b in (d, 2 * C - 1 - d)]


def zigzag_index(T: int, C: int) -> np.ndarray:
    """int32 [T]: the natural index of the token at each position of the zig-zag row (T a multiple of 2C)."""
    blk = T // (2 * C)
    return np.concatenate([np.arange(b * blk, (b + 1) * blk) for b in block_order(C)]).astype(np.int32)


def _permute_blocks(x: jax.Array, order: list[int]) -> jax.Array:
    """x [B, T, ...] with its T axis cut into len(order) blocks, reassembled in `order` (static slices)."""
    blk = x.shape[1] // len(order)
    return jnp.concatenate([x[:, b * blk:(b + 1) * blk] for b in order], axis=1)


def to_context(x: jax.Array, C: int, length: int, fill=0) -> jax.Array:
    """x [B, T, ...] in natural order -> [B, length, ...] in zig-zag order, padded with `fill` (padding: segment 0)."""
    if length > x.shape[1]:
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return _permute_blocks(x, block_order(C))


def from_context(x: jax.Array, C: int, T: int) -> jax.Array:
    """x [B, length, ...] in zig-zag order -> its first T positions in natural order (the inverse of to_context)."""
    inverse = list(np.argsort(block_order(C)))
    return _permute_blocks(x, inverse)[:, :T]


def context_attention(requested: str, resolved: str) -> str:
    """The kernel of a model whose rows are split over `context`: xla or splash as resolved; cuDNN (which cannot
    take the gathered keys' natural indices) refused when asked for, replaced by xla under `auto`."""
    if resolved != "cudnn":
        return resolved
    if requested == "cudnn":
        raise ModelError("model.attention='cudnn' cannot split a row over mesh.context (its mask is causal by "
                         "position in the local block); use model.attention='xla' on GPU/CPU or 'splash' on TPU "
                         "(or 'auto', which picks them), or mesh.context = 1.")
    return "xla"


# ----------------------------------------------------------------------------------------------- attention (xla)
def _masked_attention(q_bxSxhxDh, k_bxExgxDh, v_bxExgxDh, allowed_bxSxE, *, scale, softcap, sink_h):
    """Attention of S queries over E keys with an explicit mask (GQA: h a multiple of g); fp32 scores."""
    b, S, h, Dh = q_bxSxhxDh.shape
    E, g = k_bxExgxDh.shape[1], k_bxExgxDh.shape[2]
    r = h // g
    q_bxgxSRxDh = q_bxSxhxDh.reshape(b, S, g, r, Dh).transpose(0, 2, 1, 3, 4).reshape(b, g, S * r, Dh)
    k_bxgxExDh, v_bxgxExDh = k_bxExgxDh.transpose(0, 2, 1, 3), v_bxExgxDh.transpose(0, 2, 1, 3)
    batch = ((0, 1), (0, 1))
    scores_bxgxSRxE = jax.lax.dot_general(q_bxgxSRxDh, k_bxgxExDh, ((3, 3), batch),
                                          preferred_element_type=jnp.float32) * scale
    scores_bxgxSxrxE = scores_bxgxSRxE.reshape(b, g, S, r, E)
    if softcap is not None:
        scores_bxgxSxrxE = jnp.tanh(scores_bxgxSxrxE / softcap) * softcap
    scores_bxgxSxrxE = jnp.where(allowed_bxSxE[:, None, :, None, :], scores_bxgxSxrxE, jnp.finfo(jnp.float32).min)
    sink = None if sink_h is None else sink_h.astype(jnp.float32).reshape(1, g, 1, r, 1)
    probs_bxgxSRxE = softmax_with_sink(scores_bxgxSxrxE, sink).astype(v_bxExgxDh.dtype).reshape(b, g, S * r, E)
    out_bxgxSRxDh = jax.lax.dot_general(probs_bxgxSRxE, v_bxgxExDh, ((3, 2), batch))
    return out_bxgxSRxDh.reshape(b, g, S, r, Dh).transpose(0, 2, 1, 3, 4).reshape(b, S, h, Dh)


def _allowed(q_index_S, k_index_E, q, k, window):
    """Mask [b, S, E]: causal by natural index, same segment, window (in positions for packed rows, else in
    indices), shared-prompt branches. q, k: dicts of the tokens' seg / pos / branch ids ([b, S] / [b, E])."""
    distance_SxE = q_index_S[:, None] - k_index_E[None, :]
    allowed_bxSxE = (q["seg"][:, :, None] == k["seg"][:, None, :]) & (distance_SxE >= 0)[None]
    if window is not None:
        if "pos" in q:
            allowed_bxSxE = allowed_bxSxE & (q["pos"][:, :, None] - k["pos"][:, None, :] < window)
        else:
            allowed_bxSxE = allowed_bxSxE & (distance_SxE < window)[None]
    if "branch" in q:
        key_branch_bx1xE = k["branch"][:, None, :]
        allowed_bxSxE = allowed_bxSxE & ((key_branch_bx1xE == 0) | (key_branch_bx1xE == q["branch"][:, :, None]))
    return allowed_bxSxE


def _local_xla(q_bxtxhxDh, k_bxtxgxDh, v_bxtxgxDh, tokens, extras, *, C: int, scale, softcap, group: int,
               head_axis, kv_replicated: bool):
    """One device: t = T / C local queries (two zig-zag blocks) against the row's gathered keys, put back in
    natural order; one static branch per device index (`lax.switch`), each slicing exactly the keys its blocks
    can see."""
    k_bxtxgxDh, v_bxtxgxDh = _kv_for_heads(k_bxtxgxDh, v_bxtxgxDh, q_bxtxhxDh.shape[2], group, head_axis,
                                           kv_replicated)
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    natural = functools.partial(_permute_blocks, order=list(np.argsort(block_order(C))))
    k_bxTxgxDh, v_bxTxgxDh = natural(gather(k_bxtxgxDh)), natural(gather(v_bxtxgxDh))
    keys = {name: natural(gather(x)) for name, x in tokens.items()}
    # checkpointed: a branch's residuals are its inputs, alike in every branch (`lax.switch` allocates the union
    # of its branches' residuals), and its backward recomputes the scores
    branches = [jax.checkpoint(functools.partial(_device_xla, d=d, C=C, scale=scale, softcap=softcap))
                for d in range(C)]
    return jax.lax.switch(jax.lax.axis_index(AXIS), branches, q_bxtxhxDh, k_bxTxgxDh, v_bxTxgxDh, tokens, keys,
                          extras)


def _device_xla(q_bxtxhxDh, k_bxTxgxDh, v_bxTxgxDh, tokens, keys, extras, *, d: int, C: int, scale, softcap):
    """Device d's attention: its early block (natural block d) against natural key blocks 0..d, its late block
    (2C - 1 - d) against blocks 0..2C-1-d: 2C + 1 of the 4C key blocks a full product would compute (keys,
    values and `keys`' token ids in natural order); scores in fp32 as in `attention.attend_xla`."""
    blk = q_bxtxhxDh.shape[1] // 2
    window, sink_h = extras.get("window"), extras.get("sinks")
    outs = []
    for half, block in ((0, d), (1, 2 * C - 1 - d)):
        E = (block + 1) * blk  # the keys up to this block's last token: every later key is masked
        q_index_S = block * blk + jax.lax.iota(jnp.int32, blk)  # iotas: never a [S, E] constant in the program
        q = {name: x[:, half * blk:(half + 1) * blk] for name, x in tokens.items()}
        k = {name: x[:, :E] for name, x in keys.items()}
        allowed_bxSxE = _allowed(q_index_S, jax.lax.iota(jnp.int32, E), q, k, window)
        outs.append(_masked_attention(q_bxtxhxDh[:, half * blk:(half + 1) * blk], k_bxTxgxDh[:, :E],
                                      v_bxTxgxDh[:, :E], allowed_bxSxE, scale=scale, softcap=softcap,
                                      sink_h=sink_h))
    return jnp.concatenate(outs, axis=1)


def _kv_for_heads(k_bxtxgxDh, v_bxtxgxDh, h: int, group: int, head_axis, kv_replicated: bool):
    """The kv heads this device's h query heads use, when the kv heads are replicated over `tensor`."""
    if not (kv_replicated and head_axis is not None):
        return k_bxtxgxDh, v_bxtxgxDh
    n_kv = max(1, h // group)
    start = jax.lax.axis_index(head_axis) * h // group
    return (jax.lax.dynamic_slice_in_dim(k_bxtxgxDh, start, n_kv, axis=2),
            jax.lax.dynamic_slice_in_dim(v_bxtxgxDh, start, n_kv, axis=2))


# --------------------------------------------------------------------------------------------- attention (splash)
def _zigzag_natural(i, C: int, d, blk: int):
    """Natural index of position i within device d's two zig-zag blocks of blk tokens (numpy or jnp ints)."""
    late = (i >= blk).astype(i.dtype)
    return i + d * blk + late * ((2 * C - 2 - 2 * d) * blk)


def _splash_mask(C: int, d: int, t: int, group: int):
    """The static splash mask of device d: its t zig-zag queries (natural blocks d, 2C-1-d) against the T = t * C
    zig-zag keys, causal in natural indices; computed from indices (never materialized), per head of the group."""
    _, masks = splash_lib._pallas()
    blk = t // 2

    class ZigZagCausal(masks._ComputableMask):  # a lazy mask: the kernel evaluates it per tile
        def __init__(self):
            def fn(q_ids, kv_ids):
                return (_zigzag_natural(q_ids, C, d, blk)
                        >= _zigzag_natural(kv_ids % t, C, kv_ids // t, blk))

            super().__init__(shape=(t, t * C), mask_function=fn)

        def __eq__(self, other):
            return hash(self) == hash(other) and isinstance(other, masks._ComputableMask)

        def __hash__(self):
            return hash(("zigzag", C, d, t))

    return masks.MultiHeadMask([ZigZagCausal()] * group)


def _local_splash(q_bxtxhxDh, k_bxtxgxDh, v_bxtxgxDh, tokens, extras, *, C: int, scale, softcap, group: int,
                  head_axis, kv_replicated: bool, interpret: bool):
    """One device under splash: the local queries against the gathered keys, one static mask per device index."""
    splash, _ = splash_lib._pallas()
    k_bxtxgxDh, v_bxtxgxDh = _kv_for_heads(k_bxtxgxDh, v_bxtxgxDh, q_bxtxhxDh.shape[2], group, head_axis,
                                           kv_replicated)
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    k_bxTxgxDh, v_bxTxgxDh, seg_bxT = gather(k_bxtxgxDh), gather(v_bxtxgxDh), gather(tokens["seg"])
    b, t, h, Dh = q_bxtxhxDh.shape
    g = k_bxTxgxDh.shape[2]
    r = h // g
    block = max(u for u in (512, 256, 128) if (t // 2) % u == 0)
    q_bxgxrxtxDh = (q_bxtxhxDh * scale).reshape(b, t, g, r, Dh).transpose(0, 2, 3, 1, 4)
    k_bxgxTxDh, v_bxgxTxDh = k_bxTxgxDh.transpose(0, 2, 1, 3), v_bxTxgxDh.transpose(0, 2, 1, 3)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def branch(d):
        kernel = splash.make_splash_mqa(_splash_mask(C, d, t, r), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret, attn_logits_soft_cap=softcap)

        def one(q_rxtxDh, k_TxDh, v_TxDh, seg_t, seg_T):
            return kernel(q_rxtxDh, k_TxDh, v_TxDh, segment_ids=splash.SegmentIds(q=seg_t, kv=seg_T))

        return jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None, None)))

    branches = [branch(d) for d in range(C)]

    def run(d, *operands):  # the device's kernel: its mask is static, so one branch per device index
        return jax.lax.switch(d, branches, *operands)

    if jnp.dtype(q_bxtxhxDh.dtype).itemsize == 2:
        run = splash_lib._default_precision(run)
    out_bxgxrxtxDh = run(jax.lax.axis_index(AXIS), q_bxgxrxtxDh, k_bxgxTxDh, v_bxgxTxDh, tokens["seg"], seg_bxT)
    return out_bxgxrxtxDh.transpose(0, 3, 1, 2, 4).reshape(b, t, h, Dh).astype(q_bxtxhxDh.dtype)


def attend_context(q_BxTxHxDh: jax.Array, k_BxTxGxDh: jax.Array, v_BxTxGxDh: jax.Array, segment_ids_BxT: jax.Array,
                   *, sharder: Sharder, implementation: str, scale: float, softcap: float | None = None,
                   window: jax.Array | None = None, positions_BxT: jax.Array | None = None,
                   branch_ids_BxT: jax.Array | None = None, sinks_H: jax.Array | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """Attention over rows in zig-zag order split over `context` (module docstring): [B, T, H, Dh] in q's dtype.
    `positions_BxT`: packed rows (windows count positions); `branch_ids_BxT`: shared-prompt branches (xla only)."""
    B, T, H, _ = q_BxTxHxDh.shape
    G = k_BxTxGxDh.shape[2]
    C = sharder.context
    rows = sharder.spec(("batch",), (B,))[0]
    heads = sharder.spec(("heads",), (H,))[0]
    kv_heads = sharder.spec(("kv_heads",), (G,))[0] if heads is not None else None
    q_spec, kv_spec, tok_spec = P(rows, AXIS, heads, None), P(rows, AXIS, kv_heads, None), P(rows, AXIS)
    tokens = {"seg": segment_ids_BxT}
    if positions_BxT is not None and window is not None:
        tokens["pos"] = positions_BxT
    if branch_ids_BxT is not None:
        tokens["branch"] = branch_ids_BxT
    extras, extra_specs = {}, {}
    if window is not None:
        extras["window"], extra_specs["window"] = jnp.asarray(window, jnp.int32), P()
    if sinks_H is not None:
        extras["sinks"], extra_specs["sinks"] = sinks_H, P(heads)
    kw = dict(C=C, scale=scale, softcap=softcap, group=H // G, head_axis=heads, kv_replicated=kv_heads is None)
    if implementation == "splash":
        if interpret is None:
            interpret = sharder.mesh.devices.flat[0].platform != "tpu"
        local = functools.partial(_local_splash, interpret=interpret, **kw)
    else:
        local = functools.partial(_local_xla, **kw)
    token_specs = {name: tok_spec for name in tokens}
    return jax.shard_map(local, mesh=sharder.mesh, in_specs=(q_spec, kv_spec, kv_spec, token_specs, extra_specs),
                         out_specs=q_spec, check_vma=False)(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, tokens, extras)
