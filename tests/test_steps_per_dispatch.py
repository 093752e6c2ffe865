"""`train.steps_per_dispatch: K` runs K consecutive steps in one dispatch (`TrainStep.many`, a scan of the step over
K stacked batches): the same run as one step per dispatch, record for record and weight for weight, through log
records, evals and checkpoints; runs of K that cannot be stacked (a resume between multiples of K, the last steps,
batches of different shapes) go a step at a time; and the records, evals, checkpoints and reference syncs must fall
where a dispatch ends."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_models import tiny_run_files
from tolerances import rewards_atol

from dpojax.config import config_from_dict
from dpojax.errors import ConfigError
from dpojax.metrics import read_metrics
from dpojax.trainer import loop, prefetch, reference

STEPS = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("dispatch"), rows=32, data_seed=4, model_seed=2)


def make_cfg(files, out_dir, k: int, **train):
    return config_from_dict({
        "model": {"name_or_path": files["policy"], "tokenizer": files["tok"]},
        "data": {"train": files["data"], "eval": files["data"], "max_length": 32, "buckets": [32],
                 "cache_dir": files["cache"]},
        "train": {"batch_size": 8, "steps": STEPS, "log_every": 3, "eval_every": 6, "steps_per_dispatch": k, **train},
        "optim": {"lr": 1e-3, "max_grad_norm": 1.0, "weight_decay": 0.01, "warmup_steps": 2},
        "checkpoint": {"every": 3, "keep": 3},
        "output_dir": str(out_dir),
    })


def test_k_steps_per_dispatch_train_like_one(files, tmp_path, monkeypatch):
    sizes, runs = [], []
    setup_train = loop.setup_train

    def counting(*args, **kw):  # the steps each dispatch of the loop runs
        run, state = setup_train(*args, **kw)
        flat, many = run.train_step.flat, run.train_step.many

        def one(leaves, ref, batch):
            sizes[-1].append(1)
            return flat(leaves, ref, batch)

        def k(leaves, ref, batch):
            sizes[-1].append(jax.tree.leaves(batch)[0].shape[0])
            return many(leaves, ref, batch)

        run.train_step.flat, run.train_step.many = one, k
        sizes.append([])
        runs.append(run)
        return run, state

    monkeypatch.setattr(loop, "setup_train", counting)
    out = {k: tmp_path / f"k{k}" for k in (1, 3)}
    for k, folder in out.items():
        loop.train(make_cfg(files, folder, k))
    assert sizes == [[1] * STEPS, [3, 3, 1, 1]]  # steps 1-3 and 4-6 at once; 7 and 8 cannot make a run of 3
    recs = {k: read_metrics(folder / "metrics.jsonl") for k, folder in out.items()}
    assert [(r["step"], r["split"]) for r in recs[3]] == [(r["step"], r["split"]) for r in recs[1]]
    assert [r["step"] for r in recs[1] if r["split"] == "eval"] == [6, 8]
    for a, b in zip(recs[1], recs[3]):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "learning_rate",
                    "skipped_steps"):
            if key in a:
                # rewards: differences of log-prob sums ~ -50 (beta 0.1), 16 ulps of those
                atol = rewards_atol(a, 0.1) if key.startswith("rewards/") else 1e-6
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=atol, err_msg=f"{key} at {a['step']}")
    exported = {k: load_file(str(folder / "export" / "model.safetensors")) for k, folder in out.items()}
    for name, value in exported[1].items():
        np.testing.assert_allclose(exported[3][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert sorted(p.name for p in (out[3] / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6", "8"]

    # a start between multiples of K (a resume after a run with another K): single steps until a run of K fits
    run = runs[1]
    data = loop.load_split(run.cfg, run.models, run.cfg.data.train, run.cfg.data.train_split)
    ready = list(prefetch.ready_batches(run, data, 1, reference.lookup(run.models.ref_tables, data)))
    assert [r.steps for r in ready] == [1, 1, 3, 1, 1]  # steps 2, 3, then 4-6, 7, 8
    stacked = ready[2].batch
    assert all(x.shape[0] == 3 and x.sharding.spec[0] is None for x in jax.tree.leaves(stacked))


def test_batches_of_different_shapes_go_one_at_a_time():
    a = {"ids": np.zeros((8, 32), np.int32), "mask": np.ones((8, 32), bool)}
    assert prefetch.one_shape([a, dict(a), dict(a)])
    assert not prefetch.one_shape([a, {**a, "ids": np.zeros((8, 64), np.int32)}])  # another length bucket
    assert not prefetch.one_shape([a, {**a, "ids": np.zeros((8, 32), np.int64)}])
    assert not prefetch.one_shape([a, {"ids": a["ids"]}])  # another structure


@pytest.mark.parametrize("key, value", [("train.log_every", 10), ("train.eval_every", 5), ("checkpoint.every", 7)])
def test_boundaries_must_end_a_dispatch(files, tmp_path, key, value):
    section, name = key.split(".")
    raw = {"model": {"name_or_path": files["policy"]}, "data": {"train": files["data"]},
           "train": {"steps_per_dispatch": 4, "log_every": 4}, "output_dir": str(tmp_path)}
    raw.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError, match=rf"'{key}' = {value} must be a multiple of 'train.steps_per_dispatch' = 4"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="'train.steps_per_dispatch' = 0 must be at least 1"):
        config_from_dict({**raw, "train": {"steps_per_dispatch": 0}})
