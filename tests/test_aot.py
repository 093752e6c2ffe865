"""`dpojax compile` without compiling: topology names, and the real train step (policy + reference, real shapes,
real shardings) of every shipped config lowered for its intended topology (the `--topology` on its first line;
the GPU config on 8 CPU devices), with the model built from its literal config.json in tests/assets/hf_configs
and never allocated. tests/test_aot_compile.py compiles (libtpu, the `tpu` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

from dpojax import aot, flops
from dpojax.config import load_config
from dpojax.errors import ConfigError
from dpojax.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]
HF_CONFIGS = REPO / "tests" / "assets" / "hf_configs"
SHIPPED = {  # config -> intended topology (None: a GPU host)
    "qwen2.5-0.5b_ultrafeedback_v5e-4.yaml": "v5e-4",
    "llama-3.2-1b_ultrafeedback_v6e-8.yaml": "v6e-8",
    "llama-3.1-8b_ultrafeedback_v5p-8.yaml": "v5p-8",
    "llama-3.1-70b_ultrafeedback_v5p-128.yaml": "v5p-128",
    "llama-3.1-8b_ultrafeedback_8xh100.yaml": None,
    "qwen3-30b-a3b_ultrafeedback_v5p.yaml": "v5p-32",  # MoE: mesh.expert
    "mixtral-8x7b_ultrafeedback_v5p.yaml": "v5p-64",
    "llama-3.1-8b_long-32k_context_v5p-8.yaml": "v5p-8",  # long context: mesh.context
    "llama-3.1-8b_long-128k_context_v5p-16.yaml": "v5p-16",
    "llama-3.1-8b_long-128k_lora_context_v5e-8.yaml": "v5e-8",
}
SLOW = os.environ.get("DPOJAX_SLOW_TESTS") == "1"
# ~60-90 s each to lower on a 2-core CPU: with DPOJAX_SLOW_TESTS=1
SLOW_TO_LOWER = {"llama-3.1-8b_long-128k_context_v5p-16.yaml", "llama-3.1-8b_long-128k_lora_context_v5e-8.yaml"}


def _libtpu() -> bool:
    try:
        import libtpu  # noqa: F401 - imported only to see whether it is installed
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(not _libtpu(), reason="libtpu (pip install -e '.[tpu]') is not installed")


def _offline(path: Path, *extra: str):
    """The shipped config with its hub model replaced by the literal config.json (no download)."""
    cfg = load_config(path)
    local = HF_CONFIGS / cfg.model.name_or_path.split("/")[-1]
    assert (local / "config.json").is_file(), local
    return load_config(path, [f"model.name_or_path={local}", f"ref_model.name_or_path={local}", *extra])


def test_topology_names():
    assert aot.parse_topology("v5p-8") == ("v5p:2x2x1", "v5p", 4)
    assert aot.parse_topology("v5p-128") == ("v5p:4x4x4", "v5p", 64)
    assert aot.parse_topology("v6e:2x4") == ("v6e:2x4", "v6e", 8)
    with pytest.raises(ConfigError, match="unknown TPU topology"):
        aot.parse_topology("v9z:2x2")


@pytest.mark.parametrize("name", sorted(SHIPPED), ids=lambda n: n.removesuffix(".yaml"))
def test_shipped_config_names_its_topology(name):
    first = (REPO / "configs" / name).read_text().splitlines()[0]
    topology = SHIPPED[name]
    if topology is None:
        assert first.startswith("# dpojax train configs/" + name)
    else:
        assert first.startswith(f"# dpojax compile configs/{name} --topology {topology}")


@needs_libtpu
@pytest.mark.parametrize("name", sorted(SHIPPED), ids=lambda n: n.removesuffix(".yaml"))
def test_shipped_config_lowers_for_its_topology(name):
    """Shapes, shardings (every matrix split over fsdp) and the step trace for the real model sizes."""
    topology = SHIPPED[name]
    if name in SLOW_TO_LOWER and not SLOW:
        pytest.skip("lowering takes minutes: DPOJAX_SLOW_TESTS=1")
    if topology is None:  # 8 GPUs: lower on the 8 fake CPU devices (cuDNN attention lowers only on a GPU)
        cfg, devices, backend = _offline(REPO / "configs" / name, "model.attention=xla"), jax.devices(), "cpu"
    else:
        cfg, backend = _offline(REPO / "configs" / name), "tpu"
        devices = aot.topology_devices(aot.parse_topology(topology)[0])
    step = aot.lower_step(cfg, devices, backend=backend)
    assert step.num_params > 0.4e9 and step.seq_len == cfg.data.max_length
    # every matrix split over all devices (the context axis splits parameters as fsdp does)
    assert step.mesh["fsdp"] * step.mesh["expert"] * step.mesh.get("context", 1) == len(devices)
    # auto: the Pallas kernel on TPU
    assert step.attention == ("xla" if topology is None else "splash")
    text = step.lowered.as_text()
    assert "stablehlo.while" in text  # layers scanned, micro-batches accumulated
    if step.mesh["expert"] > 1:  # MoE for TPU: the grouped matmul is TPU's ragged_dot, not the CPU host's kernel
        assert "ragged_dot" in text
    mcfg, n = ModelConfig.from_hf(aot.read_model_config(cfg.model.name_or_path)), step.batch_pairs * 2
    counted = flops.step_flops(mcfg, [step.seq_len] * n, n * step.seq_len, reference=not cfg.ref_model.precompute,
                               weight_grads=not cfg.model.lora.enabled)
    assert step.model_flops_per_step == counted.model  # counted as the trainer's MFU counts (causal attention)


@needs_libtpu
def test_multislice_mesh_puts_data_across_slices():
    from dpojax.sharding import make_mesh

    devices = aot.topology_devices("v5e:2x2", slices=2)  # 2 slices of 4 chips
    mesh = make_mesh(data=2, fsdp=-1, tensor=1, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]  # fsdp stays in a slice
    with pytest.raises(ConfigError, match="multiple of 2"):
        make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
