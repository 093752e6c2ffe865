"""Regenerate the offline demo assets in this folder (already committed; run only to change them).

    python configs/demo/make_demo.py

Writes a word-level tokenizer (`model/tokenizer.json` + config), a tiny Llama `model/config.json` (the
demo builds it with `model.init: random`), and a synthetic IMDb-like preference set in the spirit of the
DPO paper's controlled sentiment task: each prompt starts a movie review; the chosen completion is
mostly positive, the rejected one mostly negative. Held-out pairs use unseen (subject, adjective)
combinations, so a policy that learns the preference (not the pairs) gets high held-out reward accuracy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = "film movie story plot cast acting script ending music scene director sequel".split()
VERBS = "was felt seemed looked sounded became".split()
ADVERBS = "really very quite truly rather so".split()
POSITIVE = "great wonderful brilliant moving charming delightful superb fun clever beautiful".split()
NEGATIVE = "awful boring dull clumsy tedious bland terrible messy weak painful".split()
FILLER = "and but also yet the a it i".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_WORDS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def completion(rng: random.Random, good: list[str], bad: list[str]) -> str:
    words = [rng.choice(ADVERBS), rng.choice(good), rng.choice(["and", "but", "yet"]), rng.choice(good)]
    if rng.random() < 0.3:  # a little noise: one word of the other polarity
        words += ["though", "a", "bit", rng.choice(bad)]
    return " " + " ".join(words) + " ."


def make_rows(n: int, seed: int, subjects: list[str]) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"review : the {rng.choice(subjects)} {rng.choice(VERBS)}"
        rows.append(
            {
                "prompt": prompt,
                "chosen": completion(rng, POSITIVE, NEGATIVE),
                "rejected": completion(rng, NEGATIVE, POSITIVE),
            }
        )
    return rows


def write_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SUBJECTS + VERBS + ADVERBS + POSITIVE + NEGATIVE + FILLER
    words += "review : . though bit user assistant system".split()
    vocab = {w: i for i, w in enumerate(SPECIALS + CHAT_WORDS + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": CHAT_WORDS})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def main() -> None:
    model_dir = HERE / "model"
    vocab_size = write_tokenizer(model_dir)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    train_subjects, eval_subjects = SUBJECTS[:9], SUBJECTS[9:]
    for name, rows in (
        ("train.jsonl", make_rows(2048, seed=0, subjects=train_subjects)),
        ("eval.jsonl", make_rows(256, seed=1, subjects=eval_subjects)),
    ):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {model_dir} (vocab {vocab_size}) and train/eval jsonl to {HERE}")


if __name__ == "__main__":
    main()
