"""The tokenized-data store: flat numpy columns with offsets, one folder per shard, memory-mapped and read lazily.

A shard holds M rows and their R responses (all rows' responses, row by row, best first) as columns:
  prompt_tokens    int32, every prompt's tokens back to back; prompt_offsets int64 [M + 1] cut them
  response_tokens  int32, every response's tokens back to back; response_offsets int64 [R + 1] cut them
  row_responses    int64 [M + 1]: row m's responses are responses row_responses[m] .. row_responses[m + 1] - 1
  ranks            int32 [R]: the tie-group rank of each response (0 = best)
  row_index        int64 [M]: each row's index in its source
and any per-row column (`ROW_COLUMNS`, one value per row, e.g. a label) as one more [M] array. Each column is one
.npy file, read with `np.load(mmap_mode="r")`: the pages of a column are read when a batch touches them, so a
process holds no per-row Python object, only the views below (`Ragged`, `RaggedRows`, `Indexed`: sequences whose
item m is a numpy view) and whatever per-row numbers it computes from the offsets.

A store is a folder `<cache>/<name>/` of shard folders `shard-00000-of-00002/` plus `meta.json`, which is written
last (by one process, after every shard is complete): a store without `meta.json` is incomplete and never read.
Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpojax import paths

log = logging.getLogger(__name__)

COLUMNS = ("prompt_tokens", "prompt_offsets", "response_tokens", "response_offsets", "row_responses", "ranks",
           "row_index")
ROW_COLUMNS = ("labels",)  # optional per-row columns ([M] arrays) a shard may carry: unpaired rows' labels (bool)
META = "meta.json"
SCAN_CHUNK = 1 << 24  # tokens per step of a scan over a flat column


# ------------------------------------------------------------------------------------------------------- hosts
def _alone(text: str) -> list[str]:
    return [text]


def _no_barrier(name: str) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Hosts:
    """The processes of a job as the data layer sees them: this one's index, their count, this host's name, and two
    collectives the trainer supplies (`allgather`: every process's string, in process order; `barrier`)."""

    index: int = 0
    count: int = 1
    name: str = dataclasses.field(default_factory=socket.gethostname)
    allgather: Callable[[str], list[str]] = _alone
    barrier: Callable[[str], None] = _no_barrier


ONE_HOST = Hosts()


# ------------------------------------------------------------------------------------------------------- views
def _offsets_of(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


class Ragged(Sequence):
    """Item m of pieces [(flat, offsets), ...] (their rows back to back): a view flat[offsets[m]:offsets[m + 1]]."""

    def __init__(self, pieces: list[tuple[np.ndarray, np.ndarray]], maxima: list[int] | None = None):
        self.pieces = pieces
        self.starts = _offsets_of([len(o) - 1 for _, o in pieces])
        self.maxima = maxima  # the largest value of each piece, when known (a scan skips pieces below its bound)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, m: int) -> tuple[int, int]:
        m = int(m)
        if m < 0:
            m += len(self)
        if not 0 <= m < len(self):
            raise IndexError(m)
        s = int(np.searchsorted(self.starts, m, side="right")) - 1
        return s, m - int(self.starts[s])

    def __getitem__(self, m):
        if isinstance(m, slice):
            return [self[i] for i in range(*m.indices(len(self)))]
        s, i = self._locate(m)
        flat, offsets = self.pieces[s]
        return flat[int(offsets[i]) : int(offsets[i + 1])]

    def __iter__(self):
        for flat, offsets in self.pieces:
            for i in range(len(offsets) - 1):
                yield flat[int(offsets[i]) : int(offsets[i + 1])]

    def lengths(self) -> np.ndarray:
        """int64 [len]: the length of every item, from the offsets alone."""
        if not self.pieces:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(np.asarray(o)) for _, o in self.pieces]).astype(np.int64)

    def first_at_least(self, threshold: int) -> int:
        """The index of the first item holding a value >= threshold, or -1 (a chunked scan of the flat columns)."""
        for s, (flat, offsets) in enumerate(self.pieces):
            if self.maxima is not None and self.maxima[s] < threshold:
                continue  # known without reading the piece (its pages stay out of memory)
            for lo in range(0, len(flat), SCAN_CHUNK):
                hits = np.flatnonzero(np.asarray(flat[lo : lo + SCAN_CHUNK]) >= threshold)
                if len(hits):
                    return int(self.starts[s]) + int(np.searchsorted(offsets, lo + int(hits[0]), side="right")) - 1
        return -1


class RaggedRows(Sequence):
    """Item m: the list of row m's responses (views), cut from `responses` by the row offsets of each piece."""

    def __init__(self, responses: Ragged, row_offsets: list[np.ndarray]):
        self.responses = responses
        self.row_offsets = row_offsets  # one [M_s + 1] array per piece, into that piece's responses
        self.starts = _offsets_of([len(o) - 1 for o in row_offsets])
        self.response_starts = responses.starts

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, m):
        if isinstance(m, slice):
            return [self[i] for i in range(*m.indices(len(self)))]
        m = int(m) + (len(self) if int(m) < 0 else 0)
        if not 0 <= m < len(self):
            raise IndexError(m)
        s = int(np.searchsorted(self.starts, m, side="right")) - 1
        i, base = m - int(self.starts[s]), int(self.response_starts[s])
        lo, hi = int(self.row_offsets[s][i]), int(self.row_offsets[s][i + 1])
        return [self.responses[base + j] for j in range(lo, hi)]

    def __iter__(self):
        return (self[m] for m in range(len(self)))

    def counts(self) -> np.ndarray:
        """int64 [len]: responses of every row."""
        if not self.row_offsets:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(np.asarray(o)) for o in self.row_offsets]).astype(np.int64)


