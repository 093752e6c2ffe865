"""dpojax vs TRL DPOTrainer: training throughput (preference pairs/s) on the same model, data and batch.

    .venv/bin/python benchmarks/cpu_vs_trl.py            # defaults: 4 layers, d=512, vocab 32k, max_length 512
    .venv/bin/python benchmarks/cpu_vs_trl.py --steps 8 --batch 8

Builds a random Llama (HF safetensors) and a 32k word-level tokenizer on the fly, writes synthetic preference
rows whose prompt+completion fill most of max_length, then times full training steps (policy forward+backward,
reference forward, optimizer update) of both trainers in this one script, fp32, same global batch, no gradient
accumulation. The first `--warmup` steps (compilation for dpojax) are excluded; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_assets(root: Path, args) -> dict[str, Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(args.vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=int(args.d * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.d // 64, num_key_value_heads=args.d // 64,
        max_position_embeddings=args.max_length, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(model_dir)
    rng = random.Random(0)
    words = list(vocab)[len(specials) :]
    rows = []
    for _ in range(args.pairs):
        p = rng.randint(args.max_length // 4, args.max_length // 2)
        c, r = (rng.randint(args.max_length // 4, args.max_length // 2 - 2) for _ in range(2))
        rows.append({
            "prompt": " ".join(rng.choices(words, k=p)),
            "chosen": " " + " ".join(rng.choices(words, k=c)),
            "rejected": " " + " ".join(rng.choices(words, k=r)),
        })  # fmt: skip
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"model": model_dir, "data": data}


def bench_dpojax(assets, args, root: Path) -> list[float]:
    import jax

    from dpojax.config import config_from_dict
    from dpojax.sharding import Sharder, make_mesh
    from dpojax.train import loop
    from dpojax.train.step import batch_sharding

    cfg = config_from_dict({
        "model": {"name_or_path": str(assets["model"]), "remat": args.remat},
        "data": {"train": str(assets["data"]), "max_length": args.max_length, "cache_dir": str(root / "cache"),
                 "buckets": [args.max_length]},
        "optim": {"name": "adamw", "lr": 1e-6, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": args.batch, "steps": args.warmup + args.steps},
        "output_dir": str(root / "dpojax_run"),
    })  # fmt: skip
    sharder = Sharder(make_mesh(-1, 1, 1))
    models = loop.build_models(cfg, sharder)
    pairs = loop.load_split(cfg, models.tokenizer, cfg.data.train, "train")
    run, state = loop.setup(cfg, len(pairs), models, sharder)
    sharding = batch_sharding(sharder)
    times = []
    for batch in loop._batches(cfg, pairs, 0, cfg.train.steps):
        t0 = time.perf_counter()
        state, out = run.train_step(state, run.models.ref_params, loop.to_device(batch, sharding))
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - t0)
    return times[args.warmup :]


def bench_trl(assets, args, root: Path) -> list[float]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [json.loads(line) for line in assets["data"].read_text().splitlines()]
    policy = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = DPOTrainer(
        model=policy, ref_model=ref, processing_class=AutoTokenizer.from_pretrained(assets["model"]),
        train_dataset=datasets.Dataset.from_list(rows),
        args=DPOConfig(
            output_dir=str(root / "trl_run"), report_to=[], use_cpu=True, bf16=False, max_length=args.max_length,
            per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps, learning_rate=1e-6,
            lr_scheduler_type="constant", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            gradient_checkpointing=args.remat != "none",
        ),
        callbacks=[Timer()],
    )  # fmt: skip
    trainer.train()
    return times[args.warmup :]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="global preference pairs per step")
    p.add_argument("--pairs", type=int, default=256, help="rows in the synthetic data set")
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    p.add_argument("--remat", default="none", help="dpojax model.remat (TRL: gradient checkpointing if not none)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = make_assets(root, args)
        ours = bench_dpojax(assets, args, root)
        theirs = bench_trl(assets, args, root)
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "model": f"llama L={args.layers} d={args.d} V={args.vocab} fp32",
        "max_length": args.max_length,
        "batch_pairs": args.batch,
        "dpojax_step_s": [round(t, 3) for t in ours],
        "trl_step_s": [round(t, 3) for t in theirs],
        "dpojax_pairs_per_s": args.batch / med_ours,
        "trl_pairs_per_s": args.batch / med_theirs,
        "speedup": med_theirs / med_ours,
    }
    print(json.dumps(result, indent=1))
    print(f"\ndpojax {args.batch / med_ours:.2f} pairs/s vs TRL {args.batch / med_theirs:.2f} pairs/s "
          f"(median of {args.steps} steps each): {med_theirs / med_ours:.2f}x", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
