"""LoRA: adapters interchangeable with PEFT (export, init_from, merged export) for each fused-weight layout."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from test_models import padded_batch
from tiny_models import make_tiny_checkpoint

from dpojax.config import LoraSection
from dpojax.errors import ConfigError
from dpojax.models import export_hf, load_pretrained, lora

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gemma", "gemma2", "gemma3_text", "phi3")


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, states, ids, pos, seg):
    model = nnx.merge(graphdef, *states)
    return model.logits(model(ids, pos, seg))


def _logits(graphdef, *states):
    ids, pos, seg = padded_batch()
    return np.asarray(_run(graphdef, states, ids, pos, seg))[seg > 0]


def _torch_logits(model):
    import torch

    ids, _, seg = padded_batch()
    with torch.no_grad():
        out = model.eval()(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg))
    return out.logits.numpy()[seg > 0]  # real tokens (padding rows differ by design)


def _torch_base(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


def _random_adapters(abstract, seed):
    """Every A and B random (B = 0 would hide a wrong B layout); numpy, so no compile per shape."""
    rng = np.random.default_rng(seed)
    return nnx.from_flat_state([(p, v.replace(value=jax.device_put(0.2 * rng.standard_normal(v.shape, np.float32))))
                                for p, v in nnx.to_flat_state(abstract)])


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_interchange(family, tmp_path):
    """dpojax adapter -> PEFT folder -> PeftModel logits; PEFT-made adapter -> init_from -> same logits; merged export
    == PEFT merge_and_unload."""
    import peft

    path = make_tiny_checkpoint(tmp_path / "base", family, num_kv_heads=2 if family != "gpt2" else 4)
    model, cfg = load_pretrained(path)
    bgraph, base = nnx.split(model)
    lcfg = LoraSection(enabled=True, rank=4, alpha=8.0, targets=("all-linear",))
    pgraph, abstract, groups = lora.lora_model(bgraph, base, cfg, lcfg, None)
    assert {g.leaf for g in groups} == set(lora.valid_targets(cfg))

    # ours -> PEFT
    adapters = _random_adapters(abstract, seed=1)
    ours = _logits(pgraph, base, adapters)
    lora.save_peft(tmp_path / "ours", adapters, groups, cfg, lcfg, str(path))
    torch_base = _torch_base(path)
    assert np.abs(ours - _torch_logits(torch_base)).max() > 1e-2  # the adapters change the function
    theirs = peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "ours"))
    np.testing.assert_allclose(_torch_logits(theirs), ours, atol=1e-4)

    # merged export == PEFT's merge
    export_hf(nnx.merge(bgraph, lora.merged_state(base, adapters, groups, 2.0)), cfg, tmp_path / "merged")
    np.testing.assert_allclose(_torch_logits(_torch_base(tmp_path / "merged")),
                               _torch_logits(theirs.merge_and_unload()), atol=1e-4)

    # PEFT -> ours (init_lora_weights=False: B random too)
    made = peft.get_peft_model(_torch_base(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  init_lora_weights=False))
    made.save_pretrained(str(tmp_path / "peft"))
    loaded = lora.load_peft(tmp_path / "peft", abstract, groups, cfg, lcfg)
    np.testing.assert_allclose(_logits(pgraph, base, loaded), _torch_logits(made), atol=1e-4)


def test_bad_target_names_the_family_modules(tmp_path):
    from dpojax.models.config import ModelConfig
    from dpojax.models.hf import read_hf_config

    cfg = ModelConfig.from_hf(read_hf_config(make_tiny_checkpoint(tmp_path / "base", "gpt2", num_kv_heads=4)))
    with pytest.raises(ConfigError, match="c_attn, c_fc, c_proj"):
        lora.select_groups(cfg, ("q_proj",))


# ---------------------------------------------------------------------------------------------------- training
STEPS = 4


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A LoRA run's assets and config (all-linear, rank 4, 2 micro-batches, checkpoints every 2 steps)."""
    import yaml
    from trl_harness import dpojax_overrides, make_assets

    root = tmp_path_factory.mktemp("lora_train")
    assets = make_assets(root, n_rows=16)
    raw = dpojax_overrides(
        assets, assets["standard"], root / "out", train__batch_size=8, train__micro_batch_size=4, train__steps=STEPS,
        train__log_every=1, data__eval=None, optim__name="adamw", optim__lr=1e-2, optim__schedule="constant",
        checkpoint__every=2, checkpoint__keep=5, model__lora={"enabled": True, "rank": 4, "alpha": 16,
                                                              "targets": ["all-linear"]},
    )
    del raw["ref_model"]  # the reference is the base with the adapters off
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    return {"root": root, "config": root / "run.yaml", "assets": assets, "raw": raw}


