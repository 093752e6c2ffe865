"""The MoE expert MLP alone (`experts.expert_ffn`: sort by expert, gate/up, activation, down, unsort, combine),
forward + backward, at the tiny-MoE preset's shape, against the ways to compute the same thing:

    python -m benchmarks.moe_ffn                      # BT 8192 (8 pairs x 2 x 512 tokens), D 512, F 768, X 8, Y 2
    python -m benchmarks.moe_ffn --tokens 4096 --repeats 3 --no-torch --json out.json

- `blocks`: dpojax's CPU kernel (`experts.block_matmul`: per expert, its rows in blocks, read in place);
- `ragged_dot`: `jax.lax.ragged_dot` (XLA:CPU lowers it to a masked dense product over all X experts);
- `dense rows (ideal)`: the three matmuls on BT * Y rows through one expert, no routing: only the active work;
- `one-hot einsum`: every token through every expert, weighted by its combine weight (0 off its top-Y): X / Y
  times the active work, the dense-dispatch reference;
- `torch grouped_mm`: transformers' experts forward as TRL runs it (`grouped_mm_experts_forward`, torch's CPU
  grouped matmul), and `torch eager loop`: its per-expert loop over the tokens routed to each expert.

The same routing for all (a random router, top-Y softmax, renormalized); every variant is timed in this one process
round by round (interleaved), after a warm-up call: medians with [min-max] of the wall time and of the process's
CPU time (user + system, all threads), which a shared machine's load disturbs far less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax  # noqa: E402 - after the environment set-up in harness
import jax.numpy as jnp  # noqa: E402 - after the environment set-up in harness
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402 - after the sys.path or environment set-up above
from dpojax.models import experts  # noqa: E402 - after the environment set-up in harness


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[harness.Timing, harness.Timing]]:
    """name -> (wall Timing, CPU-time Timing): each blocking call once untimed, then `repeats` rounds timing each
    once in turn."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {n: [] for n in fns}
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = harness.cpu_seconds(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(harness.cpu_seconds() - c0)
    return {n: (harness.Timing(tuple(wall[n])), harness.Timing(tuple(cpu[n]))) for n in fns}


def operands(tokens: int, d: int, f: int, num_experts: int, top_k: int, seed: int = 1):
    """x [BT, D], the experts' weights, a router's routing of x (top-k of a random router), a cotangent [BT, D]."""
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x_BTxD = jax.random.normal(k[0], (tokens, d))
    w = experts.ExpertWeights(*(jax.random.normal(k_, s) * s[1] ** -0.5 for k_, s in zip(
        k[1:4], [(num_experts, d, f), (num_experts, d, f), (num_experts, f, d)], strict=True)))
    router_DxX = jax.random.normal(k[4], (d, num_experts)) * d ** -0.5
    routing = experts.route(x_BTxD, router_DxX, None, top_k=top_k, rule="softmax_topk", norm_topk_prob=True)
    return x_BTxD, w, routing, jax.random.normal(k[5], (tokens, d))


def jax_variants(routing: experts.Routing, top_k: int) -> dict[str, Callable]:
    """name -> f(x_BTxD, w) -> y_BTxD."""
    def ffn(kernel):
        return lambda x, w: experts.expert_ffn(x, routing, w, activation="silu", dtype=jnp.float32, kernel=kernel)

    def dense_rows(x, w):
        xr = jnp.repeat(x, top_k, axis=0)
        h = jax.nn.silu(xr @ w.gate_XxDxF[0]) * (xr @ w.up_XxDxF[0])
        return (h @ w.down_XxFxD[0]).reshape(x.shape[0], top_k, -1).sum(1)

    def one_hot(x, w):
        X = w.gate_XxDxF.shape[0]
        combine_BTxX = jnp.sum(jax.nn.one_hot(routing.experts_BTxY, X) * routing.weights_BTxY[..., None], axis=1)
        h = jax.nn.silu(jnp.einsum("td,xdf->txf", x, w.gate_XxDxF)) * jnp.einsum("td,xdf->txf", x, w.up_XxDxF)
        return jnp.einsum("txf,xfd,tx->td", h, w.down_XxFxD, combine_BTxX)

    return {"blocks": ffn("blocks"), "ragged_dot": ffn("ragged_dot"), "dense rows (ideal)": dense_rows,
            "one-hot einsum": one_hot}


def torch_variants(x_BTxD, w: experts.ExpertWeights, routing: experts.Routing, cot) -> dict[str, Callable]:
    """transformers' Qwen3-MoE experts (weights as it stores them: gate_up [X, 2F, D], down [X, D, F]) forward +
    backward, with torch's grouped_mm (TRL's default) and with the eager per-expert loop."""
    import torch  # heavy optional dependency: only for the reference variants
    from transformers import Qwen3MoeConfig  # heavy optional dependency, as above
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.set_num_threads(os.cpu_count() or 1)
    X, D, F = w.gate_XxDxF.shape
    out = {}
    for impl in ("grouped_mm", "eager"):
        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=X,
                             num_experts_per_tok=routing.experts_BTxY.shape[1])
        cfg._experts_implementation = impl
        mod = Qwen3MoeExperts(cfg)
        with torch.no_grad():
            gate_up = np.concatenate([np.asarray(w.gate_XxDxF), np.asarray(w.up_XxDxF)], axis=2)
            mod.gate_up_proj.copy_(torch.from_numpy(gate_up.transpose(0, 2, 1).copy()))
            mod.down_proj.copy_(torch.from_numpy(np.asarray(w.down_XxFxD).transpose(0, 2, 1).copy()))
        x = torch.from_numpy(np.array(x_BTxD)).requires_grad_(True)
        idx = torch.from_numpy(np.array(routing.experts_BTxY)).long()
        wts = torch.from_numpy(np.array(routing.weights_BTxY))
        g = torch.from_numpy(np.array(cot))

        def step(mod=mod, x=x, idx=idx, wts=wts, g=g):
            mod.zero_grad(set_to_none=True)
            x.grad = None
            mod(x, idx, wts).backward(g)

        out[f"torch {'grouped_mm' if impl == 'grouped_mm' else 'eager loop'}"] = step
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="BT (8 pairs x chosen/rejected x 512 tokens)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=768, help="hidden width of an expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="leave transformers' experts out")
    p.add_argument("--skip", nargs="*", default=[], help="variant names to leave out")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    x, w, routing, cot = operands(a.tokens, a.d, a.f, a.experts, a.top_k)
    fns: dict[str, Callable[[], object]] = {}
    for name, fn in jax_variants(routing, a.top_k).items():
        if name in a.skip:
            continue
        step = jax.jit(lambda x, w, fn=fn: jax.vjp(fn, x, w)[1](cot))
        fns[name] = lambda step=step: jax.block_until_ready(step(x, w))
    if not a.no_torch:
        fns.update({n: f for n, f in torch_variants(x, w, routing, cot).items() if n not in a.skip})
    sizes = np.bincount(np.asarray(routing.experts_BTxY).ravel(), minlength=a.experts)
    block = experts.block_rows(a.tokens * a.top_k, a.experts)
    head = (f"{harness.machine()} | BT {a.tokens}, rows {a.tokens * a.top_k}, X {a.experts}, Y {a.top_k}, D {a.d}, "
            f"F {a.f}, fp32 | rows per expert {sizes.tolist()}, blocks of {block} rows: "
            f"{int(np.sum(-(-sizes // block)) * block)} rows computed")
    print(head, flush=True)
    t = interleaved(fns, a.repeats)
    ideal_cpu = t["dense rows (ideal)"][1] if "dense rows (ideal)" in t else None
    for name, (wall, cpu) in t.items():
        rel = f"  x{harness.ratio(cpu, ideal_cpu):.2f} ideal (CPU)" if ideal_cpu else ""
        print(f"  {name:<20} forward + backward: wall {wall}  CPU {cpu}{rel}", flush=True)
    report = {"machine": harness.machine(), "setup": head,
              "variants": {n: {"wall": wall.as_dict(), "cpu": cpu.as_dict()} for n, (wall, cpu) in t.items()}}
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
