"""The ranking step through the real model: padding responses add no loss, NaN or gradient; and `dpojax train` /
`dpojax eval` end to end on scored, conversational data with 2..4 responses per prompt and ties, recording the pair
and ranking metrics in metrics.jsonl."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_tokenizer import load_tiny_tokenizer
from trl_harness import dpojax_overrides, make_assets

from dpojax.cli import main
from dpojax.config import LossSection
from dpojax.data import collate, tokenize_rows
from dpojax.metrics import read_metrics
from dpojax.models.config import ModelConfig
from dpojax.models.hf import init_random, read_hf_config
from dpojax.trainer.step import StepSpec, batch_loss


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ranking_step"))


def test_cli_trains_and_evaluates_scored_rankings(assets, tmp_path):
    """Scored rows with 2..4 responses and ties, conversational, through `dpojax train` and `dpojax eval`."""
    pool = [json.loads(line) for line in assets["conversational"].read_text().splitlines()]
    rows = []
    for i in range(16):
        k = 2 + i % 3
        responses = [pool[(i + j) % 16]["chosen" if j % 2 == 0 else "rejected"] for j in range(k)]
        scores = [float(k - j) for j in range(k)]
        if k == 4:
            scores[2] = scores[1]  # a tie
        rows.append({"prompt": pool[i]["prompt"], "responses": responses[::-1], "scores": scores[::-1]})
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = [
        "train", str(tmp_path / "cfg.yaml"), "train.steps=4", "train.batch_size=8", "train.log_every=2",
        "train.eval_every=2", "loss.type=plackett_luce", "optim.lr=1e-3", "data.max_responses=4",
    ]
    cfg = dpojax_overrides(assets, data, out)
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    assert main(args) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(2, "train"), (2, "eval"), (4, "train"), (4, "eval")]
    for r in records:
        assert {"loss", "rewards/accuracies", "rewards/ranking_accuracy", "rewards/kendall_tau"} <= set(r)
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float))
    assert {"grad_norm", "learning_rate", "tokens_per_second", "logits/chosen"} <= set(records[0])
    assert records[-1]["loss"] < records[1]["loss"]  # it learns the training rows
    assert main(["eval", str(out / "config.yaml")]) == 0
    again = read_metrics(out / "metrics.jsonl")[-1]
    assert again["split"] == "eval" and again["step"] == 4
    np.testing.assert_allclose(again["rewards/kendall_tau"], records[-1]["rewards/kendall_tau"], rtol=1e-5)


def test_padding_responses_add_nothing_through_the_model(assets):
    """A 2-response row padded to K = 4 (empty padding responses through the real model) has the same loss and the
    same, finite, parameter gradients as the row alone; a filler row adds nothing either."""
    tok = load_tiny_tokenizer(assets["tok"])
    two = {"prompt": "the sky is", "responses": [" blue.", " red cat."]}
    four = {"prompt": "what color", "responses": [" sun.", " sea.", " dog hot.", " no."]}
    alone = tokenize_rows([two], tok, max_length=None)
    mixed = tokenize_rows([two, four], tok, max_length=None)
    kw = dict(length=16, max_length=None, truncation_mode="keep_start")
    batch_alone = collate(alone, [0], **kw)
    batch_padded = collate(mixed, [0, 1], prompt_mask=[1.0, 0.0], **kw)  # row 1: a filler row
    assert batch_padded.response_mask_NxK[0].tolist() == [1, 1, 0, 0]

    mcfg = ModelConfig.from_hf(read_hf_config(assets["policy"]))
    graphdef, params = nnx.split(init_random(mcfg, seed=0))
    _, ref_params = nnx.split(init_random(mcfg, seed=1))
    spec = StepSpec(graphdef, graphdef, LossSection(type=("plackett_luce",)), None, None)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: batch_loss(p, ref_params, b, spec), has_aux=True))
    (loss_a, m_a), g_a = grad_fn(params, jax.tree.map(np.asarray, batch_alone))
    (loss_p, m_p), g_p = grad_fn(params, jax.tree.map(np.asarray, batch_padded))
    np.testing.assert_allclose(loss_p, loss_a, rtol=1e-5)
    assert float(loss_a) > 0 and float(m_p["loss"][1]) == 1.0
    for name in ("rewards/chosen", "rewards/rejected", "logps/rejected", "rewards/kendall_tau"):
        np.testing.assert_allclose(m_p[name][0], m_a[name][0], rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_p), strict=True):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-8)
