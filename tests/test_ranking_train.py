"""Plackett-Luce through the trainer: with K = 2 `dpojax eval` equals TRL's DPOTrainer.evaluate() on the same pairs
and training equals sigmoid training step by step. (Padding responses through the real model, and `dpojax train` /
`dpojax eval` end to end on ranked data: tests/test_ranking_step.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tolerances import rewards_atol
from trl_harness import TRL_METRICS, dpojax_overrides, make_assets, trl_trainer

from dpojax.config import config_from_dict
from dpojax.metrics import read_metrics
from dpojax.trainer.evaluation import evaluate

PL = {"loss__type": "plackett_luce"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ranking"))


def ranked_copy(pairs_file, out):
    """The pair rows as ranked rows: responses [chosen, rejected] (K = 2)."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    ranked = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]} for r in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in ranked))
    return out


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_k2_eval_matches_trl_evaluate(assets, tmp_path, fmt):
    data = ranked_copy(assets[fmt], tmp_path / "ranked.jsonl")
    cfg = config_from_dict(dpojax_overrides(assets, data, tmp_path / "ours", train__eval_batch_size=16, **PL))
    ours = evaluate(cfg)
    theirs = trl_trainer(assets, assets[fmt], tmp_path / "trl", per_device_eval_batch_size=16).evaluate()
    for name in (*TRL_METRICS, "logits/chosen", "logits/rejected"):
        want = theirs[f"eval_{name}"]
        assert abs(ours[name] - want) <= 1e-4 * abs(want) + 1e-5, (name, ours[name], want)
    # K = 2: every pair is one ordered pair, so the ranking metrics are the reward accuracy in other units
    # (tau is +1 or -1 per row, and 0 for a row whose two responses are identical, so their rewards tie)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tied = sum(r["responses"][0] == r["responses"][1] for r in rows) / len(rows)
    assert ours["rewards/ranking_accuracy"] == pytest.approx(ours["rewards/accuracies"], abs=1e-6)
    assert ours["rewards/kendall_tau"] == pytest.approx(2 * ours["rewards/accuracies"] - 1 + tied, abs=1e-5)
    record = read_metrics(tmp_path / "ours" / "metrics.jsonl")[-1]
    assert record["split"] == "eval" and {"rewards/kendall_tau", *TRL_METRICS} <= set(record)


def _step_metrics(assets, data, out, steps: int = 3, **extra) -> list[dict]:
    """Metrics of `steps` training steps run by the loop's own pieces (no checkpoint, export or plot)."""
    import jax

    from dpojax import metrics as M
    from dpojax.sharding import Sharder, make_mesh
    from dpojax.trainer import build, prefetch
    from dpojax.trainer.step import batch_sharding

    cfg = config_from_dict(dpojax_overrides(
        assets, data, out, train__batch_size=8, data__eval=None, optim__name="adamw", optim__lr=1e-3,
        optim__schedule="constant", optim__max_grad_norm=None, **extra,
    ))
    sharder = Sharder(make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    models = build.build_models(cfg, sharder)
    train_data = build.load_split(cfg, models, cfg.data.train, cfg.data.train_split)
    run, state = build.setup_train(cfg, models, sharder, steps=build.total_steps(cfg, len(train_data)))
    out = []
    for batch in prefetch.host_batches(run, train_data, 0, steps):
        state, metrics = run.train_step(state, models.ref_params, build.to_device(batch, batch_sharding(sharder)))
        out.append(M.finalize(M.add_sums(None, jax.device_get(metrics))))
    return out


def test_k2_training_equals_sigmoid_training(assets, tmp_path):
    """Same batches, same updates: equal losses, gradient norms and metrics at every step (so equal gradients)."""
    rows = assets["standard"].read_text().splitlines()[:16]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    ours = _step_metrics(assets, ranked_copy(pairs, tmp_path / "ranked.jsonl"), tmp_path / "pl", **PL)
    sig = _step_metrics(assets, pairs, tmp_path / "sigmoid", loss__type="sigmoid")
    assert abs(sig[-1]["loss"] - sig[0]["loss"]) > 1e-3  # the updates moved the loss
    for name in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logits/rejected"):
        # rewards: beta 0.1 x differences of log-prob sums ~ -50, as exact as those sums (16 ulps); the rest as before
        atol = max(rewards_atol(r, 0.1) for r in sig) if name.startswith("rewards/") else 1e-7
        np.testing.assert_allclose([r[name] for r in ours], [r[name] for r in sig], rtol=1e-5, atol=atol,
                                   err_msg=name)
