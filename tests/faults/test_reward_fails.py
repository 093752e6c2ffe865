"""An online run whose reward function raises mid-run (a grader service gone, at step 3): it stops with one line
naming the function and its error (exit 2), nothing past the newest complete checkpoint (step 2) is lost, and once
the function answers again the same command resumes to the samples, metrics and weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from procs import check_nothing_lost, train_records
from tiny_models import make_tiny_checkpoint, xla_flags
from tiny_tokenizer import WORDS, make_tokenizer

pytestmark = pytest.mark.serial  # subprocess runs
ONLINE_TIMING = ("online/gen_tokens_per_second", "online/gen_time_share", "online/score_time_share")
GRADER = str(Path(__file__).resolve().parent / "grader.py")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_fails")
    rng = random.Random(3)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + "?",
             "answer": rng.choice(WORDS)} for _ in range(16)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"name_or_path": str(make_tiny_checkpoint(root / "policy", seed=0)),
                  "tokenizer": str(make_tokenizer(root / "tok"))},
        "data": {"max_length": 48, "cache_dir": str(root / "cache")},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"batch_size": 4, "steps": 4, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10},
        "online": {"enabled": True, "prompts": str(prompts), "samples_per_prompt": 2,
                   "sampling": {"max_new_tokens": 6}, "reward": f"{GRADER}:answer_hits", "seed": 7},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config, out, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpojax.cli", "train", str(config), f"output_dir={out}"],
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(None), **env},
                          capture_output=True, text=True,
                          timeout=900)


def _records(out: Path) -> list[dict]:
    """The train records less their timings (the sampler's too)."""
    return [{k: v for k, v in r.items() if k not in ONLINE_TIMING} for r in train_records(out)]


def _samples(out: Path) -> list[str]:
    return (out / "online_samples.jsonl").read_text().splitlines()


def test_reward_function_raises_mid_run(config, tmp_path):
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    done = _run(config, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = _run(config, out, DPOJAX_GRADER_DOWN_AT="3")
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = [line for line in failed.stderr.splitlines() if line.startswith("dpojax train: error:")]
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"online.reward '{GRADER}:answer_hits' raised ConnectionError: the grader at http://grader:8000 does not " \
           "answer" in lines[0], lines[0]
    assert check_nothing_lost(out) == 2
    resumed = _run(config, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert _samples(out) == _samples(reference)
    assert _records(out) == _records(reference)
    assert (out / "export" / "model.safetensors").read_bytes() == \
        (reference / "export" / "model.safetensors").read_bytes()
