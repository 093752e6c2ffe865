"""One call from a data spec (file, folder or hub id) to tokenized, cached preference pairs (or rankings)."""

from __future__ import annotations

import os
from typing import Any

from dpojax.data.formats import OnBadRow, load_rows
from dpojax.data.ranked import is_ranked, normalize_ranked, pairs_from_ranked
from dpojax.data.ranked_tokenize import TokenizedRankings, tokenize_rankings
from dpojax.data.tokenize import TokenizedPairs, tokenize_rows
from dpojax.errors import DataError


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
    cut per host by `batching.train_batches(..., process_index=, process_count=)`. Ranked or scored data is a
    DataError that says how to train on it (`load_preferences`).
    """
    return load_preferences(spec, tokenizer, split=split, max_length=max_length, truncation_mode=truncation_mode,
                            cache_dir=cache_dir, on_bad_row=on_bad_row)


def load_preferences(
    spec: str,
    tokenizer: Any,
    *,
    split: str = "train",
    max_length: int | None,
    truncation_mode: str = "keep_start",
    cache_dir: str | os.PathLike | None = None,
    on_bad_row: OnBadRow = "error",
    max_responses: int = 8,
    pairs_from_scores: str = "none",
    ranking_loss: bool = False,
) -> TokenizedPairs | TokenizedRankings:
    """Pairs or rankings from `spec`, whichever the loss trains on.

    Pair data (prompt, chosen, rejected) -> TokenizedPairs. Ranked or scored data (prompt, responses[, scores]) ->
    TokenizedRankings for a ranking loss (`ranking_loss`, e.g. plackett_luce), or TokenizedPairs expanded by
    `pairs_from_scores` ("best_vs_worst" | "all_pairs") for a pair loss. Any other combination is a DataError that
    says what to change.
    """
    rows, source = load_rows(spec, split)
    kw = dict(max_length=max_length, truncation_mode=truncation_mode, cache_dir=cache_dir)
    if not is_ranked(rows):
        if ranking_loss:
            raise DataError(
                f"{source} holds preference pairs (prompt, chosen, rejected), but a ranking loss (plackett_luce) "
                "needs ranked or scored rows (prompt, responses[, scores]). For pairs use loss.type=sigmoid: with "
                "K=2 responses it is the same loss."
            )
        return tokenize_rows(rows, tokenizer, source=source, on_bad_row=on_bad_row, **kw)
    if ranking_loss:
        if pairs_from_scores != "none":
            raise DataError(f"{source}: data.pairs_from_scores={pairs_from_scores!r} turns the rankings into pairs, "
                            "which a ranking loss cannot train on; set data.pairs_from_scores=none.")
        return tokenize_rankings(rows, tokenizer, max_responses=max_responses, source=source, on_bad_row=on_bad_row,
                                 **kw)  # fmt: skip
    if pairs_from_scores == "none":
        raise DataError(
            f"{source} holds ranked or scored rows (prompt, responses[, scores]): train on the whole ranking with "
            "loss.type=plackett_luce, or expand the rows into pairs for a pair loss with "
            "data.pairs_from_scores=best_vs_worst (or all_pairs)."
        )
    ranked = normalize_ranked(rows, source, max_responses=max_responses, on_bad_row=on_bad_row)
    return tokenize_rows(pairs_from_ranked(ranked, pairs_from_scores), tokenizer, **kw)