@pytest.fixture(scope="module")
def lora_run(lora_setup):
    """The LoRA run's per-step losses and final state on ONE device, in process."""
    from test_sharding import run_steps

    from dpojax.config import config_from_dict
    from dpojax.sharding import make_mesh

    cfg = config_from_dict(lora_setup["raw"])
    losses, state, _ = run_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]), steps=STEPS)
    return {**lora_setup, "losses": losses, "state": state, "cfg": cfg}


def test_lora_one_device_trains_adapters_only(lora_run):
    """Step 1 starts at log 2 (B = 0: the policy is the base, which is the reference); only LoraParams train."""
    losses, state = lora_run["losses"], lora_run["state"]
    np.testing.assert_allclose(losses[0], np.log(2), atol=1e-6)
    assert losses[-1] < losses[0] - 1e-3
    assert all(isinstance(v, lora.LoraParam) for _, v in nnx.to_flat_state(state.params))
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * n_adapter + 8  # AdamW moments + counts


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2)], ids=lambda s: "x".join(map(str, s)))
def test_lora_on_mesh_equals_one_device(lora_run, shape):
    """The same LoRA run in process on 8 CPU devices (no accumulation: 8 pairs split over data=8, or fsdp 4 x
    tensor 2) gives the one-device losses and adapters."""
    import dataclasses

    from test_sharding import run_steps

    from dpojax.sharding import make_mesh

    cfg = lora_run["cfg"]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=None))
    losses, state, _ = run_steps(cfg, make_mesh(*shape), steps=STEPS)
    np.testing.assert_allclose(losses, lora_run["losses"], rtol=1e-5, atol=1e-6)
    ours = dict(nnx.to_flat_state(state.params))
    for path, v in nnx.to_flat_state(lora_run["state"].params):
        np.testing.assert_allclose(np.asarray(ours[path].value), np.asarray(v.value), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def dropout_run(lora_setup):
    """The LoRA run with PEFT's lora_dropout 0.5 and padded [N, K, T] batches (whose rows, hence dropout masks, do
    not depend on the mesh), on one device; also its compiled Run and first batch."""
    import yaml

    from dpojax import metrics as M
    from dpojax.config import config_from_dict
    from dpojax.sharding import Sharder, make_mesh
    from dpojax.trainer import build, prefetch

    raw = yaml.safe_load(lora_setup["config"].read_text())
    raw["model"]["lora"]["dropout"] = 0.5
    raw["data"]["packing"] = "none"
    path = lora_setup["root"] / "dropout.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    sharder = Sharder(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    models = build.build_models(cfg, sharder)
    pairs = build.load_split(cfg, models, cfg.data.train, cfg.data.train_split)
    run, state = build.setup_train(cfg, models, sharder, steps=STEPS)
    batches = [build.to_device(b, build.batch_sharding(sharder)) for b in prefetch.host_batches(run, pairs, 0, STEPS)]
    losses = []
    for batch in batches:
        state, out = run.train_step(state, models.ref_params, batch)
        losses.append(M.finalize(jax.device_get(out))["loss"])
    return {"config": path, "losses": np.asarray(losses), "state": state, "run": run, "batch": batches[0]}


def _check_dropout(dropout_run):
    """model.lora.dropout (PEFT: B(A(dropout(x))) * scale): step 1 is log 2 whatever the masks (B = 0) and the loss
    falls; on the same adapters a training forward differs from eval, and eval (like the reference) never drops: the
    eval step of the dropout config equals that of dropout 0."""
    import dataclasses

    from dpojax.trainer import step as step_lib

    losses, run = dropout_run["losses"], dropout_run["run"]
    np.testing.assert_allclose(losses[0], np.log(2), atol=1e-6)
    assert losses[-1] < losses[0] - 1e-3
    spec_d, spec_0 = run.spec, dataclasses.replace(run.spec, lora_dropout=0.0)

    @jax.jit
    def losses_of(params, base, batch):
        train, _ = step_lib.batch_loss(params, base, batch, spec_d, dropout_key=lora.dropout_key(0, 1, 0))
        return (train, step_lib.eval_step(params, base, batch, spec_d)["loss"][0],
                step_lib.eval_step(params, base, batch, spec_0)["loss"][0])

    train, eval_d, eval_0 = losses_of(dropout_run["state"].params, run.models.ref_params, dropout_run["batch"])
    assert float(eval_d) == float(eval_0) and abs(float(train) - float(eval_d)) > 1e-4, (train, eval_d)


def test_lora_dropout_sigkill_resume_on_mesh_equals_one_device(lora_setup, dropout_run, tmp_path):
    """LoRA dropout (`_check_dropout`, in process on one device), then `dpojax train` of that run on mesh (2,2,2)
    with precomputed reference log-probs (the base's), SIGKILLed after checkpoint 2 and resumed (in this process,
    8 devices), equals the one-device run (reference in the step): the same dropout masks after a resume and on
    another mesh; the checkpoint holds adapters only; export/ is a PEFT folder and `dpojax export --merged` equals
    it merged. (LoRA on 2 processes: tests/test_gcs.py's 2-process run, resumed on 1 process.)"""
    import signal

    import peft
    from test_resume import _start_held, _train_records, _wait_for_dir

    from dpojax import cli
    from dpojax.config import load_config
    from dpojax.trainer import loop

    _check_dropout(dropout_run)
    out, mesh = tmp_path / "run", ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "ref_model.precompute=true")
    proc = _start_held(dropout_run["config"], out, 3, *mesh)
    _wait_for_dir(out / "checkpoints" / "2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    loop.train(load_config(dropout_run["config"], [f"output_dir={out}", *mesh]))
    np.testing.assert_allclose([r["loss"] for r in _train_records(out)], dropout_run["losses"], rtol=1e-6,
                               atol=1e-6)

    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().metadata(out / "checkpoints" / "4" / "params").item_metadata  # shapes only
    leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
    assert leaves and all("lora" in jax.tree_util.keystr(p) for p, _ in leaves), leaves  # adapters only, no base
    n_adapter = sum(x.size for x in jax.tree.leaves(dropout_run["state"].params))
    assert sum(np.prod(x.shape) for _, x in leaves) == n_adapter

    merged = tmp_path / "merged"
    cli.export_from_cli(str(out), str(merged), merged=True)
    theirs = peft.PeftModel.from_pretrained(_torch_base(lora_setup["assets"]["policy"]), str(out / "export"))
    np.testing.assert_allclose(_torch_logits(_torch_base(merged)), _torch_logits(theirs), atol=1e-4)


@pytest.mark.parametrize("overrides,words", [
    (["model.lora.rank=16"], ["'model.lora.rank' is set", "model.lora.enabled=true"]),
    (["model.lora.enabled=true", "model.lora.dropout=1"], ["'model.lora.dropout' = 1", "[0, 1)"]),
    (["model.lora.enabled=true", "ref_model.name_or_path=other"], ["the reference is the base model"]),
    (["model.lora.enabled=true", "ref_model.sync_every=4"], ["TR-DPO", "frozen base"]),
    (["model.lora.enabled=true", "model.lora.rank=0"], ["'model.lora.rank' = 0"]),
])
def test_lora_config_errors(overrides, words):
    from dpojax.config import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"}}, overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_lora_matches_trl_with_peft(tmp_path):
    """The same PEFT adapter (B random, so policy != reference) in both: `dpojax eval` equals TRL's evaluate() with
    it (TRL's reference: the base with the adapters disabled), and 5 SGD steps give the same losses. GPT-2, so the
    gradient of the A that c_attn's q, k and v parts share is checked too."""
    import json

    import peft
    from test_trl_parity import _close, _our_step_losses
    from trl_harness import TRL_METRICS, dpojax_overrides, make_assets, trl_trainer

    from dpojax.config import config_from_dict
    from dpojax.trainer.evaluation import evaluate

    assets = make_assets(tmp_path / "assets", family="gpt2", n_rows=8)
    targets = ["c_attn", "c_fc"]
    made = peft.get_peft_model(_torch_base(assets["policy"]), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    made.save_pretrained(str(tmp_path / "adapter"))
    lora_keys = {"model__lora": {"enabled": True, "rank": 4, "alpha": 8, "targets": targets,
                                 "init_from": str(tmp_path / "adapter")}}
    assets = {**assets, "ref": assets["policy"]}  # dpojax: the reference is the base
    data = assets["standard"]

    cfg = config_from_dict(dpojax_overrides(assets, data, tmp_path / "ours", train__eval_batch_size=8, **lora_keys))
    ours = evaluate(cfg)
    theirs = trl_trainer(assets, data, tmp_path / "trl", adapter=tmp_path / "adapter",
                         per_device_eval_batch_size=8).evaluate()
    for name in TRL_METRICS:
        assert _close(ours[name], theirs[f"eval_{name}"]), (name, ours[name], theirs[f"eval_{name}"])
    assert abs(ours["rewards/margins"]) > 1e-3  # the adapter moved the policy away from its reference

    ours = _our_step_losses(assets, data, tmp_path / "ours_train", "sgd", 0.5, steps=5, **lora_keys)
    trainer = trl_trainer(assets, data, tmp_path / "trl_train", adapter=tmp_path / "adapter",
                          per_device_train_batch_size=8, max_steps=5, learning_rate=0.5, lr_scheduler_type="constant",
                          optim="sgd", weight_decay=0.0, max_grad_norm=1e9, logging_steps=1, warmup_steps=0)
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h][:5]
    assert abs(ours[-1] - ours[0]) > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "ours_train" / "export" / "adapter_config.json").read_text())["r"] == 4


