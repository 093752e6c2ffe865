"""Ranked and scored preference rows: K responses to one prompt, validated and brought to one shape, best first.

Two formats, each standard (strings) or conversational (lists of {"role", "content"} messages, like TRL's):
  ranked   prompt, responses   `responses` is a list of 2..data.max_responses responses, best first (a strict order)
  scored   prompt, responses, scores   one number per response, higher is better; ties allowed

A normalized row is {"prompt", "responses" (best first), "ranks"} (+ "tools", "chat_template_kwargs" when
conversational). `ranks[k]` is the rank of response k's tie group, 0 for the best: 0, 1, 2, ... for ranked rows;
for scored rows the responses are sorted by score, highest first (a stable sort: tied responses keep their order),
and tied responses share one rank, e.g. scores [7, 9, 7, 1] -> responses [b, a, c, d], ranks [0, 1, 1, 2].

Ties. A tie is "no preference between these two": the Plackett-Luce loss (dpojax/ranking.py) compares each response
only with the responses ranked strictly below it, so tied responses are never pushed apart, and
`pairs_from_scores` makes no pair of two tied responses. A row whose scores are all equal states no preference at
all: it is dropped, counted and reported in a warning.

`pairs_from_scores` expands rows into ordinary pairs (trained by the pair pipeline, with any pair loss), the way
people train on scored data today: `best_vs_worst` keeps one pair per row (the first best response against the
last worst one); `all_pairs` keeps every pair of responses with different ranks (up to K(K-1)/2 per row).

Validation works like `formats.normalize_rows`: every bad row is reported in one DataError naming the source, the
row index and the field (`responses[2]` for the third response); `on_bad_row="skip"` drops and counts them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Literal

from dpojax.data.formats import (
    OnBadRow,
    PreferenceRows,
    RowFormat,
    _bad_rows_message,
    _check_extras,
    _check_field,
)
from dpojax.errors import DataError

log = logging.getLogger(__name__)

PairsFromScores = Literal["none", "best_vs_worst", "all_pairs"]
PAIRS_FROM_SCORES = ("none", "best_vs_worst", "all_pairs")


@dataclasses.dataclass(frozen=True)
class RankedFormat:
    conversational: bool  # prompt and each response are lists of {"role", "content"} messages
    scored: bool  # a `scores` column gives the order (ties allowed); otherwise `responses` is best first

    @property
    def row_format(self) -> RowFormat:
        """The pair format with the same flavour: the field checks of `formats` apply unchanged."""
        return RowFormat(self.conversational, implicit_prompt=False)

    @property
    def name(self) -> str:
        return f"{'scored' if self.scored else 'ranked'} {self.row_format.name}"


@dataclasses.dataclass(frozen=True)
class RankedRows:
    """Validated rows, each {"prompt", "responses" (best first), "ranks"} (+ "tools", "chat_template_kwargs")."""

    rows: list[dict]
    row_index: list[int]  # index of each kept row in the input
    fmt: RankedFormat
    source: str
    rows_in: int  # rows read from the source
    rows_skipped_bad: int  # invalid rows dropped under on_bad_row="skip"
    rows_identical: int  # kept rows in which two responses are identical
    rows_all_tied: int  # scored rows dropped because every score is equal (no preference)


# -------------------------------------------------------------------------------------------------- detection
def _first_dict(rows: Any) -> dict | None:
    for row in rows:
        if isinstance(row, dict):
            return row
    return None


def is_ranked(rows: Any) -> bool:
    """Whether the dataset is ranked/scored (its first row has a `responses` field) rather than pairs."""
    if hasattr(rows, "column_names"):  # a datasets.Dataset: decide from the columns, without reading rows
        return "responses" in rows.column_names
    first = _first_dict(rows)
    return first is not None and first.get("responses") is not None


def detect_ranked_format(rows: list, source: str) -> RankedFormat:
    """Decided (like the pair formats) by the first row whose `responses` is a non-empty list."""
    for row in rows:
        responses = row.get("responses") if isinstance(row, dict) else None
        if isinstance(responses, list) and responses and isinstance(responses[0], (str, list)):
            return RankedFormat(isinstance(responses[0], list), row.get("scores") is not None)
    raise DataError(f"{source}: no row has a 'responses' field that is a list of strings or of message lists")


# ------------------------------------------------------------------------------------------------- validation
def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_responses(row: dict, fmt: RankedFormat, max_responses: int) -> list[tuple[str, str]]:
    responses = row.get("responses")
    if responses is None:
        return [("responses", "missing")]
    if not isinstance(responses, list):
        return [("responses", f"expected a list of responses, got {type(responses).__name__} {responses!r:.60}")]
    if len(responses) < 2:
        return [("responses", f"has {len(responses)} response(s); a ranking needs at least 2")]
    if len(responses) > max_responses:
        return [("responses", f"has {len(responses)} responses, more than data.max_responses={max_responses}")]
    problems = []
    for j, response in enumerate(responses):
        field = f"responses[{j}]"
        problems += _check_field({field: response}, field, fmt.row_format)
    return problems


def _check_scores(row: dict, fmt: RankedFormat) -> list[tuple[str, str]]:
    scores = row.get("scores")
    if not fmt.scored:
        if scores is not None:
            return [("scores", "mixed formats: has scores, but the dataset is ranked (decided by its first row)")]
        return []
    if scores is None:
        return [("scores", "missing")]
    responses = row.get("responses")
    if not isinstance(scores, list):
        return [("scores", f"expected a list of numbers, got {type(scores).__name__} {scores!r:.60}")]
    if isinstance(responses, list) and len(scores) != len(responses):
        return [("scores", f"has {len(scores)} values for {len(responses)} responses")]
    bad = [j for j, s in enumerate(scores) if not _number(s)]
    if bad:
        return [("scores", f"scores[{bad[0]}] = {scores[bad[0]]!r:.30} is not a finite number")]
    return []


def ranked_row_problems(row: Any, fmt: RankedFormat, max_responses: int) -> list[tuple[str, str]]:
    """(field, message) for everything wrong with one ranked/scored row; empty when the row is usable."""
    if not isinstance(row, dict):
        return [("<row>", f"expected an object with prompt/responses, got {type(row).__name__}")]
    problems = _check_field(row, "prompt", fmt.row_format)
    problems += _check_responses(row, fmt, max_responses)
    problems += _check_scores(row, fmt)
    if fmt.conversational:
        problems += _check_extras(row)
    return problems


# ------------------------------------------------------------------------------------------------- normalize
def order_and_ranks(scores: list[float]) -> tuple[list[int], list[int]]:
    """(order, ranks): response indices sorted by score, highest first (stable), and the dense rank of each sorted
    response's tie group (0 = best)."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    ranks = [0]
    for prev, cur in zip(order, order[1:]):
        ranks.append(ranks[-1] + (scores[cur] < scores[prev]))
    return order, ranks


