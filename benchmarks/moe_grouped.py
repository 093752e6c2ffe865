"""The MoE grouped matmul on this machine: `jax.lax.ragged_dot` vs the `blocks` kernel
(`dpojax.models.experts.block_matmul`, at several block sizes) vs the ideal (one dense matmul of the same rows
through one expert), forward and forward + backward; then the whole `experts.expert_ffn` (routing, sort, gate/up,
activation, down, unsort, combine) on this platform's kernel against its three dense matmuls.

    python -m benchmarks.moe_grouped                              # 8 experts top-2, D 512, F 1024, BT 4096 and 8192
    python -m benchmarks.moe_grouped --tokens 4096 --blocks 128 --repeats 3 --json out.json
    JAX_PLATFORMS=cuda python -m benchmarks.moe_grouped           # on a GPU (with/without the ragged-dot fusion flag)

BT tokens are routed to top-Y of X experts uniformly at random, so BT * Y rows reach the grouped matmul of [X, D, F]
weights (fp32). Every variant is timed in this one process, one after the other: medians with [min-max] over
`--repeats` calls after a compiling warm-up; "x ideal" is the variant's median over the ideal's (1.0 = only the
active work).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax  # noqa: E402 - after the environment set-up in harness
import jax.numpy as jnp  # noqa: E402 - after the environment set-up in harness

from benchmarks import harness  # noqa: E402 - after the sys.path or environment set-up above
from dpojax.models import experts  # noqa: E402 - after the environment set-up in harness


def _operands(tokens: int, d: int, f: int, num_experts: int, top_k: int, seed: int = 0):
    """Rows sorted by expert (BT * Y of them), the experts' [X, D, F] weights, group sizes, a cotangent."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    rows = tokens * top_k
    ids = jnp.sort(jax.random.randint(k[0], (rows,), 0, num_experts))
    x = jax.random.normal(k[1], (rows, d), jnp.float32)
    w = jax.random.normal(k[2], (num_experts, d, f), jnp.float32) * d ** -0.5
    return x, w, jnp.bincount(ids, length=num_experts).astype(jnp.int32), jax.random.normal(k[3], (rows, f))


