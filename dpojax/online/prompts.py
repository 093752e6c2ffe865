"""The prompt set of an online run: any prompt-only file, dataset folder or hub set (text or chat prompts); a set
with chosen/rejected (or responses) columns is accepted and only its prompts are used. The other columns of a row
(an answer key, a test case) travel with its prompt to the reward function."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from typing import Any

import numpy as np

from dpojax.data.sources import load_rows
from dpojax.errors import DataError
from dpojax.generate import encode_prompt

log = logging.getLogger("dpojax")
RESPONSE_COLUMNS = ("chosen", "rejected", "responses", "scores")  # preference columns: ignored online


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """M prompts as the rows give them (text or a list of messages), their token ids (chat template applied, the
    generation prompt added) and every other column (one list of M values each)."""

    prompts: list[Any]
    prompt_ids: list[np.ndarray]  # [M] int32
    fields: dict[str, list]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha1 of the prompts' token ids and the other columns: what a resumed run must find again."""
        h = hashlib.sha1()
        for ids in self.prompt_ids:
            h.update(np.asarray(ids, np.int32).tobytes() + b"|")
        h.update(json.dumps(self.fields, sort_keys=True, default=str).encode())
        return h.hexdigest()

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.prompt_ids)

    def fields_of(self, indices) -> dict[str, list]:
        return {name: [values[int(i)] for i in indices] for name, values in self.fields.items()}


def prompt_rows(rows: list[dict], source: str) -> tuple[list[Any], dict[str, list]]:
    """(prompts, other columns) of `rows`; a DataError names the first row without a usable prompt."""
    if not rows:
        raise DataError(f"{source}: the prompt set is empty.")
    columns = list(rows[0])
    ignored = [c for c in columns if c in RESPONSE_COLUMNS]
    if ignored:
        log.info("%s: has %s column(s); an online run uses its prompts only", source, "/".join(ignored))
    prompts = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        chat = isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt) and prompt
        if not (isinstance(prompt, str) and prompt) and not chat:
            raise DataError(f"{source}: row {i} has no usable 'prompt' ({prompt!r}); an online prompt set needs a "
                            "'prompt' column of text or chat messages [{'role': ..., 'content': ...}].")
        prompts.append(prompt)
    keep = [c for c in columns if c != "prompt" and c not in RESPONSE_COLUMNS]
    return prompts, {c: [row.get(c) for row in rows] for c in keep}


def load_prompts(spec: str, split: str, tokenizer: Any, context: int) -> PromptSet:
    """The prompt set `spec` tokenized; a prompt that leaves no room for a response in the model's `context` is a
    DataError naming it."""
    rows, source = load_rows(spec, split)
    prompts, fields = prompt_rows([dict(r) for r in rows], source)
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(np.asarray(encode_prompt(tokenizer, prompt), np.int32))
        except DataError as e:
            raise DataError(f"{source}: row {i}: {e}") from None
        if not 0 < len(ids[-1]) < context:
            raise DataError(f"{source}: row {i} has {len(ids[-1])} prompt tokens; the model's context is {context}: "
                            "shorten it or leave it out.")
    return PromptSet(prompts, ids, fields, source)
