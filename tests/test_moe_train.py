"""Training mixture-of-experts models: the router auxiliary loss against transformers' `load_balancing_loss_func`,
its config key, and expert load metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax.errors import ConfigError
from dpojax.losses import router


def _stats(logits_LxBTxX: np.ndarray, top_k: int, weights_BT: np.ndarray):
    """RouterStats sums (counts, probs, tokens per layer) of router logits, as the decoder's MoE layers make them."""
    probs = jax.nn.softmax(jnp.asarray(logits_LxBTxX), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    picks = jax.nn.one_hot(chosen, logits_LxBTxX.shape[-1]).sum(axis=-2)
    w = jnp.asarray(weights_BT, jnp.float32)
    counts_LxX = jnp.einsum("lnx,n->lx", picks, w)
    probs_LxX = jnp.einsum("lnx,n->lx", probs, w)
    tokens_L = jnp.broadcast_to(jnp.sum(w), (logits_LxBTxX.shape[0],))
    return counts_LxX, probs_LxX, tokens_L


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_matches_transformers(family, masked):
    import importlib

    import torch

    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    gen = np.random.default_rng(0)
    layers, b, t, x, k = 3, 4, 7, 8, 2
    logits = gen.standard_normal((layers, b * t, x)).astype(np.float32) * 2.0
    mask = (gen.random((b, t)) > 0.3).astype(np.int64) if masked else np.ones((b, t), np.int64)
    theirs = hf.load_balancing_loss_func(tuple(torch.from_numpy(g) for g in logits), x, k,
                                         torch.from_numpy(mask) if masked else None)
    ours = router.load_balancing_loss(*_stats(logits, k, mask.reshape(-1)))
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)
    assert abs(float(ours) - k) > 1e-3  # random logits are not balanced: the comparison has teeth


def test_weighted_token_equals_repeated_tokens():
    """A shared prompt computed once for K responses, its tokens weighted K, gives the unpacked batch's aux loss."""
    gen = np.random.default_rng(1)
    prompt, responses = gen.standard_normal((2, 5, 8)), gen.standard_normal((2, 3, 6, 8))  # [L, tokens, X]
    unpacked = np.concatenate([prompt, responses[:, 0], prompt, responses[:, 1], prompt, responses[:, 2]], axis=1)
    packed = np.concatenate([prompt, responses.reshape(2, 18, 8)], axis=1)
    weights = np.concatenate([np.full(5, 3.0), np.ones(18)])
    a = router.load_balancing_loss(*_stats(unpacked.astype(np.float32), 2, np.ones(unpacked.shape[1])))
    b = router.load_balancing_loss(*_stats(packed.astype(np.float32), 2, weights))
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)


def test_no_tokens_gives_zero():
    z = jnp.zeros((2, 4))
    assert float(router.load_balancing_loss(z, z, jnp.zeros(2))) == 0.0


def test_resolve_aux_coef_follows_trl():
    assert router.resolve_aux_coef(None, num_experts=8, model_coef=0.001, model="m") == 0.001
    assert router.resolve_aux_coef(0.5, num_experts=8, model_coef=0.001, model="m") == 0.5
    assert router.resolve_aux_coef(0.0, num_experts=8, model_coef=0.001, model="m") == 0.0
    assert router.resolve_aux_coef(None, num_experts=0, model_coef=0.0, model="m") == 0.0
    assert router.resolve_aux_coef(0.0, num_experts=0, model_coef=0.0, model="m") == 0.0
    with pytest.raises(ConfigError, match="router_aux_loss_coef.*not a mixture-of-experts"):
        router.resolve_aux_coef(0.01, num_experts=0, model_coef=0.0, model="m")


def test_load_metrics():
    counts = jnp.array([[4.0, 4.0, 4.0, 4.0], [10.0, 2.0, 4.0, 0.0]])
    out = {k: float(v) for k, (v, _) in router.load_metrics(counts).items()}
    assert out["moe/load_max_over_mean"] == pytest.approx((1.0 + 2.5) / 2)
    assert out["moe/load_max_over_mean_worst"] == pytest.approx(2.5)
    assert out["moe/load_min_over_mean_worst"] == 0.0
    finished = router.finish_load_metrics({"loss": (1.0, 1.0), router.EXPERT_TOKENS: (counts, 0.0)})
    assert set(finished) == {"loss", *router.LOAD_METRICS}


