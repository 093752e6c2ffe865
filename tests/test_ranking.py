"""dpojax.ranking: the Plackett-Luce loss against a naive implementation of its likelihood (values and gradients,
rows with fewer than K responses, ties), K = 2 against the sigmoid loss, and the ranking metrics."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import losses
from dpojax.config import LossSection
from dpojax.errors import ConfigError
from dpojax.losses import ranking

PL = LossSection(type=("plackett_luce",), beta=0.3)


def pl_loss(logps, ref, rank, mask, row_mask, cfg=PL):
    """The Plackett-Luce loss through the one loss entry point, `losses.preference_loss` (ref None: reference-free)."""
    cfg = dataclasses.replace(cfg, reference_free=True) if ref is None else cfg
    inputs = losses.LossInputs(logps_NxK=logps, ref_logps_NxK=ref, tokens_NxK=jnp.ones_like(logps),
                               response_mask_NxK=mask, rank_NxK=rank, prompt_mask_N=row_mask)
    return losses.preference_loss(inputs, cfg)


def ranking_loss(*args, cfg=PL):
    """`pl_loss`, jitted (eager dispatch of its many small ops is slow on the fake devices)."""
    return jax.jit(pl_loss, static_argnums=5)(*args, cfg)


def random_rows(seed: int, n: int = 12, k: int = 5, ties: bool = False):
    """Policy/reference log-probs [N, K], ranks (best first) and a response mask with 2..K real responses per row;
    padding entries hold NaN, which must reach neither the loss nor a gradient."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, k + 1, size=n)
    counts[0] = k
    mask = (np.arange(k)[None, :] < counts[:, None]).astype(np.float32)
    rank = np.full((n, k), k, np.int32)
    for i, c in enumerate(counts):
        steps = rng.integers(0, 2, size=c - 1) if ties else np.ones(c - 1, int)
        if ties and steps.sum() == 0:
            steps[-1] = 1
        rank[i, :c] = np.concatenate([[0], np.cumsum(steps)])
    logps = rng.normal(-20.0, 5.0, size=(n, k)).astype(np.float32)
    ref = rng.normal(-20.0, 5.0, size=(n, k)).astype(np.float32)
    logps[mask == 0], ref[mask == 0] = np.nan, np.nan
    return jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(rank), jnp.asarray(mask)


def naive_pl_loss(logps, ref, rank, mask, beta):
    """Sum over rows of -log P(ranking): a Python loop over each row's real responses, k picked first among
    itself and every real response ranked strictly below it (no ties: the remaining ones, k..K)."""
    total = 0.0
    for i in range(logps.shape[0]):
        real = [j for j in range(logps.shape[1]) if mask[i, j] > 0]
        u = {j: beta * (logps[i, j] - ref[i, j]) for j in real}
        for k in real:
            rivals = [k] + [j for j in real if rank[i, j] > rank[i, k]]
            total = total - (u[k] - jnp.log(sum(jnp.exp(u[j]) for j in rivals)))
    return total


