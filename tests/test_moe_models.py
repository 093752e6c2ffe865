"""Mixture-of-experts families (qwen3_moe, mixtral, qwen2_moe): logits equal transformers' (fp32, padded batches)
under each routing rule, export round trips, packed rows, greedy generation, router statistics against
transformers' router logits, parameter and FLOP counts, gradients through the dropless grouped matmul, and clear
errors for what is not supported."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx
from test_hf_io import load_torch
from test_models import our_logits, padded_batch, torch_logits
from tiny_models import make_tiny_checkpoint

from dpojax.models import abstract_decoder, export_hf, load_pretrained

# name -> (family, make_tiny_checkpoint overrides)
VARIANTS = {
    "qwen3_moe": ("qwen3_moe", {}),  # top-k probabilities as they are (norm_topk_prob false)
    "qwen3_moe_norm_topk_window4": ("qwen3_moe", dict(norm_topk_prob=True, use_sliding_window=True, sliding_window=4)),
    "mixtral": ("mixtral", {}),  # always renormalized
    "mixtral_window4": ("mixtral", dict(sliding_window=4)),
    "qwen2_moe_shared_expert": ("qwen2_moe", {}),
    "qwen2_moe_norm_topk_window4": ("qwen2_moe", dict(norm_topk_prob=True, use_sliding_window=True, sliding_window=4)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_export_round_trip(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path / variant, family, **overrides)
    model, cfg = load_pretrained(path)
    assert cfg.family == family and cfg.num_experts == 8 and cfg.experts_per_token == 2
    ids, pos, seg = padded_batch()
    real = seg > 0
    ours = our_logits(model, ids, pos, seg)
    ref = torch_logits(path, ids, seg)
    assert np.abs(ref[real]).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)

    out = export_hf(model, cfg, tmp_path / "export")
    saved = set(json.loads((out / "config.json").read_text()))
    assert {"num_experts_per_tok", "router_aux_loss_coef"} <= saved
    load_torch(out)  # transformers finds every weight it expects and nothing else
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], ours[real], atol=1e-4, rtol=0)
    again, cfg2 = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(our_logits(again, ids, pos, seg), ours)


def _with(model, cfg, **changes):
    """The same weights under a config with `changes` (options that add or remove no parameter)."""
    changed = dataclasses.replace(cfg, **changes)
    return nnx.merge(nnx.graphdef(abstract_decoder(changed)), nnx.state(model))


@pytest.mark.parametrize("variant,changes", [
    ("qwen3_moe", dict(norm_topk_prob=True)),
    ("qwen2_moe_shared_expert", dict(norm_topk_prob=True)),
    ("qwen3_moe", dict(experts_per_token=3)),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_each_routing_rule_changes_the_logits(variant, changes, tmp_path):
    """The parity above means something: another routing rule on the same weights moves the logits past 1e-2."""
    family, overrides = VARIANTS[variant]
    model, cfg = load_pretrained(make_tiny_checkpoint(tmp_path / variant, family, **overrides))
    ids, pos, seg = padded_batch()
    real = seg > 0
    diff = np.abs(our_logits(model, ids, pos, seg) - our_logits(_with(model, cfg, **changes), ids, pos, seg))
    assert diff[real].max() > 1e-2, (variant, changes, diff[real].max())
