"""Per-token and per-sequence log-probabilities from final hidden states, never building [B, T, V] logits.

The LM head runs over sequence chunks of `chunk_len` positions: each chunk's logits `[B, C, V]` are built,
folded into a few `[B, C]` statistics (log-prob of the next token, logsumexp, mean logit, ...) and dropped.
The backward pass (a `custom_vjp`) recomputes each chunk's logits from the saved hidden states and the saved
logsumexp, casts the logits' gradient to the compute dtype and accumulates the unembedding gradient in fp32
across chunks (like TRL's fused LM head), so head memory does not grow with T*V. With `vocab_tile` = W, each
chunk's logits are also built W vocabulary entries at a time (`[B, C, W]`), folded with an online logsumexp into
running sums (max, sum of exp, of exp^2 for WPO, of exp * logit for the entropy, first argmax) and recomputed tile
by tile in the backward pass, so head memory does not grow with V either.

Only the positions whose statistics are used need logits (DPO scores completion tokens, not the prompt): given
`needed_BxT`, each row's needed positions are moved to the front (a stable per-row permutation, so the batch
sharding is untouched), and chunks past the longest row's count are skipped by `lax.cond` in both passes. With
prompts about as long as completions this halves the head's FLOPs, which dominate at large vocabularies.

Everything here returns sums and counts, never means: the trainer divides once, after accumulation.

Glossary: `dpojax.glossary` (B = N * K rows laid out prompt by prompt: c0, r0, c1, r1, ... for pairs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import einops
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from dpojax.losses.core import best_and_worst  # the one definition of "worst real response"

Array = jax.Array


@flax.struct.dataclass
class TokenStats:
    """Per-position statistics of the next-token distribution; position t scores token t+1 (last position: 0)."""

    logps_BxT: Array  # fp32 log p(ids[t+1] | ids[:t+1]); the only differentiable field
    mean_logit_BxT: Array | None = None  # fp32 mean over V of the (scaled, soft-capped) logits (TRL `mean_logits`)
    log_sum_sq_probs_BxT: Array | None = None  # fp32 log sum_v p_v^2 = logsumexp(2 log p) (WPO)
    entropy_BxT: Array | None = None  # fp32 entropy of the next-token distribution
    is_top1_BxT: Array | None = None  # bool: the next token is the (first) argmax of the logits


@flax.struct.dataclass
class SeqStats:
    """Per-row sums and counts over the scored completion tokens (completion_mask shifted left by one)."""

    logps_B: Array  # sum of log-probs over scored completion tokens (differentiable)
    tokens_B: Array  # number of scored completion tokens: sum(completion_mask[:, 1:])
    completion_len_B: Array  # sum(completion_mask) before the shift (TRL's IPO / sigmoid_norm normaliser)
    ld_logps_B: Array | None = None  # LD-DPO: shared-length part + ld_alpha * tail (rows paired c, r, c, r, ...)
    mean_logit_sum_B: Array | None = None  # sum of mean_logit over scored tokens (TRL `logits/*`)
    wpo_sum_B: Array | None = None  # sum of (logp - log_sum_sq_probs), no gradient (WPO weights)
    entropy_sum_B: Array | None = None  # sum of entropy over scored tokens (TRL `entropy`)
    top1_sum_B: Array | None = None  # number of scored tokens that are the argmax (TRL `mean_token_accuracy`)
    lm_logps_B: Array | None = None  # sum of log-probs over `lm_mask[:, 1:]` (e.g. ORPO's prompt+response NLL)
    lm_tokens_B: Array | None = None  # number of tokens in `lm_mask[:, 1:]`


class _HeadSpec(NamedTuple):
    """Static settings of the chunked head (hashable: a custom_vjp non-differentiable argument)."""

    chunk_len: int
    softcap: float | None
    logit_scale: float
    outputs: tuple[str, ...]  # among "mean_logit", "log_sum_sq_probs", "entropy", "is_top1"
    vocab_tile: int | None = None  # W; None: one tile of the whole vocabulary


def _to_chunks(x_BxT, chunk_len: int):
    """[B, T, ...] -> [U = T/C, B, C, ...] (T must be a multiple of C)."""
    return einops.rearrange(x_BxT, "b (u c) ... -> u b c ...", c=chunk_len)


def _from_chunks(x_UxBxC):
    """[U, B, C, ...] -> [B, T = U*C, ...]."""
    return einops.rearrange(x_UxBxC, "u b c ... -> b (u c) ...")


class _Tiling(NamedTuple):
    """The vocabulary cut into `count` tiles of `width` (W) ids, tile j reading rows [start(j), start(j) + W) of the
    unembedding in place. When W does not divide V the last tile starts at V - W and its ids below j * W (already
    in tile j - 1) are masked: -inf logits, no gradient."""

    width: int
    count: int
    vocab: int

    @staticmethod
    def of(vocab: int, tile: int | None) -> "_Tiling":
        width = min(tile or vocab, vocab)
        return _Tiling(width, -(-vocab // width), vocab)

    @property
    def overlaps(self) -> bool:
        return self.vocab % self.width != 0

    def start(self, j):
        return jnp.minimum(j * self.width, self.vocab - self.width) if self.overlaps else j * self.width

    def rows(self, x_VxD, j):
        """Tile j's rows [W, D] of a [V, D] array."""
        return lax.dynamic_slice_in_dim(x_VxD, self.start(j), self.width, axis=0)

    def ids(self, j, dtype):
        """[W] vocabulary ids of tile j's rows."""
        return self.start(j) + lax.broadcasted_iota(dtype, (self.width,), 0)

    def mask(self, ids_W, j):
        """[W] bool: the ids tile j owns (None: all of them)."""
        return ids_W >= j * self.width if self.overlaps else None

    def locate(self, ids, j):
        """(ids owned by tile j, their position in the tile)."""
        return ids // self.width == j, jnp.clip(ids - self.start(j), 0, self.width - 1)