@pytest.mark.parametrize("ties", [False, True], ids=["strict", "ties"])
def test_matches_naive_plackett_luce_values_and_grads(ties):
    logps, ref, rank, mask = random_rows(seed=1 + ties, ties=ties)
    row_mask = jnp.ones(logps.shape[0])

    @jax.jit
    def ours(lp):
        return pl_loss(lp, ref, rank, mask, row_mask, PL)[0]

    @jax.jit
    def naive(lp):
        return naive_pl_loss(lp, ref, np.asarray(rank), np.asarray(mask), PL.beta)

    np.testing.assert_allclose(ours(logps), naive(logps), rtol=1e-5)
    g_ours, g_naive = jax.grad(ours)(logps), jax.grad(naive)(logps)
    assert np.isfinite(np.asarray(g_ours)).all()
    np.testing.assert_allclose(g_ours, np.nan_to_num(g_naive), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_ours)[np.asarray(mask) == 0] == 0.0)  # padding responses get no gradient
    # the textbook form: -sum_{k<K} [u_k - logsumexp(u_k..u_K)] on a strict ranking of all K
    if not ties:
        u = PL.beta * (np.asarray(logps[0], np.float64) - np.asarray(ref[0], np.float64))
        want = -sum(u[k] - np.log(np.sum(np.exp(u[k:]))) for k in range(len(u) - 1))
        got = ranking.plackett_luce_nll(jnp.asarray(u[None], jnp.float32), rank[:1], mask[:1])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_padding_and_filler_rows_change_nothing():
    """A row padded to more responses, or batched next to filler rows, has the same loss and gradient."""
    logps, ref, rank, mask = random_rows(seed=3, n=6, k=4)
    row_mask = jnp.ones(6)
    loss, _ = ranking_loss(logps, ref, rank, mask, row_mask)
    pad = ((0, 0), (0, 3))
    wide = [jnp.pad(x, pad, constant_values=v) for x, v in ((logps, 7.0), (ref, -7.0), (rank, 7), (mask, 0.0))]
    np.testing.assert_allclose(ranking_loss(*wide, row_mask)[0], loss, rtol=1e-6)
    filler = [jnp.concatenate([x, x[:2]]) for x in (logps, ref, rank, mask)]
    loss_f, metrics_f = ranking_loss(*filler, jnp.concatenate([row_mask, jnp.zeros(2)]))
    np.testing.assert_allclose(loss_f, loss, rtol=1e-6)
    assert float(metrics_f["loss"][1]) == 6.0 and float(metrics_f["rewards/kendall_tau"][1]) == 6.0


def test_ties_are_never_compared():
    u = jnp.asarray([[1.0, 3.0, -2.0], [0.5, -0.5, 0.0]])
    rank = jnp.asarray([[0, 0, 1], [0, 1, 1]])  # row 0: top two tied; row 1: bottom two tied
    mask = jnp.ones((2, 3))
    terms = jax.jit(ranking.plackett_luce_log_terms)(u, rank, mask)
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))
    want = [[1.0 - lse(1.0, -2.0), 3.0 - lse(3.0, -2.0), 0.0], [0.5 - lse(0.5, -0.5, 0.0), 0.0, 0.0]]
    np.testing.assert_allclose(terms, want, rtol=1e-6, atol=1e-7)
    # K = 2 with a tie: no preference, no loss, no gradient
    tie = jnp.zeros((1, 2), jnp.int32)
    grad = jax.jit(jax.grad(lambda x: ranking.plackett_luce_nll(x, tie, jnp.ones((1, 2))).sum()))
    assert np.all(np.asarray(grad(jnp.asarray([[1.0, -4.0]]))) == 0.0)


def _pair_inputs(logps, ref, row_mask):
    tokens = jnp.tile(jnp.asarray([5.0, 4.0]), (logps.shape[0], 1))
    return losses.LossInputs(logps_NxK=logps, ref_logps_NxK=ref, tokens_NxK=tokens, prompt_mask_N=row_mask)