def _variants(sizes, blocks: list[int]) -> dict:
    """name -> f(x, w): one grouped matmul of the sorted rows."""
    out = {"ideal (one dense matmul)": lambda x, w: x @ w[0],
           "ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes)}
    for b in blocks:
        out[f"blocks, {b} rows"] = lambda x, w, b=b: experts.grouped_matmul(x, w, sizes, kernel="blocks", block=b)
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, harness.Timing]:
    """Each blocking call once untimed (compilation), then `repeats` rounds timing each once in turn, so that a
    shared machine's changing load falls on every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].extend(harness.time_fn(fn, warmup=0, repeats=1).times)
    return {name: harness.Timing(tuple(t)) for name, t in times.items()}


def time_matmuls(tokens: int, d: int, f: int, num_experts: int, top_k: int, blocks: list[int], repeats: int,
                 skip: tuple[str, ...] = ()) -> list[dict]:
    """Forward and forward + backward (d x and d w) of each variant, interleaved."""
    x, w, sizes, cot = _operands(tokens, d, f, num_experts, top_k)
    fns = {}
    for name, fn in _variants(sizes, blocks).items():
        if name in skip:
            continue
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda x, w, fn=fn: jax.vjp(fn, x, w)[1](cot))
        fns[(name, "forward")] = lambda f=fwd: jax.block_until_ready(f(x, w))
        fns[(name, "forward_backward")] = lambda f=bwd: jax.block_until_ready(f(x, w))
    t = interleaved(fns, repeats)
    names = dict.fromkeys(name for name, _ in fns)
    return [{"variant": n, "forward": t[(n, "forward")], "forward_backward": t[(n, "forward_backward")]}
            for n in names]


def time_expert_ffn(tokens: int, d: int, f: int, num_experts: int, top_k: int, repeats: int,
                    profile: bool = False) -> dict:
    """`experts.expert_ffn` (this platform's kernel, with `route`) forward + backward vs its three matmuls done
    densely on the same number of rows (the ideal); `profile`: also the XLA op kinds of expert_ffn's step."""
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    x_BTxD = jax.random.normal(k[0], (tokens, d))
    w = experts.ExpertWeights(*(jax.random.normal(k_, s) * s[1] ** -0.5 for k_, s in zip(
        k[1:4], [(num_experts, d, f), (num_experts, d, f), (num_experts, f, d)], strict=True)))
    kernel_DxX = jax.random.normal(k[4], (d, num_experts)) * d ** -0.5

    def ffn(x_BTxD, w):
        routing = experts.route(x_BTxD, kernel_DxX, None, top_k=top_k, rule="softmax_topk", norm_topk_prob=True)
        return experts.expert_ffn(x_BTxD, routing, w, activation="silu", dtype=jnp.float32)

    def dense(x_BTxD, w):
        x = jnp.repeat(x_BTxD, top_k, axis=0)
        h = jax.nn.silu(x @ w.gate_XxDxF[0]) * (x @ w.up_XxDxF[0])
        return (h @ w.down_XxFxD[0]).reshape(tokens, top_k, d).sum(1)

    fns = {}
    for name, fn in (("expert_ffn", ffn), ("ideal", dense)):
        step = jax.jit(lambda x, w, fn=fn: jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1))(x, w))
        fns[name] = lambda f=step: jax.block_until_ready(f(x_BTxD, w))
    out: dict = {"kernel": experts.grouped_kernel(), **interleaved(fns, repeats)}
    if profile:
        out["op_kinds"] = harness.op_kinds(fns["expert_ffn"], repeats=2)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="BT (rows = BT * top-k)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=1024, help="hidden width of an expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256], help="block sizes of the blocks kernel")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-ragged", action="store_true", help="leave ragged_dot out (slow on CPU)")
    p.add_argument("--profile", action="store_true", help="XLA op kinds of expert_ffn's forward + backward")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    report = {"machine": harness.machine(), "backend": jax.default_backend(), "shapes": []}
    print(report["machine"], "| backend:", report["backend"], "| kernel:", experts.grouped_kernel())
    for tokens in a.tokens:
        print(f"\nBT {tokens}, rows {tokens * a.top_k}, X {a.experts}, D {a.d}, F {a.f}, fp32")
        rows = time_matmuls(tokens, a.d, a.f, a.experts, a.top_k, a.blocks, a.repeats,
                            skip=("ragged_dot",) if a.skip_ragged else ())
        ideal = rows[0]
        for r in rows:
            print(f"  {r['variant']:<26} forward {r['forward']}  x{harness.ratio(r['forward'], ideal['forward']):.2f}"
                  f"   fwd+bwd {r['forward_backward']}"
                  f"  x{harness.ratio(r['forward_backward'], ideal['forward_backward']):.2f} ideal")
        ffn = time_expert_ffn(tokens, a.d, a.f, a.experts, a.top_k, a.repeats, profile=a.profile)
        print(f"  expert_ffn fwd+bwd ({ffn['kernel']}) {ffn['expert_ffn']} vs dense ideal {ffn['ideal']}: "
              f"x{harness.ratio(ffn['expert_ffn'], ffn['ideal']):.2f}")
        if a.profile:
            print(harness.format_op_kinds(ffn["op_kinds"], per=2))
        report["shapes"].append({
            "tokens": tokens, "d": a.d, "f": a.f, "experts": a.experts, "top_k": a.top_k,
            "matmul": [{"variant": r["variant"], "forward": r["forward"].as_dict(),
                        "forward_backward": r["forward_backward"].as_dict()} for r in rows],
            "expert_ffn": {"kernel": ffn["kernel"], "expert_ffn": ffn["expert_ffn"].as_dict(),
                           "ideal": ffn["ideal"].as_dict(), "op_kinds": ffn.get("op_kinds")}})
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
