"""Mixture-of-experts families (qwen3_moe, mixtral, qwen2_moe): logits equal transformers' (fp32, padded batches)
under each routing rule, export round trips, packed rows, greedy generation, router statistics against
transformers' router logits, parameter and FLOP counts, gradients through the dropless grouped matmul, and clear
errors for what is not supported."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_generate import EOS, NEW, PROMPTS, _hf_greedy, _sharpened_checkpoint
from test_hf_io import load_torch
from test_models import FAST_COMPILE, our_logits, padded_batch, torch_logits
from test_packing import ALL_STATS, ROWS, STAT_FIELDS, _batches, _stats
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import load_tiny_tokenizer, make_tokenizer

from dpojax import flops
from dpojax.config import LoraSection
from dpojax.data import tokenize_rows
from dpojax.errors import ModelError
from dpojax.generate import Generator, Sampling
from dpojax.models import Decoder, ModelConfig, abstract_decoder, abstract_params, export_hf, load_pretrained
from dpojax.models.experts import ExpertWeights, expert_ffn, route
from dpojax.models.hf import hf_weight_shapes
from dpojax.models.lora import lora_model
from dpojax.models.transformer import REMAT_POLICIES
from dpojax.sharding import Sharder, check_fsdp_sharded, make_mesh

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


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, ids_BxT, pos_BxT, seg_BxT):
    model = nnx.merge(graphdef, state)
    hidden_BxTxD, stats = model.forward(ids_BxT, pos_BxT, seg_BxT)
    return model.logits(hidden_BxTxD), stats


def forward(model, ids_BxT, pos_BxT, seg_BxT):
    """(logits, RouterStats stacked over layers) as numpy."""
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _forward(graphdef, state, ids_BxT, pos_BxT, seg_BxT))


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe")


def test_router_stats_match_transformers_router_logits(qwen2_moe):
    """Per layer: counts = the top-k choices of transformers' router logits over the real tokens, probs = the sum of
    their softmax, tokens = the number of real tokens; padding counts for nothing."""
    import torch
    import transformers

    model, cfg = load_pretrained(qwen2_moe)
    ids, pos, seg = padded_batch()
    real = (seg > 0).reshape(-1)
    _, stats = forward(model, ids, pos, seg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_moe, attn_implementation="eager",
                                                           dtype=torch.float32)
    with torch.no_grad():
        out = hf.eval()(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg),
                        output_router_logits=True)
    assert len(out.router_logits) == cfg.num_layers and stats.counts_X.shape == (cfg.num_layers, cfg.num_experts)
    for layer, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.float(), dim=-1).numpy()[real]
        top = np.argsort(-probs, axis=-1)[:, :cfg.experts_per_token]
        counts = np.bincount(top.reshape(-1), minlength=cfg.num_experts)
        np.testing.assert_array_equal(stats.counts_X[layer], counts)
        np.testing.assert_allclose(stats.probs_X[layer], probs.sum(0), atol=1e-4)
        assert stats.tokens[layer] == real.sum()
    assert (stats.counts_X > 0).sum() > cfg.num_experts  # the tokens spread over the experts


def test_packed_rows_equal_separate_rows(qwen2_moe):
    """Two sequences packed in one row (per-segment positions) give the logits and router statistics of separate
    rows."""
    model, _ = load_pretrained(qwen2_moe)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 128, 5), rng.integers(3, 128, 4)
    packed_ids = np.array([[*a, *b, 0]], np.int32)
    packed_pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]], np.int32)
    packed_seg = np.array([[1] * 5 + [2] * 4 + [0]], np.int32)
    sep_ids = np.array([[*a, 0, 0, 0, 0, 0], [*b, 0, 0, 0, 0, 0, 0]], np.int32)
    sep_pos = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
    sep_seg = (sep_ids > 0).astype(np.int32)
    packed, packed_stats = forward(model, packed_ids, packed_pos, packed_seg)
    sep, sep_stats = forward(model, sep_ids, sep_pos, sep_seg)
    np.testing.assert_allclose(packed[0, :5], sep[0, :5], atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:9], sep[1, :4], atol=1e-5)
    np.testing.assert_array_equal(packed_stats.counts_X, sep_stats.counts_X)
    np.testing.assert_allclose(packed_stats.probs_X, sep_stats.probs_X, atol=1e-5)
    np.testing.assert_array_equal(packed_stats.tokens, [9, 9])


def test_scan_loop_and_remat_agree_with_gradients(qwen2_moe):
    """A python loop with remat gives the scan's loss and gradients (through the router, ragged_dot and the router
    statistics); every remat policy traces."""
    ids, pos, seg = padded_batch()
    base, cfg = load_pretrained(qwen2_moe)
    params = nnx.state(base)

    def value_and_grad(model):
        graphdef = nnx.graphdef(model)

        def loss(state):
            hidden, stats = nnx.merge(graphdef, state).forward(ids, pos, seg)
            return jnp.sum(hidden ** 2 * seg[..., None]) + jnp.sum(stats.probs_X * stats.counts_X)

        return jax.value_and_grad(loss)

    for remat in REMAT_POLICIES:  # tracing only: compiling each would be slow on CPU
        jax.make_jaxpr(value_and_grad(abstract_decoder(cfg, remat=remat, scan_layers=True)))(params)
    loss_ref, grads_ref = jax.jit(value_and_grad(base), compiler_options=FAST_COMPILE)(params)
    loop = abstract_decoder(cfg, remat="dots", scan_layers=False)
    loss, grads = jax.jit(value_and_grad(loop), compiler_options=FAST_COMPILE)(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads, grads_ref)
    experts = grads_ref["layers"]["mlp"]["experts"]
    assert all(float(jnp.abs(experts[k][...]).max()) > 0 for k in ("gate_proj", "up_proj", "down_proj"))
    assert float(jnp.abs(grads_ref["layers"]["mlp"]["router"]["kernel"][...]).max()) > 0


def _dense_dispatch(x_BTxD, routing, w: ExpertWeights):
    """The reference: every token through every expert, weighted by its routing weight (0 off its top-k)."""
    h = jax.nn.silu(jnp.einsum("td,xdf->txf", x_BTxD, w.gate_XxDxF)) * jnp.einsum("td,xdf->txf", x_BTxD, w.up_XxDxF)
    y_BTxXxD = jnp.einsum("txf,xfd->txd", h, w.down_XxFxD)
    weights_BTxX = jnp.zeros(y_BTxXxD.shape[:2]).at[jnp.arange(x_BTxD.shape[0])[:, None],
                                                    routing.experts_BTxY].add(routing.weights_BTxY)
    return jnp.einsum("txd,tx->td", y_BTxXxD, weights_BTxX)


@pytest.mark.parametrize("rule,norm", [("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", False)])
def test_expert_ffn_equals_dense_dispatch_with_gradients(rule, norm):
    """The dropless grouped matmul (sort, ragged_dot, unsort) equals running every expert densely, values and
    gradients, with experts that receive no token."""
    keys = jax.random.split(jax.random.key(0), 5)
    BT, D, X, F, Y = 24, 16, 6, 8, 2
    x = jax.random.normal(keys[0], (BT, D))
    kernel = jax.random.normal(keys[1], (D, X))
    bias = jnp.asarray([0, 0, 0, 0, -99, -99.0])  # experts 4 and 5 get no token
    w = ExpertWeights(*(0.3 * jax.random.normal(k, s) for k, s in zip(keys[2:], [(X, D, F), (X, D, F), (X, F, D)])))

    def ours(x, kernel, w):
        return expert_ffn(x, route(x, kernel, bias, top_k=Y, rule=rule, norm_topk_prob=norm), w, activation="silu",
                          dtype=jnp.float32)

    def reference(x, kernel, w):
        return _dense_dispatch(x, route(x, kernel, bias, top_k=Y, rule=rule, norm_topk_prob=norm), w)

    routing = route(x, kernel, bias, top_k=Y, rule=rule, norm_topk_prob=norm)
    assert not np.isin(np.asarray(routing.experts_BTxY), [4, 5]).any()
    sums_to_one = np.isclose(np.asarray(routing.weights_BTxY.sum(-1)), 1.0, rtol=0, atol=1e-6)
    assert sums_to_one.all() == (rule == "topk_softmax" or norm) and sums_to_one.any() == sums_to_one.all()
    np.testing.assert_allclose(ours(x, kernel, w), reference(x, kernel, w), atol=1e-5)
    probe = jax.random.normal(jax.random.key(1), (BT, D))
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * probe), argnums=(0, 1, 2))(x, kernel, w)
    expected = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2))(x, kernel, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, expected)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_greedy_generation_equals_transformers(family, tmp_path):
    """KV-cache decoding through the MoE blocks: transformers' generate(do_sample=False), token for token."""
    path, hf_model = _sharpened_checkpoint(tmp_path / family, family)
    model, cfg = load_pretrained(path)
    ours = Generator(model, cfg, eos_ids=(EOS,), batch_size=4).generate_ids(PROMPTS, Sampling(max_new_tokens=NEW))
    assert [c.tokens for c in ours] == _hf_greedy(hf_model, PROMPTS)


