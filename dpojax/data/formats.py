"""Validate preference rows of every format and bring them to ONE row type: a prompt and K >= 2 ranked responses.

Formats, with TRL 1.16's meaning (`trl/data_utils.py`); each is standard (strings) or conversational (lists of
{"role", "content"} messages, the tokenizer's chat template applied later):
  pair             prompt, chosen, rejected
  implicit prompt  chosen, rejected only; the prompt is their common prefix, cut the way TRL's `extract_prompt`
                   cuts it (see `extract_prompt`, quirks included)
  ranked           prompt, responses   2..data.max_responses responses, best first (a strict order)
  scored           prompt, responses, scores   one number per response, higher is better; ties allowed
  unpaired         prompt, completion, label   one response with a thumbs-up (true: desirable) or down (false);
                   KTO's data (TRL's unpaired preference format)

A normalized row is {"prompt", "responses" (best first), "ranks"} (+ "tools", "chat_template_kwargs" when
conversational): a pair is the ranking [chosen, rejected] with ranks [0, 1]. `ranks[k]` is the rank of response
k's tie group, 0 for the best. Scored rows are sorted by score, highest first (stable: tied responses keep their
order), tied responses share one rank, e.g. scores [7, 9, 7, 1] -> responses [b, a, c, d], ranks [0, 1, 1, 2]; a
scored row whose scores are all equal states no preference and is dropped (counted, warned). An unpaired row is
{"prompt", "responses": [completion], "ranks": [0], "label"}; `unpair_rows` turns pair rows into unpaired ones
(chosen -> label true, rejected -> false) in the order TRL's `unpair_preference_dataset` gives.

`pairs_from_scores` turns ranked rows into K = 2 rows for pair losses: `best_vs_worst` keeps one pair per row (the
first best response against the last worst one); `all_pairs` keeps every pair of responses with different ranks.

Every row is checked before anything is tokenized, and all bad rows are reported together in one DataError that names
the source, the row index and the field (`responses[2]` for the third response). `on_bad_row="skip"` drops them
instead and counts them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Literal

from dpojax.errors import DataError

log = logging.getLogger(__name__)

MAX_LISTED = 20  # bad rows spelled out in one error message; the rest are counted
ON_BAD_ROW = ("error", "skip")
OnBadRow = Literal[ON_BAD_ROW]
PAIRS_FROM_SCORES = ("none", "best_vs_worst", "all_pairs")


# ----------------------------------------------------------------------------------------------- TRL prompt rules
def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from an implicit-prompt pair, with TRL 1.16 `extract_prompt` semantics.

    The prompt is the longest common prefix (characters or messages). When the texts differ right after a space, that
    space goes to the completions. Two TRL quirks are kept on purpose for token-exact parity: when one side is a
    prefix of the other (or they are equal), the cut is one element *before* the end of the shorter side; and when
    they differ at the very first element and `chosen` ends with a space, the cut lands at index -1.
    """
    n = min(len(chosen), len(rejected))
    cut = n - 1  # value TRL's loop variable keeps when the loop runs to the end
    for i in range(n):
        if chosen[i] != rejected[i]:
            cut = i - 1 if chosen[i - 1] == " " else i
            break
    return chosen[:cut], chosen[cut:], rejected[cut:]



# -------------------------------------------------------------------------------------------------- the row type
@dataclasses.dataclass(frozen=True)
class RowFormat:
    conversational: bool  # fields are lists of {"role", "content"} messages
    implicit_prompt: bool = False  # pair rows without a prompt column: the prompt is extracted
    ranked: bool = False  # a `responses` column (ranked or scored) instead of chosen/rejected
    scored: bool = False  # a `scores` column gives the order (ties allowed)
    unpaired: bool = False  # prompt, completion, label (true: desirable): one response per row, KTO's data

    @property
    def name(self) -> str:
        base = "conversational" if self.conversational else "standard"
        if self.unpaired:
            return f"unpaired {base}"
        if self.ranked:
            return f"{'scored' if self.scored else 'ranked'} {base}"
        return f"implicit-prompt {base}" if self.implicit_prompt else base


