"""Throughput of the real dpojax train step on whatever backend JAX finds (CPU, GPU, TPU): tokens/s, pairs/s, step
time, compile time, peak memory and MFU per chip, with the FLOP accounting written out.

    python -m benchmarks.throughput                                  # bench-llama: the CPU benchmark Llama, T 512
    python -m benchmarks.throughput --preset llama-1b                # Llama-3.2-1B shape, random init, T 2048, bf16
    python -m benchmarks.throughput --preset llama-8b                # Llama-3.1-8B shape, FSDP over all chips
    python -m benchmarks.throughput --config configs/demo.yaml       # any config (its data, model, mesh)
    python -m benchmarks.throughput --preset llama-1b --attention cudnn --remat qkv --micro-batch 4 \\
        --set data.packing=padding_free                              # any config key, passed through
    python -m benchmarks.throughput --preset llama-8b --accounting   # the FLOP accounting only, nothing runs

Presets build a random-init model from its config.json shape alone (no weights on disk) and a word-level
tokenizer covering the vocabulary, with pairs whose prompt + completion fill max_length exactly, so every step
runs one compiled shape. A config runs its own model and data. Either way the step is `dpojax train`'s (built
by benchmarks/harness.py): policy forward+backward, reference forward, optimizer update; the first --warmup steps
(compilation) are untimed. MFU = model FLOPs of the timed steps (dpojax.flops: real tokens, causal attention,
head on the scored tokens; remat recompute excluded, shown as HFU) / time / (chips x peak per chip). The peak is
the chip's dense bf16 datasheet figure (dpojax.flops.PEAK_BF16_FLOPS) or, on CPU, a measured matmul in the
step's compute dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "")  # any backend (the harness defaults other benchmarks to CPU)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402 - after the sys.path or environment set-up above
from benchmarks.model_body import BENCH_LLAMA  # noqa: E402 - after the sys.path or environment set-up above
from dpojax import flops  # noqa: E402 - after the environment set-up above
from dpojax.config import config_from_dict, load_config  # noqa: E402 - after the environment set-up above
from dpojax.models.attention import IMPLEMENTATIONS, resolve_attention  # noqa: E402 - after the environment set-up above
from dpojax.models.config import ModelConfig  # noqa: E402 - after the environment set-up above
from dpojax.models.transformer import REMAT_NAMES  # noqa: E402 - after the environment set-up above
from dpojax.trainer.build import DTYPES  # noqa: E402 - after the environment set-up above

LLAMA_32_1B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "hidden_act": "silu",
}
LLAMA_31_8B = {
    **LLAMA_32_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128,
    "rope_scaling": {**LLAMA_32_1B["rope_scaling"], "factor": 8.0}, "tie_word_embeddings": False,
}
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "tie_word_embeddings": False, "hidden_act": "silu",
}

HOST_LLAMA = {**TINY_LLAMA, "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1}  # a CPU step of a few ms: what the host must keep up with (GPU, TPU)


@dataclasses.dataclass(frozen=True)
class Preset:
    hf: dict  # config.json fields of the model shape
    max_length: int  # tokens per sequence (every pair fills it)
    batch: int  # global preference pairs per step (rounded up to a multiple of the data-parallel devices)
    dtype: str = "float32"  # model.dtype (compute)
    remat: str = "none"
    mesh: tuple[int, int, int] = (-1, 1, 1)  # data, fsdp, tensor
    note: str = ""


PRESETS = {
    "tiny": Preset(TINY_LLAMA, 64, 8, note="2 layers, d 64: a smoke test"),
    "host": Preset(HOST_LLAMA, 32, 4, note="2 layers, d 32, T 32: a step of a few ms on CPU "
                                           "(benchmarks/host_overhead.py)"),
    "bench-llama": Preset(BENCH_LLAMA, 512, 8, note="benchmarks/cpu_vs_trl.py's synthetic Llama (4 layers, d 512, "
                                                    "vocab 32k), fp32"),
    "llama-1b": Preset(LLAMA_32_1B, 2048, 8, dtype="bfloat16", remat="full",
                       note="Llama-3.2-1B shape, random init, bf16 compute, fp32 params"),
    "llama-8b": Preset(LLAMA_31_8B, 2048, 8, dtype="bfloat16", remat="full", mesh=(1, -1, 1),
                       note="Llama-3.1-8B shape, random init, bf16 compute, FSDP over all chips"),
}


# ---- building the config --------------------------------------------------------------------------------------
def option_overrides(args) -> list[str]:
    """The benchmark's options as config overrides (applied after the preset's or the config's own values)."""
    out = [f"model.attention={args.attention}"] if args.attention else []
    out += [f"model.remat={args.remat}"] if args.remat else []
    out += [f"train.micro_batch_size={args.micro_batch}"] if args.micro_batch else []
    return out + list(args.set)