def _tile_logits(h_BxCxD, unembed_VxD, j, tiling: _Tiling, spec: _HeadSpec):
    """fp32 logits of tile j (matmul in the hidden's dtype) and tanh(.) of the soft-cap (None without)."""
    w_WxD = tiling.rows(unembed_VxD, j).astype(h_BxCxD.dtype)
    z_BxCxW = lax.dot_general(h_BxCxD, w_WxD, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if spec.logit_scale != 1.0:
        z_BxCxW = z_BxCxW * spec.logit_scale
    if spec.softcap is None:
        return z_BxCxW, None
    tanh_BxCxW = jnp.tanh(z_BxCxW / spec.softcap)
    return spec.softcap * tanh_BxCxW, tanh_BxCxW


def _tile_partials(h_BxCxD, unembed_VxD, targets_BxC, j, tiling: _Tiling, spec: _HeadSpec) -> dict[str, Array]:
    """One tile's [B, C] partial sums, relative to the tile's own max (merged across tiles by `_merge`)."""
    z_BxCxW, _ = _tile_logits(h_BxCxD, unembed_VxD, j, tiling, spec)
    ids_W = tiling.ids(j, targets_BxC.dtype)
    valid_W = tiling.mask(ids_W, j)
    masked = lambda x, fill: x if valid_W is None else jnp.where(valid_W, x, jnp.asarray(fill, x.dtype))
    zv_BxCxW = masked(z_BxCxW, -jnp.inf)
    max_BxC = lax.stop_gradient(jnp.max(zv_BxCxW, axis=-1))
    shifted_BxCxW = zv_BxCxW - max_BxC[..., None]
    e_BxCxW = jnp.exp(shifted_BxCxW)
    here_BxC, pos_BxC = tiling.locate(targets_BxC, j)
    target_BxC = jnp.take_along_axis(z_BxCxW, pos_BxC[..., None], axis=-1)[..., 0]
    out = {"max": max_BxC, "sum_exp": jnp.sum(e_BxCxW, axis=-1), "target": jnp.where(here_BxC, target_BxC, 0.0)}
    if "mean_logit" in spec.outputs:
        out["sum_logit"] = jnp.sum(masked(z_BxCxW, 0.0), axis=-1)
    if "log_sum_sq_probs" in spec.outputs:
        out["sum_sq_exp"] = jnp.sum(e_BxCxW * e_BxCxW, axis=-1)
    if "entropy" in spec.outputs:
        out["sum_exp_shifted"] = jnp.sum(masked(e_BxCxW * shifted_BxCxW, 0.0), axis=-1)
    if "is_top1" in spec.outputs:
        out["argmax"] = ids_W[jnp.argmax(zv_BxCxW, axis=-1)]
    return out


def _merge(a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
    """Online logsumexp: partial sums of two disjoint vocabulary parts, rescaled to their common max."""
    max_BxC = jnp.maximum(a["max"], b["max"])
    ra_BxC, rb_BxC = jnp.exp(a["max"] - max_BxC), jnp.exp(b["max"] - max_BxC)
    out = {"max": max_BxC, "sum_exp": a["sum_exp"] * ra_BxC + b["sum_exp"] * rb_BxC,
           "target": a["target"] + b["target"]}
    if "sum_logit" in a:
        out["sum_logit"] = a["sum_logit"] + b["sum_logit"]
    if "sum_sq_exp" in a:
        out["sum_sq_exp"] = a["sum_sq_exp"] * (ra_BxC * ra_BxC) + b["sum_sq_exp"] * (rb_BxC * rb_BxC)
    if "sum_exp_shifted" in a:  # sum e^(z-m)(z-m) moved to the new max m': r * (a + (m - m') * sum e^(z-m))
        out["sum_exp_shifted"] = (ra_BxC * (a["sum_exp_shifted"] + (a["max"] - max_BxC) * a["sum_exp"])
                                  + rb_BxC * (b["sum_exp_shifted"] + (b["max"] - max_BxC) * b["sum_exp"]))
    if "argmax" in a:  # b's ids are all larger: it wins only with a larger max (the first argmax, as jnp.argmax)
        out["argmax"] = jnp.where(b["max"] > a["max"], b["argmax"], a["argmax"])
    return out


def _chunk_stats(h_BxCxD, unembed_VxD, targets_BxC, tiling: _Tiling, spec: _HeadSpec) -> dict[str, Array]:
    """Fold one chunk's logits, tile by tile, into [B, C] statistics; `lse` is kept for the backward pass."""
    part = functools.partial(_tile_partials, h_BxCxD, unembed_VxD, targets_BxC, tiling=tiling, spec=spec)
    acc = part(j=0)
    if tiling.count > 1:
        acc = lax.fori_loop(1, tiling.count, lambda j, acc: _merge(acc, part(j=j)), acc)
    log_sum_exp_BxC = jnp.log(acc["sum_exp"])
    lse_BxC = acc["max"] + log_sum_exp_BxC
    out = {"logps": acc["target"] - lse_BxC, "lse": lse_BxC}
    if "mean_logit" in spec.outputs:
        out["mean_logit"] = acc["sum_logit"] / tiling.vocab
    if "log_sum_sq_probs" in spec.outputs:
        out["log_sum_sq_probs"] = jnp.log(acc["sum_sq_exp"]) - 2.0 * log_sum_exp_BxC
    if "entropy" in spec.outputs:
        out["entropy"] = log_sum_exp_BxC - acc["sum_exp_shifted"] / acc["sum_exp"]
    if "is_top1" in spec.outputs:
        out["is_top1"] = acc["argmax"] == targets_BxC
    return out


def _live(chunk_index, n_live, spec: _HeadSpec, compute, skipped):
    """`compute()` for a chunk that holds needed positions, else `skipped()` (no work); n_live None: all live."""
    if n_live is None:
        return compute()
    return lax.cond(chunk_index * spec.chunk_len < n_live, compute, skipped)


def _head_forward(hidden_BxTxD, unembed_VxD, targets_BxT, n_live, spec: _HeadSpec):
    tiling = _Tiling.of(unembed_VxD.shape[0], spec.vocab_tile)

    def body(_, xs):
        k, h_BxCxD, t_BxC = xs
        compute = functools.partial(_chunk_stats, h_BxCxD, unembed_VxD, t_BxC, tiling, spec)

        def zeros():
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))

        return None, _live(k, n_live, spec, compute, zeros)

    chunks = hidden_BxTxD.shape[1] // spec.chunk_len
    xs = (jnp.arange(chunks), _to_chunks(hidden_BxTxD, spec.chunk_len), _to_chunks(targets_BxT, spec.chunk_len))
    _, stats = lax.scan(body, None, xs)
    return {k: _from_chunks(v) for k, v in stats.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head(hidden_BxTxD, unembed_VxD, targets_BxT, n_live, spec: _HeadSpec):
    """Chunked, vocabulary-tiled LM head: dict of [B, T] statistics; only `logps` carries a gradient. Chunks
    starting at or past `n_live` (int32 scalar, or None for all) are not computed and read 0."""
    return _head_forward(hidden_BxTxD, unembed_VxD, targets_BxT, n_live, spec)


def _head_fwd(hidden_BxTxD, unembed_VxD, targets_BxT, n_live, spec: _HeadSpec):
    stats = _head_forward(hidden_BxTxD, unembed_VxD, targets_BxT, n_live, spec)
    return stats, (hidden_BxTxD, unembed_VxD, targets_BxT, n_live, stats["lse"])


def _tile_grads(h_BxCxD, unembed_VxD, t_BxC, lse_BxC, g_BxC, j, tiling: _Tiling, spec: _HeadSpec):
    """Tile j's share of dh [B, C, D] and its dW rows [W, D] (both fp32); d logp / dz = onehot(target) - softmax(z),
    through scale and soft-cap; ids the tile does not own get no gradient."""
    z_BxCxW, tanh_BxCxW = _tile_logits(h_BxCxD, unembed_VxD, j, tiling, spec)
    p_BxCxW = jnp.exp(z_BxCxW - lse_BxC[..., None])
    ids_W = tiling.ids(j, t_BxC.dtype)
    dz_BxCxW = g_BxC[..., None] * ((ids_W == t_BxC[..., None]).astype(jnp.float32) - p_BxCxW)
    if tanh_BxCxW is not None:
        dz_BxCxW = dz_BxCxW * (1.0 - tanh_BxCxW * tanh_BxCxW)
    if spec.logit_scale != 1.0:
        dz_BxCxW = dz_BxCxW * spec.logit_scale
    if tiling.overlaps:
        dz_BxCxW = jnp.where(tiling.mask(ids_W, j), dz_BxCxW, 0.0)
    dz_BxCxW = dz_BxCxW.astype(h_BxCxD.dtype)
    w_WxD = tiling.rows(unembed_VxD, j).astype(h_BxCxD.dtype)
    dh_BxCxD = lax.dot_general(dz_BxCxW, w_WxD, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dw_WxD = lax.dot_general(dz_BxCxW, h_BxCxD, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
    return dh_BxCxD, dw_WxD


def _add_tile(dw_VxD, dw_WxD, j, tiling: _Tiling):
    """dW[tile j's rows] += the tile's gradient (0 on the rows it does not own)."""
    return lax.dynamic_update_slice_in_dim(dw_VxD, tiling.rows(dw_VxD, j) + dw_WxD, tiling.start(j), axis=0)


def _head_bwd(spec: _HeadSpec, residuals, cotangents):
    """Recompute each chunk's logits tile by tile: dh sums over tiles, dW is written tile by tile (fp32)."""
    hidden_BxTxD, unembed_VxD, targets_BxT, n_live, lse_BxT = residuals
    g_BxT = cotangents["logps"]
    tiling = _Tiling.of(unembed_VxD.shape[0], spec.vocab_tile)

    def chunk_grads(dw_VxD, h_BxCxD, t_BxC, lse_BxC, g_BxC):
        grads = functools.partial(_tile_grads, h_BxCxD, unembed_VxD, t_BxC, lse_BxC, g_BxC, tiling=tiling, spec=spec)
        dh_BxCxD, dw_WxD = grads(j=0)
        dw_VxD = _add_tile(dw_VxD, dw_WxD, 0, tiling)

        def tile(j, carry):
            dw_VxD, dh_BxCxD = carry
            dh_part_BxCxD, dw_WxD = grads(j=j)
            return _add_tile(dw_VxD, dw_WxD, j, tiling), dh_BxCxD + dh_part_BxCxD

        if tiling.count > 1:
            dw_VxD, dh_BxCxD = lax.fori_loop(1, tiling.count, tile, (dw_VxD, dh_BxCxD))
        return dw_VxD, dh_BxCxD.astype(hidden_BxTxD.dtype)

    def body(dw_VxD, xs):
        k, h_BxCxD = xs[:2]
        compute = functools.partial(chunk_grads, dw_VxD, *xs[1:])

        def skipped():
            return dw_VxD, jnp.zeros(h_BxCxD.shape, hidden_BxTxD.dtype)

        return _live(k, n_live, spec, compute, skipped)

    chunks = hidden_BxTxD.shape[1] // spec.chunk_len
    xs = (jnp.arange(chunks),) + tuple(_to_chunks(x, spec.chunk_len)
                                       for x in (hidden_BxTxD, targets_BxT, lse_BxT, g_BxT))
    dw_VxD, dh_chunks = lax.scan(body, jnp.zeros(unembed_VxD.shape, jnp.float32), xs)
    return _from_chunks(dh_chunks), dw_VxD.astype(unembed_VxD.dtype), None, None


_head.defvjp(_head_fwd, _head_bwd)


def _head_spec(unembed_VxD, t: int, *, chunk_len: int, softcap, logit_scale, vocab_tile, with_mean_logit, with_wpo,
               with_entropy, with_top1) -> _HeadSpec:
    if vocab_tile is not None and vocab_tile < 1:
        raise ValueError(f"vocab_tile = {vocab_tile} must be a positive number of vocabulary entries (or None).")
    outputs = tuple(
        name
        for name, wanted in (
            ("mean_logit", with_mean_logit),
            ("log_sum_sq_probs", with_wpo),
            ("entropy", with_entropy),
            ("is_top1", with_top1),
        )
        if wanted
    )
    tile = None if vocab_tile is None or vocab_tile >= unembed_VxD.shape[0] else int(vocab_tile)
    return _HeadSpec(max(1, min(chunk_len, t)), None if softcap is None else float(softcap), float(logit_scale),
                     outputs, tile)


def token_logprobs(
    hidden_BxTxD: Array,
    unembed_VxD: Array,
    input_ids_BxT: Array,
    *,
    chunk_len: int = 256,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    with_mean_logit: bool = True,
    with_wpo: bool = False,
    with_entropy: bool = False,
    with_top1: bool = False,
    needed_BxT: Array | None = None,
    vocab_tile: int | None = None,
) -> TokenStats:
    """Next-token log-probs of `input_ids` under logits `softcap*tanh(logit_scale * hidden @ unembed.T / softcap)`.

    Position t scores token t+1; the last position scores nothing and is 0 in every field. The matmul runs in
    the hidden's dtype with fp32 accumulation; logsumexp and all statistics are fp32. Only `logps_BxT` is
    differentiable (w.r.t. hidden and unembed); the other fields are metrics and carry no gradient.
    T need not be a multiple of `chunk_len` (padded internally). Peak head memory is about
    B * chunk_len * W * 10 bytes plus an fp32 [V, D] gradient accumulator, where W = `vocab_tile` (None: W = V, one
    tile). With W < V each chunk's logits are built W vocabulary entries at a time and folded with an online
    logsumexp in both passes (V need not be a multiple of W); the results equal the one-tile head up to fp32
    rounding. Tiles read the unembedding in place (no padded copy).

    `needed_BxT` (bool): the positions whose statistics the caller uses; every other position reads 0 (and
    passes no gradient), and chunks made only of unneeded positions are never computed (module docstring).
    """
    b, t, _ = hidden_BxTxD.shape
    spec = _head_spec(unembed_VxD, t, chunk_len=chunk_len, softcap=softcap, logit_scale=logit_scale,
                      vocab_tile=vocab_tile, with_mean_logit=with_mean_logit, with_wpo=with_wpo,
                      with_entropy=with_entropy, with_top1=with_top1)
    chunk = spec.chunk_len
    ids_BxT = input_ids_BxT.astype(jnp.int32)
    targets_BxT = jnp.concatenate([ids_BxT[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    scored_BxT = jnp.broadcast_to(jnp.arange(t) < t - 1, (b, t))
    n_live = None
    if needed_BxT is not None:  # needed positions first in each row, in order; chunks past the longest skipped
        scored_BxT = scored_BxT & needed_BxT.astype(bool)
        order_BxT = jnp.argsort(~scored_BxT, axis=1, stable=True)
        hidden_BxTxD = jnp.take_along_axis(hidden_BxTxD, order_BxT[..., None], axis=1)
        targets_BxT = jnp.take_along_axis(targets_BxT, order_BxT, axis=1)
        n_live = jnp.max(jnp.sum(scored_BxT, axis=1, dtype=jnp.int32))
    pad = -t % chunk
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    stats = _head(hidden_BxTxD, unembed_VxD, targets_BxT, n_live, spec)
    if needed_BxT is not None:  # back to the original positions
        inverse_BxT = jnp.argsort(order_BxT, axis=1)
        stats = {k: jnp.take_along_axis(v[:, :t], inverse_BxT, axis=1) for k, v in stats.items()}
    return _token_stats(stats, scored_BxT)


def _token_stats(stats: dict[str, Array], keep_BxT: Array) -> TokenStats:
    """The head's [B, >= T] statistics cut to T = keep's length, 0 where `keep` is False; only logps keeps a
    gradient."""
    t = keep_BxT.shape[1]

    def clean(name):
        if name not in stats:
            return None
        x_BxT = stats[name][:, :t]
        x_BxT = x_BxT if name == "logps" else lax.stop_gradient(x_BxT)
        return jnp.where(keep_BxT, x_BxT, jnp.zeros((), x_BxT.dtype))

    return TokenStats(
        logps_BxT=clean("logps"),
        mean_logit_BxT=clean("mean_logit"),
        log_sum_sq_probs_BxT=clean("log_sum_sq_probs"),
        entropy_BxT=clean("entropy"),
        is_top1_BxT=clean("is_top1"),
    )


def entry_logprobs(
    hidden_PxJxD: Array,
    unembed_VxD: Array,
    src_PxI: Array,
    targets_PxI: Array,
    valid_PxI: Array,
    *,
    chunk_len: int = 256,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    with_mean_logit: bool = True,
    with_wpo: bool = False,
    with_entropy: bool = False,
    with_top1: bool = False,
    vocab_tile: int | None = None,
) -> TokenStats:
    """`token_logprobs` for packed rows (`dpojax.data.packing`): entry e of a row scores `targets_PxI[e]` from the
    hidden state at `src_PxI[e]` (TokenStats fields are [P, I], 0 where `valid_PxI` is 0). Valid entries come
    first in each row, so chunks past the longest row's count are skipped, as with `needed_BxT`."""
    spec = _head_spec(unembed_VxD, src_PxI.shape[1], chunk_len=chunk_len, softcap=softcap, logit_scale=logit_scale,
                      vocab_tile=vocab_tile, with_mean_logit=with_mean_logit, with_wpo=with_wpo,
                      with_entropy=with_entropy, with_top1=with_top1)
    e = src_PxI.shape[1]
    valid_PxI = valid_PxI.astype(bool)
    hidden_PxIxD = jnp.take_along_axis(hidden_PxJxD, src_PxI.astype(jnp.int32)[..., None], axis=1)
    targets_PxI = targets_PxI.astype(jnp.int32)
    n_live = jnp.max(jnp.sum(valid_PxI, axis=1, dtype=jnp.int32))
    pad = -e % spec.chunk_len
    if pad:
        hidden_PxIxD = jnp.pad(hidden_PxIxD, ((0, 0), (0, pad), (0, 0)))
        targets_PxI = jnp.pad(targets_PxI, ((0, 0), (0, pad)))
    return _token_stats(_head(hidden_PxIxD, unembed_VxD, targets_PxI, n_live, spec), valid_PxI)


def head_chunk(t: int, cap: int = 256) -> int:
    """The head's chunk length for rows of `t` positions: about t/4 (at least 16, at most `cap`), so that with the
    needed positions moved to the front the chunks past the longest row's scored positions are skipped. At t = 64
    (short chat pairs, whose responses are a fraction of the row) one chunk of 16 is computed instead of all 64
    positions, which shortens a small model's step on CPU markedly."""
    return max(1, min(cap, t, max(16, t // 4)))


def scored_mask(mask_BxT: Array) -> Array:
    """fp32 mask of the scored positions: position t counts when token t+1 is in `mask` (TRL's mask[:, 1:])."""
    m_BxT = mask_BxT.astype(jnp.float32)
    return jnp.concatenate([m_BxT[:, 1:], jnp.zeros_like(m_BxT[:, :1])], axis=1)


def ld_weighted_logps(logps_NxKxT: Array, scored_NxKxT: Array, ld_alpha: float) -> Array:
    """LD-DPO length desensitisation (Liu et al. 2024, arXiv:2409.06411, Eq. 9) for [N, K, T] (a pair: K = 2).

    With l = the shortest response length of the prompt's responses (a pair's shared length), each response's
    log-prob becomes sum_{k <= l} log p(y_k) + ld_alpha * sum_{k > l} log p(y_k), counting response tokens in order
    (`scored_NxKxT` is the already-shifted completion mask). Returns [N, K].
    """
    m_NxKxT = scored_NxKxT.astype(jnp.float32)
    pos_NxKxT = jnp.cumsum(m_NxKxT, axis=-1)
    shared_N = jnp.min(jnp.sum(m_NxKxT, axis=-1), axis=1)
    in_shared_NxKxT = (pos_NxKxT <= shared_N[:, None, None]).astype(jnp.float32)
    shared_NxK = jnp.sum(logps_NxKxT * m_NxKxT * in_shared_NxKxT, axis=-1)
    tail_NxK = jnp.sum(logps_NxKxT * m_NxKxT * (1.0 - in_shared_NxKxT), axis=-1)
    return shared_NxK + ld_alpha * tail_NxK


def sequence_stats(
    tok: TokenStats,
    completion_mask_BxT: Array,
    *,
    ld_alpha: float | None = None,
    lm_mask_BxT: Array | None = None,
    num_responses: int = 2,
) -> SeqStats:
    """Per-row sums over the completion tokens, the completion mask applied to the *predicted* token.

    `ld_alpha` (LD-DPO) needs each row's siblings: rows laid out prompt by prompt, `num_responses` (K) per prompt.
    `lm_mask_BxT` (e.g. the attention mask) adds a second log-prob sum over another token set, for losses whose
    NLL term covers prompt and response (TRL's ORPOTrainer).
    """
    m_BxT = scored_mask(completion_mask_BxT)
    logps_BxT = tok.logps_BxT

    def masked_sum(x_BxT):
        return None if x_BxT is None else jnp.sum(lax.stop_gradient(x_BxT).astype(jnp.float32) * m_BxT, axis=1)

    ld_logps_B = None
    if ld_alpha is not None:
        b, t = logps_BxT.shape
        k = num_responses
        ld_logps_B = ld_weighted_logps(logps_BxT.reshape(b // k, k, t), m_BxT.reshape(b // k, k, t), ld_alpha)
        ld_logps_B = ld_logps_B.reshape(b)
    wpo_sum_B = None
    if tok.log_sum_sq_probs_BxT is not None:
        wpo_sum_B = masked_sum(logps_BxT - tok.log_sum_sq_probs_BxT)
    lm_logps_B = lm_tokens_B = None
    if lm_mask_BxT is not None:
        lm_BxT = scored_mask(lm_mask_BxT)
        lm_logps_B = jnp.sum(logps_BxT * lm_BxT, axis=1)
        lm_tokens_B = jnp.sum(lm_BxT, axis=1)
    return SeqStats(
        logps_B=jnp.sum(logps_BxT * m_BxT, axis=1),
        tokens_B=jnp.sum(m_BxT, axis=1),
        completion_len_B=jnp.sum(completion_mask_BxT.astype(jnp.float32), axis=1),
        ld_logps_B=ld_logps_B,
        mean_logit_sum_B=masked_sum(tok.mean_logit_BxT),
        wpo_sum_B=wpo_sum_B,
        entropy_sum_B=masked_sum(tok.entropy_BxT),
        top1_sum_B=masked_sum(tok.is_top1_BxT),
        lm_logps_B=lm_logps_B,
        lm_tokens_B=lm_tokens_B,
    )


def entry_sequence_stats(
    tok: TokenStats,
    owner_PxI: Array,
    completion_PxI: Array,
    completion_len_NxK: Array,
    response_mask_NxK: Array,
    *,
    ld_shared_PxI: Array | None = None,
    ld_alpha: float | None = None,
    lm_PxI: Array | None = None,
) -> SeqStats:
    """`sequence_stats` of packed rows: entries summed into their owner slots n * (K + 1) + k (k = K: the shared
    prompt), giving the same B = N * K rows, prompt by prompt, as the [N, K, T] batch. ORPO's prompt+response NLL
    (`lm_PxI`) adds the shared prompt's sum to each real response of its prompt, as each unpacked sequence holds it."""
    n, k = response_mask_NxK.shape
    slots = n * (k + 1)
    owner_PI = owner_PxI.reshape(-1)
    comp_PxI = completion_PxI.astype(jnp.float32)

    def per_response(x_PxI, gradient=False):
        """[N, K + 1] sums of x over the entries of each slot (column K: the shared prompt)."""
        x_PxI = x_PxI if gradient else lax.stop_gradient(x_PxI)
        return jax.ops.segment_sum(x_PxI.astype(jnp.float32).reshape(-1), owner_PI, slots).reshape(n, k + 1)

    def masked(x_PxI):
        return None if x_PxI is None else per_response(x_PxI * comp_PxI)[:, :k].reshape(-1)

    ld_logps_B = None
    if ld_alpha is not None:
        shared_PxI = ld_shared_PxI.astype(jnp.float32)
        weight_PxI = comp_PxI * (shared_PxI + ld_alpha * (1.0 - shared_PxI))
        ld_logps_B = per_response(tok.logps_BxT * weight_PxI, gradient=True)[:, :k].reshape(-1)
    wpo_sum_B = None
    if tok.log_sum_sq_probs_BxT is not None:
        wpo_sum_B = masked(tok.logps_BxT - tok.log_sum_sq_probs_BxT)
    lm_logps_B = lm_tokens_B = None
    if lm_PxI is not None:
        lm_PxI = lm_PxI.astype(jnp.float32)
        real_NxK = response_mask_NxK.astype(jnp.float32)

        def with_prompt(sums_NxO):
            return (sums_NxO[:, :k] + sums_NxO[:, k:] * real_NxK).reshape(-1)

        lm_logps_B = with_prompt(per_response(tok.logps_BxT * lm_PxI, gradient=True))
        lm_tokens_B = with_prompt(per_response(lm_PxI))
    return SeqStats(
        logps_B=per_response(tok.logps_BxT * comp_PxI, gradient=True)[:, :k].reshape(-1),
        tokens_B=per_response(comp_PxI)[:, :k].reshape(-1),
        completion_len_B=completion_len_NxK.astype(jnp.float32).reshape(-1),
        ld_logps_B=ld_logps_B,
        mean_logit_sum_B=masked(tok.mean_logit_BxT),
        wpo_sum_B=wpo_sum_B,
        entropy_sum_B=masked(tok.entropy_BxT),
        top1_sum_B=masked(tok.is_top1_BxT),
        lm_logps_B=lm_logps_B,
        lm_tokens_B=lm_tokens_B,
    )


def token_metric_sums(stats: SeqStats, *, num_responses: int = 2, response_mask_NxK: Array | None = None,
                      prompt_mask_N: Array | None = None) -> dict[str, tuple[Array, Array]]:
    """TRL's token-level metrics as (sum, count) over rows laid out prompt by prompt, K = `num_responses` each.

    `logits/chosen|rejected`: mean logit over the scored tokens of the best / the worst real response; `entropy`:
    over every real response's tokens; `mean_token_accuracy`: share of the best response's tokens that are the
    argmax. Filler prompts and padding responses count nothing. Value = sum / count.
    """
    k = num_responses
    tokens_NxK = stats.tokens_B.reshape(-1, k)
    n = tokens_NxK.shape[0]
    real_NxK = jnp.ones((n, k), jnp.float32) if response_mask_NxK is None else response_mask_NxK.astype(jnp.float32)
    if prompt_mask_N is not None:
        real_NxK = real_NxK * prompt_mask_N.astype(jnp.float32)[:, None]

    def best_worst(x_B):
        best_N, worst_N = best_and_worst(x_B.reshape(n, k) * real_NxK, real_NxK)
        return best_N, worst_N

    tok_w, tok_l = best_worst(stats.tokens_B)
    out: dict[str, tuple[Array, Array]] = {}
    if stats.mean_logit_sum_B is not None:
        logit_w, logit_l = best_worst(stats.mean_logit_sum_B)
        out["logits/chosen"] = (jnp.sum(logit_w), jnp.sum(tok_w))
        out["logits/rejected"] = (jnp.sum(logit_l), jnp.sum(tok_l))
    if stats.entropy_sum_B is not None:
        out["entropy"] = (jnp.sum(stats.entropy_sum_B.reshape(n, k) * real_NxK), jnp.sum(tokens_NxK * real_NxK))
    if stats.top1_sum_B is not None:
        out["mean_token_accuracy"] = (jnp.sum(best_worst(stats.top1_sum_B)[0]), jnp.sum(tok_w))
    return out