@dataclasses.dataclass(frozen=True)
class PreferenceRows:
    """Validated rows, each {"prompt", "responses" (best first), "ranks"} (+ "tools", "chat_template_kwargs")."""

    rows: list[dict]
    row_index: list[int]  # index of each kept row in the input (several rows share one under pairs_from_scores)
    fmt: RowFormat
    source: str
    rows_in: int  # rows read from the source
    rows_skipped_bad: int  # invalid rows dropped under on_bad_row="skip"
    rows_identical: int  # kept rows in which two responses are identical (kept, as TRL does)
    rows_all_tied: int = 0  # scored rows dropped because every score is equal (no preference)
    pairs_from_scores: str = "none"  # how ranked rows were turned into pairs, if they were


# ---------------------------------------------------------------------------------------------------- detection
def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "messages"
    return "none" if value is None else "bad"


def detect_format(rows: list, source: str) -> RowFormat:
    """Decided (like TRL) by the first row with a usable `responses` (ranked) or `chosen` (pair) field."""
    for row in rows:
        if not isinstance(row, dict):
            continue
        responses = row.get("responses")
        if isinstance(responses, list) and responses and isinstance(responses[0], (str, list)):
            return RowFormat(isinstance(responses[0], list), ranked=True, scored=row.get("scores") is not None)
        if _kind(row.get("chosen")) in ("text", "messages"):
            return RowFormat(_kind(row["chosen"]) == "messages", implicit_prompt=row.get("prompt") is None)
        if _kind(row.get("completion")) in ("text", "messages") and "label" in row:
            return RowFormat(_kind(row["completion"]) == "messages", unpaired=True)
    raise DataError(f"{source}: no row has a 'chosen' field (a string or a list of messages), a 'responses' "
                    "field (a list of them), nor 'completion' and 'label' fields (unpaired rows)")


def is_unpaired(rows: Any) -> bool:
    """Whether the data set is unpaired (prompt, completion, label) rather than pairs, read without a full pass."""
    if hasattr(rows, "column_names"):  # a datasets.Dataset
        return "completion" in rows.column_names and "chosen" not in rows.column_names
    first = next((r for r in rows if isinstance(r, dict)), None)
    return first is not None and first.get("completion") is not None and first.get("chosen") is None


def is_ranked(rows: Any) -> bool:
    """Whether the data set is ranked/scored (a `responses` column) rather than pairs, read without a full pass."""
    if hasattr(rows, "column_names"):  # a datasets.Dataset
        return "responses" in rows.column_names
    first = next((r for r in rows if isinstance(r, dict)), None)
    return first is not None and first.get("responses") is not None


# --------------------------------------------------------------------------------------------------- validation
def _check_messages(value: list, field: str) -> list[tuple[str, str]]:
    problems = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            problems.append((field, f"message {j} is {type(msg).__name__}, expected a dict with role and content"))
        elif not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            problems.append((field, f"message {j} needs a string 'role' and a string 'content', got {msg!r:.80}"))
    return problems


def _check_field(row: dict, field: str, fmt: RowFormat) -> list[tuple[str, str]]:
    kind = _kind(row.get(field))
    if kind == "none":
        return [(field, "missing")]
    value = row[field]
    if kind == "bad":
        return [(field, f"expected a string or a list of messages, got {type(value).__name__} {value!r:.60}")]
    want = "messages" if fmt.conversational else "text"
    if kind != want:
        got = "a list of messages" if kind == "messages" else "a string"
        return [(field, f"mixed formats: {got}, but the dataset is {fmt.name} (decided by its first row)")]
    if kind == "messages":
        problems = _check_messages(value, field)
        if problems:
            return problems
    if len(value) == 0 and (field != "prompt" or fmt.conversational):
        return [(field, "empty")]
    return []