ROWS = [
    {"prompt": "the sky is", "responses": [" blue.", " red cat.", " no."]},
    {"prompt": "what color is the sea when the sun is hot and the dog is", "responses": [" blue.", " green sea."]},
    {"prompt": "a", "responses": [" one two three four five six seven eight nine ten.", " b."]},
    {"prompt": "sun", "responses": [" hot.", " hot."]},  # identical responses: laid out once, weighted twice
    {"prompt": "the dog and the cat", "responses": [" run.", " sleep and run and sleep and run.", " eat."]},
]


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("mode", ["shared_prompt", "padding_free"])
def test_packed_token_weights_count_unpacked_sequences(tmp_path, mode, truncation_mode):
    """Any per-token quantity of (token, position) summed over packed tokens with their weights equals its sum over
    the [N, K, T] batch's real tokens (the router statistics' case): shared prompts count once per response,
    aliased responses twice, filler prompts and padding not at all; groups split over rows included."""
    from tiny_tokenizer import load_tiny_tokenizer, make_tokenizer

    from dpojax.data import collate, tokenize_rows
    from dpojax.data.packing import Packing, pack
    from dpojax.trainer.step import token_weights

    tok = load_tiny_tokenizer(make_tokenizer(tmp_path / "tok"))
    data = tokenize_rows(ROWS, tok, max_length=16)
    idx = np.arange(len(data))
    prompt_mask = np.ones(len(idx), np.float32)
    prompt_mask[-1] = 0.0  # a filler
    unpacked = collate(data, idx, length=16, max_length=16, truncation_mode=truncation_mode, prompt_mask=prompt_mask)
    packed = pack(data, idx, prompt_mask, Packing(mode), max_length=16, truncation_mode=truncation_mode)
    table = np.random.default_rng(0).standard_normal((int(data.lengths_MxK.max()) + 64, 512))

    def weighted_sum(ids, positions, weights):
        return float(np.sum(np.asarray(weights) * table[np.asarray(positions), np.asarray(ids)]))

    want = weighted_sum(unpacked.input_ids_NxKxT.reshape(-1, 16), unpacked.positions_NxKxT.reshape(-1, 16),
                        token_weights(unpacked))
    got = weighted_sum(packed.input_ids_PxJ, packed.positions_PxJ, token_weights(packed))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.max(packed.token_weight_PxJ) >= 2  # something was shared or aliased


# ---- end to end against TRL 1.16: DPOTrainer with the router aux loss on -------------------------------------------
COEF = 0.5  # large enough that the aux loss moves the numbers past the tolerance (the checkpoints say 0.01)


@pytest.fixture(scope="module")
def moe_assets(tmp_path_factory):
    from trl_harness import make_assets

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_assets(tmp_path_factory.mktemp(family), family=family)
        return cache[family]

    return get


def _close(ours: float, theirs: float, rel: float = 1e-4, abs_: float = 1e-5) -> bool:
    return abs(ours - theirs) <= rel * abs(theirs) + abs_


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_eval_matches_trl_with_aux_loss(moe_assets, tmp_path, family):
    """`dpojax eval` equals DPOTrainer.evaluate() with output_router_logits and router_aux_loss_coef > 0: the loss
    (which includes coef x aux_loss), aux_loss itself and TRL's reward metrics."""
    from trl_harness import TRL_METRICS, dpojax_overrides, trl_trainer

    from dpojax.config import config_from_dict
    from dpojax.trainer.evaluation import evaluate

    assets = moe_assets(family)
    data = assets["standard"]
    cfg = config_from_dict(dpojax_overrides(assets, data, tmp_path / "ours", train__eval_batch_size=16,
                                            loss__router_aux_loss_coef=COEF))
    ours = evaluate(cfg)
    theirs = trl_trainer(assets, data, tmp_path / "trl", per_device_eval_batch_size=16,
                         router_aux_loss_coef=COEF).evaluate()
    for name in (*TRL_METRICS, "aux_loss"):
        assert _close(ours[name], theirs[f"eval_{name}"]), (family, name, ours[name], theirs[f"eval_{name}"])
    assert COEF * ours["aux_loss"] > 1e-2  # the aux loss is a visible part of the loss
    assert 1.0 <= ours["moe/load_max_over_mean"] <= 8.0


def _eight_rows(assets, tmp_path):
    rows = assets["standard"].read_text().splitlines()[:8]
    data = tmp_path / "eight.jsonl"
    data.write_text("\n".join(rows) + "\n")
    return data


