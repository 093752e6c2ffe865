"""LoRA: adapters interchangeable with PEFT (export, init_from, merged export) for each fused-weight layout."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from dpojax.config import LoraSection
from dpojax.errors import ConfigError
from dpojax.models import export_hf, load_pretrained
from dpojax.models import lora
from test_models import padded_batch
from tiny_models import make_tiny_checkpoint

FAMILIES = ("llama", "gpt2", "gpt_neox", "phi3")  # every layout: unfused, Conv1D cat, per-head, cat rows


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
    path = make_tiny_checkpoint(tmp_path / "base", "gpt2", num_kv_heads=4)
    model, cfg = load_pretrained(path)
    with pytest.raises(ConfigError, match="c_attn, c_fc, c_proj"):
        lora.select_groups(cfg, ("q_proj",))