def _check_extras(row: dict) -> list[tuple[str, str]]:
    tools, kwargs = row.get("tools"), row.get("chat_template_kwargs")
    problems = []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            problems.append(("tools", "a string that is not valid JSON"))
    if tools is not None and not isinstance(tools, (str, list)):
        problems.append(("tools", f"expected a list or a JSON string, got {type(tools).__name__}"))
    if kwargs is not None and not isinstance(kwargs, dict):
        problems.append(("chat_template_kwargs", f"expected a dict, got {type(kwargs).__name__}"))
    return problems




def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_responses(row: dict, fmt: RowFormat, max_responses: int) -> list[tuple[str, str]]:
    responses = row.get("responses")
    if responses is None:
        return [("responses", "missing")]
    if not isinstance(responses, list):
        return [("responses", f"expected a list of responses, got {type(responses).__name__} {responses!r:.60}")]
    if len(responses) < 2:
        return [("responses", f"has {len(responses)} response(s); a ranking needs at least 2")]
    if len(responses) > max_responses:
        return [("responses", f"has {len(responses)} responses, more than data.max_responses={max_responses}")]
    return [p for j, y in enumerate(responses) for p in _check_field({f"responses[{j}]": y}, f"responses[{j}]", fmt)]


def _check_scores(row: dict, fmt: RowFormat) -> list[tuple[str, str]]:
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


def _check_label(row: dict) -> list[tuple[str, str]]:
    label = row.get("label")
    if label is None:
        return [("label", "missing; an unpaired row needs label true (desirable) or false (undesirable)")]
    if not isinstance(label, bool):
        return [("label", f"expected true (desirable) or false (undesirable), got {type(label).__name__} "
                          f"{label!r:.30}")]
    return []


def row_problems(row: Any, fmt: RowFormat, max_responses: int = 8) -> list[tuple[str, str]]:
    """(field, message) for everything wrong with one row; empty when the row is usable."""
    if not isinstance(row, dict):
        fields = ("prompt/completion/label" if fmt.unpaired else "prompt/responses" if fmt.ranked
                  else "prompt/chosen/rejected")
        return [("<row>", f"expected an object with {fields}, got {type(row).__name__}")]
    if fmt.unpaired:
        problems = _check_field(row, "prompt", fmt) + _check_field(row, "completion", fmt) + _check_label(row)
        if row.get("chosen") is not None or row.get("responses") is not None:
            problems.append(("completion", "mixed formats: has chosen/responses, but the dataset is unpaired "
                                           "(decided by its first row)"))
    elif fmt.ranked:
        problems = _check_field(row, "prompt", fmt) + _check_responses(row, fmt, max_responses)
        problems += _check_scores(row, fmt)
    else:
        problems = [p for f in ("chosen", "rejected") for p in _check_field(row, f, fmt)]
        if fmt.implicit_prompt:
            if row.get("prompt") is not None:
                problems.append(("prompt", "mixed formats: has a prompt, but the first row has none (implicit "
                                           "prompt)"))
        else:
            problems += _check_field(row, "prompt", fmt)
    if fmt.conversational:
        problems += _check_extras(row)
    if not problems and fmt.implicit_prompt and fmt.conversational:
        if not extract_prompt(row["chosen"], row["rejected"])[0]:
            problems.append(("chosen", "implicit prompt: chosen and rejected share no leading message (no prompt)"))
    return problems


def required_columns(fmt: RowFormat) -> tuple[str, ...]:
    """The fields every row of `fmt` needs."""
    if fmt.unpaired:
        return ("prompt", "completion", "label")
    if fmt.ranked:
        return ("prompt", "responses") + (("scores",) if fmt.scored else ())
    return ("chosen", "rejected") if fmt.implicit_prompt else ("prompt", "chosen", "rejected")


def _missing_columns(rows: list, fmt: RowFormat, source: str) -> None:
    """One short error when a required column is absent from every row (instead of one line per row)."""
    required = required_columns(fmt)
    dict_rows = [r for r in rows if isinstance(r, dict)]
    for col in required:
        if dict_rows and all(r.get(col) is None for r in dict_rows):
            seen = sorted({k for r in dict_rows[:100] for k in r})
            raise DataError(f"{source}: every row lacks the '{col}' field (fields present: {seen})")


