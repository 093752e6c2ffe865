"""End to end against TRL 1.16: `dpojax eval` metrics equal DPOTrainer.evaluate(), and per-step training
losses equal DPOTrainer's over 10 steps (SGD, then AdamW) from the same init on the same batches."""

from __future__ import annotations

import numpy as np
import pytest
from trl_harness import TRL_METRICS, dpojax_overrides, make_assets, trl_trainer

from dpojax.config import config_from_dict
from dpojax.metrics import read_metrics
from dpojax.trainer.evaluation import evaluate
from dpojax.trainer.loop import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("parity"))


def _close(ours: float, theirs: float, rel: float = 1e-4, abs_: float = 1e-5) -> bool:
    return abs(ours - theirs) <= rel * abs(theirs) + abs_


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize(
    "loss",
    [
        {"loss__type": "sigmoid"},
        {"loss__type": "ipo", "loss__beta": 0.5},
        {"loss__type": "hinge"},
        {"loss__type": "robust", "loss__label_smoothing": 0.1},
        {"loss__type": "apo_zero"},
        {"loss__type": ["sigmoid", "sft"], "loss__weights": [0.8, 0.2]},
    ],
    ids=["sigmoid", "ipo", "hinge", "robust", "apo_zero", "mpo"],
)
def test_eval_matches_trl_evaluate(assets, tmp_path, fmt, loss):
    # (cDPO label smoothing is not here: TRL 1.16 ignores label_smoothing for sigmoid; tests/test_losses.py
    # checks it against the cDPO formula.)
    data = assets[fmt]
    cfg = config_from_dict(dpojax_overrides(assets, data, tmp_path / "ours", train__eval_batch_size=16, **loss))
    ours = evaluate(cfg)
    types = loss["loss__type"]
    trl_loss = {"loss_type": types if isinstance(types, list) else [types], "beta": loss.get("loss__beta", 0.1)}
    if "loss__weights" in loss:
        trl_loss["loss_weights"] = loss["loss__weights"]
    if "loss__label_smoothing" in loss:
        trl_loss["label_smoothing"] = loss["loss__label_smoothing"]
    theirs = trl_trainer(assets, data, tmp_path / "trl", per_device_eval_batch_size=16, **trl_loss).evaluate()
    for name in TRL_METRICS:
        assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])
    # the eval record lands in metrics.jsonl with TRL's names
    record = read_metrics(tmp_path / "ours" / "metrics.jsonl")[-1]
    assert record["split"] == "eval" and set(TRL_METRICS) <= set(record)


def _trl_step_losses(assets, data, out, optim: str, lr: float, steps: int) -> list[float]:
    trainer = trl_trainer(
        assets, data, out,
        per_device_train_batch_size=8, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        optim="sgd" if optim == "sgd" else "adamw_torch", weight_decay=0.0, max_grad_norm=1e9,
        logging_steps=1, warmup_steps=0,
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h][:steps]


def _our_step_losses(assets, data, out, optim: str, lr: float, steps: int, **extra) -> list[float]:
    cfg = config_from_dict(
        dpojax_overrides(
            assets, data, out,
            train__batch_size=8, train__steps=steps, train__log_every=1, data__eval=None,
            optim__name=optim, optim__lr=lr, optim__schedule="constant", optim__max_grad_norm=None, **extra,
        )
    )
    train(cfg)
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("optim,lr", [("sgd", 0.5), ("adamw", 1e-3)])
def test_training_losses_match_trl(assets, tmp_path, optim, lr):
    """8 pairs = one batch per step, so batch order cannot differ; the loss changes every step."""
    import json

    rows = assets["standard"].read_text().splitlines()[:8]
    data = tmp_path / "eight.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert all(json.loads(r) for r in rows)
    ours = _our_step_losses(assets, data, tmp_path / "ours", optim, lr, steps=10)
    theirs = _trl_step_losses(assets, data, tmp_path / "trl", optim, lr, steps=10)
    assert len(ours) == len(theirs) == 10
    assert abs(ours[-1] - ours[0]) > 1e-3  # training moved the loss, so equality below means something
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_is_exact(assets, tmp_path):
    """4 micro-batches of 2 pairs give the same updates as 1 batch of 8 pairs."""
    rows = assets["standard"].read_text().splitlines()[:8]
    data = tmp_path / "eight.jsonl"
    data.write_text("\n".join(rows) + "\n")
    mesh = {"mesh": {"data": 2, "fsdp": 1, "tensor": 4}}  # 2 data shards, so a micro-batch of 2 pairs fits
    whole = _our_step_losses(assets, data, tmp_path / "whole", "adamw", 1e-3, steps=5, **mesh)
    accum = _our_step_losses(assets, data, tmp_path / "accum", "adamw", 1e-3, steps=5, train__micro_batch_size=2,
                             **mesh)
    np.testing.assert_allclose(accum, whole, rtol=1e-5, atol=1e-6)
