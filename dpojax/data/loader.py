"""One call from a data spec (file, folder or hub id) to tokenized, cached preference rows."""

from __future__ import annotations

import os
from typing import Any

from dpojax.data.formats import OnBadRow, is_ranked, is_unpaired, normalize_rows, unpair_rows
from dpojax.data.sources import load_rows
from dpojax.data.tokenize import TokenizedData, tokenize_rows
from dpojax.errors import DataError


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
    ranking_loss: bool | None = False,
    unpaired_loss: bool = False,
    unpair: bool = False,
) -> TokenizedData:
    """Load `spec`, validate and normalize its rows (any format), and tokenize them like TRL 1.16 (reusing
    `cache_dir`). Every host may call this: the work is deterministic and the cache file is written atomically.

    Pair data trains pair losses. Ranked or scored data trains a K-wise loss (`ranking_loss`, e.g. plackett_luce)
    on whole rankings, or a pair loss once `pairs_from_scores` ("best_vs_worst" | "all_pairs") has expanded it into
    pairs. `ranking_loss` None: the loss takes pairs and whole rankings alike (a reward model: Bradley-Terry,
    Plackett-Luce); ranked rows stay whole unless `pairs_from_scores` expands them. Unpaired rows (prompt,
    completion, label) train an unpaired loss (`unpaired_loss`: KTO), and so do pairs that `unpair` unrolls into
    unpaired rows (TRL's `unpair_preference_dataset`). Any other combination is a DataError that says what to change.
    """
    rows, source = load_rows(spec, split)
    _check_unpaired(source, is_unpaired(rows), unpaired_loss, unpair)
    ranked = is_ranked(rows)
    if ranking_loss is None:
        ranking_loss = ranked and pairs_from_scores == "none"
    if ranking_loss and not ranked:
        raise DataError(
            f"{source} holds preference pairs (prompt, chosen, rejected), but a ranking loss (plackett_luce) "
            "needs ranked or scored rows (prompt, responses[, scores]). For pairs use loss.type=sigmoid: with "
            "K=2 responses it is the same loss."
        )
    if ranking_loss and pairs_from_scores != "none":
        raise DataError(f"{source}: data.pairs_from_scores={pairs_from_scores!r} turns the rankings into pairs, "
                        "which a ranking loss cannot train on; set data.pairs_from_scores=none.")
    if ranked and not ranking_loss and pairs_from_scores == "none":
        raise DataError(
            f"{source} holds ranked or scored rows (prompt, responses[, scores]): train on the whole ranking with "
            "loss.type=plackett_luce, or expand the rows into pairs for a pair loss with "
            "data.pairs_from_scores=best_vs_worst (or all_pairs)."
        )
    prefrows = normalize_rows(rows, source, on_bad_row=on_bad_row, max_responses=max_responses,
                              pairs_from_scores=pairs_from_scores if ranked else "none")
    if unpair:
        prefrows = unpair_rows(prefrows)
    return tokenize_rows(prefrows, tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                         cache_dir=cache_dir)


def _check_unpaired(source: str, unpaired_rows: bool, unpaired_loss: bool, unpair: bool) -> None:
    if unpaired_rows and not unpaired_loss:
        raise DataError(f"{source} holds unpaired rows (prompt, completion, label), which only loss.type=kto (or "
                        "apo_zero_unpaired) trains on: set loss.type=kto, or give pairs (prompt, chosen, rejected).")
    if unpaired_loss and not unpaired_rows and not unpair:
        raise DataError(f"{source} holds preference pairs, but KTO trains on unpaired rows (prompt, completion, "
                        "label): set data.unpair=true to unroll each pair into a desirable (chosen) and an undesirable "
                        "(rejected) row, as TRL's KTOTrainer does.")