# -------------------------------------------------------------------------------------------------- normalize
def order_and_ranks(scores: list[float]) -> tuple[list[int], list[int]]:
    """(order, ranks): response indices sorted by score, highest first (stable), and the dense rank of each sorted
    response's tie group (0 = best)."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    ranks = [0]
    for prev, cur in zip(order, order[1:]):
        ranks.append(ranks[-1] + (scores[cur] < scores[prev]))
    return order, ranks


def normalize_row(row: dict, fmt: RowFormat) -> dict:
    """One valid row as {prompt, responses (best first), ranks} (module docstring)."""
    if fmt.unpaired:
        out = {"prompt": row["prompt"], "responses": [row["completion"]], "ranks": [0], "label": row["label"]}
    elif not fmt.ranked:
        if fmt.implicit_prompt:
            prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        else:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        out = {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}
    elif fmt.scored:
        order, ranks = order_and_ranks(row["scores"])
        out = {"prompt": row["prompt"], "responses": [row["responses"][j] for j in order], "ranks": ranks}
    else:
        responses = list(row["responses"])
        out = {"prompt": row["prompt"], "responses": responses, "ranks": list(range(len(responses)))}
    if fmt.conversational:
        tools = row.get("tools")
        out["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        out["chat_template_kwargs"] = row.get("chat_template_kwargs") or {}
    return out


def has_duplicates(responses: list) -> bool:
    seen = [json.dumps(r, sort_keys=True) for r in responses]
    return len(set(seen)) < len(seen)


def bad_rows_message(source: str, bad: list[tuple[int, str, str]], n_bad_rows: int, rows_in: int,
                     n_problems: int | None = None) -> str:
    """The one error of all bad rows: the first MAX_LISTED problems of `bad` listed, the rest (`n_problems` in all,
    default len(bad)) counted."""
    n_problems = len(bad) if n_problems is None else n_problems
    lines = [f"  row {i}, field '{field}': {msg}" for i, field, msg in bad[:MAX_LISTED]]
    more = f"\n  ... and {n_problems - MAX_LISTED} more problems" if n_problems > MAX_LISTED else ""
    return (
        f"{source}: {n_bad_rows} bad row(s) of {rows_in}:\n"
        + "\n".join(lines)
        + more
        + "\nFix or remove these rows, or drop them with on_bad_row='skip'."
    )


def normalize_rows(rows: Any, source: str, *, on_bad_row: OnBadRow = "error", max_responses: int = 8,
                   pairs_from_scores: str = "none") -> PreferenceRows:
    """Validate every row, then bring the good ones to {prompt, responses (best first), ranks}; with
    `pairs_from_scores` ranked rows are expanded into K = 2 rows."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_responses < 2:
        raise DataError(f"data.max_responses must be at least 2, got {max_responses}")
    rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    if not rows:
        raise DataError(f"{source}: no rows")
    fmt = detect_format(rows, source)
    _missing_columns(rows, fmt, source)
    good, index, bad, bad_rows, identical, all_tied = [], [], [], 0, 0, 0
    for i, row in enumerate(rows):
        problems = row_problems(row, fmt, max_responses)
        if problems:
            bad_rows += 1
            bad += [(i, field, msg) for field, msg in problems]
            continue
        norm = normalize_row(row, fmt)
        if len(norm["ranks"]) > 1 and norm["ranks"][-1] == 0:
            all_tied += 1
            continue
        identical += has_duplicates(norm["responses"])
        good.append(norm)
        index.append(i)
    if bad and on_bad_row == "error":
        raise DataError(bad_rows_message(source, bad, bad_rows, len(rows)))
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d (on_bad_row='skip')", source, bad_rows, len(rows))
    if all_tied:
        log.warning("%s: dropped %d row(s) whose scores are all equal (no preference to learn)", source, all_tied)
    if not good:
        raise DataError(f"{source}: no usable rows left ({bad_rows} bad, {all_tied} all tied, of {len(rows)})")
    what = "have chosen == rejected" if not fmt.ranked else "have two identical responses"
    if identical:
        log.warning("%s: %d row(s) %s; kept (as TRL does), they teach nothing", source, identical, what)
    out = PreferenceRows(good, index, fmt, source, len(rows), bad_rows, identical, all_tied)
    return out if pairs_from_scores == "none" else expand_pairs(out, pairs_from_scores)


