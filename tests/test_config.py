"""Config loading and validation: every mistake names the key, the value and the fix; shipped configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpojax.config import ConfigError, config_from_dict, dump_yaml, load_config
from dpojax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": {"name_or_path": "some/model"}}


def _error(*overrides: str, base: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base or BASE, list(overrides))
    return str(info.value)


def _ok(*overrides: str):
    return config_from_dict(BASE, list(overrides))


def test_overrides_are_typed():
    cfg = config_from_dict(BASE, ["optim.lr=1e-5", "loss.type=[sigmoid,sft]", "loss.weights=[1, 0.5]",
                                  "checkpoint.async=false", "train.micro_batch_size=16"])
    assert cfg.optim.lr == 1e-5 and cfg.loss.type == ("sigmoid", "sft") and cfg.loss.weights == (1.0, 0.5)
    assert cfg.checkpoint.async_ is False and cfg.grad_accum_steps == 4
    assert config_from_dict(BASE, ["loss.type=ipo"]).loss.type == ("ipo",)


def test_round_trip_through_yaml(tmp_path):
    cfg = config_from_dict(BASE, ["optim.lr=3e-4", "checkpoint.async=false"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_unknown_key_names_closest():
    assert "unknown key 'optim.lrr'" in (msg := _error("optim.lrr=1")) and "'optim.lr'" in msg
    assert "Did you mean 'model'" in _error("modle.dtype=float32")


@pytest.mark.parametrize(
    "override,words",
    [
        ("optim.lr=fast", ["'optim.lr' = 'fast'", "float"]),
        ("train.batch_size=1.5", ["'train.batch_size' = 1.5", "int"]),
        ("model.dtype=float16", ["'model.dtype'", "'float32', 'bfloat16'"]),
        ("model.scan_layers=maybe", ["'model.scan_layers'", "bool"]),
    ],
)
def test_wrong_type_names_key_value_and_type(override, words):
    msg = _error(override)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.micro_batch_size=5", ["multiple of 'train.micro_batch_size' = 5"]),
        ("loss.weights=[1,2]", ["'loss.weights' has 2 entries", "1 losses"]),
        ("loss.label_smoothing=0.7", ["label_smoothing"]),
        ("loss.beta=0", ["'loss.beta'"]),
        ("loss.type=dpo", ["'dpo'", "sigmoid"]),
        ("data.buckets=[64]", ["must reach data.max_length = 1024"]),
        ("checkpoint.best_metric=loss", ["needs an eval set"]),
        ("checkpoint.keep=0", ["'checkpoint.keep'"]),
        ("mesh.tensor=0", ["'mesh.tensor'"]),
        ("data.packing=true", ["data.packing", "shared_prompt", "padding_free"]),
        ("model.trust_remote_code=true", ["trust_remote_code"]),
    ],
)
def test_invalid_values(override, words):
    msg = _error(override)
    assert all(w in msg for w in words), msg


def test_best_metric_is_checked_against_the_runs_metrics():
    msg = _error("data.eval=e.jsonl", "checkpoint.best_metric=rewards/accuracy")
    assert "'checkpoint.best_metric' = 'rewards/accuracy' is not an eval metric" in msg and "rewards/accuracies" in msg
    assert "rewards/kendall_tau" not in msg  # only the metrics this loss records
    for ok in ("rewards/accuracies", "loss", "logits/chosen"):
        _ok("data.eval=e.jsonl", f"checkpoint.best_metric={ok}")
    _ok("data.eval=e.jsonl", "loss.type=plackett_luce", "checkpoint.best_metric=rewards/kendall_tau")
    _ok("data.eval=e.jsonl", "loss.type=orpo", "checkpoint.best_metric=log_odds_ratio")


def test_model_is_required_and_override_syntax():
    assert "model.name_or_path" in _error(base={"data": {"train": "x"}})
    assert "section.key=value" in _error("optim.lr")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  name_or_path: x\n  dtyp: float32\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.dtyp'.*wrong.yaml"):
        load_config(wrong)


def test_impossible_mesh_names_devices():
    with pytest.raises(ConfigError, match="8 devices"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match="not divisible"):
        make_mesh(data=-1, fsdp=3, tensor=1)
    assert dict(make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert dict(make_mesh(1, 2, 1, expert=-1).shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    text = path.read_text()
    assert text.startswith("#"), "a config opens with the command that runs it"
    load_config(path)


def test_compilation_cache_follows_the_config_and_the_environment_wins(tmp_path, monkeypatch):
    import jax
    from jax._src import compilation_cache

    from dpojax.cli import use_compilation_cache

    saved = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        cfg = config_from_dict({**BASE, "train": {"compilation_cache": str(tmp_path / "cfg")}})
        assert use_compilation_cache(cfg) == str(tmp_path / "env")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        assert use_compilation_cache(cfg) == str(tmp_path / "cfg") == jax.config.jax_compilation_cache_dir
        assert use_compilation_cache(config_from_dict({**BASE, "train": {"compilation_cache": "~/x"}})) == str(
            Path.home() / "x")
        assert use_compilation_cache(config_from_dict({**BASE, "train": {"compilation_cache": None}})) is None
        assert config_from_dict(BASE).train.compilation_cache == "~/.cache/dpojax/xla"
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
        compilation_cache.reset_cache()


def test_shipped_smollm2_set_is_what_its_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("arithmetic", REPO / "configs" / "smollm2" / "arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(tmp_path)
    for name in ("train.jsonl", "eval.jsonl", "eval_prompts.jsonl", "train_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "configs" / "smollm2" / name).read_bytes(), name
