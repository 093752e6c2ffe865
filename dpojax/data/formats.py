"""Load preference rows and bring them to one normalized shape: {prompt, chosen, rejected}.

Three input formats, with TRL 1.16's meaning (`trl/data_utils.py`):
  standard         prompt, chosen, rejected are strings; the text fed to the model is prompt + chosen.
  conversational   each field is a list of {"role", "content"} messages.
  implicit prompt  only chosen and rejected (strings or messages); the prompt is their common prefix, cut the way
                   TRL's `extract_prompt` cuts it (see `extract_prompt` below, quirks included).

Every row is checked before anything is tokenized, and all bad rows are reported together in one DataError that names
the source, the row index and the field. `on_bad_row="skip"` drops them instead and counts them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from dpojax.errors import DataError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LISTED = 20  # bad rows spelled out in one error message; the rest are counted
OnBadRow = Literal["error", "skip"]


# ----------------------------------------------------------------------------------------------------------- loading
def load_rows(spec: str, split: str = "train") -> tuple[list[dict] | Any, str]:
    """Rows from a local .jsonl/.json/.parquet/.csv file, a local dataset folder, or a Hugging Face hub dataset id.

    Returns (rows, source_name): a list of dicts (or a `datasets.Dataset` for folders and hub ids) and the name that
    error messages use for this source.
    """
    path = Path(os.path.expanduser(str(spec)))
    looks_local = path.suffix.lower() in LOCAL_SUFFIXES or str(spec).startswith((".", "/", "~"))
    if path.is_file() or (looks_local and not path.is_dir()):
        if not path.is_file():
            raise DataError(f"{spec}: data file not found")
        return _load_file(path), str(spec)
    import datasets  # heavy import, only when needed

    source = str(spec) if path.is_dir() else f"{spec}[{split}]"
    try:
        if path.is_dir() and (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(str(spec), split=split)
    except Exception as e:  # noqa: BLE001 - any loader failure is a data error for the user
        raise DataError(f"{source}: could not load the dataset: {type(e).__name__}: {e}") from e
    return data, source


def _load_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no} (row {len(rows)}): invalid JSON: {e}") from e
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines saved with a .json suffix
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:  # column-oriented: {"prompt": [...], "chosen": [...], ...}
            keys = list(data)
            return [dict(zip(keys, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
    raise DataError(f"{path}: expected a JSON list of rows or a dict of equal-length columns")


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


# -------------------------------------------------------------------------------------------------- validation
@dataclasses.dataclass(frozen=True)
class RowFormat:
    conversational: bool  # fields are lists of {"role", "content"} messages
    implicit_prompt: bool  # no prompt column: the prompt is extracted from chosen/rejected

    @property
    def name(self) -> str:
        base = "conversational" if self.conversational else "standard"
        return f"implicit-prompt {base}" if self.implicit_prompt else base


@dataclasses.dataclass(frozen=True)
class PreferenceRows:
    """Validated rows, each {"prompt", "chosen", "rejected"} (+ "tools", "chat_template_kwargs" if given)."""

    rows: list[dict]
    row_index: list[int]  # index of each kept row in the input
    fmt: RowFormat
    source: str
    rows_in: int  # rows read from the source
    rows_skipped_bad: int  # invalid rows dropped under on_bad_row="skip"
    rows_identical: int  # kept rows whose chosen == rejected (kept, as TRL does)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "messages"
    return "none" if value is None else "bad"


def detect_format(rows: list[dict], source: str) -> RowFormat:
    """The format of the dataset, decided (like TRL) by its first row that has a usable `chosen` field."""
    for row in rows:
        if isinstance(row, dict) and _kind(row.get("chosen")) in ("text", "messages"):
            return RowFormat(_kind(row["chosen"]) == "messages", row.get("prompt") is None)
    raise DataError(f"{source}: no row has a 'chosen' field that is a string or a list of messages")


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


def row_problems(row: Any, fmt: RowFormat) -> list[tuple[str, str]]:
    """(field, message) for everything wrong with one row; empty when the row is usable."""
    if not isinstance(row, dict):
        return [("<row>", f"expected an object with prompt/chosen/rejected, got {type(row).__name__}")]
    problems = [p for f in ("chosen", "rejected") for p in _check_field(row, f, fmt)]
    if fmt.implicit_prompt:
        if row.get("prompt") is not None:
            problems.append(("prompt", "mixed formats: has a prompt, but the first row has none (implicit prompt)"))
    else:
        problems += _check_field(row, "prompt", fmt)
    if fmt.conversational:
        problems += _check_extras(row)
    if not problems and fmt.implicit_prompt and fmt.conversational:
        if not extract_prompt(row["chosen"], row["rejected"])[0]:
            problems.append(("chosen", "implicit prompt: chosen and rejected share no leading message (no prompt)"))
    return problems


def _normalize(row: dict, fmt: RowFormat) -> dict:
    if fmt.implicit_prompt:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    else:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt.conversational:
        tools = row.get("tools")
        out["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        out["chat_template_kwargs"] = row.get("chat_template_kwargs") or {}
    return out


def _bad_rows_message(source: str, bad: list[tuple[int, str, str]], n_bad_rows: int, rows_in: int) -> str:
    lines = [f"  row {i}, field '{field}': {msg}" for i, field, msg in bad[:MAX_LISTED]]
    more = f"\n  ... and {len(bad) - MAX_LISTED} more problems" if len(bad) > MAX_LISTED else ""
    return (
        f"{source}: {n_bad_rows} bad row(s) of {rows_in}:\n"
        + "\n".join(lines)
        + more
        + "\nFix or remove these rows, or drop them with on_bad_row='skip'."
    )


def _missing_columns(rows: list, fmt: RowFormat, source: str) -> None:
    """One short error when a required column is absent from every row (instead of one line per row)."""
    required = ("chosen", "rejected") if fmt.implicit_prompt else ("prompt", "chosen", "rejected")
    dict_rows = [r for r in rows if isinstance(r, dict)]
    for col in required:
        if dict_rows and all(r.get(col) is None for r in dict_rows):
            seen = sorted({k for r in dict_rows[:100] for k in r})
            raise DataError(f"{source}: every row lacks the '{col}' field (fields present: {seen})")


def normalize_rows(rows: Any, source: str, *, on_bad_row: OnBadRow = "error") -> PreferenceRows:
    """Validate every row, then bring the good ones to {prompt, chosen, rejected} (prompt extracted if implicit)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    if not rows:
        raise DataError(f"{source}: no rows")
    fmt = detect_format(rows, source)
    _missing_columns(rows, fmt, source)
    good, index, bad, bad_rows, identical = [], [], [], 0, 0
    for i, row in enumerate(rows):
        problems = row_problems(row, fmt)
        if problems:
            bad_rows += 1
            bad += [(i, field, msg) for field, msg in problems]
            continue
        identical += row["chosen"] == row["rejected"]
        good.append(_normalize(row, fmt))
        index.append(i)
    if bad and on_bad_row == "error":
        raise DataError(_bad_rows_message(source, bad, bad_rows, len(rows)))
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d (on_bad_row='skip')", source, bad_rows, len(rows))
    if not good:
        raise DataError(f"{source}: no usable rows left ({bad_rows} bad of {len(rows)})")
    if identical:
        log.warning("%s: %d row(s) have chosen == rejected; kept (as TRL does), they teach nothing", source, identical)
    return PreferenceRows(good, index, fmt, source, len(rows), bad_rows, identical)
