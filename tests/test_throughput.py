"""FLOP accounting (dpojax.flops) against a hand count and against XLA's cost analysis; peaks per device kind; the
throughput benchmark runs the real step of its tiny preset and prints every field."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpojax import flops
from dpojax.data.batching import PreferenceBatch
from dpojax.models import Decoder, ModelConfig

# D 64, F 128, H 4, G 2, Dh 16, L 2, V 256
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False}


def test_step_flops_hand_count():
    cfg = ModelConfig.from_hf(TINY)
    # one layer's matmul weights: q 64*64 + k, v 2 * 64*32 + o 64*64 + gate, up, down 3 * 64*128 = 36864
    # sequences of 5 and 3 real tokens: 8 tokens, causal pairs 5*6/2 + 3*4/2 = 21 per layer; 4 scored tokens
    f = flops.step_flops(cfg, [5, 3], 4, remat="none")
    assert f.policy_forward.matmul == 2 * 2 * 36864 * 8
    assert f.policy_forward.attention == 4 * 4 * 16 * 21 * 2
    assert f.policy_forward.head == 2 * 256 * 64 * 4
    fwd = 2 * 2 * 36864 * 8 + 4 * 4 * 16 * 21 * 2 + 2 * 256 * 64 * 4
    assert f.policy_backward == 2 * fwd and f.reference_forward.total == fwd
    assert f.model == 4 * fwd and f.tokens == 8
    assert f.remat_recompute == 2 * 256 * 64 * 4  # remat none: only the log-prob head recomputes its logits
    down = 2 * 2 * 128 * 64 * 8  # the MLP's down projection: never recomputed
    full = flops.step_flops(cfg, [5, 3], 4, remat="full")
    assert full.remat_recompute == fwd - down and full.model == f.model
    dots = flops.step_flops(cfg, [5, 3], 4, remat="dots")  # every projection saved: the attention again
    assert dots.remat_recompute == 2 * 256 * 64 * 4 + 4 * 4 * 16 * 21 * 2
    dots_all = flops.step_flops(cfg, [5, 3], 4, remat="dots_all", reference=False)  # attention products saved too
    assert dots_all.remat_recompute == 2 * 256 * 64 * 4 and dots_all.model == 3 * fwd
    lora = flops.step_flops(cfg, [5, 3], 4, weight_grads=False)  # LoRA: no base-weight gradients
    assert lora.policy_backward == 2 * 2 * 36864 * 8 + 2 * 256 * 64 * 4 + 2 * (4 * 4 * 16 * 21 * 2)
    qkv = flops.step_flops(cfg, [5, 3], 4, remat="qkv")  # o (64*64) and gate, up (2 * 64*128) again
    assert qkv.remat_recompute == 2 * 256 * 64 * 4 + 2 * 2 * (64 * 64 + 2 * 64 * 128) * 8
    # a sliding window of 2 over 5 tokens: keys per query 1, 2, 2, 2, 2
    assert flops.causal_pairs([5], window=2) == 9 and flops.causal_pairs([5, 3]) == 21


def test_batch_counts_skip_padding_and_fillers():
    seg = np.zeros((2, 2, 6), np.int32)
    seg[0, 0, :5], seg[0, 1, :3], seg[1, :, :4] = 1, 1, 1
    comp = np.zeros_like(seg)
    comp[0, 0, 2:5], comp[0, 1, 2:3], comp[1, :, 2:4] = 1, 1, 1
    batch = PreferenceBatch(seg, seg, seg, comp, np.ones((2, 2), np.float32), np.zeros((2, 2), np.int32),
                            np.array([1.0, 0.0], np.float32), np.array([0, -1], np.int32))  # row 1: a filler
    prefix, lengths, scored = flops.batch_counts(batch)
    assert lengths.tolist() == [5, 3] and prefix.tolist() == [0, 0] and scored == 4
    two = PreferenceBatch(*(np.array([[[1, 1, 2, 2, 2, 0]]], np.int32),) * 3, comp[:1, :1],
                          np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32), np.ones(1, np.float32),
                          np.zeros(1, np.int32))  # two sequences of 2 and 3 tokens in one row
    assert sorted(flops.batch_counts(two)[1].tolist()) == [2, 3]
    assert flops.batch_flops(ModelConfig.from_hf(TINY), batch).model == flops.step_flops(
        ModelConfig.from_hf(TINY), [5, 3], 4).model


def test_packed_batch_counts_the_shared_prompt_once():
    from dpojax.data.packing import PackedBatch

    # one row: a prompt of 3 tokens shared by responses of 2 and 1 tokens, then 2 padding positions
    seg, branch = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32), np.array([[0, 0, 0, 1, 1, 2, 0, 0]], np.int32)
    zeros, scored = np.zeros_like(seg), np.array([[1, 1, 1, 0, 0, 0, 0, 0]], np.float32)
    one = np.ones((1, 2), np.float32)
    batch = PackedBatch(zeros, zeros, seg, branch, zeros, zeros, zeros, scored, scored * 0, scored * 0, one, one,
                        zeros[:, :2], one[:, 0], zeros[:, 0])
    prefix, lengths, n_scored = flops.batch_counts(batch)
    assert sorted(zip(prefix.tolist(), lengths.tolist())) == [(0, 3), (3, 1), (3, 2)] and n_scored == 3
    cfg = ModelConfig.from_hf(TINY)
    f = flops.batch_flops(cfg, batch)
    # keys per query: prompt 1, 2, 3; response 1: 4, 5; response 2: 4 -> 19 pairs per layer; 6 tokens, once each
    assert f.tokens == 6 and f.policy_forward.attention == 4 * 4 * 16 * 19 * 2


def test_forward_backward_and_remat_match_xla_cost_analysis():
    """XLA's cost analysis of the lowered step (no compile: the remat recompute sits behind optimization barriers
    already) counts every op of an unrolled body (attention over the full T x T at T < 256, as attend_xla computes
    it; a scanned body would be counted once): forward + backward (3x forward) is within 3% of it, and each remat
    policy's recompute within 3% of the forward of what XLA adds; `dots` (which saves the Dense outputs, named for
    the policy as their matmul sits in a custom_vjp) recomputes less than `full`."""
    cfg = ModelConfig.from_hf({**TINY, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 1})
    B, T = 2, 64
    ids, seg = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    fwd = flops.forward_flops(cfg, tokens=B * T, scored=0, pairs_per_layer=[B * T * T] * cfg.num_layers)

    def xla_flops(remat: str) -> float:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, attention="xla", scan_layers=False,
                                                                   remat=remat, rngs=nnx.Rngs(0))))

        def hidden(s):
            return nnx.merge(graphdef, s)(ids, pos, seg)

        return jax.jit(jax.grad(lambda s: jnp.sum(hidden(s) ** 2))).lower(state).cost_analysis()["flops"]

    plain = xla_flops("none")
    assert plain == pytest.approx(3 * fwd.total, rel=0.03)
    added = {remat: xla_flops(remat) - plain for remat in ("full", "dots", "dots_all", "qkv")}
    for remat, extra in added.items():
        ours = flops.remat_recompute(cfg, fwd, remat, tokens=B * T)  # fwd has no head: only the body's share
        assert extra == pytest.approx(ours, abs=0.03 * fwd.total), remat
    assert added["dots_all"] < added["dots"] < 0.5 * added["full"], added


def test_peaks_by_device_kind():
    assert flops.chip_name("NVIDIA H100 80GB HBM3") == "H100" and flops.chip_name("NVIDIA H200") == "H200"
    assert flops.chip_name("NVIDIA A100-SXM4-80GB") == "A100"
    assert flops.chip_name("TPU v5 lite") == "v5e" and flops.chip_name("TPU v5") == "v5p"
    assert flops.chip_name("TPU v6 lite") == "v6e" and flops.chip_name("TPU v4") == "v4"
    assert flops.device_peak("cpu") is None and flops.peak_flops_per_second() is None  # CPU here
    assert flops.device_peak("NVIDIA H200") == 989e12


def test_throughput_accounting_of_the_large_presets(capsys):
    from benchmarks import throughput

    throughput.main(["--preset", "llama-1b", "--accounting"])
    throughput.main(["--preset", "llama-8b", "--accounting"])
    out = capsys.readouterr().out
    assert "llama-1b: 1235.8M params, T 2048" in out and "llama-8b: 8030.3M params" in out
    for part in ("policy forward", "policy backward", "reference forward", "remat recompute", "at 40% MFU on H200"):
        assert part in out


def test_presets_fill_max_length_exactly(tmp_path):
    """A preset's synthetic model folder and pairs: every pair tokenizes to exactly max_length tokens, so every
    batch is one compiled shape (tests/test_tracking.py runs the script's timed steps on a config)."""
    from benchmarks import throughput
    from dpojax.trainer import build

    args = throughput.argparse.Namespace(attention=None, remat="full", micro_batch=4, set=["train.seed=3"],
                                         max_length=None, batch=None, dtype=None, warmup=1, steps=2)
    cfg = throughput.preset_config("tiny", args, tmp_path, n_devices=8)
    assert (cfg.model.init, cfg.model.remat, cfg.micro_batch_size, cfg.train.seed) == ("random", "full", 4, 3)
    assert cfg.train.batch_size == 8 and cfg.train.steps == 3 and cfg.data.buckets == (64,)
    tokenizer, _ = build.load_tokenizer(cfg)
    for line in (tmp_path / "pairs.jsonl").read_text().splitlines()[:4]:
        row = throughput.json.loads(line)
        for key in ("chosen", "rejected"):
            assert len(tokenizer(row["prompt"] + row[key])["input_ids"]) + 1 == 64  # + EOS


def test_cpu_steps_compile_with_the_memory_optimized_scheduler():
    """On CPU the train, eval and reference steps compile with XLA's memory-optimized scheduler: fewer buffers live
    at once than the default (concurrency) order keeps, here for a scanned tiny body's forward+backward at [4, 128];
    other platforms get no options."""
    from jax.sharding import Mesh

    from dpojax.sharding import Sharder
    from dpojax.trainer.step import CPU_COMPILER_OPTIONS, compiler_options

    cpu = Sharder(Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))
    assert compiler_options(cpu) == CPU_COMPILER_OPTIONS and compiler_options() == CPU_COMPILER_OPTIONS
    cfg = ModelConfig.from_hf({**TINY, "num_hidden_layers": 4, "max_position_embeddings": 256})
    graphdef, params = nnx.split(Decoder(cfg, scan_layers=True, rngs=nnx.Rngs(0)))
    ids = jnp.zeros((4, 128), jnp.int32)
    pos, seg = jnp.broadcast_to(jnp.arange(128), (4, 128)), jnp.ones((4, 128), jnp.int32)
    grad = jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, pos, seg)))
    temp = {name: jax.jit(grad, compiler_options=opts).lower(params).compile().memory_analysis().temp_size_in_bytes
            for name, opts in (("default", None), ("memory", compiler_options(cpu)))}
    assert temp["memory"] < temp["default"], temp


def test_throughput_runs_trl_side_by_side(tmp_path, capsys):
    """`--trl`: after dpojax's timed steps, TRL's DPOTrainer runs in a child process on the same model folder (a
    random init from its config.json, as dpojax's `model.init: random`), the same pairs, length and batch, on the
    same kind of device, and the report gives both and their ratio."""
    from benchmarks import throughput

    out = tmp_path / "r.json"
    result = throughput.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--trl", "--json", str(out)])
    trl = json.loads(out.read_text())["trl"]
    assert trl == result["trl"] and (trl["device"], trl["dtype"], trl["remat"]) == ("cpu", "float32", "none")
    assert trl["step"]["n"] == 2  # medians are rounded to 0.1 ms:
    assert trl["pairs_per_s"] == pytest.approx(8 / trl["step"]["median_s"], rel=1e-2)
    printed = capsys.readouterr().out
    ratio = trl["step"]["median_s"] / result["step"]["median_s"]
    assert f"dpojax / TRL        {ratio:.2f}x pairs/s" in printed and "TRL DPOTrainer      " in printed
