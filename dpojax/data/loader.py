"""One call from a data spec (file, folder or hub id) to tokenized, cached preference pairs."""

from __future__ import annotations

import os
from typing import Any

from dpojax.data.formats import OnBadRow, load_rows
from dpojax.data.tokenize import TokenizedPairs, tokenize_rows


def load_pairs(
    spec: str,
    tokenizer: Any,
    *,
    split: str = "train",
    max_length: int | None,
    truncation_mode: str = "keep_start",
    cache_dir: str | os.PathLike | None = None,
    on_bad_row: OnBadRow = "error",
) -> TokenizedPairs:
    """Load `spec`, validate and normalize its rows, and tokenize them like TRL 1.16 (reusing `cache_dir`).

    Every host may call this: the work is deterministic and the cache file is written atomically. Batches are then
    cut per host by `batching.train_batches(..., process_index=, process_count=)`.
    """
    rows, source = load_rows(spec, split)
    return tokenize_rows(
        rows,
        tokenizer,
        max_length=max_length,
        truncation_mode=truncation_mode,
        cache_dir=cache_dir,
        source=source,
        on_bad_row=on_bad_row,
    )
