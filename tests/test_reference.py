"""Reference strategies: precomputed (cached) reference log-probs, TR-DPO soft updates, reference-free losses."""

from __future__ import annotations

import logging
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from trl_harness import dpojax_overrides, make_assets

from dpojax.config import config_from_dict
from dpojax.metrics import read_metrics
from dpojax.models import load_pretrained
from dpojax.sharding import Sharder, make_mesh
from dpojax.trainer import build, loop
from dpojax.trainer.step import sync_reference

STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("refs"), n_rows=16)


def _cfg(assets, out, **extra):
    base = dict(
        train__batch_size=8, train__steps=STEPS, train__log_every=1, optim__lr=3e-3, optim__schedule="constant",
        checkpoint__every=None,
    )
    base.update(extra)
    return config_from_dict(dpojax_overrides(assets, assets["standard"], out, **base))


def _losses(out, split="train", key="loss"):
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]


def test_precomputed_reference_matches_in_memory_and_is_cached(assets, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    loop.train(_cfg(assets, tmp_path / "live", data__cache_dir=cache))
    with caplog.at_level(logging.INFO, logger="dpojax"):
        loop.train(_cfg(assets, tmp_path / "pre1", data__cache_dir=cache, ref_model__precompute=True))
    assert "reference log-probs computed for 16 pairs" in caplog.text
    np.testing.assert_allclose(_losses(tmp_path / "pre1"), _losses(tmp_path / "live"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _losses(tmp_path / "pre1", "eval"), _losses(tmp_path / "live", "eval"), rtol=1e-5, atol=1e-6
    )

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpojax"):
        loop.train(_cfg(assets, tmp_path / "pre2", data__cache_dir=cache, ref_model__precompute=True))
    assert "reference log-probs loaded from cache" in caplog.text
    assert "computed for" not in caplog.text
    assert _losses(tmp_path / "pre2") == _losses(tmp_path / "pre1")

    # another reference (here: the policy's weights under another folder name and content) is a cache miss
    other = tmp_path / "other_ref"
    shutil.copytree(assets["policy"], other)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpojax"):
        loop.train(_cfg(assets, tmp_path / "pre3", data__cache_dir=cache, ref_model__precompute=True,
                        ref_model__name_or_path=str(other)))
    assert "reference log-probs computed for 16 pairs" in caplog.text


def test_precompute_drops_the_reference_from_memory(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "x", ref_model__precompute=True, data__cache_dir=str(tmp_path / "c"))
    sharder = Sharder(make_mesh(-1, 1, 1))
    models = build.build_models(cfg, sharder)
    pairs = build.load_split(cfg, models, cfg.data.train, "train")
    models = build.precompute_references(cfg, models, sharder, [pairs])
    assert models.ref_params is None and models.ref_graphdef is None
    assert models.ref_tables[pairs.fingerprint].shape == (len(pairs), 2)


def test_tr_dpo_soft_update_formula():
    policy = {"w": np.array([1.0, 2.0], np.float32)}
    ref = {"w": np.array([3.0, -1.0], np.float32)}
    out = sync_reference(policy, ref, 0.6)
    np.testing.assert_allclose(out["w"], 0.6 * policy["w"] + 0.4 * ref["w"], rtol=1e-7)


def test_tr_dpo_reference_is_mixed_in_checkpointed_and_restored(assets, tmp_path):
    """After sync_every steps the saved reference equals alpha * policy + (1 - alpha) * previous reference; a run
    resumed from that checkpoint gives the uninterrupted run's losses (the first half is the checked run)."""
    trdpo = dict(ref_model__sync_every=2, ref_model__mixup_alpha=0.6, checkpoint__every=2)
    whole = tmp_path / "whole"
    loop.train(_cfg(assets, whole, **trdpo))
    out = tmp_path / "split"
    loop.train(_cfg(assets, out, **trdpo, train__steps=2))
    policy = jax.tree.leaves(ocp.StandardCheckpointer().restore(out / "checkpoints" / "2" / "params"))
    ref = jax.tree.leaves(ocp.StandardCheckpointer().restore(out / "checkpoints" / "2" / "ref"))
    _, initial = __import__("flax").nnx.split(load_pretrained(assets["ref"])[0])
    for p, r, r0 in zip(policy, ref, jax.tree.leaves(initial)):
        np.testing.assert_allclose(np.asarray(r), 0.6 * np.asarray(p) + 0.4 * np.asarray(r0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(ref[0]), np.asarray(jax.tree.leaves(initial)[0]))
    loop.train(_cfg(assets, out, **trdpo))
    np.testing.assert_allclose(_losses(out), _losses(whole), rtol=1e-6, atol=1e-7)


def test_reference_free_losses_load_no_reference(assets, tmp_path):
    for loss in ("simpo", "orpo"):
        cfg = _cfg(assets, tmp_path / loss, loss__type=loss)
        models = build.build_models(cfg, Sharder(make_mesh(-1, 1, 1)))
        assert models.ref_graphdef is None and models.ref_params is None
    cfg = _cfg(assets, tmp_path / "rf", loss__reference_free=True)
    assert build.build_models(cfg, Sharder(make_mesh(-1, 1, 1))).ref_params is None


def test_precomputed_reference_for_rankings_matches_in_memory(assets, tmp_path, caplog):
    """Scored rows with 2..4 responses: an [M, K] table (padding responses never read) gives the live losses."""
    import json

    pool = [json.loads(line) for line in assets["standard"].read_text().splitlines()]
    rows = []
    for i in range(16):
        k = 2 + i % 3
        responses = [pool[(i + j) % 16]["chosen" if j % 2 == 0 else "rejected"] for j in range(k)]
        rows.append({"prompt": pool[i]["prompt"], "responses": responses, "scores": [float(k - j) for j in range(k)]})
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = str(tmp_path / "cache")

    def cfg(out, **extra):
        base = dict(train__batch_size=8, train__steps=2, train__log_every=1, optim__lr=3e-3,
                    optim__schedule="constant", checkpoint__every=None, loss__type="plackett_luce",
                    data__max_responses=4, data__cache_dir=cache, **extra)
        return config_from_dict(dpojax_overrides(assets, data, out, **base))

    loop.train(cfg(tmp_path / "live"))
    with caplog.at_level(logging.INFO, logger="dpojax"):
        loop.train(cfg(tmp_path / "pre", ref_model__precompute=True))
    assert "reference log-probs computed for 16 rankings" in caplog.text
    for key in ("loss", "rewards/kendall_tau", "rewards/margins"):
        np.testing.assert_allclose(_losses(tmp_path / "pre", key=key), _losses(tmp_path / "live", key=key),
                                   rtol=1e-5, atol=1e-6)
