"""What a resume accepts: every config key that changes the run's numbers must match the checkpoint's (named with
its old and new value); the learning-rate schedule keeps the horizon the run started with. End to end: a run that
raises train.steps continues on a constant schedule and is refused on a decaying one, never with an Orbax error."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax.cli import main
from dpojax.config import config_from_dict, to_dict
from dpojax.metrics import read_metrics
from dpojax.trainer.checkpoint import resume_conflicts, schedule_conflict

BASE = {"model": {"name_or_path": "some/model"}, "data": {"train": "t.jsonl"}}


def _cfg(*overrides):
    return config_from_dict(BASE, list(overrides))


@pytest.mark.parametrize("override", [
    "optim.lr=1e-3", "optim.schedule=cosine", "optim.warmup_steps=5", "optim.b2=0.99", "loss.beta=0.2",
    "loss.type=ipo", "loss.label_smoothing=0.1", "loss.rpo_alpha=1.0", "data.max_responses=4",
    "ref_model.sync_every=3", "data.max_length=512", "train.seed=1", "model.dtype=bfloat16",
])
def test_every_change_of_the_run_is_refused_by_name(override):
    saved = to_dict(_cfg())
    conflicts = resume_conflicts(saved, _cfg(override))
    key, value = override.split("=")
    assert len(conflicts) == 1 and conflicts[0].startswith(f"{key}: ") and "->" in conflicts[0], conflicts


@pytest.mark.parametrize("override", [
    "train.steps=50", "train.log_every=3", "train.eval_every=2", "train.micro_batch_size=16", "mesh.fsdp=2",
    "mesh.data=4", "checkpoint.every=5", "checkpoint.keep=4", "model.attention=xla", "model.remat=full",
    "distributed.heartbeat_timeout=30", "output_dir=elsewhere", "data.cache_dir=/tmp/c",
])
def test_changes_of_how_it_runs_are_accepted(override):
    assert resume_conflicts(to_dict(_cfg()), _cfg(override)) == []


def test_a_key_added_after_the_checkpoint_counts_as_its_default():
    """A checkpoint written before a config key existed (e.g. the `online` section) still resumes, and a real
    change is still refused by name."""
    saved = to_dict(_cfg())
    del saved["online"]
    assert resume_conflicts(saved, _cfg()) == []
    conflicts = resume_conflicts(saved, _cfg("loss.beta=0.2"))
    assert conflicts == ["loss.beta: 0.1 -> 0.2"], conflicts


def test_schedule_keeps_its_first_horizon():
    linear, constant = _cfg("optim.schedule=linear"), _cfg("optim.schedule=constant")
    assert schedule_conflict(linear, horizon=10, total_steps=8) is None  # stop early on the same schedule
    assert schedule_conflict(constant, horizon=10, total_steps=40) is None
    why = schedule_conflict(linear, horizon=10, total_steps=40)
    assert "decays over the 10 steps" in why and "40" in why and "optim.schedule=constant" in why


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_cfg")
    tok = make_tokenizer(root / "tok")
    policy = make_tiny_checkpoint(root / "policy", seed=0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(16, "standard", seed=5)))
    cfg = {
        "model": {"name_or_path": str(policy), "tokenizer": str(tok)},
        "data": {"train": str(data), "max_length": 48, "cache_dir": str(root / "cache")},
        "optim": {"name": "adamw", "lr": 1e-3, "schedule": "linear"},
        "train": {"batch_size": 8, "steps": 2, "log_every": 1},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def test_raising_steps_continues_or_is_refused_with_the_reason(setup, capsys):
    root, path = setup
    decaying, constant = root / "linear", root / "constant"
    assert main(["train", str(path), f"output_dir={decaying}"]) == 0
    assert main(["train", str(path), f"output_dir={decaying}", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "decays over the 2 steps" in err and "Orbax" not in err and "Traceback" not in err
    assert main(["train", str(path), f"output_dir={decaying}", "optim.lr=5e-3"]) == 2
    assert "optim.lr: 0.001 -> 0.005" in capsys.readouterr().err
    assert main(["train", str(path), f"output_dir={constant}", "optim.schedule=constant"]) == 0
    assert main(["train", str(path), f"output_dir={constant}", "optim.schedule=constant", "train.steps=4"]) == 0
    steps = [r["step"] for r in read_metrics(constant / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_final_eval_competes_for_best(setup):
    """With the loss falling at every eval, the best checkpoint is the final one (evaluated after the loop)."""
    root, path = setup
    out = root / "best"
    data = yaml.safe_load(path.read_text())["data"]["train"]
    assert main(["train", str(path), f"output_dir={out}", f"data.eval={data}", "train.steps=3", "train.eval_every=1",
                 "optim.schedule=constant", "optim.lr=3e-3", "checkpoint.best_metric=loss", "checkpoint.best_mode=min",
                 "checkpoint.async=false"]) == 0
    evals = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert len(evals) == 3 and evals[2] < min(evals[:2]), evals
    assert sorted(p.name for p in (out / "best").iterdir() if p.name.isdigit()) == ["3"]