def test_sizes_count_all_and_active_experts(qwen2_moe):
    """num_params equals the torch model's parameter count; active_params drops the X - Y experts a token skips;
    the FLOPs count only active experts (plus the router and the shared expert)."""
    import torch
    import transformers

    _, cfg = load_pretrained(qwen2_moe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_moe, dtype=torch.float32)
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    D, X, Y, Fe, L = (cfg.hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.expert_intermediate_size,
                      cfg.num_layers)
    one_expert = sum(p[0].numel() for p in hf.model.layers[0].mlp.experts.parameters())
    assert one_expert == 3 * D * Fe
    assert cfg.active_params() == cfg.num_params() - L * (X - Y) * one_expert
    every_expert = dataclasses.replace(cfg, experts_per_token=X)
    assert every_expert.active_params() == every_expert.num_params() == cfg.num_params()
    assert cfg.forward_flops_per_token(12) == every_expert.forward_flops_per_token(12) - 2 * L * (X - Y) * one_expert
    no_shared = dataclasses.replace(cfg, shared_expert_size=0)
    shared = 3 * D * cfg.shared_expert_size + D  # the shared expert and its gate
    assert cfg.forward_flops_per_token(12) - no_shared.forward_flops_per_token(12) == 2 * L * shared
    # the step's MFU accounting (dpojax.flops) counts the same active experts
    fwd = flops.forward_flops(cfg, tokens=10, scored=0, pairs_per_layer=[0] * L)
    assert fwd.matmul == flops.forward_flops(every_expert, tokens=10, scored=0,
                                             pairs_per_layer=[0] * L).matmul - 2 * L * (X - Y) * one_expert * 10
    assert cfg.active_mlp_width == Y * Fe + cfg.shared_expert_size


