"""Context parallelism (mesh.context) on this CPU with 8 fake devices: per-device memory of a long-sequence train
step (XLA's compiled memory analysis) against the context size C, and step time against the same work on one
device.

    python -m benchmarks.context                      # Llama (4 layers, d 256, 8 heads / 4 kv heads, V 2k), T 4096
    python -m benchmarks.context --length 8192 --sizes 1 2 4 8 --repeats 2

One preference pair (prompt + 2 responses, every sequence exactly `--length` tokens: [1, 2, T] rows), full DPO
(policy + frozen reference), AdamW, fp32, remat full. For each C the real train step (`dpojax train`'s builder) is
compiled on a (data 1, context C) mesh of the first C devices; "per device" is the memory analysis of one device's
program: arguments (parameters, AdamW moments, reference, batch: sharded over context like fsdp) and temporaries
(activations, the head's chunks, gradients). Step times run all C fake devices on this machine's few cores, so
they measure the overhead of the split (communication, the zig-zag permutes, one static branch per device of
(2C + 1) / 4C of the score blocks, recomputed in the backward) on the same total work, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax  # noqa: E402 - after the environment set-up above (8 fake devices)

from benchmarks import harness  # noqa: E402 - after the sys.path or environment set-up above
from dpojax.trainer import build, prefetch, reference  # noqa: E402 - after the sys.path set-up above
from dpojax.trainer.step import batch_sharding  # noqa: E402 - after the sys.path set-up above

MiB = 2**20
MODEL = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1 << 17,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


def built_for(cfg, C: int):
    """(BuiltStep, compiled train step) on a (data 1, context C) mesh of the first C devices."""
    sharder = build.make_sharder(cfg, devices=jax.devices()[:C])
    models = build.build_models(cfg, sharder)
    pairs = build.load_split(cfg, models, cfg.data.train, cfg.data.train_split)
    run, state = build.setup_train(cfg, models, sharder, steps=build.total_steps(cfg, len(pairs)))
    built = harness.BuiltStep(run, run.train_step.leaves_of(state), list(prefetch.host_batches(run, pairs, 0, 4)),
                              reference.lookup(run.models.ref_tables, pairs))
    batch = build.to_device(built.batches[0], batch_sharding(sharder))
    compiled = run.train_step.flat.lower(built.leaves, jax.tree.leaves(models.ref_params), batch).compile()
    return built, compiled


def collectives(hlo_text: str) -> dict[str, int]:
    """{"all-gather f32[1,4096,4,32]": count, ...}: the compiled program's collectives by result shape, to check
    that attention gathers keys and values ([b, T, G, Dh]) and never whole activations."""
    found: dict[str, int] = {}
    for m in re.finditer(r"= (\w+\[[\d,]*\])(?:\{[^}]*\})? (all-gather|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(", hlo_text):
        key = f"{m.group(2)} {m.group(1)}"
        found[key] = found.get(key, 0) + 1
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096, help="tokens per sequence (T)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="context sizes C")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dpojax-context-"))
    model_dir = harness.synthetic_model_dir(work / "model", MODEL)
    data = harness.full_length_pairs(work / "pairs.jsonl", 8, args.length, MODEL["vocab_size"])
    print(f"{harness.machine()}; jax {jax.__version__}; {len(jax.devices())} fake devices")
    print(f"Llama d {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, T = {args.length} per sequence, "
          "1 pair per step, full DPO, fp32, remat full\n")
    print("| context C | arguments / device | temporaries / device | total / device | x of C=1 | step time |")
    print("|---|---|---|---|---|---|")
    rows, base = {}, None
    for C in args.sizes:
        cfg = harness.config_from_dict({
            "model": {"name_or_path": str(model_dir), "init": "random", "remat": "full", "attention": "xla"},
            "data": {"train": str(data), "max_length": args.length, "buckets": [args.length], "packing": "none",
                     "cache_dir": str(work / "cache")},
            "optim": {"name": "adamw", "lr": 1e-6, "schedule": "constant"},
            "train": {"batch_size": 1, "steps": 4},
            "mesh": {"data": 1, "context": C},
            "output_dir": str(work / f"run{C}"),
        })
        built, compiled = built_for(cfg, C)
        mem = compiled.memory_analysis()
        args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        total = args_b + temp_b
        base = base or total
        t = harness.time_fn(lambda b=built: b(b.batches[1]), warmup=1, repeats=args.repeats)
        rows[C] = {"arguments": args_b, "temporaries": temp_b, "step": t}
        print(f"| {C} | {args_b / MiB:.1f} MiB | {temp_b / MiB:.1f} MiB | {total / MiB:.1f} MiB | "
              f"{total / base:.3f} (1/C = {1 / C:.3f}) | {t} |")
        rows[C]["collectives"] = collectives(compiled.as_text()) if C > 1 else {}
        del built, compiled
    for C, row in rows.items():
        if row["collectives"]:
            print(f"\ncontext {C}, collectives of one device's program (result shape: count): "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(row["collectives"].items())))
    return rows


if __name__ == "__main__":
    main()