def _normalize(row: dict, fmt: RankedFormat) -> dict:
    responses = row["responses"]
    if fmt.scored:
        order, ranks = order_and_ranks(row["scores"])
        responses = [responses[j] for j in order]
    else:
        ranks = list(range(len(responses)))
    out = {"prompt": row["prompt"], "responses": responses, "ranks": ranks}
    if fmt.conversational:
        tools = row.get("tools")
        out["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        out["chat_template_kwargs"] = row.get("chat_template_kwargs") or {}
    return out


def _has_duplicates(responses: list) -> bool:
    seen = [json.dumps(r, sort_keys=True) for r in responses]
    return len(set(seen)) < len(seen)


def normalize_ranked(
    rows: Any, source: str, *, max_responses: int, on_bad_row: OnBadRow = "error"
) -> RankedRows:
    """Validate every row, then bring the good ones to {prompt, responses (best first), ranks}."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_responses < 2:
        raise DataError(f"data.max_responses must be at least 2, got {max_responses}")
    rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    if not rows:
        raise DataError(f"{source}: no rows")
    fmt = detect_ranked_format(rows, source)
    dict_rows = [r for r in rows if isinstance(r, dict)]
    for col in ("prompt", "responses") + (("scores",) if fmt.scored else ()):
        if all(r.get(col) is None for r in dict_rows):
            seen = sorted({k for r in dict_rows[:100] for k in r})
            raise DataError(f"{source}: every row lacks the '{col}' field (fields present: {seen})")
    good, index, bad, bad_rows, identical, all_tied = [], [], [], 0, 0, 0
    for i, row in enumerate(rows):
        problems = ranked_row_problems(row, fmt, max_responses)
        if problems:
            bad_rows += 1
            bad += [(i, field, msg) for field, msg in problems]
            continue
        norm = _normalize(row, fmt)
        if norm["ranks"][-1] == 0:
            all_tied += 1
            continue
        identical += _has_duplicates(norm["responses"])
        good.append(norm)
        index.append(i)
    if bad and on_bad_row == "error":
        raise DataError(_bad_rows_message(source, bad, bad_rows, len(rows)))
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d (on_bad_row='skip')", source, bad_rows, len(rows))
    if all_tied:
        log.warning("%s: dropped %d row(s) whose scores are all equal (no preference to learn)", source, all_tied)
    if not good:
        raise DataError(f"{source}: no usable rows left ({bad_rows} bad, {all_tied} all tied, of {len(rows)})")
    if identical:
        log.warning("%s: %d row(s) have two identical responses; kept, as for pairs", source, identical)
    return RankedRows(good, index, fmt, source, len(rows), bad_rows, identical, all_tied)


# ---------------------------------------------------------------------------------------------- pair expansion
def _pair_indices(ranks: list[int], mode: str) -> list[tuple[int, int]]:
    if mode == "best_vs_worst":
        return [(0, len(ranks) - 1)]  # normalized rows are sorted and never all tied, so these ranks differ
    if mode == "all_pairs":
        n = len(ranks)
        return [(i, j) for i in range(n) for j in range(i + 1, n) if ranks[i] < ranks[j]]
    raise ValueError(f"pairs_from_scores must be one of {PAIRS_FROM_SCORES[1:]}, got {mode!r}")


def pairs_from_ranked(ranked: RankedRows, mode: str) -> PreferenceRows:
    """Ordinary {prompt, chosen, rejected} pairs from ranked rows (`best_vs_worst` or `all_pairs`), ready for
    `tokenize.tokenize_rows`; each pair's row_index is its source row."""
    rows, index, identical = [], [], 0
    for i, row in zip(ranked.row_index, ranked.rows, strict=True):
        extras = {k: row[k] for k in ("tools", "chat_template_kwargs") if k in row}
        for a, b in _pair_indices(row["ranks"], mode):
            chosen, rejected = row["responses"][a], row["responses"][b]
            identical += chosen == rejected
            rows.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, **extras})
            index.append(i)
    log.info("%s: %d ranked row(s) expanded into %d pairs (%s)", ranked.source, len(ranked.rows), len(rows), mode)
    return PreferenceRows(
        rows, index, ranked.fmt.row_format, ranked.source, ranked.rows_in, ranked.rows_skipped_bad, identical
    )