def preset_config(name: str, args, work: Path, n_devices: int):
    """The Config of a preset: synthetic model folder and full-length pairs under `work`."""
    p = PRESETS[name]
    T = args.max_length or p.max_length
    data_devices = n_devices if p.mesh[0] == -1 or p.mesh[1] == -1 else p.mesh[0] * p.mesh[1]
    batch = args.batch or -(-p.batch // data_devices) * data_devices
    model_dir = harness.synthetic_model_dir(work / "model", {**p.hf, "max_position_embeddings": max(
        p.hf["max_position_embeddings"], T)})
    data = harness.full_length_pairs(work / "pairs.jsonl", batch * (args.warmup + args.steps), T, p.hf["vocab_size"])
    raw = {
        "model": {"name_or_path": str(model_dir), "init": "random", "dtype": args.dtype or p.dtype,
                  "remat": p.remat},
        "data": {"train": str(data), "max_length": T, "buckets": [T], "cache_dir": str(work / "cache")},
        "optim": {"name": "adamw", "lr": 1e-6, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": batch, "steps": args.warmup + args.steps},
        "mesh": dict(zip(("data", "fsdp", "tensor"), p.mesh)),
        "output_dir": str(work / "run"),
    }
    return config_from_dict(raw, option_overrides(args))


def file_config(path: str, args, work: Path):
    steps = [f"train.steps={args.warmup + args.steps}", f"output_dir={work / 'run'}"]
    steps += [f"train.batch_size={args.batch}"] if args.batch else []
    return load_config(path, steps + option_overrides(args))


# ---- measuring --------------------------------------------------------------------------------------------------
def peak_per_chip(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one chip, where it comes from)."""
    import jax

    kind = jax.devices()[0].device_kind
    name = flops.chip_name(kind)
    if name is not None:
        return flops.PEAK_BF16_FLOPS[name], f"{name} dense bf16 datasheet peak"
    if jax.default_backend() == "cpu":
        measured = flops.measured_matmul_peak(dtype) / jax.device_count()
        return measured, f"measured {dtype} 2048^3 matmul on this CPU ({harness.machine()})"
    raise SystemExit(f"throughput: no peak known for device kind {kind!r}; add it to dpojax.flops.DEVICE_KINDS.")


def measure(cfg, args) -> dict:
    """Build the step, run warm-up + timed steps, and return every figure of the report."""
    import jax

    t0 = time.perf_counter()
    built = harness.build_step(cfg)
    setup_s = time.perf_counter() - t0
    mcfg, run = built.run.models.policy_cfg, built.run
    with_ref = run.models.ref_graphdef is not None
    times, step_flops = [], []
    with harness.CompileTimer() as compiled:
        for i, batch in enumerate(built.batches):
            t0 = time.perf_counter()
            built(batch)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
                step_flops.append(flops.batch_flops(mcfg, batch, remat=cfg.model.remat, reference=with_ref,
                                                    weight_grads=run.models.lora is None))
    timing = harness.Timing(tuple(times))
    memory, memory_what = harness.peak_memory()
    n = jax.device_count()
    peak, peak_what = peak_per_chip(cfg.model.dtype)
    total_s = sum(times)
    model = sum(f.model for f in step_flops)
    tokens = sum(f.tokens for f in step_flops)
    typical = step_flops[len(step_flops) // 2]
    attention = resolve_attention(run.spec.attention, dtype=DTYPES[cfg.model.dtype],
                                  head_dim=mcfg.head_dim, softcap=mcfg.attn_softcap,
                                  sliding_window=mcfg.has_sliding_window)
    return {
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "chips": n,
        "machine": harness.machine(), "model": cfg.model.name_or_path, "params": mcfg.num_params(),
        "max_length": cfg.data.max_length, "batch_pairs": cfg.train.batch_size, "micro_batch": cfg.micro_batch_size,
        "dtype": cfg.model.dtype, "attention": attention, "packing": run.spec.packing, "remat": cfg.model.remat,
        "reference_in_step": with_ref,
        "timed_steps": len(times), "step": timing.as_dict(), "setup_s": round(setup_s, 2),
        "compile_s": round(compiled.seconds, 2),
        "tokens_per_s": tokens / total_s, "tokens_per_s_per_chip": tokens / total_s / n,
        "pairs_per_s": cfg.train.batch_size * len(times) / total_s,
        "peak_memory_bytes": memory, "peak_memory_what": memory_what,
        "peak_flops_per_chip": peak, "peak_what": peak_what,
        "mfu": model / total_s / (peak * n),
        "hfu": sum(f.hardware for f in step_flops) / total_s / (peak * n),
        "flops_per_step": {"model": typical.model, "hardware": typical.hardware,
                           "policy_forward": dataclasses.asdict(typical.policy_forward),
                           "policy_backward": typical.policy_backward,
                           "reference_forward": typical.reference_forward.total,
                           "remat_recompute": typical.remat_recompute, "tokens": typical.tokens},
        "_accounting": typical.lines(),
    }


def peak_table(current: str | None, measured: float | None) -> list[str]:
    lines = ["peak dense bf16 FLOP/s per chip (dpojax.flops.PEAK_BF16_FLOPS):"]
    for name, peak in flops.PEAK_BF16_FLOPS.items():
        lines.append(f"  {name:<6} {peak / 1e12:7.0f} TFLOP/s" + ("   <- this run" if name == current else ""))
    if measured is not None:
        lines.append(f"  CPU    {measured / 1e12:7.3f} TFLOP/s   <- this run (measured matmul, per device)")
    return lines


def report(r: dict) -> str:
    s = r["step"]
    chip = flops.chip_name(r["device_kind"])
    lines = [
        f"backend {r['backend']}: {r['chips']} x {r['device_kind']}  [{r['machine']}]",
        f"model {r['model']}: {r['params'] / 1e6:.1f}M params, T {r['max_length']}, batch {r['batch_pairs']} pairs "
        f"(micro-batch {r['micro_batch']}), {r['dtype']}, attention {r['attention']}, packing {r['packing']}, "
        f"remat {r['remat']}, "
        f"reference {'in the step' if r['reference_in_step'] else 'precomputed/none'}",
        f"tokens/s            {r['tokens_per_s']:.1f}  ({r['tokens_per_s_per_chip']:.1f} per chip; computed tokens: "
        "a shared prompt counts once)",
        f"pairs/s             {r['pairs_per_s']:.3f}",
        f"step time           {s['median_s']:.4f} s median [{s['min_s']:.4f}-{s['max_s']:.4f}] over {s['n']} steps "
        "after warm-up",
        f"compile time        {r['compile_s']:.2f} s (trace + lower + compile; setup {r['setup_s']:.1f} s)",
        f"peak memory         {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_what']})",
        "FLOPs per step (dpojax.flops; a median step):",
        *("  " + line for line in r["_accounting"]),
        f"MFU per chip        {r['mfu']:.2%}  (model FLOPs / time / {r['chips']} x "
        f"{r['peak_flops_per_chip'] / 1e12:.3f} TFLOP/s: {r['peak_what']})",
        f"HFU per chip        {r['hfu']:.2%}  (remat recompute included)",
        *peak_table(chip, r["peak_flops_per_chip"] if chip is None else None),
    ]
    return "\n".join(lines)


def accounting_only(name: str, args) -> str:
    """The FLOP accounting of a preset's full-length batch, from its shape alone (no devices used)."""
    import numpy as np

    p = PRESETS[name]
    T, batch = args.max_length or p.max_length, args.batch or p.batch
    cfg = ModelConfig.from_hf(p.hf)
    completion = T - T // 2  # scored positions per sequence: the completion and its EOS
    f = flops.step_flops(cfg, np.full(2 * batch, T), 2 * batch * completion, remat=args.remat or p.remat)
    lines = [f"{name}: {cfg.num_params() / 1e6:.1f}M params, T {T}, batch {batch} pairs ({p.note}); unpacked "
             "(data.packing=none: each sequence computes its prompt)", *f.lines()]
    for chip, peak in flops.PEAK_BF16_FLOPS.items():
        lines.append(f"  at 40% MFU on {chip:<5}: {f.model / (0.4 * peak):.4f} s/step for one chip")
    return "\n".join(lines)


def trl_side(cfg, args, result: dict, work: Path) -> dict:
    """TRL's DPOTrainer on `cfg`'s model folder and JSONL pairs, same length, batch, remat (gradient checkpointing)
    and compute dtype, on the same kind of device, in a child process (`harness.trl_in_subprocess`)."""
    device = {"cpu": "cpu", "gpu": "cuda"}.get(result["backend"])
    model_dir, data = Path(cfg.model.name_or_path), Path(cfg.data.train)
    if device is None:
        raise SystemExit(f"--trl: TRL runs on CPU or CUDA, not on {result['backend']}")
    if not model_dir.is_dir() or data.suffix != ".jsonl":
        raise SystemExit(f"--trl needs a local model folder and a JSONL file of pairs (got {model_dir}, {data})")
    setup = harness.StepSetup(model_dir, data, cfg.train.batch_size, cfg.data.max_length, args.steps, args.warmup,
                              remat=cfg.model.remat)
    return harness.trl_in_subprocess(setup, dtype=cfg.model.dtype, device=device, json_path=work / "trl.json")


def trl_report(r: dict) -> str:
    t, s = r["trl"], r["trl"]["step"]
    return "\n".join([
        f"TRL DPOTrainer      {t['pairs_per_s']:.3f} pairs/s, step {s['median_s']:.4f} s median "
        f"[{s['min_s']:.4f}-{s['max_s']:.4f}] over {s['n']} steps (torch on {t['device']}, {t['dtype']}"
        f"{', gradient checkpointing' if t['remat'] != 'none' else ''}; same model, pairs, T and batch)",
        f"dpojax / TRL        {s['median_s'] / r['step']['median_s']:.2f}x pairs/s, median steps (the same pairs: "
        "the same ratio of tokens/s)  [" + r["machine"] + "]",
    ])


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: bench-llama")
    src.add_argument("--config", default=None, help="a dpojax config YAML (its model, data and mesh)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    ap.add_argument("--batch", type=int, default=None, help="global pairs per step (default: the preset's/config's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch_size (gradient accumulation)")
    ap.add_argument("--max-length", type=int, default=None, help="presets: tokens per sequence")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="presets: model.dtype")
    ap.add_argument("--attention", default=None, choices=IMPLEMENTATIONS, help="model.attention")
    ap.add_argument("--remat", default=None, choices=REMAT_NAMES, help="model.remat")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any config override, e.g. data.packing=... (repeatable)")
    ap.add_argument("--accounting", action="store_true", help="presets: print the FLOP accounting only")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--trl", action="store_true",
                    help="then TRL's DPOTrainer on the same model, data, length and batch (a child process; "
                         "CPU or CUDA), and the ratio of pairs/s")
    args = ap.parse_args(argv)
    name = args.preset or (None if args.config else "bench-llama")
    if args.accounting:
        if name is None:
            ap.error("--accounting needs a --preset")
        print(accounting_only(name, args), flush=True)
        return None
    if args.trl:  # on a GPU, JAX would take 75% of its memory up front and keep it: TRL's process would not fit
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = preset_config(name, args, work, jax.device_count()) if name else file_config(args.config, args, work)
        result = measure(cfg, args)
        result["preset"] = name or args.config
        print(report(result), flush=True)
        if args.trl:
            result["trl"] = trl_side(cfg, args, result, work)
            print(trl_report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=1))
    return result


if __name__ == "__main__":
    main()
