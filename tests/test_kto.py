"""KTO on unpaired rows against TRL 1.16's KTOTrainer: the unpaired format and TRL's unpairing, the KL completions,
the loss, `dpojax eval` equal to KTOTrainer.evaluate() and training steps equal to KTOTrainer's, meshes, resume,
and one-line errors for bad input.

The default suite runs the cheap checks and one end-to-end comparison (Llama, standard rows, four eval batches of 4
against KL chunks of 8); DPOJAX_SLOW_TESTS=1 runs the rest (conversational rows, training steps, data.unpair,
apo_zero_unpaired, Qwen3 and Gemma 2, precompute, LoRA, meshes, resume).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows
from trl_harness import dpojax_overrides, kto_trainer, make_assets, make_unpaired_rows, write_jsonl

from dpojax import losses
from dpojax.config import config_from_dict
from dpojax.data import formats, unpaired
from dpojax.data.loader import load_preferences
from dpojax.data.tokenize import tokenize_rows
from dpojax.errors import ConfigError, DataError
from dpojax.metrics import read_metrics
from dpojax.trainer.evaluation import evaluate
from dpojax.trainer.loop import train

SLOW = pytest.mark.skipif(os.environ.get("DPOJAX_SLOW_TESTS") != "1", reason="set DPOJAX_SLOW_TESTS=1 (minutes)")
METRICS = losses.KTO_METRICS  # TRL 1.16 KTOTrainer's names: loss, rewards/*, logps/*, logits/*, kl, entropy


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    out = make_assets(root)
    for fmt in ("standard", "conversational"):
        out[f"u_{fmt}"] = write_jsonl(root / f"unpaired_{fmt}.jsonl", make_unpaired_rows(16, fmt))
        out[f"u8_{fmt}"] = write_jsonl(root / f"unpaired8_{fmt}.jsonl", make_unpaired_rows(8, fmt))
    return out


def _close(ours: float, theirs: float, rel: float = 1e-4, abs_: float = 1e-5) -> bool:
    return abs(ours - theirs) <= rel * abs(theirs) + abs_


def _assert_matches_trl(ours: dict, theirs: dict, names=METRICS) -> None:
    for name in names:
        assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])
    assert theirs["eval_rewards/margins"] != 0.0 and theirs["eval_kl"] != 0.0  # the comparison has teeth


def _eval_vs_trl(assets, tmp_path, data, *, ours_kw=None, trl_kw=None, eval_bs=4):
    """`dpojax eval` (on a (4, 1, 2) mesh) and KTOTrainer.evaluate() on `data`: eval batches of 4, KL chunks of 8
    (the train batch)."""
    ours_kw = {"loss__type": "kto", **(ours_kw or {})}
    cfg = config_from_dict(dpojax_overrides(assets, data, tmp_path / "ours", train__batch_size=8,
                                            train__eval_batch_size=eval_bs, mesh={"data": 4, "fsdp": 1, "tensor": 2},
                                            **ours_kw))
    ours = evaluate(cfg)
    theirs = kto_trainer(assets, data, tmp_path / "trl", per_device_train_batch_size=8,
                         per_device_eval_batch_size=eval_bs, **(trl_kw or {})).evaluate()
    return ours, theirs


# ------------------------------------------------------------------------------------------------ format
def test_unpaired_rows_normalize_tokenize_and_cache(tmp_path):
    tok = load_tiny_tokenizer(tmp_path / "tok")
    for fmt in ("standard", "conversational"):
        rows = make_unpaired_rows(6, fmt)
        pref = formats.normalize_rows(rows, "u.jsonl")
        assert pref.fmt.unpaired and pref.fmt.name == f"unpaired {fmt}"
        assert [r["label"] for r in pref.rows] == [r["label"] for r in rows]
        assert all(r["responses"] == [row["completion"]] for r, row in zip(pref.rows, rows))
        data = tokenize_rows(pref, tok, max_length=48, cache_dir=tmp_path / "cache")
        assert data.num_responses == 1 and data.labels.tolist() == [r["label"] for r in rows]
        again = tokenize_rows(pref, tok, max_length=48, cache_dir=tmp_path / "cache")
        assert again.from_cache and again.labels.tolist() == data.labels.tolist()
        # the same text as pairs tokenizes each completion to the same ids (one tokenization path)
        pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"]} for r in rows]
        paired = tokenize_rows(pairs, tok, max_length=48)
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(data.response_ids, paired.response_ids))


def test_unpair_follows_trl_unpair_preference_dataset():
    import datasets  # the reference: TRL's own unpairing, over more rows than one block
    from trl.data_utils import unpair_preference_dataset

    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(formats.UNPAIR_BLOCK + 3)]
    ours = formats.unpair_rows(formats.normalize_rows(rows, "pairs"))
    theirs = unpair_preference_dataset(datasets.Dataset.from_list(rows)).to_list()
    assert [(r["prompt"], r["responses"][0], r["label"]) for r in ours.rows] == \
        [(r["prompt"], r["completion"], r["label"]) for r in theirs]
    assert ours.fmt.unpaired and ours.row_index[formats.UNPAIR_BLOCK] == 0  # each keeps its source row


def test_kl_completions_rotate_within_chunks(tmp_path):
    data = tokenize_rows(make_unpaired_rows(7, "standard"), load_tiny_tokenizer(tmp_path / "tok"), max_length=48)
    kl = unpaired.with_kl_completions(data, 3)
    own = [r[0] for r in data.response_ids]
    expect = [own[2], own[0], own[1], own[5], own[3], own[4], own[6]]  # chunks [0 1 2] [3 4 5] [6], as TRL
    assert kl.num_responses == 2 and kl.fingerprint != data.fingerprint
    assert all(np.array_equal(r[0], y) and np.array_equal(r[1], e) for r, y, e in zip(kl.response_ids, own, expect))


# -------------------------------------------------------------------------------------------------- loss
def test_kto_loss_formula_clamp_and_detached_kl():
    beta, dw, uw = 0.5, 1.5, 0.7
    rng = np.random.default_rng(0)
    logps, ref = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    label, mask = np.array([1, 0, 1, 1, 0], np.float32), np.array([1, 1, 1, 1, 0], np.float32)
    kls = []
    for name, shift in (("kto", -3.0), ("kto", 3.0), ("apo_zero_unpaired", 0.0)):
        cfg = config_from_dict({"model": {"name_or_path": "x"}, "loss": {
            "type": name, "beta": beta, "desirable_weight": dw, "undesirable_weight": uw}}).loss
        hp = losses.LossParams.of(cfg)
        pol = logps + np.array([0.0, shift], np.float32)  # shift > 0 makes the KL estimate positive
        total, metrics = losses.kto_loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(label), jnp.asarray(mask),
                                         cfg, hp)
        r = pol[:, 0] - ref[:, 0]
        z0 = max(0.0, float(np.mean((pol[:, 1] - ref[:, 1])[:4]))) if name == "kto" else 0.0
        kls.append(z0)
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        if name == "kto":
            per = np.where(label > 0, dw * (1 - sig(beta * (r - z0))), uw * (1 - sig(beta * (z0 - r))))
        else:
            per = np.where(label > 0, dw * (1 - sig(beta * r)), uw * sig(beta * r))
        np.testing.assert_allclose(float(total), np.sum(per[:4]), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["kl"][0]), z0, rtol=1e-5, atol=1e-7)
        assert float(metrics["loss"][1]) == 4 and float(metrics["rewards/margins"][1]) == 1
        np.testing.assert_allclose(float(metrics["rewards/chosen"][0]), beta * np.mean(r[[0, 2, 3]]), rtol=1e-5)
        grad = jax.grad(lambda p, c=cfg, h=hp: losses.kto_loss(p, jnp.asarray(ref), jnp.asarray(label),
                                                               jnp.asarray(mask), c, h)[0])(jnp.asarray(pol))
        assert np.all(np.asarray(grad)[:, 1] == 0.0) and np.all(np.asarray(grad)[4] == 0.0)  # z0 detached
    assert kls[0] == 0.0 < kls[1]  # the clamp at 0 and a positive estimate were both exercised


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_is_one_line_naming_row_file_and_fix(tmp_path, caplog):
    tok = load_tiny_tokenizer(tmp_path / "tok")
    rows = make_unpaired_rows(4, "standard")
    del rows[1]["label"]
    rows[2]["label"] = "yes"
    with pytest.raises(DataError) as e:
        formats.normalize_rows(rows, "u.jsonl")
    assert "row 1, field 'label': missing" in str(e.value) and "row 2, field 'label'" in str(e.value)
    assert "true" in str(e.value) and "'yes'" in str(e.value)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pref_rows(4, "standard"))
    with pytest.raises(DataError, match=r"pairs.jsonl holds preference pairs.*data.unpair=true"):
        load_preferences(str(pairs), tok, max_length=48, unpaired_loss=True)
    u = write_jsonl(tmp_path / "u.jsonl", make_unpaired_rows(4, "standard"))
    with pytest.raises(DataError, match=r"u.jsonl holds unpaired rows.*loss.type=kto"):
        load_preferences(str(u), tok, max_length=48)
    only_good = [dict(r, label=True) for r in make_unpaired_rows(4, "standard")]
    data = tokenize_rows(only_good, tok, max_length=48, source="good.jsonl")
    with pytest.raises(DataError, match=r"good.jsonl: none of its 4 rows is undesirable.*undesirable_weight=0"):
        unpaired.check_balance(data, 1.0, 1.0)
    unpaired.check_balance(data, 1.0, 0.0)  # no undesirable term asked for: fine
    mixed = tokenize_rows(make_unpaired_rows(9, "standard"), tok, max_length=48)  # 6 desirable, 3 undesirable
    with caplog.at_level(logging.WARNING):
        unpaired.check_balance(mixed, 1.0, 1.0)
    assert "desirable_weight in [0.5, 0.67] OR undesirable_weight in [1.5, 2.0]" in caplog.text  # TRL's bounds
    base = {"model": {"name_or_path": "x"}}
    for extra, match in (
        ({"loss": {"type": "sigmoid"}, "data": {"unpair": True}}, "data.unpair"),
        ({"loss": {"type": "kto"}, "train": {"batch_size": 1}}, "at least 2 rows per micro-batch"),
        ({"loss": {"type": "kto", "label_smoothing": 0.1}}, r"kto does not support \['label_smoothing'\]"),
        ({"loss": {"type": "sigmoid", "desirable_weight": 2.0}}, "use loss.type=kto"),
        ({"loss": {"type": ["kto", "sigmoid"]}}, "cannot be combined"),
    ):
        with pytest.raises(ConfigError, match=match) as e:
            config_from_dict({**base, **extra})
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ TRL parity
def test_eval_matches_trl_kto_llama_standard(assets, tmp_path):
    ours, theirs = _eval_vs_trl(assets, tmp_path, assets["u_standard"])
    _assert_matches_trl(ours, theirs)
    record = read_metrics(tmp_path / "ours" / "metrics.jsonl")[-1]
    assert record["split"] == "eval" and set(METRICS) <= set(record)


@SLOW
@pytest.mark.parametrize("case", ["conversational", "apo_zero_unpaired", "unpair", "unpair_one_class_batches",
                                  "precompute"])
def test_eval_matches_trl_kto_variants(assets, tmp_path, case):
    data, ours_kw, trl_kw, eval_bs = assets["u_conversational"], {}, {}, 4
    if case == "apo_zero_unpaired":
        data, ours_kw, trl_kw = assets["u_standard"], {"loss__type": "apo_zero_unpaired"}, {
            "loss_type": "apo_zero_unpaired"}
    if case == "unpair":  # paired rows, which TRL's KTOTrainer unpairs itself: 16 chosen, then 16 rejected rows, so
        data, ours_kw, eval_bs = assets["conversational"], {"data__unpair": True}, 32  # one batch holds both classes
    if case == "unpair_one_class_batches":  # eval batches of 4 of one label: no batch has a margin to report
        data, ours_kw = assets["conversational"], {"data__unpair": True}
    if case == "precompute":
        ours_kw, trl_kw = {"ref_model__precompute": True}, {"precompute_ref_log_probs": True}
    ours, theirs = _eval_vs_trl(assets, tmp_path, data, ours_kw=ours_kw, trl_kw=trl_kw, eval_bs=eval_bs)
    if case == "unpair_one_class_batches":  # TRL leaves the metric out, and so does dpojax (it used to show 0.0)
        assert "rewards/margins" not in ours and "eval_rewards/margins" not in theirs
        for name in (n for n in METRICS if n != "rewards/margins"):
            assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])
        return
    names = [n for n in METRICS if n != "kl"] if case == "apo_zero_unpaired" else METRICS
    for name in names:
        assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])
    assert theirs["eval_rewards/margins"] != 0.0  # policy and reference differ: the comparison has teeth
    assert ours["kl"] == 0.0 == theirs["eval_kl"] if case == "apo_zero_unpaired" else "kl" in ours


@SLOW
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_eval_matches_trl_kto_families(tmp_path, family):
    assets = make_assets(tmp_path / "assets", family=family)
    data = write_jsonl(tmp_path / "u.jsonl", make_unpaired_rows(16, "standard"))
    ours, theirs = _eval_vs_trl(assets, tmp_path, data)
    _assert_matches_trl(ours, theirs)


def _our_losses(assets, data, out, steps=5, **extra) -> list[float]:
    cfg = config_from_dict(dpojax_overrides(
        assets, data, out, loss__type="kto", train__batch_size=8, train__steps=steps, train__log_every=1,
        data__eval=None, optim__name="sgd", optim__lr=0.5, optim__schedule="constant", optim__max_grad_norm=None,
        **extra))
    train(cfg)
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


@SLOW
@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_training_losses_match_trl(assets, tmp_path, fmt):
    """8 rows = one batch per step (the KL term is the batch's, whatever the order within it)."""
    data = assets[f"u8_{fmt}"]
    ours = _our_losses(assets, data, tmp_path / "ours")
    trainer = kto_trainer(assets, data, tmp_path / "trl", per_device_train_batch_size=8, max_steps=5,
                          learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
                          max_grad_norm=1e9, logging_steps=1, warmup_steps=0)
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h][:5]
    assert len(ours) == len(theirs) == 5 and abs(ours[-1] - ours[0]) > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