def _our_train(assets, data, out, steps: int, **extra) -> list[dict]:
    from trl_harness import dpojax_overrides

    from dpojax.config import config_from_dict
    from dpojax.metrics import read_metrics
    from dpojax.trainer.loop import train

    cfg = config_from_dict(dpojax_overrides(
        assets, data, out, train__batch_size=8, train__steps=steps, train__log_every=1, data__eval=None,
        optim__name="sgd", optim__lr=0.5, optim__schedule="constant", optim__max_grad_norm=None, **extra))
    train(cfg)
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_training_matches_trl_with_aux_loss(moe_assets, tmp_path, family):
    """5 SGD steps: per-step loss and aux_loss equal DPOTrainer's (one batch of 8 pairs per step)."""
    from trl_harness import trl_trainer

    assets = moe_assets(family)
    data = _eight_rows(assets, tmp_path)
    ours = _our_train(assets, data, tmp_path / "ours", 5, loss__router_aux_loss_coef=COEF)
    trainer = trl_trainer(assets, data, tmp_path / "trl", per_device_train_batch_size=8, max_steps=5,
                          learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
                          max_grad_norm=1e9, logging_steps=1, warmup_steps=0, router_aux_loss_coef=COEF)
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h][:5]
    assert len(ours) == len(theirs) == 5
    for name in ("loss", "aux_loss"):
        np.testing.assert_allclose([r[name] for r in ours], [h[name] for h in theirs], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3  # training moved the loss
    assert all(1.0 <= r["moe/load_max_over_mean"] <= r["moe/load_max_over_mean_worst"] <= 8.0 for r in ours)


# ---- the step on a tiny Qwen3-MoE: packing and gradient accumulation ------------------------------------------------
@pytest.fixture(scope="module")
def moe_step_setup(tmp_path_factory):
    """(graphdef, params, tokenized ROWS) of a tiny Qwen3-MoE and the test tokenizer."""
    from flax import nnx
    from tiny_models import make_tiny_checkpoint
    from tiny_tokenizer import load_tiny_tokenizer, make_tokenizer

    from dpojax.data import tokenize_rows
    from dpojax.models import load_pretrained

    root = tmp_path_factory.mktemp("moe_step")
    model, _ = load_pretrained(make_tiny_checkpoint(root / "model", "qwen3_moe"), attention="xla")
    graphdef, params = nnx.split(model)
    tok = load_tiny_tokenizer(make_tokenizer(root / "tok"))
    return graphdef, params, tokenize_rows(ROWS[:4], tok, max_length=24)


def _moe_spec(graphdef, **kw):
    import optax

    from dpojax.config import LossSection
    from dpojax.trainer.step import StepSpec

    # Plackett-Luce: the rows have 2 or 3 responses (padding responses route nothing)
    return StepSpec(graphdef, graphdef, LossSection(type=("plackett_luce",)), optax.sgd(1.0),
                    optax.constant_schedule(1.0), moe=True, router_aux_loss_coef=COEF, **kw)


@pytest.mark.parametrize("mode", ["shared_prompt", "padding_free"])
def test_packed_aux_loss_and_gradients_equal_unpacked(moe_step_setup, mode):
    """The aux loss (prompt tokens weighted by their responses), the load metrics and the gradients of a packed
    batch equal the [N, K, T] batch's: a shared prompt is routed once and counts K times."""
    from dpojax.data import collate
    from dpojax.data.packing import Packing, pack
    from dpojax.trainer.step import batch_loss

    graphdef, params, data = moe_step_setup
    idx = np.arange(len(data))
    unpacked = collate(data, idx, length=24, max_length=24, truncation_mode="keep_start")
    packed = pack(data, idx, np.ones(len(idx), np.float32), Packing(mode), max_length=24, truncation_mode="keep_start")

    def run(batch, spec):
        fn = jax.value_and_grad(lambda p, b: batch_loss(p, params, b, spec), has_aux=True)
        (loss, metrics), grads = jax.jit(fn)(params, batch)
        return loss, router.finish_load_metrics(metrics), grads

    want = run(unpacked, _moe_spec(graphdef))
    got = run(packed, _moe_spec(graphdef, packing=mode, band=24))
    np.testing.assert_allclose(float(got[1]["aux_loss"][0]), float(want[1]["aux_loss"][0]), rtol=1e-5)
    for name in router.LOAD_METRICS:
        np.testing.assert_allclose(float(got[1][name][0]), float(want[1][name][0]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    router_grad = lambda g: np.asarray(g["layers"]["mlp"]["router"]["kernel"][...])  # noqa: E731
    assert np.abs(router_grad(want[2])).max() > 0  # the aux loss reaches the router
    np.testing.assert_allclose(router_grad(got[2]), router_grad(want[2]), rtol=1e-4, atol=1e-6)


def test_accumulation_averages_the_micro_batches_aux_loss(moe_step_setup):
    """With A = 2 equally full micro-batches, one update (SGD, lr 1) equals the mean of the two micro-batches'
    updates, each with its own aux loss (TRL's per-forward average); `loss` and `aux_loss` are those means, the load
    metrics those of the step's pooled counts."""
    import dataclasses

    import optax

    from dpojax.data import collate
    from dpojax.trainer.step import TrainState, train_step

    graphdef, params, data = moe_step_setup
    batch = collate(data, np.arange(len(data)), length=24, max_length=24, truncation_mode="keep_start")
    spec = _moe_spec(graphdef)

    def step(b, accum):
        s = TrainState(jnp.zeros((), jnp.int32), params, optax.sgd(1.0).init(params))
        return jax.jit(lambda s, b: train_step(s, params, b, dataclasses.replace(spec, grad_accum=accum)))(s, b)

    both, m_both = step(batch, 2)
    halves = [step(jax.tree.map(lambda x, a=a: None if x is None else x[a::2], batch), 1) for a in range(2)]
    def value(m, name):
        return float(m[name][0] / m[name][1])

    for name in ("loss", "aux_loss"):
        np.testing.assert_allclose(value(m_both, name), np.mean([value(m, name) for _, m in halves]), rtol=1e-5,
                                   err_msg=name)
    mean_params = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][0].params, halves[1][0].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), both.params, mean_params)
    assert float(m_both["moe/load_max_over_mean"][0]) >= 1.0


