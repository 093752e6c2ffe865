"""A damaged checkpoint (a file missing, or one cut short) is not resumed from: the run falls back to the newest
complete one, says so in one line, moves the damaged one aside (checkpoints/damaged-<step>) and ends equal to an
uninterrupted run. Also a changed data file (refused by name) and a non-finite loss streak (stops, nothing lost). One
process, in this process (cheap: part of `make test`, but the divergence case: `make test-faults`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from procs import check_nothing_lost, train_records
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax.cli import main
from dpojax.metrics import truncate_after


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    tok = make_tokenizer(root / "tok")
    policy = make_tiny_checkpoint(root / "policy", seed=0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(24, "standard", seed=5)))
    cfg = {
        "model": {"name_or_path": str(policy), "tokenizer": str(tok)},
        "data": {"train": str(data), "max_length": 48, "cache_dir": str(root / "cache"), "packing": "none"},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": 6, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10, "async": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = root / "uninterrupted"
    assert main(["train", str(path), f"output_dir={reference}"]) == 0
    return path, reference


def _cut_short(step_dir: Path) -> str:
    """Truncate every data file of the params item to half its size (whichever of them a restore reads first)."""
    files = sorted(p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d")
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(files[0].parent)


def _remove_meta(step_dir: Path) -> str:
    victim = next(p for p in (step_dir / "meta").rglob("*") if p.is_file())
    victim.unlink()
    return str(victim)


@pytest.mark.parametrize("damage", [_cut_short, _remove_meta], ids=["file_cut_short", "file_missing"])
def test_damaged_newest_checkpoint_falls_back(setup, tmp_path, damage, caplog):
    config, reference = setup
    out = tmp_path / "run"
    assert main(["train", str(config), f"output_dir={out}", "train.steps=4"]) == 0
    damage(out / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="dpojax"):
        assert main(["train", str(config), f"output_dir={out}"]) == 0
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("checkpoint 4 is damaged (") and \
        lines[0].endswith("resuming from step 2 instead"), lines
    assert (out / "checkpoints" / "damaged-4").is_dir()
    assert check_nothing_lost(out) == 6
    assert train_records(out) == train_records(reference)
    assert (out / "export" / "model.safetensors").read_bytes() == (reference / "export" /
                                                                    "model.safetensors").read_bytes()


def test_torn_metrics_line_is_dropped(tmp_path):
    """A record cut short by a crash or a full disk mid-write is dropped on resume with those past the checkpoint."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n{"step": 3, "spl')
    truncate_after(path, 2)
    assert path.read_text() == '{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n'


def test_changed_data_file_is_refused(setup, tmp_path, capsys):
    """The train data's fingerprint (its rows and their tokens) is in each checkpoint: a resume on a changed file
    is refused, naming it; restored, the run resumes."""
    config, reference = setup
    out, data = tmp_path / "run", tmp_path / "data.jsonl"
    original = Path(yaml.safe_load(config.read_text())["data"]["train"]).read_text()
    data.write_text(original)
    run = ["train", str(config), f"output_dir={out}", f"data.train={data}"]
    assert main([*run, "train.steps=2"]) == 0
    rows = [json.loads(line) for line in original.splitlines()]
    rows[5]["chosen"] = rows[5]["chosen"] + " (edited)"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main([*run, "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"the train data '{data}' (split 'train') is not the data it was trained on" in err, err
    assert "Restore the original file, or start a new run" in err
    assert check_nothing_lost(out) == 2
    data.write_text(original)
    assert main([*run, "train.steps=4"]) == 0
    assert train_records(out) == train_records(reference)[:4]  # a constant schedule: the first 4 steps of 6


@pytest.mark.serial  # two more compiles: in `make test-faults`
def test_non_finite_streak_stops_nothing_lost(setup, tmp_path, capsys, caplog):
    """`train.max_bad_steps` non-finite steps in a row (an absurd learning rate) stop the run with one message; the
    newest complete checkpoint holds finite weights and every record up to it; the next start resumes from it (and,
    the numbers being the same, diverges again: the fix is a new run with other settings)."""
    config, _ = setup
    out = tmp_path / "run"
    run = ["train", str(config), f"output_dir={out}", "optim.name=sgd", "optim.lr=1e30", "optim.max_grad_norm=null",
           "train.max_bad_steps=2", "checkpoint.every=1"]
    capsys.readouterr()
    assert main(run) == 2
    first = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpojax train: error:")]
    assert len(first) == 1 and "consecutive steps had a non-finite loss" in first[0], first
    step = check_nothing_lost(out)
    restored = ocp.StandardCheckpointer().restore(out / "checkpoints" / str(step) / "params")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    with caplog.at_level(logging.INFO, logger="dpojax"):
        assert main(run) == 2
    assert any(r.getMessage().startswith("resumed from ") and r.getMessage().endswith(f" at step {step}")
               for r in caplog.records)
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpojax train: error:")]
    assert len(again) == 1 and "consecutive steps had a non-finite loss" in again[0], again
    assert check_nothing_lost(out) >= step
