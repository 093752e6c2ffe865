"""Chunked log-probs equal a naive full-logits computation (values and gradients), TRL's fused LM head, and
never need [B, T, V] logits in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax.logprobs import (
    TokenStats,
    ld_weighted_logps,
    scored_mask,
    sequence_stats,
    token_logprobs,
    token_metric_sums,
)

B, T, D, V = 4, 13, 16, 37  # T is not a multiple of the chunk lengths below


STATIC = ("chunk_len", "softcap", "logit_scale", "with_wpo", "with_entropy", "with_top1", "vocab_tile")
_token_logprobs = jax.jit(token_logprobs, static_argnames=STATIC)
# XLA's default CPU optimization level, as a run compiles it (conftest lowers it for the tests' compile time): which
# of two equal logits is the maximum is decided in the last bit, where the optimization level can tip it.
_token_logprobs_as_run = jax.jit(token_logprobs, static_argnames=STATIC,
                                 compiler_options={"xla_backend_optimization_level": 3})


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(k[0], (B, T, D), dtype)
    unembed = (0.5 * jax.random.normal(k[1], (V, D))).astype(dtype)
    ids = jax.random.randint(k[2], (B, T), 0, V)
    return hidden, unembed, ids


@jax.jit
def _naive_jit(hidden_BxTxD, unembed_VxD, ids_BxT):
    return _naive(hidden_BxTxD, unembed_VxD, ids_BxT)


def _naive(hidden_BxTxD, unembed_VxD, ids_BxT, softcap=None, logit_scale=1.0):
    """Full [B, T, V] logits: the reference the chunked head must reproduce."""
    z = logit_scale * jnp.einsum("btd,vd->btv", hidden_BxTxD.astype(jnp.float32), unembed_VxD.astype(jnp.float32))
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    logp = jax.nn.log_softmax(z, axis=-1)
    target = jnp.take_along_axis(logp[:, :-1], ids_BxT[:, 1:, None], axis=-1)[..., 0]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)))
    return {
        "logps": pad(target),
        "mean_logit": pad(z.mean(-1)[:, :-1]),
        "log_sum_sq_probs": pad(jax.nn.logsumexp(2 * logp, axis=-1)[:, :-1]),
        "entropy": pad(-(jnp.exp(logp) * logp).sum(-1)[:, :-1]),
        "is_top1": pad(jnp.argmax(z, -1)[:, :-1] == ids_BxT[:, 1:]),
    }


def _all(tok: TokenStats) -> dict:
    return {"logps": tok.logps_BxT, "mean_logit": tok.mean_logit_BxT, "log_sum_sq_probs": tok.log_sum_sq_probs_BxT,
            "entropy": tok.entropy_BxT, "is_top1": tok.is_top1_BxT}


@pytest.mark.parametrize("chunk_len,softcap,logit_scale", [(4, None, 1.0), (5, 3.0, 0.7), (64, 2.5, 1.3)])
def test_values_and_grads_match_full_logits(chunk_len, softcap, logit_scale):
    hidden, unembed, ids = _inputs()
    weights_BxT = jax.random.normal(jax.random.PRNGKey(7), (B, T))  # a non-uniform cotangent
    kw = dict(chunk_len=chunk_len, softcap=softcap, logit_scale=logit_scale)

    def ours(h, w):
        fields = _all(token_logprobs(h, w, ids, with_wpo=True, with_entropy=True, with_top1=True, **kw))
        return jnp.sum(weights_BxT * fields["logps"]), fields

    def naive(h, w):
        fields = _naive(h, w, ids, softcap, logit_scale)
        return jnp.sum(weights_BxT * fields["logps"]), fields

    (_, got), d_got = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(hidden, unembed)
    (_, want), d_want = jax.jit(jax.value_and_grad(naive, (0, 1), has_aux=True))(hidden, unembed)
    for name, value in got.items():
        assert value.shape == (B, T) and value.dtype == want[name].dtype, name
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for g, w in zip(d_got, d_want, strict=True):  # w.r.t. hidden, unembed
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("chunk_len", [2, 5, 64])
def test_needed_positions_only_equal_the_full_head_there_and_skip_the_rest(chunk_len):
    """With `needed_BxT`, needed positions (moved to the front of each row, chunks past the longest row skipped)
    get exactly the full head's values and gradients; the others read 0 and pass no gradient. Row 2 needs
    nothing; the longest row needs 4 of 13 positions, so with chunk 2 most chunks are never computed."""
    hidden, unembed, ids = _inputs(4)
    needed = np.zeros((B, T), bool)
    needed[0, [3, 4, 5, 9]] = True
    needed[1, [0, 11]] = True
    needed[3, [7, 12]] = True  # position T-1 scores nothing and must stay 0
    weights_BxT = jax.random.normal(jax.random.PRNGKey(8), (B, T))
    kw = dict(chunk_len=chunk_len, softcap=2.0, with_wpo=True, with_entropy=True, with_top1=True)

    def ours(h, w):
        fields = _all(token_logprobs(h, w, ids, needed_BxT=jnp.asarray(needed), **kw))
        return jnp.sum(weights_BxT * fields["logps"]), fields

    def naive(h, w):
        fields = _naive(h, w, ids, softcap=2.0)
        keep = jnp.asarray(needed) & (jnp.arange(T) < T - 1)
        fields = {k: jnp.where(keep, v, jnp.zeros((), v.dtype)) for k, v in fields.items()}
        return jnp.sum(weights_BxT * fields["logps"]), fields

    (_, got), d_got = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(hidden, unembed)
    (_, want), d_want = jax.jit(jax.value_and_grad(naive, (0, 1), has_aux=True))(hidden, unembed)
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.count_nonzero(np.asarray(got["logps"])) == 7
    for g, w in zip(d_got, d_want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)
    assert not np.any(np.asarray(d_got[0])[2])  # the row that needs nothing gets no hidden-state gradient


def test_jit_chunk_independent_and_metrics_have_no_gradient():
    hidden, unembed, ids = _inputs(1)
    f = jax.jit(lambda h, w, c: token_logprobs(h, w, ids, chunk_len=c).logps_BxT, static_argnums=2)
    np.testing.assert_allclose(f(hidden, unembed, 3), f(hidden, unembed, T), rtol=1e-6, atol=1e-6)
    g = jax.jit(jax.grad(lambda h: jnp.sum(token_logprobs(h, unembed, ids, with_wpo=True).mean_logit_BxT)))(hidden)
    assert not np.any(np.asarray(g))


def test_bf16_compute_keeps_fp32_statistics_and_param_dtypes():
    hidden, unembed, ids = _inputs(2)
    h16 = hidden.astype(jnp.bfloat16)

    def loss(h, w):
        logps_BxT = token_logprobs(h, w, ids, chunk_len=4).logps_BxT
        return logps_BxT.sum(), logps_BxT

    (_, logps_BxT), (dh, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(h16, unembed)
    assert logps_BxT.dtype == jnp.float32
    ref = _naive_jit(h16, unembed.astype(jnp.bfloat16), ids)["logps"]
    np.testing.assert_allclose(logps_BxT, ref, rtol=2e-2, atol=2e-2)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32  # fp32 params get fp32-accumulated gradients


def test_matches_trl_fused_lm_head():
    """Our per-token fields equal TRL's ChunkedLogProbFunction (its torch path) with soft-cap and logit scale."""
    torch = pytest.importorskip("torch")
    kernels = pytest.importorskip("trl.kernels")
    hidden, unembed, ids = _inputs(3)
    softcap, scale = 4.0, 0.8
    tok = _token_logprobs(hidden, unembed, ids, chunk_len=4, softcap=softcap, logit_scale=scale,
                          with_wpo=True, with_entropy=True, with_top1=True)
    h = torch.tensor(np.asarray(hidden[:, :-1]).reshape(-1, D))
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    theirs = kernels.ChunkedLogProbFunction.apply(
        h, torch.tensor(np.asarray(unembed)), None, torch.tensor(np.asarray(ids[:, 1:]).reshape(-1)),
        1.0, 8, softcap, scale, outputs,
    )
    names = ("logps", "entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
    for name, value in zip(names, theirs, strict=True):
        np.testing.assert_allclose(_all(tok)[name][:, :-1], value.numpy().reshape(B, T - 1), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def _masks(seed=0):
    rng = np.random.default_rng(seed)
    completion, attention = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for row, prompt in enumerate((0, 2, 3, 1)):
        end = prompt + int(rng.integers(2, T - prompt + 1))
        completion[row, prompt:end] = 1
        attention[row, :end] = 1
    return jnp.asarray(completion), jnp.asarray(attention)


def test_sequence_stats_shift_the_completion_mask_like_trl():
    hidden, unembed, ids = _inputs(4)
    completion, attention = _masks()
    tok = _token_logprobs(hidden, unembed, ids, with_wpo=True, with_entropy=True, with_top1=True)
    stats = sequence_stats(tok, completion, lm_mask_BxT=attention)
    ref = {k: np.asarray(v) for k, v in _naive_jit(hidden, unembed, ids).items()}
    m = np.asarray(completion)[:, 1:]  # TRL: shift_completion_mask = completion_mask[..., 1:]
    lm = np.asarray(attention)[:, 1:]
    expect = {
        "logps_B": (ref["logps"][:, :-1] * m).sum(1),
        "tokens_B": m.sum(1),
        "completion_len_B": np.asarray(completion).sum(1),
        "mean_logit_sum_B": (ref["mean_logit"][:, :-1] * m).sum(1),
        "wpo_sum_B": ((ref["logps"] - ref["log_sum_sq_probs"])[:, :-1] * m).sum(1),
        "entropy_sum_B": (ref["entropy"][:, :-1] * m).sum(1),
        "top1_sum_B": (ref["is_top1"][:, :-1] * m).sum(1),
        "lm_logps_B": (ref["logps"][:, :-1] * lm).sum(1),
        "lm_tokens_B": lm.sum(1),
    }
    for name, value in expect.items():
        np.testing.assert_allclose(getattr(stats, name), value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert stats.completion_len_B[0] == stats.tokens_B[0] + 1  # row 0 has no prompt: position 0 is not scored

    metrics = token_metric_sums(stats)
    np.testing.assert_allclose(metrics["logits/chosen"][0], expect["mean_logit_sum_B"][0::2].sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logits/rejected"][1], m[1::2].sum())
    np.testing.assert_allclose(metrics["entropy"][0], expect["entropy_sum_B"].sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["mean_token_accuracy"], (expect["top1_sum_B"][0::2].sum(), m[0::2].sum()))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_alpha_weights_the_tail_beyond_the_shared_length(ld_alpha):
    """LD-DPO: per pair, tokens up to min(|y_w|, |y_l|) count fully, the rest of the longer one by ld_alpha."""
    hidden, unembed, ids = _inputs(4)
    completion, _ = _masks(5)
    tok = _token_logprobs(hidden, unembed, ids, with_wpo=True, with_entropy=True, with_top1=True)
    stats = sequence_stats(tok, completion, ld_alpha=ld_alpha)
    logps, m = np.asarray(tok.logps_BxT), np.asarray(scored_mask(completion))
    expect = []
    for pair in range(B // 2):
        rows = (2 * pair, 2 * pair + 1)
        shared = min(m[r].sum() for r in rows)
        for r in rows:
            vals = logps[r][m[r] > 0]
            expect.append(vals[: int(shared)].sum() + ld_alpha * vals[int(shared) :].sum())
    np.testing.assert_allclose(stats.ld_logps_B, expect, rtol=1e-5, atol=1e-5)
    if ld_alpha == 1.0:
        np.testing.assert_allclose(stats.ld_logps_B, stats.logps_B, rtol=1e-6)
    direct = ld_weighted_logps(tok.logps_BxT.reshape(B // 2, 2, T), m.reshape(B // 2, 2, T), ld_alpha)
    np.testing.assert_allclose(direct.reshape(-1), expect, rtol=1e-5, atol=1e-5)


def test_head_memory_does_not_grow_with_full_logits():
    """Compile (no allocation) value_and_grad at B=8, T=4096, V=128256, D=4096 in bf16; temp memory must be far
    below the 2*B*T*V*4 bytes of fp32 logits for chosen + rejected.
    """
    b, t, v, d = 8, 4096, 128256, 4096

    def loss(hidden, unembed, ids, mask):
        return sequence_stats(token_logprobs(hidden, unembed, ids), mask).logps_B.sum()

    shapes = [jax.ShapeDtypeStruct(s, dt) for s, dt in
              (((b, t, d), jnp.bfloat16), ((v, d), jnp.bfloat16), ((b, t), jnp.int32), ((b, t), jnp.int32))]
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*shapes).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = 2 * b * t * v * 4
    print(f"\nhead temp memory {temp / 2**30:.2f} GiB vs full fp32 logits {full_logits / 2**30:.2f} GiB")
    assert temp < full_logits / 4


# ---- vocabulary tiles: the tiled head equals the one-tile head --------------------------------------------------


def _head_value_and_grads(hidden, unembed, ids, weights_BxT, **kw):
    """Every field of the head and the gradients (w.r.t. hidden, unembed) of a weighted sum of its log-probs."""

    def f(h, w):
        fields = _all(token_logprobs(h, w, ids, with_wpo=True, with_entropy=True, with_top1=True, **kw))
        return jnp.sum(weights_BxT * fields["logps"]), fields

    (_, fields), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(hidden, unembed)
    return fields, grads


def _assert_same_head(got, want):
    (fields, grads), (fields_ref, grads_ref) = got, want
    for name, value in fields.items():
        assert value.shape == (B, T) and value.dtype == fields_ref[name].dtype, name
        if name == "is_top1":
            np.testing.assert_array_equal(value, fields_ref[name], err_msg=name)
        else:
            np.testing.assert_allclose(value, fields_ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for g, w in zip(grads, grads_ref, strict=True):  # w.r.t. hidden, unembed
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab_tile", [1, 4, 10, 36])  # V = 37: none divides it; 10 pads the last tile by 3
@pytest.mark.parametrize("chunk_len,softcap,logit_scale,needed", [
    (4, None, 1.0, False), (5, 3.0, 0.7, False), (2, 2.0, 1.3, True), (64, 2.5, 1.0, True)])
def test_vocab_tiles_equal_one_tile(vocab_tile, chunk_len, softcap, logit_scale, needed):
    """Values of every statistic and gradients w.r.t. hidden and unembed, with soft-cap, logit scale and the
    needed-positions compaction (row 2 needs nothing, so with chunk 2 most chunks are skipped)."""
    hidden, unembed, ids = _inputs(5)
    weights_BxT = jax.random.normal(jax.random.PRNGKey(9), (B, T))
    needed_BxT = None
    if needed:
        mask = np.zeros((B, T), bool)
        mask[0, [1, 2, 3, 8]] = mask[1, [0, 12]] = mask[3, 5:11] = True
        needed_BxT = jnp.asarray(mask)
    kw = dict(chunk_len=chunk_len, softcap=softcap, logit_scale=logit_scale, needed_BxT=needed_BxT)
    want = _head_value_and_grads(hidden, unembed, ids, weights_BxT, **kw)
    _assert_same_head(_head_value_and_grads(hidden, unembed, ids, weights_BxT, vocab_tile=vocab_tile, **kw), want)


def test_one_tile_is_the_untiled_head_bit_for_bit():
    """`vocab_tile` >= V is the untiled head (None): identical numbers, not just close ones."""
    hidden, unembed, ids = _inputs(6)
    weights_BxT = jax.random.normal(jax.random.PRNGKey(10), (B, T))
    want = _head_value_and_grads(hidden, unembed, ids, weights_BxT, chunk_len=4, softcap=3.0)
    for tile in (V, 4 * V):
        got = _head_value_and_grads(hidden, unembed, ids, weights_BxT, chunk_len=4, softcap=3.0, vocab_tile=tile)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("vocab_tile", [3, 8, 10])
def test_vocab_tiles_break_top1_ties_like_argmax(vocab_tile):
    """Equal maxima in different tiles (duplicated unembedding rows 5, 20, 33 and 12, 30; a zero hidden state
    makes every logit 0; a saturated soft-cap makes many logits equal): the first index wins, as with jnp.argmax
    on full logits. W = 8 puts 33 in the overlapping last tile (ids 29..36, owning 32..36)."""
    hidden, unembed, ids = _inputs(7)
    unembed = unembed.at[20].set(unembed[5]).at[33].set(unembed[5]).at[12].set(unembed[30])
    hidden = hidden.at[:, :4].set(4.0 * unembed[5]).at[:, 4:8].set(4.0 * unembed[30]).at[1].set(0.0)
    ids = ids.at[:, 1:5].set(jnp.array([5, 20, 33, 0])).at[:, 5:9].set(jnp.array([12, 30, 5, 12]))
    for softcap in (None, 0.5):
        z_BxTxV = jnp.einsum("btd,vd->btv", hidden, unembed)
        if softcap is not None:
            z_BxTxV = softcap * jnp.tanh(z_BxTxV / softcap)
        first_BxT = np.asarray(jnp.argmax(z_BxTxV, axis=-1))
        assert (z_BxTxV == z_BxTxV.max(-1, keepdims=True)).sum(-1).max() > 1  # the ties are real
        got = _token_logprobs_as_run(hidden, unembed, ids, chunk_len=4, softcap=softcap, with_top1=True,
                                     vocab_tile=vocab_tile).is_top1_BxT
        np.testing.assert_array_equal(got[:, :-1], first_BxT[:, :-1] == np.asarray(ids[:, 1:]))
        np.testing.assert_array_equal(got, _token_logprobs_as_run(hidden, unembed, ids, chunk_len=4, softcap=softcap,
                                                                  with_top1=True).is_top1_BxT)


def test_vocab_tile_must_be_positive():
    hidden, unembed, ids = _inputs()
    with pytest.raises(ValueError, match="vocab_tile"):
        token_logprobs(hidden, unembed, ids, vocab_tile=0)


def _head_temp_bytes(b, t, v, d, chunk_len, vocab_tile, dtype=jnp.float32):
    """Compiled (never allocated) temp bytes of value_and_grad of the head with every statistic on."""

    def loss(hidden, unembed, ids, mask):
        tok = token_logprobs(hidden, unembed, ids, chunk_len=chunk_len, vocab_tile=vocab_tile, with_wpo=True,
                             with_entropy=True, with_top1=True, needed_BxT=mask > 0)
        return sequence_stats(tok, mask).logps_B.sum()

    shapes = [jax.ShapeDtypeStruct(s, dt) for s, dt in
              (((b, t, d), dtype), ((v, d), dtype), ((b, t), jnp.int32), ((b, t), jnp.int32))]
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_tiled_head_memory_does_not_grow_with_the_vocabulary():
    """At fixed B * C and W, going from V = 32k to 128k adds to the tiled head's temp memory at most one [V, D]
    buffer (the fp32 gradient accumulator, where it cannot share the gradient's output), never a [B, C, V] block;
    the untiled head grows by its [B, C, V] fp32 logits."""
    b, t, d, chunk, tile = 8, 1024, 16, 256, 4096
    small, large = 32_000, 128_256  # neither a multiple of W
    grown = {w: _head_temp_bytes(b, t, large, d, chunk, w) - _head_temp_bytes(b, t, small, d, chunk, w)
             for w in (None, tile)}
    per_vd = (large - small) * d * 4  # one fp32 [V, D] buffer's growth
    per_block = b * chunk * (large - small) * 4  # one fp32 [B, C, V] block's growth
    print(f"\ntemp growth 32k -> 128k: untiled {grown[None] / 2**20:.1f} MiB, W={tile} {grown[tile] / 2**20:.1f} MiB"
          f" ([V, D] fp32: {per_vd / 2**20:.1f} MiB, [B, C, V] fp32: {per_block / 2**20:.1f} MiB)")
    assert grown[None] >= per_block
    assert grown[tile] <= per_vd < per_block / 100