def test_lora_only_learns_the_demo_preference(tmp_path):
    """Learning with the adapters only: `dpojax train` of the demo config (a random-init tiny Llama, frozen) with
    rank-8 all-linear adapters reaches held-out reward accuracy >= 0.9 in 30 steps (0.996 measured; steps are
    ~0.06 s, the time is compiles); the reference is the base."""
    from pathlib import Path

    from dpojax.cli import main
    from dpojax.metrics import read_metrics

    demo = Path(__file__).resolve().parents[1] / "configs"
    out = tmp_path / "run"
    assert main(["train", str(demo / "demo.yaml"), f"output_dir={out}", f"data.cache_dir={out}/cache",
                 f"model.name_or_path={demo / 'demo' / 'model'}", f"data.train={demo / 'demo' / 'train.jsonl'}",
                 f"data.eval={demo / 'demo' / 'eval.jsonl'}", "train.steps=30", "train.eval_every=30",
                 "checkpoint.every=1000", "optim.lr=1e-2", "optim.warmup_steps=0", "model.lora.enabled=true",
                 "model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[all-linear]"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    final = [r for r in records if r["split"] == "eval"][-1]
    print(f"\nLoRA-only held-out reward accuracy {final['rewards/accuracies']:.3f}")
    assert final["rewards/accuracies"] >= 0.9, final
    assert final["rewards/margins"] > 0
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
