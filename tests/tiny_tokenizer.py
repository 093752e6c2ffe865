"""A tiny deterministic tokenizer and preference rows in its vocabulary, built on the fly (no network, no hub).

API (used by other test files; keep it):
  make_tokenizer(path, *, chat_template=True) -> Path   a saved HF tokenizer folder, < 128 ids
  load_tiny_tokenizer(path, *, chat_template=True) -> PreTrainedTokenizerFast   the same, loaded
  make_pref_rows(n, fmt="standard", seed=0) -> list[dict]   fmt: "standard" | "conversational" | "implicit"
                                                             | "implicit_conversational"

The tokenizer is a hand-built BPE (no trainer, so no tie-breaking surprises): Metaspace pre-tokenizer (spaces become
"▁"), one token per character plus a chain of merges that builds every word of WORDS, and a post-processor that
prepends "<s>" like Llama's. Special tokens: <pad>=0 (pad), <s>=1 (bos), </s>=2 (eos), <unk>=3, and the chat role
markers <|system|>, <|user|>, <|assistant|>.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the sky is blue red green what color sun sea hot cold yes no it a big cat dog likes fish in where why you are "
    "good bad"
).split()
PUNCT = ".?!,"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(set("".join(WORDS)) | set(PUNCT) | {"▁"}):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for length in range(2, max(len(w) for w in WORDS) + 2):  # shorter prefixes merge first
        for word in WORDS:
            piece = "▁" + word
            if len(piece) >= length and piece[:length] not in vocab:
                vocab[piece[:length]] = len(vocab)
                merges.append((piece[: length - 1], piece[length - 1]))
    return vocab, merges


def make_tokenizer(path: str | Path, *, chat_template: bool = True) -> Path:
    """Build and save (`save_pretrained`) the tiny tokenizer under `path`; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges()
    assert len(vocab) < 128, len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIALS[4:]),
    )
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    path = Path(path)
    hf.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ preference rows
def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _standard_row(rng: random.Random, i: int) -> dict:
    prompt = _sentence(rng, 1, 3 if i % 4 else 14) + rng.choice(["?", "", " is"])  # every 4th prompt is long
    chosen = " " + _sentence(rng, 1, 6) + "."
    rejected = " " + _sentence(rng, 1, 6) + rng.choice([".", "!", ""])
    if i % 7 == 3:
        chosen += "</s>"  # already ends with EOS: must not get a second one
    if i % 6 == 2:  # the prompt ends mid-word: tokens merge across the prompt/completion boundary
        word = rng.choice([w for w in WORDS if len(w) > 3])
        prompt, chosen = prompt + " " + word[:2], word[2:] + chosen
    if i % 9 == 5:
        rejected = chosen  # identical pair: kept, counted
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversational_row(rng: random.Random, i: int) -> dict:
    prompt = [{"role": "user", "content": _sentence(rng, 1, 3 if i % 4 else 12) + "?"}]
    if i % 3 == 1:
        prompt.insert(0, {"role": "system", "content": _sentence(rng, 2, 4) + "."})
    if i % 5 == 2:  # multi-turn
        prompt += [{"role": "assistant", "content": _sentence(rng, 1, 3)}, {"role": "user", "content": "why?"}]
    chosen = [{"role": "assistant", "content": _sentence(rng, 1, 6) + "."}]
    rejected = [{"role": "assistant", "content": _sentence(rng, 1, 6) + "!"}]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def make_pref_rows(n: int, fmt: str = "standard", seed: int = 0) -> list[dict]:
    """n small varied preference rows: "standard", "conversational", "implicit" (text) or "implicit_conversational"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if fmt in ("standard", "implicit"):
            row = _standard_row(rng, i)
        elif fmt in ("conversational", "implicit_conversational"):
            row = _conversational_row(rng, i)
        else:
            raise ValueError(f"unknown fmt {fmt!r}")
        if fmt.startswith("implicit"):
            row = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        rows.append(row)
    return rows


def load_tiny_tokenizer(path: str | Path, *, chat_template: bool = True):
    """make_tokenizer + `transformers.AutoTokenizer.from_pretrained` on the folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(path, chat_template=chat_template))
