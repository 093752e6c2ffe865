"""A source's rows validated, normalized and tokenized as a stream: no list of every row exists at any time.

Two passes over a `sources.RowStream` (each reads the source again, lazily): `scan_rows` validates every row and
counts (the errors, warnings and counts of `formats.normalize_rows`) and hashes the normalized rows for the store's
key (`tokenize.fingerprint`); on a miss `tokenize_stream` tokenizes this process's share of them CHUNK_ROWS at a
time (on worker threads, or processes for many rows on many CPUs: `workers.worker_plan`) and appends each
SHARD_CHUNKS chunks to the token store as one shard. The rows, their order, the key and the store's batches are
those of the in-memory path (`tokenize_rows` on `normalize_rows`, then `unpair_rows`). Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from dpojax import paths
from dpojax.data import encoding, formats, store, workers
from dpojax.data import tokenize as tok_lib
from dpojax.data.formats import (
    MAX_LISTED,
    ON_BAD_ROW,
    PreferenceRows,
    bad_rows_message,
    detect_format,
    expand_row,
    has_duplicates,
    normalize_row,
    required_columns,
    row_problems,
    unpair_block,
)
from dpojax.data.tokenize import TokenizedData
from dpojax.errors import DataError

log = logging.getLogger(__name__)

SHARD_CHUNKS = 8  # tokenized chunks of CHUNK_ROWS rows per shard of the store (what a process holds at a time)


@dataclasses.dataclass(frozen=True)
class Scan:
    """What the validating pass over a source found: the source's row format and the options that shape its rows,
    `head` (a PreferenceRows without rows: the format after unpairing and the counts the key hashes), how many
    rows there are to tokenize (`n_rows`) and their digest (`rows_hash`)."""

    fmt: Any  # formats.RowFormat of the source's rows
    pairs_from_scores: str
    unpair_pairs: bool  # pair rows unrolled into unpaired rows (data.unpair)
    max_responses: int
    head: PreferenceRows
    n_rows: int
    rows_hash: str = ""  # `tokenize.rows_digest` of the rows to tokenize (the row part of the store's key)


def _source_rows(stream: Iterable, scan: Scan) -> Iterator[tuple[int, dict]]:
    """(source index, normalized row) of every valid row that states a preference, expanded into pairs."""
    for i, row in enumerate(stream):
        if row_problems(row, scan.fmt, scan.max_responses):
            continue
        norm = normalize_row(row, scan.fmt)
        if len(norm["ranks"]) > 1 and norm["ranks"][-1] == 0:
            continue
        if scan.pairs_from_scores == "none":
            yield i, norm
        else:
            yield from ((i, pair) for pair in expand_row(norm, scan.pairs_from_scores))


def final_rows(stream: Iterable, scan: Scan) -> Iterator[tuple[int, dict]]:
    """(source index, row) of every row to tokenize, in order: `_source_rows`, unpaired in blocks as `unpair_rows`."""
    return _unpaired(_source_rows(stream, scan), scan)


def _unpaired(rows: Iterator[tuple[int, dict]], scan: Scan) -> Iterator[tuple[int, dict]]:
    if not scan.unpair_pairs:
        yield from rows
        return
    while block := list(itertools.islice(rows, formats.UNPAIR_BLOCK)):
        yield from unpair_block(block)


@dataclasses.dataclass
class _Tally:
    """The counts of the validating pass (mutable while it runs)."""

    rows_in: int = 0
    bad_rows: int = 0
    problems: int = 0
    listed: list = dataclasses.field(default_factory=list)  # the first MAX_LISTED problems
    all_tied: int = 0
    good: int = 0
    identical: int = 0  # rows with two identical responses, before any expansion (the warning's count)
    pairs_identical: int = 0  # expanded pairs with chosen == rejected
    expanded: int = 0  # rows after expansion into pairs
    dicts: int = 0  # rows that are dicts
    present: set = dataclasses.field(default_factory=set)  # required fields some row has
    seen: set = dataclasses.field(default_factory=set)  # the fields of the first 100 dict rows

    def add(self, i: int, row: Any, scan: Scan, required: tuple[str, ...]) -> list[dict]:
        """Count one source row; returns its normalized rows to tokenize (expanded into pairs), if any."""
        self.rows_in += 1
        if isinstance(row, dict):
            self.dicts += 1
            self.present.update(c for c in required if row.get(c) is not None)
            if self.dicts <= 100:
                self.seen.update(row)
        problems = row_problems(row, scan.fmt, scan.max_responses)
        if problems:
            self.bad_rows += 1
            self.problems += len(problems)
            self.listed += [(i, field, msg) for field, msg in problems][: MAX_LISTED - len(self.listed)]
            return []
        norm = normalize_row(row, scan.fmt)
        if len(norm["ranks"]) > 1 and norm["ranks"][-1] == 0:
            self.all_tied += 1
            return []
        self.good += 1
        self.identical += has_duplicates(norm["responses"])
        if scan.pairs_from_scores == "none":
            self.expanded += 1
            return [norm]
        pairs = expand_row(norm, scan.pairs_from_scores)
        self.expanded += len(pairs)
        self.pairs_identical += sum(p["responses"][0] == p["responses"][1] for p in pairs)
        return pairs


def scan_rows(stream: Iterable, source: str, *, on_bad_row: str = "error", max_responses: int = 8,
              pairs_from_scores: str = "none", unpair: bool = False) -> Scan:
    """One pass over `stream` that checks every row and counts, with `formats.normalize_rows`' errors (every bad
    row in one DataError naming its row and field), warnings and counts; then `unpair_rows`' format and counts.
    The same pass hashes the rows to tokenize (`Scan.rows_hash`)."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_responses < 2:
        raise DataError(f"data.max_responses must be at least 2, got {max_responses}")
    if next(iter(stream), _NONE) is _NONE:
        raise DataError(f"{source}: no rows")
    fmt = detect_format(stream, source)
    scan = Scan(fmt, pairs_from_scores, unpair and not fmt.unpaired, max_responses, None, 0)
    tally, required = _Tally(), required_columns(fmt)
    rows_hash = tok_lib.rows_digest(_unpaired(((i, r) for i, row in enumerate(stream)
                                               for r in tally.add(i, row, scan, required)), scan))
    missing = [c for c in required if c not in tally.present]
    if missing and tally.dicts:
        raise DataError(f"{source}: every row lacks the '{missing[0]}' field (fields present: {sorted(tally.seen)})")
    if tally.bad_rows and on_bad_row == "error":
        raise DataError(bad_rows_message(source, tally.listed, tally.bad_rows, tally.rows_in, tally.problems))
    _warn(source, tally, fmt)
    identical = tally.identical if pairs_from_scores == "none" else tally.pairs_identical
    head = PreferenceRows([], [], fmt, source, tally.rows_in, tally.bad_rows, identical, tally.all_tied,
                          pairs_from_scores)
    n_rows = tally.expanded
    if pairs_from_scores != "none":
        log.info("%s: %d ranked row(s) expanded into %d pairs (%s)", source, tally.good, n_rows, pairs_from_scores)
    if scan.unpair_pairs:
        log.info("%s: %d pair(s) unpaired into %d rows (data.unpair)", source, n_rows, 2 * n_rows)
        head = dataclasses.replace(head, rows_identical=0, fmt=dataclasses.replace(fmt, unpaired=True))
        n_rows *= 2
    return dataclasses.replace(scan, head=head, n_rows=n_rows, rows_hash=rows_hash)


