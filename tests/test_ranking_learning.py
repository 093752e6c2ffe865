"""Learning test: on a synthetic 4-way ranking task, Plackett-Luce training on the whole ranking orders held-out
responses much better (Kendall tau of the implicit rewards) than DPO on best-vs-worst pairs of the same rows, for the
same number of steps from the same random init.

The task: each response is three words drawn from the vocabulary of its quality level (4 levels, 4 words each, no
word in two levels), so quality is a learnable token-level property. Best-vs-worst pairs only ever show levels 3 and
0; the order of levels 2 and 1 is never shown, and on held-out rows it comes out at chance. Measured on 2 CPU cores
(40 steps): Plackett-Luce tau 1.0, best-vs-worst tau about 0.7.
"""

from __future__ import annotations

import json
import random

import pytest
from tiny_tokenizer import make_tokenizer

from dpojax.config import config_from_dict
from dpojax.metrics import read_metrics
from dpojax.trainer.evaluation import evaluate
from dpojax.trainer.loop import train

PROMPT_WORDS = "the sky is what color it a in where you are likes".split()
LEVEL_WORDS = {3: "good yes blue sun", 2: "green sea cat fish", 1: "red dog hot big", 0: "bad no cold why"}
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def ranked_rows(n: int, seed: int) -> list[dict]:
    """n prompts, each with one response per quality level, best first."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 3))) + "?"
        responses = [" " + " ".join(rng.choice(LEVEL_WORDS[lv].split()) for _ in range(3)) + "." for lv in (3, 2, 1, 0)]
        rows.append({"prompt": prompt, "responses": responses})
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    for name, n, seed in (("train", 128, 0), ("eval", 32, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked_rows(n, seed)))
    model = root / "model"  # a config.json is all `model.init: random` reads
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    return {"root": root, "tok": make_tokenizer(root / "tok"), "model": model}


def _config(task, out, **sections):
    raw = {
        "model": {"name_or_path": str(task["model"]), "tokenizer": str(task["tok"]), "init": "random", "seed": 0},
        "data": {"train": str(task["root"] / "train.jsonl"), "max_length": 32, "max_responses": 4,
                 "cache_dir": str(task["root"] / "cache")},
        "loss": {"type": "plackett_luce", "beta": 0.1},
        "optim": {"name": "adamw", "lr": 2e-3, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": 16, "steps": 40, "log_every": 10},
        "output_dir": str(out),
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return config_from_dict(raw)


def held_out_tau(task, out) -> dict[str, float]:
    """Plackett-Luce metrics of the run's final policy on the held-out ranked rows (`dpojax eval`)."""
    return evaluate(_config(task, out, data={"eval": str(task["root"] / "eval.jsonl")}))


def test_full_ranking_beats_best_vs_worst_pairs(task):
    pl_dir, pairs_dir = task["root"] / "pl", task["root"] / "bvw"
    train(_config(task, pl_dir))
    train(_config(task, pairs_dir, loss={"type": "sigmoid"}, data={"pairs_from_scores": "best_vs_worst"}))
    pl, pairs = held_out_tau(task, pl_dir), held_out_tau(task, pairs_dir)
    print(f"\nheld-out Kendall tau: plackett_luce {pl['rewards/kendall_tau']:.3f}, "
          f"best_vs_worst {pairs['rewards/kendall_tau']:.3f}")
    # both learn best vs worst ...
    assert pl["rewards/accuracies"] >= 0.95 and pairs["rewards/accuracies"] >= 0.95
    # ... but only the full ranking teaches the order of the middle levels
    assert pl["rewards/kendall_tau"] >= 0.9, pl
    assert pl["rewards/kendall_tau"] - pairs["rewards/kendall_tau"] >= 0.15, (pl, pairs)
    assert pl["rewards/ranking_accuracy"] > pairs["rewards/ranking_accuracy"]
    train_records = [r for r in read_metrics(pl_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
