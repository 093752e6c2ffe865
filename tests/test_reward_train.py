"""Reward-model training (task: reward) against TRL 1.16's RewardTrainer, end to end on tiny checkpoints.

Fast (in `make test`, tiny Llama reward model, standard rows): `dpojax eval` equals `RewardTrainer.evaluate()` (every
TRL reward metric, shared-prompt packed rows); 5 SGD steps (padded [N, K, T] batches) give TRL's losses, and the
exported `*ForSequenceClassification` folder scores like TRL's model after the same 5 steps; the refusals.
Slow (DPOJAX_SLOW_TESTS=1): conversational rows, Qwen3 and Gemma 2, rankings (Plackett-Luce), meshes, SIGKILL and
resume, LoRA, and the demo reaching held-out accuracy >= 0.9.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import load_tiny_tokenizer
from trl_harness import make_assets, reward_overrides, trl_reward_trainer

from dpojax.config import config_from_dict
from dpojax.data.tokenize import tokenize_rows
from dpojax.errors import ConfigError, ModelError
from dpojax.losses import REWARD_METRICS
from dpojax.metrics import read_metrics
from dpojax.trainer.evaluation import evaluate
from dpojax.trainer.loop import train

SLOW = pytest.mark.skipif(os.environ.get("DPOJAX_SLOW_TESTS") != "1", reason="slow: set DPOJAX_SLOW_TESTS=1")
SGD = dict(optim__name="sgd", optim__lr=0.5, optim__schedule="constant", optim__max_grad_norm=None)
TRL_SGD = dict(learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=1e9,
               logging_steps=1, warmup_steps=0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    out = make_assets(root, n_rows=16)
    out["rm"] = make_tiny_checkpoint(root / "rm", "llama", seed=2, num_labels=1)
    return out


def _close(ours: float, theirs: float, rel: float = 1e-4, abs_: float = 1e-5) -> bool:
    return abs(ours - theirs) <= rel * abs(theirs) + abs_


def _eval_parity(assets, tmp_path, model, fmt, data=None, trl_args=None, **extra):
    data = data or assets[fmt]
    ours = evaluate(config_from_dict(reward_overrides(model, assets, data, tmp_path / "ours",
                                                      train__eval_batch_size=16, **extra)))
    theirs = trl_reward_trainer(model, assets, data, tmp_path / "trl", per_device_eval_batch_size=16,
                                **(trl_args or {})).evaluate()
    for name in REWARD_METRICS:
        assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])
    assert theirs["eval_max_reward"] > theirs["eval_min_reward"]  # the scores differ, so equality has teeth
    return ours


def test_eval_matches_trl_evaluate(assets, tmp_path):
    """With TRL's margin column and center_rewards_coefficient; packed rows (data.packing auto: shared_prompt)."""
    rows = [json.loads(line) for line in assets["standard"].read_text().splitlines()]
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps({**r, "margin": 0.25 * (i % 5)}) + "\n" for i, r in enumerate(rows)))
    _eval_parity(assets, tmp_path, assets["rm"], "standard", data=data,
                 trl_args={"center_rewards_coefficient": 0.01}, reward__center_rewards_coefficient=0.01)
    record = read_metrics(tmp_path / "ours" / "metrics.jsonl")[-1]
    assert record["split"] == "eval" and set(REWARD_METRICS) <= set(record)


def _eight_rows(assets, tmp_path, fmt: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"eight_{fmt}.jsonl"
    data.write_text("\n".join(assets[fmt].read_text().splitlines()[:8]) + "\n")
    return data


def _steps_parity(assets, tmp_path, fmt: str, packing: str, steps: int = 5):
    """(our losses, TRL's trainer after the same steps): 8 pairs = one batch per step, SGD."""
    data = _eight_rows(assets, tmp_path, fmt)
    out = tmp_path / "ours"
    train(config_from_dict(reward_overrides(assets["rm"], assets, data, out, train__batch_size=8,
                                            train__steps=steps, train__log_every=1, data__eval=None,
                                            data__packing=packing, **SGD)))
    ours = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    trainer = trl_reward_trainer(assets["rm"], assets, data, tmp_path / "trl", per_device_train_batch_size=8,
                                 max_steps=steps, **TRL_SGD)
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h][:steps]
    assert len(ours) == len(theirs) == steps
    assert abs(ours[-1] - ours[0]) > 1e-2  # training moved the loss
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    return out, trainer


