"""Unrolled layers (`model.scan_layers: false`) train on per-layer leaves (`dpojax.trainer.step.split_layers`): the
same run as the scanned model, record for record and weight for weight, through evals, checkpoints and the export;
and the compiled step holds no stacked [L, ...] copy of any weight (XLA folds the step's stack of the per-layer
leaves into the model's per-layer slices, forward and backward)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_models import tiny_run_files
from tolerances import rewards_atol

from dpojax.config import config_from_dict
from dpojax.metrics import read_metrics
from dpojax.trainer import loop, prefetch
from dpojax.trainer.step import PerLayer, join_layers, split_layers

LAYERS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("per_layer"), rows=24, data_seed=3, model_seed=1, num_layers=LAYERS)


def make_cfg(files, out_dir, scan: bool):
    return config_from_dict({
        "model": {"name_or_path": files["policy"], "tokenizer": files["tok"], "scan_layers": scan},
        "data": {"train": files["data"], "eval": files["data"], "max_length": 32, "cache_dir": files["cache"]},
        "train": {"batch_size": 8, "steps": 4, "log_every": 1, "eval_every": 2},
        "optim": {"lr": 1e-3, "max_grad_norm": 1.0, "weight_decay": 0.01},
        "checkpoint": {"every": 2},
        "output_dir": str(out_dir),
    })


def test_split_and_join_are_inverse():
    tree = {"layers": {"w": np.arange(24.0).reshape(3, 2, 4)}, "embed": np.ones((3, 5))}
    split = split_layers(tree, 3)
    assert isinstance(split["layers"]["w"], PerLayer) and [p.shape for p in split["layers"]["w"]] == [(2, 4)] * 3
    assert split["embed"] is tree["embed"]  # only leaves under layers/ are split
    np.testing.assert_array_equal(join_layers(split)["layers"]["w"], tree["layers"]["w"])


def test_unrolled_layers_train_like_scanned(files, tmp_path, monkeypatch):
    runs = []
    setup_train = loop.setup_train

    def capture(*args, **kw):
        run, state = setup_train(*args, **kw)
        runs.append((run, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)))
        return run, state

    monkeypatch.setattr(loop, "setup_train", capture)
    out = {scan: tmp_path / f"scan_{scan}" for scan in (True, False)}
    for scan, folder in out.items():
        loop.train(make_cfg(files, folder, scan))
    recs = {scan: read_metrics(folder / "metrics.jsonl") for scan, folder in out.items()}
    assert [(r["step"], r["split"]) for r in recs[False]] == [(r["step"], r["split"]) for r in recs[True]]
    assert len(recs[True]) == 4 + 2  # 4 train records, evals at steps 2 and 4 (final)
    for a, b in zip(recs[True], recs[False]):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            if key in a:
                # rewards: differences of log-prob sums ~ -50 (beta 0.1), 16 ulps of those
                atol = rewards_atol(a, 0.1) if key.startswith("rewards/") else 1e-6
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=atol, err_msg=f"{key} at {a['step']}")
    exported = {scan: load_file(str(folder / "export" / "model.safetensors")) for scan, folder in out.items()}
    assert exported[True].keys() == exported[False].keys()
    for name, value in exported[True].items():
        np.testing.assert_allclose(exported[False][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert sorted(p.name for p in (out[False] / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

    run, state = runs[1]  # unrolled: the step's state leaves are per layer, and no stacked weight is ever built
    assert run.train_step.num_layers == LAYERS
    per_layer = jax.tree.leaves(split_layers(state, LAYERS))
    stacked = {x.shape for x in jax.tree.leaves(state.params) if x.ndim >= 2 and x.shape[0] == LAYERS}
    assert len(per_layer) > len(jax.tree.leaves(state)) and stacked
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         next(prefetch.ready_batches(run, run_data(run, files), 0, None)).batch)
    hlo = run.train_step.lower(state, run.models.ref_params, batch).compile().as_text()
    built = {tuple(int(d) for d in dims.split(",")): op  # what each instruction computes (the frozen reference
             for dims, op in re.findall(r"= f32\[([\d,]+)\]\S* (\w[\w-]*)\(", hlo)  # comes in stacked: its
             if op != "parameter"}  # parameters are not built)
    assert not stacked & built.keys(), f"stacked weights built in the step: {stacked & built.keys()}"
    assert {(32, 64), (64, 32)} <= built.keys()  # the regex does see the per-layer gradients and updates


def run_data(run, files):
    from dpojax.trainer.build import load_split

    return load_split(run.cfg, run.models, run.cfg.data.train, run.cfg.data.train_split)
