"""The policy body (embeddings, L blocks, final norm; no lm_head) forward, backward and forward+backward:
dpojax vs transformers (PyTorch) on the same CPU, same shapes, same weights layout, fp32 by default.

    python -m benchmarks.model_body                       # SmolLM2-135M at [16, 64] and [8, 512], bench Llama [16, 512]
    python -m benchmarks.model_body --models smollm2 --shapes 16x64 --profile   # + XLA op-kind shares
    python -m benchmarks.model_body --dtype bfloat16      # bf16 compute (fp32 params) on both sides

The loss is a scalar of the hidden states (sum of h * w with a fixed w), so the backward is the body's full
backward, gradients for every parameter. "backward" times the backward pass alone (dpojax: a jitted `jax.vjp`
pullback; torch: `loss.backward()` after an untimed forward). Random weights: only shapes matter here.
Target (issue 19): dpojax forward+backward <= torch's on both SmolLM2 shapes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)
from dpojax.models import ModelConfig, init_random  # noqa: E402 - after the environment set-up above
from dpojax.trainer.step import compiler_options, join_layers, split_layers  # noqa: E402 - after the environment set-up above

# SmolLM2-135M(-Instruct)'s config.json, shape fields (the weights come from dpojax.models.smollm2 when needed)
SMOLLM2_135M = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "hidden_act": "silu",
}
# the synthetic model of benchmarks/cpu_vs_trl.py (its defaults): 4 thick layers, vocabulary-dominated
BENCH_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 512,
    "intermediate_size": 1344, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
    "max_position_embeddings": 512, "tie_word_embeddings": False, "hidden_act": "silu",
}
MODELS = {"smollm2": (SMOLLM2_135M, ((16, 64), (8, 512))), "bench-llama": (BENCH_LLAMA, ((16, 512),))}


def dpojax_body(hf: dict, B: int, T: int, dtype: str, *, scan_layers: bool = True, remat: str = "none"):
    """{name: () -> None} for forward, backward, forward+backward of dpojax's body; each call blocks."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    cfg = ModelConfig.from_hf(hf)
    model = init_random(cfg, dtype=jnp.dtype(dtype), scan_layers=scan_layers, remat=remat)
    graphdef, params = nnx.split(model)
    if not scan_layers:  # unrolled: the parameters as the train step takes them, one array per layer
        params = jax.jit(lambda p: split_layers(p, cfg.num_layers))(params)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    w = jnp.asarray(rng.standard_normal((T, cfg.hidden_size)), jnp.float32) / T

    def loss(p):
        h = nnx.merge(graphdef, join_layers(p))(ids, pos, seg)
        return jnp.sum(h.astype(jnp.float32) * w)

    opts = compiler_options()  # the train steps' XLA options (on CPU: the memory-optimized scheduler)
    fwd = jax.jit(loss, compiler_options=opts)
    vjp = jax.jit(lambda p: jax.vjp(loss, p), compiler_options=opts)
    pullback = jax.jit(lambda f: f(jnp.float32(1.0)), compiler_options=opts)
    grad = jax.jit(jax.value_and_grad(loss), compiler_options=opts)

    def time_backward(warmup: int, repeats: int) -> harness.Timing:
        """The pullback alone; its residuals live only during this call (at [8, 512] they take gigabytes)."""
        _, f = vjp(params)
        timing = harness.time_fn(lambda: jax.block_until_ready(pullback(f)), warmup=warmup, repeats=repeats)
        return timing

    return cfg, {
        "forward": lambda: jax.block_until_ready(fwd(params)),
        "forward+backward": lambda: jax.block_until_ready(grad(params)),
    }, time_backward


def torch_body(hf: dict, B: int, T: int, dtype: str):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    body = model.model
    body.train()
    ids = torch.randint(0, config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    pos = torch.arange(T)[None].expand(B, T)
    w = torch.randn(T, config.hidden_size) / T
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def loss():
        with autocast:
            h = body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return (h.float() * w).sum()

    def forward():
        with torch.no_grad():
            loss()

    held = {}

    def backward():  # the backward alone: forward untimed, outside this call
        held.pop("loss").backward()
        body.zero_grad(set_to_none=True)

    def fwd_bwd():
        loss().backward()
        body.zero_grad(set_to_none=True)

    return {"forward": forward, "backward": backward, "forward+backward": fwd_bwd}, lambda: held.update(loss=loss())


def time_torch_backward(fns, prepare, warmup: int, repeats: int) -> harness.Timing:
    import time

    times = []
    for i in range(warmup + repeats):
        prepare()
        t0 = time.perf_counter()
        fns["backward"]()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return harness.Timing(tuple(times))


def run_shape(name: str, hf: dict, B: int, T: int, args) -> dict:
    cfg, ours, time_backward = dpojax_body(hf, B, T, args.dtype, scan_layers=not args.no_scan, remat=args.remat)
    flops = harness.body_flops(cfg, B, T)
    row = {"model": name, "shape": [B, T], "dtype": args.dtype}
    results = {}
    for kind in ("forward", "forward+backward"):
        results[("dpojax", kind)] = harness.time_fn(ours[kind], warmup=args.warmup, repeats=args.repeats)
    if args.profile:
        rows = harness.op_kinds(ours["forward+backward"])
        print(f"\n{name} [{B}, {T}] {args.dtype}: dpojax forward+backward, XLA op kinds by self time "
              f"({harness.machine()}):\n{harness.format_op_kinds(rows)}", flush=True)
        row["largest_non_matmul_share"] = round(harness.largest_non_matmul_share(rows), 3)
    results[("dpojax", "backward")] = time_backward(args.warmup, args.repeats)
    del ours, time_backward
    gc.collect()
    if not args.no_torch:
        theirs, prepare = torch_body(hf, B, T, args.dtype)
        for kind in ("forward", "forward+backward"):
            results[("torch", kind)] = harness.time_fn(theirs[kind], warmup=args.warmup, repeats=args.repeats)
        results[("torch", "backward")] = time_torch_backward(theirs, prepare, args.warmup, args.repeats)
    for (who, kind), t in results.items():
        f = flops * {"forward": 1, "backward": 2, "forward+backward": 3}[kind]
        row[f"{who} {kind}"] = {**t.as_dict(), "gflops_per_s": round(harness.gflops_per_s(f, t), 1)}
    lines = [f"{name} [{B}, {T}] {args.dtype}  ({harness.machine()})"]
    for kind in ("forward", "backward", "forward+backward"):
        ours_t, theirs_t = results[("dpojax", kind)], results.get(("torch", kind))
        vs = "" if theirs_t is None else f"   torch {theirs_t}   torch/dpojax {harness.ratio(theirs_t, ours_t):.2f}x"
        lines.append(f"  {kind:<17} dpojax {ours_t}{vs}")
    print("\n".join(lines), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,bench-llama", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--shapes", default=None, help="comma list of BxT (default: each model's own shapes)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--remat", default="none")
    p.add_argument("--no-scan", action="store_true",
                   help="dpojax: layers unrolled (model.scan_layers false; per-layer weights, as the train step)")
    p.add_argument("--no-torch", action="store_true", help="time dpojax only")
    p.add_argument("--profile", action="store_true", help="print the XLA op-kind breakdown of forward+backward")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        hf, shapes = MODELS[name]
        if args.shapes:
            shapes = tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))
        for B, T in shapes:
            rows.append(run_shape(name, hf, B, T, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": harness.machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
