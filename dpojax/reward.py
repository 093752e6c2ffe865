"""A reward model for online DPO: scores whole prompt + completion sequences with a HF sequence-classification model
(`dpojax.models.score`).

    rm = RewardModel.load("path/to/reward-model", policy_tokenizer=tokenizer)
    rewards = rm.score_ids([prompt_ids + completion_ids, ...])      # numpy float32 [n]
    rewards = rm.score_messages([[{"role": "user", ...}, {"role": "assistant", ...}], ...])   # its chat template
    rewards = rm.score(prompts, completions, completion_ids, rows)   # online DPO's reward interface

`score_ids` takes the POLICY tokenizer's ids. A reward model trained on the same tokenizer (same vocabulary, merges,
special tokens: `vocabulary_fingerprint`) scores them as they are. Otherwise each sequence is decoded with the
policy tokenizer, special tokens kept as text, and encoded again with the reward model's tokenizer without adding
special tokens: chat markers whose strings both tokenizers know come through as single tokens, others as plain text.
A reward model that expects another chat format should be given the conversation instead (`score_messages`, which
applies the reward tokenizer's chat template) or its own text (`score_texts`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from dpojax.errors import DataError, ModelError
from dpojax.generate import encode_prompt
from dpojax.models.hf import resolve_model_dir
from dpojax.models.score import ScoreModel, check_reward_head, load_score_model, score_sequences
from dpojax.sharding import Sharder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """sha256 of what maps text to ids (vocabulary, merges, normalizer, pre/post-processing, added and special
    tokens); the chat template is left out, as it does not change which id a token has."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps({"special": special, "len": len(tokenizer)}, sort_keys=True).encode())
    return h.hexdigest()


class RewardModel:
    """Scores token sequences with one reward model (num_labels = 1), `batch_size` rows per compiled call."""

    def __init__(self, model: ScoreModel, *, tokenizer: Any = None, policy_tokenizer: Any = None,
                 batch_size: int = 8, name: str = "reward model"):
        check_reward_head(model.num_labels)
        self.name = name
        self.model, self.tokenizer, self.policy_tokenizer, self.batch_size = model, tokenizer, policy_tokenizer, \
            batch_size
        self.retokenizes = (tokenizer is not None and policy_tokenizer is not None
                            and vocabulary_fingerprint(tokenizer) != vocabulary_fingerprint(policy_tokenizer))

    @classmethod
    def load(cls, name_or_path: str | pathlib.Path, *, policy_tokenizer: Any = None, batch_size: int = 8,
             dtype=jnp.float32, sharder: Sharder | None = None, revision: str | None = None) -> RewardModel:
        """From a `*ForSequenceClassification` folder or hub id; its own tokenizer when the folder has one."""
        folder = resolve_model_dir(name_or_path, revision)
        model, _ = load_score_model(folder, dtype=dtype, sharder=sharder)
        tokenizer = None
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer  # needed only for a reward model that brings its tokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(model, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, batch_size=batch_size,
                   name=str(name_or_path))

    def score(self, prompts: Sequence[Any], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
              rows: dict | None = None) -> np.ndarray:
        """float32 [n]: online DPO's reward interface. Each prompt (text, or messages through the chat template with
        the generation prompt: `generate.encode_prompt`, as the sampler encoded it) in the policy tokenizer's ids,
        followed by its sampled `completion_ids`, scored by `score_ids`; `completions` and `rows` are not used."""
        tokenizer = self.policy_tokenizer if self.policy_tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ModelError("score needs the policy tokenizer to encode the prompts: give policy_tokenizer.")
        return self.score_ids([encode_prompt(tokenizer, p) + list(c) for p, c in zip(prompts, completion_ids,
                                                                                       strict=True)])

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n]: the reward of each full prompt + completion, given as the policy tokenizer's ids."""
        if self.retokenizes:
            sequences = [self.retokenize(s) for s in sequences]
        return score_sequences(self.model, sequences, batch_size=self.batch_size)

    def retokenize(self, ids: Sequence[int]) -> list[int]:
        """Policy ids -> text (special tokens kept) -> the reward tokenizer's ids (no special tokens added)."""
        text = self.policy_tokenizer.decode(list(ids), skip_special_tokens=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [n]: rewards of texts, tokenized by the reward model's tokenizer (with its special tokens)."""
        tokenizer = self._own_tokenizer("score_texts")
        return score_sequences(self.model, [tokenizer(t)["input_ids"] for t in texts], batch_size=self.batch_size)

    def score_messages(self, conversations: Sequence[Sequence[dict]]) -> np.ndarray:
        """float32 [n]: rewards of conversations (lists of {"role", "content"}, the completion as the last assistant
        message) through the reward tokenizer's chat template."""
        tokenizer = self._own_tokenizer("score_messages")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("score_messages needs a reward tokenizer with a chat template; this one has none: "
                            "use score_texts with the text the reward model was trained on.")
        ids = [list(tokenizer.apply_chat_template(list(c), tokenize=True, return_dict=True)["input_ids"])
               for c in conversations]
        return score_sequences(self.model, ids, batch_size=self.batch_size)

    def _own_tokenizer(self, what: str) -> Any:
        tokenizer = self.tokenizer if self.tokenizer is not None else self.policy_tokenizer
        if tokenizer is None:
            raise ModelError(f"{what} needs a tokenizer: the reward model folder has none and no policy tokenizer "
                             "was given.")
        return tokenizer
