"""Every script in examples/ runs as its docstring says (short settings), offline on CPU."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import xla_flags

import dpojax
from dpojax.losses import core

REPO = Path(__file__).resolve().parents[1]


def test_custom_loss_example_trains_next_to_sigmoid(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "XLA_FLAGS": xla_flags(None)}  # one CPU device as a user runs it (8 fake ones compile slower), fast compile
    out = subprocess.run([sys.executable, "examples/custom_loss.py", "--steps", "4", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout.split("held-out eval after 4 steps on the demo data\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["loss.type", "loss", "rewards/accuracies"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table[1:3]}
    assert set(rows) == {"sigmoid", "margin_sigmoid"}
    assert all(np.isfinite(v).all() for v in rows.values())
    assert rows["margin_sigmoid"][0] > rows["sigmoid"][0]  # the margin keeps its loss above DPO's
    for loss in rows:
        assert (tmp_path / loss / "metrics.jsonl").is_file()


def test_custom_loss_example_is_a_loss_import_module(monkeypatch):
    """What the example's docstring runs with the CLI: the file registers its loss through loss.import."""
    before = dict(core.LOSSES)
    monkeypatch.chdir(REPO)
    try:
        cfg = dpojax.load_config("configs/demo.yaml", ["loss.import=[examples/custom_loss.py]",
                                                       "loss.type=margin_sigmoid"])
        assert cfg.loss.type == ("margin_sigmoid",) and "margin_sigmoid" in dpojax.LOSSES
    finally:
        core.LOSSES.clear()
        core.LOSSES.update(before)
        core._validated.cache_clear()
        for name in [m for m in sys.modules if m.startswith("dpojax_user_losses")]:
            del sys.modules[name]


# ------------------------------------------------------------------ beta_sweep, score_pairs, token_logps (in-process)
@pytest.fixture(scope="module")
def examples():
    """The examples folder as importable modules (token_logps imports its sibling score_pairs)."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import beta_sweep
        import score_pairs
        import token_logps
        yield dict(beta_sweep=beta_sweep, score_pairs=score_pairs, token_logps=token_logps)
    finally:
        sys.path.remove(str(REPO / "examples"))


@pytest.fixture(scope="module")
def scored_run(examples, tmp_path_factory):
    """One short demo run trained by score_pairs (shared with token_logps), and its scores of the eval file."""
    out = tmp_path_factory.mktemp("score_pairs") / "run"
    small = ["train.batch_size=8", "optim.warmup_steps=0", "optim.lr=1e-2"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = examples["score_pairs"].main(["--steps", "2", "--out", str(out), "--set", *small, "--show", "3"])
    return out, {**result, "printed": printed.getvalue()}


def test_beta_sweep_example_trains_one_policy_per_beta(examples, capsys):
    results = examples["beta_sweep"].main(["--betas", "0.05", "1.0", "--steps", "2", "--batch-size", "8"])
    printed = capsys.readouterr().out
    table = printed.split("steps on the demo data\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["beta", "train/loss", "train/rewards/accuracies"]
    assert [float(line.split()[0]) for line in table[1:3]] == [0.05, 1.0]
    for line, beta in zip(table[1:3], (0.05, 1.0)):
        assert float(line.split()[3]) == pytest.approx(results[beta]["eval/loss"], abs=1e-4)
    # the same data and initial weights, different betas: a larger beta scales the implicit rewards up
    small, large = results[0.05], results[1.0]
    assert abs(large["eval/rewards/margins"]) > abs(small["eval/rewards/margins"]) > 0
    assert all(np.isfinite(list(m.values())).all() for m in results.values())


def test_score_pairs_example_accuracy_is_evaluates(scored_run):
    run, result = scored_run
    chosen, rejected = result["chosen"], result["rejected"]
    assert chosen.shape == rejected.shape == (256,)  # every pair of configs/demo/eval.jsonl
    metrics = dpojax.evaluate(run / "config.yaml", [f"data.eval={REPO / 'configs/demo/eval.jsonl'}"])
    assert result["accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    np.testing.assert_allclose(chosen.mean(), metrics["rewards/chosen"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(rejected.mean(), metrics["rewards/rejected"], atol=1e-5, rtol=1e-4)
    assert f"accuracy {result['accuracy']:.4f} over 256 pairs" in result["printed"]


def test_token_logps_example_differences_sum_to_the_log_ratio(examples, scored_run, capsys):
    run, result = scored_run
    table = examples["token_logps"].main(["--run", str(run), "--index", "5"])
    printed = capsys.readouterr().out
    assert "chosen completion of pair 5" in printed and "rejected completion of pair 5" in printed
    beta = result["beta"]
    for name in ("chosen", "rejected"):
        tokens = table[name]
        assert tokens and all(isinstance(text, str) and lp < 0 and lr < 0 for text, lp, lr in tokens)
        log_ratio = sum(lp - lr for _, lp, lr in tokens)
        np.testing.assert_allclose(beta * log_ratio, result[name][5], atol=1e-5)  # score_pairs' sequence sums