class Indexed(Sequence):
    """Item m of `base` is base[index[m]]: a mixture's rows, each one row of one source's store."""

    def __init__(self, base: Sequence, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, m):
        if isinstance(m, slice):
            return [self[i] for i in range(*m.indices(len(self)))]
        return self.base[int(self.index[m])]

    def __iter__(self):
        return (self.base[int(i)] for i in self.index)

    def counts(self) -> np.ndarray:
        """Responses of every row."""
        if hasattr(self.base, "counts"):
            return self.base.counts()[self.index]
        return np.asarray([len(self.base[int(i)]) for i in self.index], np.int64)


def concat(views: list[Sequence]) -> Sequence:
    """One view of several views' items back to back (the sources of a mixture)."""
    if all(isinstance(v, Ragged) for v in views):
        maxima = None if any(v.maxima is None for v in views) else [m for v in views for m in v.maxima]
        return Ragged([p for v in views for p in v.pieces], maxima)
    if all(isinstance(v, RaggedRows) for v in views):
        return RaggedRows(concat([v.responses for v in views]), [o for v in views for o in v.row_offsets])
    raise TypeError("concat: views of one kind (Ragged or RaggedRows) only")


# --------------------------------------------------------------------------------------------------- shard I/O
def shard_arrays(prompts: list[np.ndarray], responses: list[list[np.ndarray]], ranks: list[np.ndarray],
                 row_index: Sequence[int], **row_columns: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of one shard from ragged per-row arrays (what the per-row tokenizer returns)."""
    flat_responses = [r for rs in responses for r in rs]
    out = {
        "prompt_tokens": np.concatenate(prompts).astype(np.int32) if prompts else np.zeros(0, np.int32),
        "prompt_offsets": _offsets_of([len(p) for p in prompts]),
        "response_tokens": (np.concatenate(flat_responses).astype(np.int32) if flat_responses
                            else np.zeros(0, np.int32)),
        "response_offsets": _offsets_of([len(r) for r in flat_responses]),
        "row_responses": _offsets_of([len(rs) for rs in responses]),
        "ranks": np.concatenate(ranks).astype(np.int32) if ranks else np.zeros(0, np.int32),
        "row_index": np.asarray(row_index, np.int64),
    }
    out.update({k: np.asarray(v) for k, v in row_columns.items()})
    return with_token_max(out)


def with_token_max(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` plus token_max: int64 [2], the largest prompt and response token id (-1 when none)."""
    top = [int(arrays[c].max()) if len(arrays[c]) else -1 for c in ("prompt_tokens", "response_tokens")]
    return {**arrays, "token_max": np.asarray(top, np.int64)}


def join_shards(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The columns of several shards' rows back to back, as one shard (offsets rebased)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for flat, offsets in (("prompt_tokens", "prompt_offsets"), ("response_tokens", "response_offsets"),
                          ("ranks", "row_responses")):
        out[flat] = np.concatenate([p[flat] for p in parts])
        base = np.cumsum([0] + [len(p[flat]) for p in parts[:-1]])  # ranks: one per response, as row_responses
        out[offsets] = np.concatenate([parts[0][offsets][:1]] + [p[offsets][1:] + b for p, b in zip(parts, base)])
    out["row_index"] = np.concatenate([p["row_index"] for p in parts])
    for name in parts[0].keys() - set(COLUMNS) - {"token_max"}:
        out[name] = np.concatenate([p[name] for p in parts])
    return with_token_max(out)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def write_shard(folder, arrays: dict[str, np.ndarray]) -> None:
    """Each column as one .npy file under `folder` (local or a URL), each written whole and atomically."""
    folder = paths.path(folder)
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        paths.write_bytes(folder / f"{name}.npy", buffer.getvalue())


def read_shard(folder) -> dict[str, np.ndarray]:
    """The columns of a shard, memory-mapped (a URL is mirrored locally first, `paths.local_copy`)."""
    local = paths.local_copy(folder)
    out = {}
    for name in os.listdir(local):
        if name.endswith(".npy"):
            out[name[:-4]] = np.load(local / name, mmap_mode="r", allow_pickle=False).view(np.ndarray)
    missing = [c for c in COLUMNS if c not in out]
    if missing:
        raise ValueError(f"shard {folder} lacks the columns {missing}")
    return out


def write_meta(store, meta: dict[str, Any]) -> None:
    paths.write_text(paths.path(store) / META, json.dumps(meta, indent=1, sort_keys=True))


def read_meta(store) -> dict[str, Any] | None:
    """The store's meta.json, or None when the store is absent or incomplete."""
    p = paths.path(store) / META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable token store %s: %s", store, e)
        return None


def views(shards: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """prompt_ids, response_ids, ranks (views) and row_index (an array) over shards' rows back to back, plus every
    per-row column present in all shards."""
    known = all("token_max" in s for s in shards)
    responses = Ragged([(s["response_tokens"], s["response_offsets"]) for s in shards],
                       [int(s["token_max"][1]) for s in shards] if known else None)
    out = {
        "prompt_ids": Ragged([(s["prompt_tokens"], s["prompt_offsets"]) for s in shards],
                             [int(s["token_max"][0]) for s in shards] if known else None),
        "response_ids": RaggedRows(responses, [s["row_responses"] for s in shards]),
        "ranks": Ragged([(s["ranks"], s["row_responses"]) for s in shards]),
        "row_index": (np.concatenate([np.asarray(s["row_index"]) for s in shards]) if len(shards) > 1
                      else shards[0]["row_index"]),
    }
    for name in ROW_COLUMNS:
        if shards and all(name in s for s in shards):
            out[name] = np.concatenate([np.asarray(s[name]) for s in shards])
    return out