# ---- full-size configs (as on the hub), abstractly: counts, shardings, options ----------------------------------

QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1,
                 "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
                 "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
                 "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
                 "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
                 "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
                 "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
                 "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
                "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
                "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1e6,
                "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
                "vocab_size": 32000}
QWEN15_MOE_A27B = {"architectures": ["Qwen2MoeForCausalLM"], "decoder_sparse_step": 1, "hidden_act": "silu",
                   "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 8192,
                   "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
                   "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
                   "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
                   "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
                   "use_sliding_window": False, "vocab_size": 151936}
# published totals and active counts (model cards), as (total, active) in billions
FULL_SIZE = {"qwen3-30b-a3b": (QWEN3_30B_A3B, 30.5, 3.3), "mixtral-8x7b": (MIXTRAL_8X7B, 46.7, 12.9),
             "qwen1.5-moe-a2.7b": (QWEN15_MOE_A27B, 14.3, 2.7)}


def _hf_meta_count(hf: dict) -> int:
    """transformers' own parameter count for `hf`, built on the meta device (no memory)."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_counts_and_shardings(name):
    hf, total_b, active_b = FULL_SIZE[name]
    cfg = ModelConfig.from_hf(hf)
    model = nnx.eval_shape(lambda: Decoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert all(len(v.logical_axes) == len(v.shape) for v in flat.values())
    count = sum(int(np.prod(v.shape)) for v in flat.values())
    assert count == cfg.num_params() == _hf_meta_count(hf) == sum(int(np.prod(s)) for s in
                                                                  hf_weight_shapes(cfg).values())
    assert round(count / 1e9, 1) == total_b
    assert abs(cfg.active_params() / 1e9 - active_b) < 0.06  # cards round (3.35 -> "3.3B") or truncate
    sharder = Sharder(make_mesh(data=1, fsdp=4, tensor=2))
    _, params = abstract_params(cfg, sharder=sharder, param_dtype=jnp.bfloat16)
    check_fsdp_sharded(params, sharder.mesh)
    gate = params["layers"]["mlp"]["experts"]["gate_proj"].get_value()
    assert gate.sharding.spec == P(None, None, "fsdp", "tensor")  # the expert axis is not sharded (yet)
    assert cfg.flops_per_token(1024) < 6 * count / 2


def test_full_size_options():
    qwen3 = ModelConfig.from_hf(QWEN3_30B_A3B)
    assert (qwen3.num_experts, qwen3.experts_per_token, qwen3.expert_intermediate_size) == (128, 8, 768)
    assert qwen3.norm_topk_prob and qwen3.qk_norm and qwen3.shared_expert_size == 0 and qwen3.windows == (None,) * 48
    assert qwen3.router_aux_loss_coef == 0.001 and not qwen3.output_router_logits
    # transformers 5 saves Qwen3-MoE's expert count under its attribute-map name
    renamed = {**{k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"}, "num_local_experts": 128}
    assert ModelConfig.from_hf(renamed) == qwen3
    window = ModelConfig.from_hf({**QWEN3_30B_A3B, "use_sliding_window": True, "sliding_window": 4096})
    assert window.windows == (4096,) * 48
    mixtral = ModelConfig.from_hf(MIXTRAL_8X7B)
    assert mixtral.norm_topk_prob and mixtral.expert_intermediate_size == 14336
    assert mixtral.router_rule == "softmax_topk"
    assert ModelConfig.from_hf({**MIXTRAL_8X7B, "norm_topk_prob": False}).norm_topk_prob  # Mixtral always renormalizes
    qwen15 = ModelConfig.from_hf(QWEN15_MOE_A27B)
    assert qwen15.shared_expert_size == 5632 and qwen15.qkv_bias and not qwen15.o_bias and not qwen15.norm_topk_prob
    assert qwen15.windows == (None,) * 24  # use_sliding_window false
    sliding = ModelConfig.from_hf({**QWEN15_MOE_A27B, "use_sliding_window": True})
    assert sliding.windows == tuple(32768 if i % 2 == 0 and i < 21 else None for i in range(24))


def test_unsupported_moe_options_are_named():
    def error(hf, match):
        with pytest.raises(ModelError, match=match):
            ModelConfig.from_hf(hf)

    for model_type in ("deepseek_v3", "olmoe"):
        error({**QWEN3_30B_A3B, "model_type": model_type},
              f"{model_type} is a mixture-of-experts architecture.*supported for "
              "gpt_oss, mixtral, qwen2_moe, qwen3_moe")
    error({**QWEN3_30B_A3B, "decoder_sparse_step": 2}, "decoder_sparse_step=2")
    error({**QWEN15_MOE_A27B, "mlp_only_layers": [0, 5]}, r"mlp_only_layers=\[0, 5\]")
    error({**MIXTRAL_8X7B, "router_jitter_noise": 0.1}, "router_jitter_noise")
    error({**MIXTRAL_8X7B, "num_experts_per_tok": 9}, r"experts per token \(9\)")
    error({**QWEN3_30B_A3B, "num_experts": 0}, "num_experts is 0")


def test_lora_all_linear_adapts_the_dense_projections_only(qwen2_moe):
    """LoRA `all-linear` on an MoE model adapts its Dense projections: attention, the shared expert and its gate
    (what PEFT adapts on Qwen2-MoE); not the router nor the stacked experts, which are no Dense modules."""
    model, cfg = load_pretrained(qwen2_moe)
    lora_cfg = LoraSection(enabled=True, targets=("all-linear",))
    _, adapters, groups = lora_model(*nnx.split(model), cfg, lora_cfg, None)
    leaves = sorted(g.hf.split("{i}.")[1] for g in groups)
    assert leaves == sorted([f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.shared_expert.{p}_proj" for p in
                                                                         ("gate", "up", "down")]
                            + ["mlp.shared_expert_gate"])
    assert jax.tree.leaves(adapters)


def test_sharded_load_forward_and_export(qwen2_moe, tmp_path):
    """On a (data=1, fsdp=4, tensor=2) mesh: experts split over embed (fsdp) and their width (tensor), the router
    whole over its experts; the logits and router statistics of one device; a sharded export loads in
    transformers."""
    sharder = Sharder(make_mesh(data=1, fsdp=4, tensor=2))
    model, cfg = load_pretrained(qwen2_moe, sharder=sharder)
    mlp = nnx.state(model)["layers"]["mlp"]
    assert mlp["experts"]["gate_proj"].get_value().sharding.spec == P(None, None, "fsdp", "tensor")
    assert mlp["experts"]["down_proj"].get_value().sharding.spec == P(None, None, "tensor", "fsdp")
    assert mlp["router"]["kernel"].get_value().sharding.spec == P(None, "fsdp", None)
    ids, pos, seg = padded_batch()
    logits, stats = forward(model, ids, pos, seg)
    ref_logits, ref_stats = forward(load_pretrained(qwen2_moe)[0], ids, pos, seg)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_array_equal(stats.counts_X, ref_stats.counts_X)
    out = export_hf(model, cfg, tmp_path / "export", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    load_torch(out)
    real = seg > 0
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], logits[real], atol=1e-4, rtol=0)


def test_mixtral_module_spelling_loads(tmp_path):
    """Mixtral's expert weights under transformers' module name `mlp.` (instead of `block_sparse_moe.`) load the
    same model."""
    from safetensors.numpy import load_file, save_file

    path = make_tiny_checkpoint(tmp_path / "mixtral", "mixtral")
    ids, pos, seg = padded_batch()
    expected = our_logits(load_pretrained(path)[0], ids, pos, seg)
    tensors = load_file(str(path / "model.safetensors"))
    assert any(".block_sparse_moe.experts.7.w2.weight" in k for k in tensors)
    save_file({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_array_equal(our_logits(load_pretrained(path)[0], ids, pos, seg), expected)


@pytest.mark.parametrize("mode", ["shared_prompt", "padding_free"])
def test_packed_batches_give_the_unpacked_statistics(qwen2_moe, tmp_path, mode):
    """The train step's packed rows (shared prompts: band and branch ids; padding-free) give the per-sequence
    log-prob statistics of the [N, K, T] batch on an MoE model (routing is per token, so packing cannot move it)."""
    model, _ = load_pretrained(qwen2_moe, attention="xla")
    graphdef, params = nnx.split(model)
    data = tokenize_rows(ROWS, load_tiny_tokenizer(make_tokenizer(tmp_path / "tok")), max_length=12)
    unpacked, packed = _batches(data, 12, "keep_start", mode)
    want = _stats(graphdef, params, unpacked, ALL_STATS, "none", None)
    got = _stats(graphdef, params, packed, ALL_STATS, mode, 12)
    for name in STAT_FIELDS:
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, err_msg=name)