@pytest.mark.parametrize("reference_free", [False, True])
def test_k2_equals_sigmoid_loss_grads_and_metrics(reference_free):
    rng = np.random.default_rng(0)
    logps = jnp.asarray(rng.normal(-15, 4, (10, 2)), jnp.float32)
    ref = jnp.asarray(rng.normal(-15, 4, (10, 2)), jnp.float32)
    row_mask = jnp.asarray([1.0] * 8 + [0.0] * 2)
    rank, mask = jnp.tile(jnp.arange(2), (10, 1)), jnp.ones((10, 2))
    pl = dataclasses.replace(PL, reference_free=reference_free)
    sig = dataclasses.replace(pl, type=("sigmoid",))

    def ours(lp):
        return pl_loss(lp, None if reference_free else ref, rank, mask, row_mask, pl)

    def theirs(lp):
        return losses.preference_loss(_pair_inputs(lp, ref, row_mask), sig)

    (l_ours, m_ours), g_ours = jax.jit(jax.value_and_grad(ours, has_aux=True))(logps)
    (l_sig, m_sig), g_sig = jax.jit(jax.value_and_grad(theirs, has_aux=True))(logps)
    np.testing.assert_allclose(l_ours, l_sig, rtol=1e-6)
    np.testing.assert_allclose(g_ours, g_sig, rtol=1e-5, atol=1e-8)
    for name, (s, c) in m_sig.items():
        np.testing.assert_allclose([m_ours[name][0], m_ours[name][1]], [s, c], rtol=1e-5, atol=1e-7, err_msg=name)
    acc = m_sig["rewards/accuracies"]
    np.testing.assert_allclose(m_ours["rewards/ranking_accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(m_ours["rewards/kendall_tau"][0], 2 * acc[0] - acc[1], rtol=1e-6)


def test_ranking_metrics_match_scipy_and_counting():
    from scipy.stats import kendalltau

    logps, ref, rank, mask = random_rows(seed=5, n=20, k=6, ties=True)
    row_mask = jnp.ones(20).at[3].set(0.0)
    _, metrics = ranking_loss(logps, ref, rank, mask, row_mask)
    u = PL.beta * (np.nan_to_num(np.asarray(logps)) - np.nan_to_num(np.asarray(ref)))
    taus, correct, ordered = [], 0, 0
    for i in range(20):
        if row_mask[i] == 0:
            continue
        real = np.asarray(mask[i]) > 0
        r, v = np.asarray(rank[i])[real], u[i][real]
        taus.append(kendalltau(-r, v).statistic)  # tau-b; rank 0 is the best
        for a in range(len(r)):
            for b in range(len(r)):
                if r[a] < r[b]:
                    ordered += 1
                    correct += v[a] > v[b]
    tau_sum, tau_count = metrics["rewards/kendall_tau"]
    np.testing.assert_allclose(tau_sum / tau_count, np.mean(taus), rtol=1e-5)
    assert float(metrics["rewards/ranking_accuracy"][0]) == correct
    assert float(metrics["rewards/ranking_accuracy"][1]) == ordered
    # rewards all equal (policy == reference): tau is 0, not NaN
    assert float(ranking.kendall_tau(jnp.zeros((1, 3)), jnp.asarray([[0, 1, 2]]), jnp.ones((1, 3)))[0]) == 0.0


def test_best_and_worst_metrics_use_the_last_real_response():
    logps = jnp.asarray([[-1.0, -2.0, -3.0, 0.0], [-4.0, -5.0, 0.0, 0.0]])
    rank = jnp.asarray([[0, 1, 2, 4], [0, 1, 4, 4]])
    mask = jnp.asarray([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    _, m = ranking_loss(logps, None, rank, mask, jnp.ones(2))
    np.testing.assert_allclose(m["logps/chosen"][0], -5.0)
    np.testing.assert_allclose(m["logps/rejected"][0], -8.0)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"type": ("plackett_luce", "sigmoid")}, "cannot be combined"),
        ({"label_smoothing": 0.1}, "label_smoothing"),
        ({"rpo_alpha": 1.0}, "rpo_alpha"),
        ({"use_weighting": True}, "use_weighting"),
        ({"type": ("plackett_luc",)}, "plackett_luce"),  # the unknown-type message lists it
    ],
)
def test_invalid_ranking_configs(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        losses.validate_loss_config(dataclasses.replace(PL, **changes))
    losses.validate_loss_config(PL)
    assert losses.is_kwise(PL) and not losses.is_kwise(LossSection())


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.max_responses=1"], "'data.max_responses' = 1 must be at least 2"),
        (["data.pairs_from_scores=all_pairs"], "'data.pairs_from_scores' = 'all_pairs' turns rankings into pairs"),
        (["data.pairs_from_scores=best"], "expected one of 'none', 'best_vs_worst', 'all_pairs'"),
    ],
)
def test_config_keys_for_rankings(overrides, needle):
    from dpojax.config import config_from_dict

    raw = {"model": {"name_or_path": "m"}, "loss": {"type": "plackett_luce"}}
    cfg = config_from_dict(raw, ["data.max_responses=4"])
    assert cfg.data.max_responses == 4 and cfg.data.pairs_from_scores == "none"
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, overrides)
    assert needle in str(err.value)
    assert config_from_dict(raw, ["loss.type=sigmoid", "data.pairs_from_scores=all_pairs"]).data.pairs_from_scores