# ---------------------------------------------------------------------------------------------- pair expansion
def _pair_indices(ranks: list[int], mode: str) -> list[tuple[int, int]]:
    if mode == "best_vs_worst":
        return [(0, len(ranks) - 1)]  # normalized rows are sorted and never all tied, so these ranks differ
    if mode == "all_pairs":
        n = len(ranks)
        return [(i, j) for i in range(n) for j in range(i + 1, n) if ranks[i] < ranks[j]]
    raise ValueError(f"pairs_from_scores must be one of {PAIRS_FROM_SCORES[1:]}, got {mode!r}")


def expand_row(row: dict, mode: str) -> list[dict]:
    """The K = 2 rows of one normalized ranked row (`expand_pairs`)."""
    extras = {k: row[k] for k in ("tools", "chat_template_kwargs") if k in row}
    return [{"prompt": row["prompt"], "responses": [row["responses"][a], row["responses"][b]], "ranks": [0, 1],
             **extras} for a, b in _pair_indices(row["ranks"], mode)]


def expand_pairs(prefrows: PreferenceRows, mode: str) -> PreferenceRows:
    """K = 2 rows from ranked rows (`best_vs_worst` or `all_pairs`); each pair's row_index is its source row."""
    rows, index = [], []
    for i, row in zip(prefrows.row_index, prefrows.rows, strict=True):
        pairs = expand_row(row, mode)
        rows += pairs
        index += [i] * len(pairs)
    identical = sum(pair["responses"][0] == pair["responses"][1] for pair in rows)
    log.info("%s: %d ranked row(s) expanded into %d pairs (%s)", prefrows.source, len(prefrows.rows), len(rows), mode)
    return dataclasses.replace(prefrows, rows=rows, row_index=index, rows_identical=identical,
                               pairs_from_scores=mode)


# ---------------------------------------------------------------------------------------------------- unpairing
UNPAIR_BLOCK = 1000  # rows per block of TRL's unpairing (`datasets.Dataset.map(batched=True)`'s default batch)


def unpair_block(block: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """One block of (source row, pair row) unpaired: its chosen responses (label true), then its rejected ones."""
    out = []
    for k, label in ((0, True), (-1, False)):  # the best response is chosen, the worst real one rejected
        for i, row in block:
            extras = {key: row[key] for key in ("tools", "chat_template_kwargs") if key in row}
            out.append((i, {"prompt": row["prompt"], "responses": [row["responses"][k]], "ranks": [0], "label": label,
                            **extras}))
    return out


def unpair_rows(prefrows: PreferenceRows) -> PreferenceRows:
    """Unpaired rows from pair rows, as TRL's `unpair_preference_dataset`: each block of UNPAIR_BLOCK pairs becomes
    its chosen responses (label true) followed by its rejected ones (label false); both keep their source row."""
    if prefrows.fmt.unpaired:
        return prefrows
    rows, index = [], []
    for start in range(0, len(prefrows.rows), UNPAIR_BLOCK):
        block = unpair_block(list(zip(prefrows.row_index[start : start + UNPAIR_BLOCK],
                                      prefrows.rows[start : start + UNPAIR_BLOCK], strict=True)))
        rows += [row for _, row in block]
        index += [i for i, _ in block]
    log.info("%s: %d pair(s) unpaired into %d rows (data.unpair)", prefrows.source, len(prefrows.rows), len(rows))
    return dataclasses.replace(prefrows, rows=rows, row_index=index, rows_identical=0,
                               fmt=dataclasses.replace(prefrows.fmt, unpaired=True))
