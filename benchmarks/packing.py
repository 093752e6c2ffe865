"""Shared-prompt packing vs padded batches vs TRL DPOTrainer: share of computed positions that are real tokens,
positions computed per pair, and training pairs/s, on three length profiles modelled on public data sets.

    python -m benchmarks.packing                        # all three profiles, benchmark Llama (4 layers, d 512, V 32k)
    make bench                                          # includes the short-QA and HH profiles, 2 timed steps
    python -m benchmarks.packing --profiles hh --steps 3

Profiles (token counts drawn uniformly around the mean, word-level tokenizer: one word = one token):
  ultrafeedback  prompt ~150 (40-260), responses ~250 (80-420), max_length 1024 (some pairs are truncated)
  hh             multi-turn prompt ~250 (120-380), responses ~60 (20-100), max_length 512
  short_qa       prompt ~40 (20-60), responses ~15 (5-25), max_length 128
Modes: `none` ([N, K, T] rows padded to a power-of-two bucket), `padding_free` (packed rows, every sequence whole),
`shared_prompt` (packed rows, each prompt once: the default) and TRL 1.16's DPOTrainer (its own padding), all on the
same model, rows, global batch and AdamW, fp32, in this one process. Every dpojax mode first runs each batch once
(compiling each of its few shapes), then times a second pass; medians with [min-max]. "positions/pair" counts
every computed position (padding included, a shared prompt once); "real" is the share of them holding a token.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import cpu_vs_trl, harness  # noqa: E402 - after the sys.path or environment set-up above

PROFILES = {  # (prompt lo, hi), (response lo, hi), max_length
    "ultrafeedback": ((40, 260), (80, 420), 1024),
    "hh": ((120, 380), (20, 100), 512),
    "short_qa": ((20, 60), (5, 25), 128),
}
MODES = ("none", "padding_free", "shared_prompt")


def profile_rows(name: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    (p_lo, p_hi), (r_lo, r_hi), _ = PROFILES[name]
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab - 4)]

    def text(lo, hi):
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    return [{"prompt": text(p_lo, p_hi), "chosen": " " + text(r_lo, r_hi), "rejected": " " + text(r_lo, r_hi)}
            for _ in range(n)]


def computed_positions(batch) -> tuple[int, int]:
    """(positions computed, of which real tokens) for one batch of either layout."""
    ids = getattr(batch, "input_ids_PxJ", None)
    if ids is None:
        ids = batch.input_ids_NxKxT
        return int(ids.size), int((batch.segment_ids_NxKxT > 0).sum())
    return int(ids.size), int((batch.segment_ids_PxJ > 0).sum())


def dpojax_mode(setup: harness.StepSetup, work: Path, mode: str) -> dict:
    step, batches = harness.build_dpojax_step(setup, work / mode, data_overrides={"packing": mode})
    t0 = time.perf_counter()
    for batch in batches:  # compile every shape the run meets
        step(batch)
    compile_pass = time.perf_counter() - t0
    times = []
    for batch in batches[: setup.steps]:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    timing = harness.Timing(tuple(times))
    computed, real = (sum(x) for x in zip(*(computed_positions(b) for b in batches)))
    shapes = sorted({tuple(getattr(b, "input_ids_PxJ", getattr(b, "input_ids_NxKxT", None)).shape) for b in batches})
    pairs = setup.batch * len(batches)
    return {"mode": mode, "step": timing.as_dict(), "pairs_per_s": round(setup.batch / timing.median, 3),
            "real_share": round(real / computed, 4), "positions_per_pair": round(computed / pairs, 1),
            "shapes": [list(s) for s in shapes], "first_pass_s": round(compile_pass, 1), "timing": str(timing)}


def run_profile(name: str, args, root: Path) -> dict:
    _, _, max_length = PROFILES[name]
    ns = argparse.Namespace(vocab=args.vocab, d=args.d, layers=args.layers, max_length=max_length, pairs=4)
    model_dir, _ = cpu_vs_trl.synthetic_assets(root / name, ns)
    rows = profile_rows(name, args.batch * args.steps, args.vocab)
    data = cpu_vs_trl.write_jsonl(root / name / "rows.jsonl", rows)
    setup = harness.StepSetup(model_dir, data, batch=args.batch, max_length=max_length, steps=args.steps, warmup=1)
    out = {"profile": name, "max_length": max_length, "batch_pairs": args.batch, "machine": harness.machine(),
           "modes": []}
    for mode in args.modes:
        r = dpojax_mode(setup, root / name, mode)
        out["modes"].append(r)
        print(f"[{name}] dpojax {mode:>13}: {r['pairs_per_s']:.2f} pairs/s ({r['timing']}/step), real tokens "
              f"{100 * r['real_share']:.1f}%, {r['positions_per_pair']:.0f} positions/pair, shapes {r['shapes']}",
              flush=True)
    if not args.no_trl:
        trl = harness.trl_steps(setup, root / name)
        out["trl"] = {"step": trl.as_dict(), "pairs_per_s": round(args.batch / trl.median, 3)}
        print(f"[{name}] TRL DPOTrainer     : {args.batch / trl.median:.2f} pairs/s ({trl}/step)", flush=True)
    base = {m["mode"]: m["pairs_per_s"] for m in out["modes"]}
    if "none" in base:
        for m in out["modes"]:
            m["speedup_vs_none"] = round(m["pairs_per_s"] / base["none"], 3)
    if "trl" in out:
        for m in out["modes"]:
            m["speedup_vs_trl"] = round(m["pairs_per_s"] / out["trl"]["pairs_per_s"], 3)
    print(f"[{name}] " + ", ".join(f"{m['mode']} {m.get('speedup_vs_none', 0):.2f}x none"
                                   + (f" / {m['speedup_vs_trl']:.2f}x TRL" if "speedup_vs_trl" in m else "")
                                   for m in out["modes"]) + f"  [{harness.machine()}]", flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (each a different batch)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_profile(name, args, Path(tmp)) for name in args.profiles]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