def _torch_scores(model, trainer, n: int = 16):
    """Scores of the trainer's first n tokenized chosen/rejected sequences under a torch classifier."""
    import torch

    ds = trainer.train_dataset
    seqs = [ds[i][key] for i in range(min(n, len(ds))) for key in ("chosen_ids", "rejected_ids")]
    with torch.no_grad():
        return np.asarray([float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs])


def test_training_steps_match_trl_and_export_scores(assets, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    out, trainer = _steps_parity(assets, tmp_path, "standard", "none")
    exported = AutoModelForSequenceClassification.from_pretrained(out / "export", dtype=torch.float32)
    assert exported.config.architectures == ["LlamaForSequenceClassification"]
    trainer.model.eval()
    theirs, ours = _torch_scores(trainer.model, trainer), _torch_scores(exported.eval(), trainer)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)  # our trained weights are TRL's


def test_reward_loss_by_hand():
    """Pairs: TRL's formula (margin, centering), fillers out of every metric; a ranking: Plackett-Luce."""
    import jax
    import jax.numpy as jnp

    from dpojax import losses
    from dpojax.losses.ranking import plackett_luce_nll

    reward_loss = jax.jit(losses.reward_loss, static_argnames="center_coef")  # one compile per shape, not per op
    s = jnp.asarray([[2.0, 1.0], [0.5, 1.5], [9.0, -9.0]])  # the last prompt is a filler
    loss, m = reward_loss(s, jnp.asarray([[0, 1]] * 3), jnp.ones((3, 2)), jnp.asarray([1.0, 1.0, 0.0]),
                          margin_N=jnp.asarray([0.5, 0.0, 0.0]), center_coef=0.01)
    want = [np.logaddexp(0, -(2 - 1 - 0.5)) + 0.01 * 9, np.logaddexp(0, 1.0) + 0.01 * 4]
    np.testing.assert_allclose(float(loss), sum(want), rtol=1e-6)
    value = {k: float(a) / float(b) for k, (a, b) in m.items()}
    assert value["accuracy"] == 0.5 and value["min_reward"] == 0.5 and value["max_reward"] == 2.0
    np.testing.assert_allclose([value["margin"], value["mean_reward"]], [0.0, 1.25], rtol=1e-6)
    ranked, rank = jnp.asarray([[3.0, 1.0, 2.0]]), jnp.asarray([[0, 1, 2]])
    loss, m = reward_loss(ranked, rank, jnp.ones((1, 3)), jnp.ones(1))
    want = float(jax.jit(plackett_luce_nll)(ranked, rank, jnp.ones((1, 3)))[0])
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(m["accuracy"][0]) / float(m["accuracy"][1]) == 2 / 3  # (0>1), (0>2) right; (1>2) wrong


# ---------------------------------------------------------------------------------------------- refusals
def test_reward_task_refuses_preference_keys(assets, tmp_path):
    base = reward_overrides(assets["rm"], assets, assets["standard"], tmp_path / "x")
    for key, value, named in (("loss", {"type": "ipo"}, "loss.type"), ("loss", {"beta": 0.5}, "loss.beta"),
                              ("ref_model", {"precompute": True}, "ref_model.precompute")):
        with pytest.raises(ConfigError, match=f"'{named}' is set, but task=reward"):
            config_from_dict({**base, key: value})
    pref = {k: v for k, v in base.items() if k != "task"}
    with pytest.raises(ConfigError, match="'reward.center_rewards_coefficient' is set"):
        config_from_dict({**pref, "reward": {"center_rewards_coefficient": 0.01}})


def test_eval_of_a_causal_lm_is_refused(assets, tmp_path):
    cfg = config_from_dict(reward_overrides(assets["policy"], assets, assets["standard"], tmp_path / "none"))
    with pytest.raises(ModelError, match=r"has no score head \(score.weight\): it is a causal LM"):
        evaluate(cfg)


# ---------------------------------------------------------------------------------------------- slow
@SLOW
def test_conversational_eval_and_steps_match_trl(assets, tmp_path):
    _eval_parity(assets, tmp_path / "eval", assets["rm"], "conversational", data__packing="none")
    _steps_parity(assets, tmp_path / "steps", "conversational", "shared_prompt")