# ---- LoRA and the precomputed reference on MoE models -------------------------------------------------------
def test_lora_on_moe_adapts_attention_and_trains(moe_assets, tmp_path):
    """all-linear on Qwen3-MoE adapts the attention projections (not the router, not the experts: PEFT's
    all-linear takes nn.Linear modules only); two steps train, with the aux loss, and export a PEFT adapter."""
    import json

    assets = moe_assets("qwen3_moe")
    data = _eight_rows(assets, tmp_path)
    lora = {"enabled": True, "rank": 4, "alpha": 8, "targets": ["all-linear"]}
    records = _our_train(assets, data, tmp_path / "lora", 2, model__lora=lora, ref_model={},
                         loss__router_aux_loss_coef=COEF)
    assert len(records) == 2 and all(np.isfinite(r["loss"]) and r["aux_loss"] > 0 for r in records)
    assert records[0]["loss"] != records[1]["loss"]
    adapter = json.loads((tmp_path / "lora" / "export" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("family,target", [("qwen3_moe", "experts"), ("qwen3_moe", "gate_up_proj"),
                                           ("qwen3_moe", "gate"), ("mixtral", "w1"), ("mixtral", "experts.0.w2"),
                                           ("qwen2_moe", "gate_proj")])
def test_lora_targets_naming_experts_or_router_are_refused(tmp_path, family, target):
    from tiny_models import make_tiny_checkpoint

    from dpojax.models.config import ModelConfig
    from dpojax.models.hf import read_hf_config
    from dpojax.trainer.build import moe_lora_targets

    cfg = ModelConfig.from_hf(read_hf_config(make_tiny_checkpoint(tmp_path / family, family)))
    present = {f"layers/self_attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with pytest.raises(ConfigError, match=r"experts or the router .*target_parameters, is not supported.*q_proj"):
        moe_lora_targets(cfg, ("q_proj", target), "m", present)
    assert moe_lora_targets(cfg, ("q_proj", "v_proj"), "m", present) == ("q_proj", "v_proj")


def test_reference_precompute_with_moe(moe_assets, tmp_path):
    """ref_model.precompute on an MoE reference gives the same training records as the reference in the step."""
    assets = moe_assets("mixtral")
    data = _eight_rows(assets, tmp_path)
    live = _our_train(assets, data, tmp_path / "live", 2, loss__router_aux_loss_coef=COEF)
    pre = _our_train(assets, data, tmp_path / "pre", 2, loss__router_aux_loss_coef=COEF,
                     ref_model={"name_or_path": str(assets["ref"]), "precompute": True})
    for name in ("loss", "aux_loss", "rewards/margins", "moe/load_max_over_mean"):
        np.testing.assert_allclose([r[name] for r in pre], [r[name] for r in live], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_flops_count_active_experts(tmp_path):
    """MFU's model FLOPs (`dpojax.flops`) count the router and the Y active experts of the X, by hand."""
    from tiny_models import make_tiny_checkpoint

    from dpojax import flops
    from dpojax.models.config import ModelConfig
    from dpojax.models.hf import read_hf_config

    cfg = ModelConfig.from_hf(read_hf_config(make_tiny_checkpoint(tmp_path / "m", "qwen3_moe")))
    D, X, Y, Fe, L = cfg.hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.expert_intermediate_size, 2
    attention = D * cfg.num_heads * cfg.head_dim * 2 + 2 * D * cfg.num_kv_heads * cfg.head_dim
    per_token = attention + D * X + Y * 3 * D * Fe
    f = flops.step_flops(cfg, [10, 6], 5, remat="qkv")
    assert f.policy_forward.matmul == 2.0 * L * per_token * 16
    assert cfg.active_params() < cfg.num_params()
    qkv = f.remat_recompute - f.policy_forward.head
    assert qkv == 2.0 * L * (cfg.num_heads * cfg.head_dim * D + 2 * Y * Fe * D + D * X) * 16
