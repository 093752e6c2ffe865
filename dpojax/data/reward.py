"""Reward-model rows (task: reward): the tokenized preference rows as TRL 1.16's `RewardTrainer` keeps them.

TRL tokenizes each full sequence, prompt + response, as one text (standard rows: the EOS string appended unless the
response ends with it; conversational rows: the chat template over prompt + response messages, no generation
prompt). dpojax's preference tokenization (`data.tokenize`, TRL's DPO rules) makes those same ids, split at the
prompt: prompt_ids + response_ids is TRL's reward sequence, and the shared prompt lets packing compute it once.
TRL does not truncate reward data: it drops every pair whose chosen or rejected sequence has more than max_length
tokens, and so does `reward_rows` (any response of a ranking), so batching never cuts a sequence.

A pair row may carry TRL's optional `margin` column (a number: the loss becomes -log sigma(r_c - r_r - margin));
`margin_column` reads it from the source and `reward_rows` keeps each kept row's (`TokenizedData.margins`).
Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Any

import numpy as np

from dpojax.data.sources import row_stream
from dpojax.data.tokenize import TokenizedData
from dpojax.errors import DataError

log = logging.getLogger(__name__)

_ABSENT = object()  # a row without a margin field


def margin_column(spec: str, split: str) -> np.ndarray | None:
    """float32 [rows of the source]: its `margin` column, or None when it has none. DataError naming the row for a
    value that is not a finite number."""
    rows = row_stream(spec, split)
    source = rows.source
    if rows.dataset is not None:  # a datasets.Dataset (memory-mapped)
        if "margin" not in rows.dataset.column_names:
            return None
        values: list[Any] = list(rows.dataset["margin"])
    else:  # read lazily: only the margins are kept
        values = [row.get("margin", _ABSENT) if isinstance(row, dict) else _ABSENT for row in rows]
        if all(v is _ABSENT for v in values):
            return None
        values = [None if v is _ABSENT else v for v in values]
    for i, v in enumerate(values):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise DataError(f"{source}: row {i}, field 'margin': {v!r} is not a number; every row of a data set with "
                            "a margin column needs one (TRL's reward margin, e.g. 0.0), or drop the column.")
    return np.asarray(values, np.float32)


def reward_rows(data: TokenizedData, max_length: int | None, margins: np.ndarray | None = None) -> TokenizedData:
    """`data` without the rows that have a sequence (prompt + response) longer than `max_length` tokens (TRL's
    filter), counted in `stats.rows_dropped_long`, with each kept row's margin (`margins`: the source's column,
    `margin_column`); the fingerprint marks both."""
    if margins is not None:
        if data.num_responses != 2:
            raise DataError(f"{data.source}: a 'margin' column belongs to pairs (prompt, chosen, rejected); these "
                            "rows are rankings. Drop the column, or expand them into pairs (data.pairs_from_scores).")
        data = dataclasses.replace(data, margins=margins[data.row_index])
    if max_length is None:
        return data
    keep = np.flatnonzero(np.max(data.lengths_MxK, axis=1) <= max_length)
    dropped = len(data) - len(keep)
    if not len(keep):
        raise DataError(f"{data.source}: every row has a sequence (prompt + response) longer than data.max_length="
                        f"{max_length} tokens, and a reward model drops such rows as TRL does; raise data.max_length.")
    if dropped:
        log.warning("%s: dropped %d row(s) with a sequence longer than max_length=%d tokens (TRL's reward data "
                    "filter)", data.source, dropped, max_length)
    stats = dataclasses.replace(data.stats, rows_dropped_long=data.stats.rows_dropped_long + dropped,
                                rows_out=len(keep))
    key = f"{data.fingerprint}:reward:{max_length}"
    if data.margins is not None:
        key += ":" + hashlib.sha256(data.margins.tobytes()).hexdigest()
    return dataclasses.replace(
        data, prompt_ids=[data.prompt_ids[m] for m in keep], response_ids=[data.response_ids[m] for m in keep],
        ranks=[data.ranks[m] for m in keep], row_index=data.row_index[keep], stats=stats,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:40],
        margins=None if data.margins is None else data.margins[keep])