@SLOW
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_families_eval_matches_trl(assets, tmp_path, family, fmt):
    model = make_tiny_checkpoint(tmp_path / "rm", family, seed=2, num_labels=1)
    _eval_parity(assets, tmp_path, model, fmt)


@SLOW
def test_rankings_train_through_plackett_luce(assets, tmp_path):
    """Rankings of 3 and 2 responses: the eval loss is the Plackett-Luce NLL of transformers' scores, packed rows
    give the padded batch's metrics; training raises the ranking accuracy."""
    import torch
    from transformers import AutoModelForSequenceClassification

    rows = [json.loads(line) for line in assets["standard"].read_text().splitlines()]
    ranked = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["rejected"] + " so"][:2 + i % 2]}
              for i, r in enumerate(rows)]  # K = 3 and K = 2 rows: padding responses in the [N, K, T] batch
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ranked))
    cfg = config_from_dict(reward_overrides(assets["rm"], assets, data, tmp_path / "ours",
                                            train__eval_batch_size=16, data__packing="none"))
    ours = evaluate(cfg)
    packed = evaluate(config_from_dict(reward_overrides(assets["rm"], assets, data, tmp_path / "packed",
                                                        train__eval_batch_size=16, data__packing="shared_prompt")))
    for name in REWARD_METRICS:
        assert _close(packed[name], ours[name], rel=1e-5), (name, packed[name], ours[name])
    tok = tokenize_rows(ranked, load_tiny_tokenizer(assets["tok"]), max_length=48)
    model = AutoModelForSequenceClassification.from_pretrained(assets["rm"], dtype=torch.float32).eval()
    nll = []
    for p, responses in zip(tok.prompt_ids, tok.response_ids, strict=True):
        with torch.no_grad():
            s = np.asarray([float(model(input_ids=torch.tensor([list(p) + list(r)])).logits[0, 0])
                            for r in responses], np.float64)
        nll.append(sum(np.log(np.sum(np.exp(s[k:]))) - s[k] for k in range(len(s) - 1)))
    assert _close(ours["loss"], float(np.mean(nll)))
    trained = train(config_from_dict(reward_overrides(
        assets["rm"], assets, data, tmp_path / "train", train__batch_size=8, train__steps=10,
        **{**SGD, "optim__lr": 0.1})))
    assert trained["accuracy"] > ours["accuracy"] and trained["loss"] < ours["loss"]