_NONE = object()


def _warn(source: str, tally: _Tally, fmt: Any) -> None:
    if tally.bad_rows:
        log.warning("%s: skipped %d bad row(s) of %d (on_bad_row='skip')", source, tally.bad_rows, tally.rows_in)
    if tally.all_tied:
        log.warning("%s: dropped %d row(s) whose scores are all equal (no preference to learn)", source,
                    tally.all_tied)
    if not tally.good:
        raise DataError(f"{source}: no usable rows left ({tally.bad_rows} bad, {tally.all_tied} all tied, of "
                        f"{tally.rows_in})")
    what = "have chosen == rejected" if not fmt.ranked else "have two identical responses"
    if tally.identical:
        log.warning("%s: %d row(s) %s; kept (as TRL does), they teach nothing", source, tally.identical, what)


# ------------------------------------------------------------------------------------------------ tokenizing
def _chunks(rows: Iterator[tuple[int, dict]], head: PreferenceRows, size: int) -> Iterator[PreferenceRows]:
    while block := list(itertools.islice(rows, size)):
        yield dataclasses.replace(head, rows=[r for _, r in block], row_index=[i for i, _ in block])


def _ordered(fn: Callable, items: Iterable, pool: concurrent.futures.Executor | None, window: int) -> Iterator:
    """fn over items, results in order; with a pool at most `window` items in flight (the rest not yet read)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def shard_counts(n_rows: int, hosts: store.Hosts) -> list[int]:
    """Shards each process writes: its share of the rows in SHARD_CHUNKS * CHUNK_ROWS rows each (at least one)."""
    per_shard = SHARD_CHUNKS * tok_lib.CHUNK_ROWS
    shares = [tok_lib.row_share(n_rows, i, hosts.count) for i in range(hosts.count)]
    return [max(1, -(-(hi - lo) // per_shard)) for lo, hi in shares]


def tokenize_stream(stream: Iterable, scan: Scan, tokenizer: Any, *, max_length: int | None,
                    truncation_mode: str = "keep_start", cache_dir: str | os.PathLike | None = None,
                    num_proc: int | None = None, hosts: store.Hosts | None = None) -> TokenizedData:
    """`tokenize.tokenize_rows` of the rows `scan` found in `stream`, streamed (module docstring): the same key,
    store and batches."""
    tok_lib.check_settings(max_length, truncation_mode)
    hosts = hosts or store.ONE_HOST
    head = scan.head
    key = tok_lib.fingerprint(head, tokenizer, max_length, truncation_mode, rows_hash=scan.rows_hash)
    folder = paths.path(cache_dir) / f"preferences-{key}" if cache_dir is not None else None
    cached = tok_lib.cached_store(head.source, key, folder, hosts)
    if cached is not None:
        return cached
    tok_lib.pad_token_id(tokenizer)  # a tokenizer without a pad or EOS token fails before any row is tokenized
    lo, hi = tok_lib.row_share(scan.n_rows, hosts.index, hosts.count)
    log.info("%s: tokenizing rows %d..%d of %d on process %d of %d (%s), streamed", head.source, lo, hi,
             scan.n_rows, hosts.index, hosts.count, hosts.name)
    counts = shard_counts(scan.n_rows, hosts)
    first = sum(counts[: hosts.index])
    n_workers, processes = workers.worker_plan(num_proc, hi - lo, tok_lib.CHUNK_ROWS)
    work = functools.partial(tok_lib.tokenize_chunk, tokenizer, max_length=max_length,
                             truncation_mode=truncation_mode)
    chunks = _chunks(itertools.islice(final_rows(stream, scan), lo, hi), head, tok_lib.CHUNK_ROWS)
    shards, dropped, diverged = [], 0, None
    encoding.prepare(tokenizer)  # the tokenizer's call state is set before threads share it
    with _pool(n_workers) if processes else workers.pool(n_workers, False) as pool:
        done = _ordered(work, chunks, pool, 2 * max(1, n_workers))
        for s in range(counts[hosts.index]):
            parts = list(itertools.islice(done, SHARD_CHUNKS))
            dropped += sum(c.dropped for c in parts)
            diverged = next((c.diverged for c in parts if c.diverged is not None), diverged)
            arrays = store.join_shards([c.arrays for c in parts]) if parts else _empty(head)
            if folder is None:
                shards.append(arrays)
            else:
                store.write_shard(folder / store.shard_name(first + s, sum(counts)), arrays)
            del parts, arrays
    summary = tok_lib.Chunk({}, dropped, diverged)
    return tok_lib.report(tok_lib.finish_store(head, scan.n_rows, shards, sum(counts), summary, tokenizer, key,
                                                folder, max_length, truncation_mode, hosts))


def _empty(head: PreferenceRows) -> dict[str, np.ndarray]:
    extra = {"labels": np.zeros(0, bool)} if head.fmt.unpaired else {}
    return store.shard_arrays([], [], [], [], **extra)


def _pool(n_workers: int) -> contextlib.AbstractContextManager[concurrent.futures.Executor | None]:
    """`n_workers` spawned tokenizer processes (`workers.pool`)."""
    return workers.pool(n_workers, True)