@SLOW
def test_meshes_equal_one_device(assets, tmp_path):
    """KTO on meshes (8,1,1) and (2,2,2) (packed rows) equals one device ([N, K, T] rows)."""
    from test_sharding import run_steps  # the sharding tests' step runner: same batches, losses and state

    from dpojax.sharding import make_mesh

    cfg = config_from_dict(dpojax_overrides(
        assets, assets["u_standard"], tmp_path / "m", loss__type="kto", train__batch_size=8, train__steps=5,
        data__eval=None, optim__name="adamw", optim__lr=1e-3, optim__schedule="constant"))
    one, state_1, _ = run_steps(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing="none")),
                                make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    assert abs(one[-1] - one[0]) > 1e-4
    for shape in ((8, 1, 1), (2, 2, 2)):
        got, _, _ = run_steps(cfg, make_mesh(*shape))
        np.testing.assert_allclose(got, one, rtol=1e-6, atol=1e-6, err_msg=str(shape))


@SLOW
def test_sigkill_resumes_exactly(assets, tmp_path):
    import yaml
    from test_resume import _run, _start_held, _train_records, _wait_for_dir

    cfg = dpojax_overrides(assets, assets["u_standard"], tmp_path / "unused", loss__type="kto", train__batch_size=8,
                           train__steps=6, train__log_every=1, data__eval=None, optim__lr=3e-3,
                           optim__schedule="constant", checkpoint={"every": 2, "keep": 10})
    del cfg["output_dir"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = tmp_path / "uninterrupted"
    _run(path, reference).check_returncode()
    out = tmp_path / "killed"
    proc = _start_held(path, out, 5)
    _wait_for_dir(out / "checkpoints" / "4")
    proc.kill()
    proc.wait(timeout=30)
    result = _run(path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert _train_records(out) == _train_records(reference) and "kl" in _train_records(out)[-1]


@SLOW
def test_lora_eval_matches_trl_with_peft(assets, tmp_path):
    """The same PEFT adapter (A and B random, so policy != reference) in both: TRL's reference is the base with the
    adapter disabled, dpojax's the frozen base."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    made = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
    made.save_pretrained(str(tmp_path / "adapter"))
    lora = {"model__lora": {"enabled": True, "rank": 4, "alpha": 8, "targets": targets,
                            "init_from": str(tmp_path / "adapter")}, "ref_model": {}}
    ours, theirs = _eval_vs_trl({**assets, "ref": assets["policy"]}, tmp_path, assets["u_standard"], ours_kw=lora,
                                trl_kw={"adapter": tmp_path / "adapter"})
    _assert_matches_trl(ours, theirs)