@SLOW
def test_meshes_equal_one_device(assets, tmp_path):
    """5 AdamW steps on meshes (8,1,1) and (2,2,2) (packed rows) equal one device (padded batches): losses and
    every parameter, the score head included."""
    import dataclasses

    import jax
    from test_sharding import _flat, run_steps

    from dpojax.sharding import make_mesh

    cfg = config_from_dict(reward_overrides(
        assets["rm"], assets, assets["standard"], tmp_path / "out", train__batch_size=8, train__steps=5,
        data__eval=None, optim__name="adamw", optim__lr=1e-3, optim__weight_decay=0.01, optim__schedule="constant"))
    unpacked = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing="none"))
    losses_1, state_1, _ = run_steps(unpacked, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    assert abs(losses_1[-1] - losses_1[0]) > 1e-3
    for shape in ((8, 1, 1), (2, 2, 2)):
        losses, state, _ = run_steps(cfg, make_mesh(*shape))
        np.testing.assert_allclose(losses, losses_1, rtol=1e-6, atol=1e-6)
        ours, ref = _flat(state.params), _flat(state_1.params)
        assert ours.keys() == ref.keys() and "score/weight" in ours
        for name in ours:
            np.testing.assert_allclose(np.asarray(ours[name][...]), np.asarray(ref[name][...]), rtol=1e-5,
                                       atol=2e-6, err_msg=f"{shape} {name}")


@SLOW
def test_sigkill_resumes_exactly(assets, tmp_path):
    import signal

    import yaml
    from test_resume import _run, _start_held, _train_records, _wait_for_dir

    cfg = reward_overrides(assets["rm"], assets, assets["standard"], tmp_path / "unused", data__eval=None,
                           train__batch_size=8, train__steps=6, train__log_every=1,
                           optim__name="adamw", optim__lr=3e-3, optim__schedule="constant")
    cfg["checkpoint"] = {"every": 2, "keep": 10}
    cfg.pop("output_dir")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    reference = tmp_path / "uninterrupted"
    result = _run(config, reference)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "killed"
    proc = _start_held(config, out, 5)
    _wait_for_dir(out / "checkpoints" / "4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    result = _run(config, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert _train_records(out) == _train_records(reference) and len(_train_records(out)) == 6
    # the reward run's folder resumed as a preference run: refused with one line (its model is a classifier)
    pref = {k: v for k, v in cfg.items() if k != "task"}
    config.write_text(yaml.safe_dump(pref))
    result = _run(config, out)
    assert result.returncode != 0 and "Train or evaluate it with task: reward" in result.stderr, result.stderr[-2000:]


@SLOW
def test_demo_reaches_accuracy_and_its_export_scores_like_transformers(tmp_path):
    """configs/demo_reward.yaml: held-out accuracy >= 0.9; the export, scored by transformers, gives the run's final
    eval metrics (fp32, 1e-4)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpojax.config import load_config

    root = Path(__file__).resolve().parents[1]
    demo = root / "configs" / "demo"
    cfg = load_config(root / "configs" / "demo_reward.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.name_or_path={demo / 'model'}", f"data.train={demo / 'train.jsonl'}",
        f"data.eval={demo / 'eval.jsonl'}"])
    final = train(cfg)
    assert final["accuracy"] >= 0.9, final
    export = tmp_path / "run" / "export"
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (root / "configs/demo/eval.jsonl").read_text().splitlines()]
    tok = tokenize_rows(rows, AutoTokenizer.from_pretrained(export), max_length=cfg.data.max_length)
    scores = []
    with torch.no_grad():
        for p, responses in zip(tok.prompt_ids, tok.response_ids, strict=True):
            if max(len(p) + len(r) for r in responses) > cfg.data.max_length:
                continue  # dropped from the eval set, as TRL drops it
            scores.append([float(model(input_ids=torch.tensor([list(p) + list(r)])).logits[0, 0]) for r in responses])
    s = np.asarray(scores, np.float64)
    d = s[:, 0] - s[:, 1]
    loss = np.mean(np.logaddexp(0.0, -d) + 0.01 * (s[:, 0] + s[:, 1]) ** 2)
    for name, value in (("loss", loss), ("margin", d.mean()), ("accuracy", (d > 0).mean()),
                        ("mean_reward", s.mean())):
        assert _close(final[name], float(value), abs_=1e-4), (name, final[name], value)


@SLOW
def test_lora_matches_trl_with_peft(assets, tmp_path):
    """The same PEFT adapter (B random) on the reward model in both, PEFT's SEQ_CLS (score head trained whole):
    eval equals TRL's, 5 SGD steps give TRL's losses, and the export (adapters merged) scores like TRL's merged
    model after them."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    torch_rm = AutoModelForSequenceClassification.from_pretrained(assets["rm"], dtype=torch.float32)
    made = peft.get_peft_model(torch_rm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    made.save_pretrained(str(tmp_path / "adapter"))
    keys = {"model__lora": {"enabled": True, "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"],
                            "init_from": str(tmp_path / "adapter")}}
    data = assets["standard"]
    ours = evaluate(config_from_dict(reward_overrides(assets["rm"], assets, data, tmp_path / "ours",
                                                      train__eval_batch_size=16, **keys)))
    theirs = trl_reward_trainer(assets["rm"], assets, data, tmp_path / "trl", adapter=tmp_path / "adapter",
                                per_device_eval_batch_size=16).evaluate()
    for name in REWARD_METRICS:
        assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])

    eight = _eight_rows(assets, tmp_path, "standard")
    out = tmp_path / "ours_train"
    train(config_from_dict(reward_overrides(assets["rm"], assets, eight, out, train__batch_size=8, train__steps=5,
                                            train__log_every=1, data__eval=None, **SGD, **keys)))
    ours = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    trainer = trl_reward_trainer(assets["rm"], assets, eight, tmp_path / "trl_train", adapter=tmp_path / "adapter",
                                 per_device_train_batch_size=8, max_steps=5, **TRL_SGD)
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h][:5]
    assert abs(ours[-1] - ours[0]) > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    exported = AutoModelForSequenceClassification.from_pretrained(out / "export", dtype=torch.float32).eval()
    merged = trainer.model.merge_and_unload().eval()
    np.testing.assert_allclose(_torch_scores(exported, trainer), _torch_scores(merged, trainer), rtol=1e-4,
                               atol=1e-4)
