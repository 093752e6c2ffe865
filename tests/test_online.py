"""Online preference optimization (docs/online.md) with real `dpojax train` processes on fake CPU devices: a run
is a function of its config and seeds (a second run from scratch equals the first), a SIGKILLed run resumes to the
uninterrupted run's samples, rewards, losses and weights, the meshes (8,1,1) and (2,2,2) equal one device, two
processes equal one, a bad reward function stops the run with one line naming it, and the iterative schedule's
`previous_round` reference. The pure parts (pairs from rewards, fillers, reward checks, config checks) are tested
directly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_models import make_tiny_checkpoint, xla_flags
from tiny_tokenizer import WORDS, make_tokenizer

from dpojax.config import config_from_dict
from dpojax.data.batching import PreferenceBatch
from dpojax.errors import ConfigError, UserError
from dpojax.metrics import read_metrics
from dpojax.online import pairs
from dpojax.online.rewards import load_reward
from dpojax.reward import RewardModel

HERE = Path(__file__).resolve().parent
REWARDS = str(HERE / "online_rewards.py")
HELD_CLI = str(HERE / "held_cli.py")
STEPS = 4
TIMING = {"tokens_per_second", "pairs_per_second", "mfu", "online/gen_tokens_per_second", "online/gen_time_share",
          "online/score_time_share"}


def _prompt_rows(n: int) -> list[dict]:
    rng = random.Random(3)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + "?"
        prompt = [{"role": "user", "content": text}] if i % 5 == 4 else text  # text and chat prompts
        rows.append({"prompt": prompt, "answer": rng.choice(WORDS)})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _prompt_rows(24)))
    cfg = {
        "model": {"name_or_path": str(make_tiny_checkpoint(root / "policy", seed=0)),
                  "tokenizer": str(make_tokenizer(root / "tok"))},
        "data": {"max_length": 48, "cache_dir": str(root / "cache")},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": STEPS, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10},
        "online": {"enabled": True, "prompts": str(prompts), "samples_per_prompt": 4,
                   "sampling": {"max_new_tokens": 8}, "reward": f"{REWARDS}:answer_hits", "seed": 7},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = root / "reference"
    result = _run(path, reference)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "config": path, "reference": reference}


def _env(devices: int | None = 8, **extra: str) -> dict:
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", **extra}


def _cmd(config, out, *overrides, wrapper: str | None = None) -> list[str]:
    head = [sys.executable, wrapper] if wrapper else [sys.executable, "-m", "dpojax.cli"]
    return [*head, "train", str(config), f"output_dir={out}", *overrides]


def _run(config, out, *overrides, devices: int | None = 8) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(config, out, *overrides), env=_env(devices), capture_output=True, text=True,
                          timeout=600)


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")
            if r["split"] == "train"]


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "online_samples.jsonl").read_text().splitlines()]


def _weights(out: Path) -> bytes:
    return (out / "export" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------ whole runs
def test_the_reference_run_records_its_samples_and_metrics(setup):
    ref = setup["reference"]
    samples = _samples(ref)
    assert [s["step"] for s in samples] == [s for s in range(1, STEPS + 1) for _ in range(8)]
    assert all(len(s["completions"]) == 4 and len(s["rewards"]) == 4 for s in samples)
    assert any(isinstance(s["prompt"], list) for s in samples)  # chat prompts went through the template
    recs = _records(ref)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[0]["rewards/chosen"] == 0.0 and recs[1]["rewards/chosen"] != 0.0  # the policy moves from step 1
    for r in recs:
        assert 0 <= r["online/tied_share"] <= 1 and 0 <= r["online/eos_rate"] <= 1
        assert 0 < r["online/completion_length"] <= 8
        np.testing.assert_allclose(r["online/reward_mean"], np.mean(
            [x for s in samples if s["step"] == r["step"] for x in s["rewards"]]), rtol=1e-6)
    # a second run from scratch (the killed run of the next test, steps 1-2, then its resume) equals this one


def test_a_reward_model_scores_the_samples(setup):
    """online.reward_model: a *ForSequenceClassification model (sharing the policy's tokenizer) scores each prompt
    with its sampled ids; the recorded rewards are its scores (tests/test_score.py: those equal transformers')."""
    root = setup["root"]
    rm = make_tiny_checkpoint(root / "reward_model", seed=5, num_labels=1)
    out = root / "with_reward_model"
    result = _run(setup["config"], out, "online.reward=null", f"online.reward_model={rm}", "train.steps=2",
                  "checkpoint.every=null")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = _samples(out)
    from transformers import AutoTokenizer  # the policy's tokenizer, as the run loads it

    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    model = RewardModel.load(rm, policy_tokenizer=tokenizer)
    for s in samples[:4]:
        expected = model.score([s["prompt"]] * len(s["completion_ids"]), s["completions"], s["completion_ids"])
        np.testing.assert_allclose(s["rewards"], expected, rtol=1e-5, atol=1e-6)
    assert len({round(x, 6) for s in samples for x in s["rewards"]}) > 1  # real scores, not a constant


def test_sigkill_then_resume_equals_the_uninterrupted_run(setup):
    """Also the "two runs are equal" test: the killed run ran steps 1-3 from scratch, as the reference did."""
    out = setup["root"] / "killed"
    proc = subprocess.Popen(_cmd(setup["config"], out, wrapper=HELD_CLI), env=_env(DPOJAX_HOLD_AT="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "HELD AT STEP" in line:
            break
    end = time.monotonic() + 240
    while not (out / "checkpoints" / "2").is_dir():  # the async save of step 2 completes while step 3 is held
        assert time.monotonic() < end, "checkpoint 2 never appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert max(s["step"] for s in _samples(out)) == 3  # step 3 sampled and written before the kill
    result = _run(setup["config"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    ref = setup["reference"]
    assert _samples(out) == _samples(ref)  # step 3's lines dropped on resume, then redone the same
    assert _records(out) == _records(ref)
    assert _weights(out) == _weights(ref)


@pytest.mark.parametrize("mesh", ["one_device", "(2,2,2)"])
def test_meshes_equal_the_data_parallel_run(setup, mesh):
    """The reference run is (8,1,1) (data-parallel over 8 devices); one device and (2,2,2) give its samples and
    rewards and, to float tolerance, its losses over 3 steps."""
    out = setup["root"] / f"mesh_{mesh}"
    if mesh == "one_device":
        result = _run(setup["config"], out, "train.steps=3", devices=None)
    else:
        result = _run(setup["config"], out, "train.steps=3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    assert result.returncode == 0, result.stderr[-3000:]
    ref_samples = [s for s in _samples(setup["reference"]) if s["step"] <= 3]
    got = _samples(out)
    assert [s["completions"] for s in got] == [s["completions"] for s in ref_samples]
    np.testing.assert_allclose([s["rewards"] for s in got], [s["rewards"] for s in ref_samples], rtol=1e-6)
    for a, b in zip(_records(setup["reference"])[:3], _records(out), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "online/reward_mean"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_two_processes_equal_one(setup):  # in the parallel pool: nothing timed (as tests/test_gcs.py's 2 processes)
    """2 processes x 4 devices sample, score (each its own prompts) and train like one process with 8 devices."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_cpu", HERE.parent / "launch" / "local_cpu.py")
    local_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_cpu)
    out = setup["root"] / "two_processes"
    code = local_cpu.main(["--processes", "2", "--devices-per-process", "4", "--grace", "30", "train",
                           str(setup["config"]), f"output_dir={out}", "train.steps=3"])
    assert code == 0
    ref_samples = [s for s in _samples(setup["reference"]) if s["step"] <= 3]
    assert _samples(out) == ref_samples  # process 0 wrote every host's samples and rewards, once
    for a, b in zip(_records(setup["reference"])[:3], _records(out), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "online/reward_mean", "online/tied_share"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_reward_function_that_raises_stops_the_run_with_one_line(setup):
    out = setup["root"] / "bad_reward"
    result = _run(setup["config"], out, f"online.reward={REWARDS}:raises", devices=None)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "online.reward" in line]
    assert len(lines) == 1 and "raises" in lines[0] and "RuntimeError: the grader crashed" in lines[0], lines
    assert "Traceback" not in result.stderr


def test_a_missing_reward_function_fails_before_anything_compiles(setup, capsys):
    from dpojax.cli import main

    code = main(["train", str(setup["config"]), f"output_dir={setup['root'] / 'no_reward'}",
                 f"online.reward={REWARDS}:nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'online.reward'" in err and "has no function 'nope'" in err, err


def test_iterative_rounds_and_the_previous_round_reference(setup):
    """2 rounds of 8 prompts, 2 epochs each (2 steps a round): with reference previous_round the first step of
    round 2 starts with the reference equal to the policy (rewards exactly 0), although the policy has moved.
    Its batches are padded [N, K, T] ones; the other runs' are packed (data.packing auto on CPU)."""
    out = setup["root"] / "iterative"
    result = _run(setup["config"], out, "train.steps=null", "online.schedule=iterative", "online.rounds=2",
                  "online.prompts_per_round=8", "online.epochs_per_round=2", "online.reference=previous_round",
                  "checkpoint.every=2", "data.packing=none", devices=None)  # padded batches (the others pack)
    assert result.returncode == 0, result.stderr[-3000:]
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    chosen = [r["rewards/chosen"] for r in recs]
    assert chosen[0] == 0.0 and chosen[1] != 0.0 and chosen[2] == 0.0 and chosen[3] != 0.0, chosen
    assert recs[2]["logps/chosen"] != recs[0]["logps/chosen"]  # round 2 samples from the trained policy
    samples = _samples(out)
    assert [(s["round"], s["step"]) for s in samples] == [(0, 1)] * 8 + [(1, 3)] * 8
    assert "online/reward_mean" in recs[0] and "online/reward_mean" in recs[2]
    assert "online/reward_mean" not in recs[1]  # no sampling inside a round


# ------------------------------------------------------------------------------------------------ pure parts
def test_group_rows_best_vs_worst_all_pairs_ranking_and_ties():
    r = [0.5, 2.0, 0.5, -1.0]
    assert pairs.group_rows(r, "best_vs_worst") == [([1, 3], [0, 1])]
    assert pairs.group_rows(r, "all_pairs") == [([1, 0], [0, 1]), ([1, 2], [0, 1]), ([1, 3], [0, 1]),
                                                ([0, 3], [0, 1]), ([2, 3], [0, 1])]
    assert pairs.group_rows(r, "ranking") == [([1, 0, 2, 3], [0, 1, 1, 2])]
    assert all(pairs.group_rows([1.0] * 4, mode) == [] for mode in pairs.MODES)


def test_step_rows_keep_shapes_with_fillers_and_sampled_ids():
    layout = pairs.Layout((32,), 32, "keep_start", 0)
    prompts = [np.array([1, 5, 6]), np.array([1, 7])]
    completions = [[10, 11, 2], [12], [13, 14], [15, 2], [20], [21], [22], [23, 2]]
    rewards = np.array([1.0, 0.0, 0.5, 0.0, 3.0, 3.0, 3.0, 3.0], np.float32)  # prompt 2: all tied
    rows = pairs.step_rows(prompts, completions, rewards, 4, "all_pairs", layout, "test")
    assert rows.tied == 1 and len(rows.indices) == 12 and rows.mask.tolist() == [1.0] * 5 + [0.0] * 7
    batch = pairs.host_batch(rows, layout)
    assert isinstance(batch, PreferenceBatch) and batch.input_ids_NxKxT.shape == (12, 2, 32)
    assert batch.input_ids_NxKxT[0, 0, :6].tolist() == [1, 5, 6, 10, 11, 2]  # prompt + completion as sampled
    assert batch.input_ids_NxKxT[0, 1, :6].tolist() == [1, 5, 6, 13, 14, 0]  # cut at max_new_tokens: no EOS added
    assert batch.completion_mask_NxKxT[0, 0, :6].tolist() == [0, 0, 0, 1, 1, 1]
    everything_tied = pairs.step_rows(prompts, completions, np.zeros(8, np.float32), 4, "ranking", layout, "test")
    batch = pairs.host_batch(everything_tied, layout)
    assert batch.input_ids_NxKxT.shape == (2, 4, 32) and batch.prompt_mask_N.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name, expected", [
    ("raises", "raised RuntimeError: the grader crashed"),
    ("wrong_count", "returned 3 values for 4 completions"),
    ("not_finite", "returned nan for prompt 'what?'"),
])
def test_bad_reward_functions_are_one_line_naming_the_function(name, expected):
    reward = load_reward(f"{REWARDS}:{name}")
    with pytest.raises(UserError) as e:
        reward.score(["what?"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {"answer": ["x"] * 4})
    msg = str(e.value)
    assert "\n" not in msg and f"online_rewards.py:{name}" in msg and expected in msg and "what?" in msg, msg


def test_config_checks():
    base = {"model": {"name_or_path": "m"}, "loss": {"type": "sigmoid"},
            "online": {"enabled": True, "prompts": "p.jsonl", "reward": "r.py:f"}}
    assert config_from_dict(base).online.samples_per_prompt == 4

    def error(*overrides, raw=base):
        with pytest.raises(ConfigError) as e:
            config_from_dict(raw, list(overrides))
        return str(e.value)

    assert "online.enabled" in error(raw={"model": {"name_or_path": "m"}, "online": {"prompts": "p.jsonl"}})
    assert "at least 2" in error("online.samples_per_prompt=1")
    assert "plackett_luce" in error("loss.type=plackett_luce") and "ranking" in error("online.pairs=ranking")
    assert "exactly one reward" in error("online.reward_model=some/model")  # and online.reward
    assert config_from_dict(base, ["online.reward=null", "online.reward_model=some/model"]).online.reward is None
    assert "module:function" in error("online.reward=no_function_named")
    assert "iterative" in error("online.rounds=3")
    assert "data.train" in error("data.train=x.jsonl")
    assert "temperature" in error("online.sampling.temperature=0")
    assert "LoRA" in error("online.schedule=iterative", "online.reference=previous_round", "model.lora.enabled=true")


def test_smollm2_reward_and_prompts():
    repo = HERE.parent
    rows = [json.loads(line) for line in (repo / "configs/smollm2/train_prompts.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (repo / "configs/smollm2/train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [t["prompt"] for t in train] and len(rows) == 115
    for r, t in zip(rows, train):  # the answer key is the result in the chosen answer ("8 + 2 = 10.")
        assert t["chosen"][0]["content"] == f"{r['prompt'][0]['content'][8:-1]} = {r['answer']}."
    exact, short = (load_reward(f"{repo}/configs/smollm2/reward.py:{n}") for n in ("exact_match", "exact_then_short"))
    completions = ["8 + 2 = 10.", "8 + 2 = 11.", "The answer is 10. Addition is fun.", "Ten."]
    fields = {"answer": [10] * 4}
    assert exact.score(["q"] * 4, completions, [[]] * 4, fields).tolist() == [1.0, 0.0, 1.0, 0.0]
    np.testing.assert_allclose(short.score(["q"] * 4, completions, [[]] * 4, fields), [1.0, 0.0, 0.97, 0.0])
    cfg = yaml.safe_load((repo / "configs/smollm2-135m_arithmetic_online.yaml").read_text())
    assert config_from_dict(cfg).online.reward == "configs/smollm2/reward.py:exact_then_short"
