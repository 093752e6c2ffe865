"""`dpojax compile` for TPU topologies on this CPU host with libtpu (the `tpu` extra), nothing allocated.

- A small Llama compiles for two topologies (v5e-4, v5p-8): it fits, and the argument memory XLA reports equals
  what the sharding implies (fp32 policy + AdamW moments + fp32 reference, split 4 ways, plus the batch); for v5e-4
  its model is a hub id this machine cannot reach, given by `--model-config`.
- DPOJAX_SLOW_TESTS=1 also compiles every shipped TPU config (minutes each on 2 CPU cores) and asserts it fits.
"""

from __future__ import annotations

import json
import re

import pytest
from test_aot import REPO, SHIPPED, SLOW, _libtpu, _offline, needs_libtpu

from dpojax import aot
from dpojax.cli import main

# every weight's shard on 4 chips keeps its last two dims multiples of (8, 128), TPU's fp32 tile: XLA's argument
# memory counts tile padding, which would otherwise sit between the figure and what the sharding implies
TINY = dict(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(TINY))
    cfg = root / "tiny.yaml"
    cfg.write_text(
        "# dpojax compile tiny.yaml --topology v5p-8\n"
        f"model: {{name_or_path: {root / 'model'}, dtype: bfloat16, param_dtype: float32, remat: full}}\n"
        "data: {train: unused.jsonl, max_length: 512}\n"
        "train: {batch_size: 8, steps: 100}\n"
        "mesh: {data: 1, fsdp: -1, tensor: 1}\n"
    )
    return cfg


def _gib(text: str, label: str) -> float:
    value, unit = re.search(label + r"\s+([\d.]+) (GiB|MiB)", text).groups()
    return float(value) / (1 if unit == "GiB" else 1024)


def _hub_config(tiny_config, tmp_path):
    """tiny_config with a hub id the machine cannot reach in place of its local model folder."""
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(tiny_config.read_text().replace(re.search(r"name_or_path: ([^,]+),", tiny_config.read_text())
                                                   .group(1), "no-such-org/no-such-model"))
    return cfg


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-4", "v5p-8"])
def test_compile_fits_and_reports_memory(tiny_config, tmp_path, capsys, monkeypatch, topology):
    """For v5e-4 the model is a hub id the machine cannot reach (one compile serves both checks): the error says how
    to give config.json, and --model-config works."""
    args = [str(tiny_config)]
    if topology == "v5e-4":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without hub access, without waiting for timeouts
        hub = _hub_config(tiny_config, tmp_path)
        assert main(["compile", str(hub), "--topology", topology]) == 2
        assert "--model-config" in capsys.readouterr().err
        args = [str(hub), "--model-config", str(tiny_config.parent / "model" / "config.json")]
    assert main(["compile", *args, "--topology", topology]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "4 devices" in out, out
    D, F, kv = TINY["hidden_size"], TINY["intermediate_size"], TINY["hidden_size"] // 2  # 4 heads, 2 kv heads
    n = 2 * TINY["vocab_size"] * D + 2 * (D * D + 2 * D * kv + D * D + 3 * D * F) + 2 * 2 * D + D
    # per device: (fp32 policy + 2 fp32 AdamW moments + fp32 reference) / 4 chips + int32/float32 batch / 4
    expected = (4 * n * 4 + 8 * 2 * 512 * 4 * 4 + 8 * 8) / 4 / 2**30
    assert abs(_gib(out, "arguments") - expected) < 0.01 * expected, (out, expected)  # shown in MiB below 1 GiB
    assert _gib(out, "peak per device") < _gib(out, "of")
    assert "FLOPs per step" in out and "XLA cost model" in out


@pytest.mark.skipif(not (SLOW and _libtpu()), reason="set DPOJAX_SLOW_TESTS=1 (and install libtpu): minutes each")
@pytest.mark.parametrize("name", sorted(n for n, t in SHIPPED.items() if t), ids=lambda n: n.removesuffix(".yaml"))
def test_shipped_config_compiles_and_fits(name):
    report = aot.compile_for_topology(_offline(REPO / "configs" / name), SHIPPED[name])
    print(report.format())
    assert report.fits, report.format()


@needs_libtpu
@pytest.mark.parametrize("overrides", [
    ["loss.type=plackett_luce", "data.max_responses=4"],
    ["ref_model.precompute=true"],
    ["ref_model.sync_every=2"],
    ["loss.type=[orpo]"],
], ids=["plackett_luce", "precompute", "tr_dpo", "orpo"])
def test_compile_every_mode_the_trainer_accepts(tiny_config, capsys, overrides):
    """The one step builder serves `dpojax compile` for every config `dpojax train` accepts (K-wise losses at
    K = data.max_responses, precomputed reference log-probs, TR-DPO, reference-free)."""
    assert main(["compile", str(tiny_config), "--topology", "v5e:2x2", "data.max_length=128", *overrides]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out, out
    k = 4 if "plackett" in overrides[0] else 2
    assert f"8 prompts x {k} responses x 128 tokens" in out, out
