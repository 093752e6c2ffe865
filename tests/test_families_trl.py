"""End to end against TRL 1.16 for every family beyond Llama: `dpojax eval` on a tiny policy/reference pair
equals DPOTrainer.evaluate() on standard and conversational data (the families' tiny defaults turn their
features on: Gemma 2 windows shorter than the rows and both soft-caps, NeoX partial rotary, Phi-3 LongRoPE)."""

from __future__ import annotations

import pytest
from trl_harness import TRL_METRICS, dpojax_overrides, make_assets, trl_trainer

from dpojax.config import config_from_dict
from dpojax.trainer.evaluation import evaluate

FAMILIES = ["gpt2", "gpt_neox", "gemma", "gemma2", "gemma3_text", "phi3"]
METRICS = (*TRL_METRICS, "logits/chosen", "logits/rejected")  # mean logits: Gemma 2's final soft-cap shows here


@pytest.fixture(scope="module")
def family_assets(tmp_path_factory):
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_assets(tmp_path_factory.mktemp(family), family=family)
        return cache[family]

    return get


def _close(ours: float, theirs: float, rel: float = 1e-4, abs_: float = 1e-5) -> bool:
    return abs(ours - theirs) <= rel * abs(theirs) + abs_


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_matches_trl_evaluate(family_assets, tmp_path, family, fmt):
    assets = family_assets(family)
    data = assets[fmt]
    cfg = config_from_dict(dpojax_overrides(assets, data, tmp_path / "ours", train__eval_batch_size=16))
    ours = evaluate(cfg)
    theirs = trl_trainer(assets, data, tmp_path / "trl", per_device_eval_batch_size=16).evaluate()
    for name in METRICS:
        assert _close(ours[name], theirs[f"eval_{name}"]), (family, name, ours[name], theirs[f"eval_{name}"])
    assert theirs["eval_rewards/margins"] != 0.0  # policy and reference differ, so the comparison has teeth
