"""A mixture of data sets with weights: one TokenizedData whose rows are drawn from each source in proportion.

An epoch of the mixture has as many rows as all sources together (M = sum of M_i). Source i gets
c_i = round(M * w_i / sum(w)) of them (largest remainders, ties to the earlier source): when c_i <= M_i a
seeded subset of its rows (the first c_i of a permutation), when larger every row once per full pass and a seeded
subset for the rest. The mixture's rows are a fixed function of the sources' fingerprints, the weights and the seed,
so `train_batches` shuffles them per epoch as for one data set: the order is deterministic, a resumed run gets the
same batches, and every host count builds the same global batches. Rows are views into the sources' token stores
(`store.Indexed`); nothing is copied. Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

from dpojax.data import store
from dpojax.data.tokenize import DataStats, TokenizedData
from dpojax.errors import DataError


def check_weights(weights: Sequence[float], names: Sequence[str]) -> None:
    """DataError for a negative or non-finite weight, or when every weight is zero."""
    for w, name in zip(weights, names, strict=True):
        if not math.isfinite(w) or w < 0:
            raise DataError(f"data.train: the weight of {name} is {w}; a mixture weight must be a finite number >= 0")
    if not any(w > 0 for w in weights):
        raise DataError(f"data.train: every mixture weight is 0 ({list(weights)}); give at least one source a "
                        "positive weight")


def source_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Rows of each source in one mixture epoch (largest-remainder rounding; they add up to sum(sizes))."""
    total, wsum = sum(sizes), float(sum(weights))
    exact = [total * w / wsum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def source_rows(n_rows: int, count: int, seed: int, source: int) -> np.ndarray:
    """`count` row indices of a source of n_rows: whole passes, then a seeded subset (each pass in order)."""
    full, rest = divmod(count, n_rows)
    pick = np.random.default_rng([seed, source, 0x6D6978]).permutation(n_rows)[:rest]
    return np.concatenate([np.tile(np.arange(n_rows), full), np.sort(pick)]).astype(np.int64)


def _concat(fields: list[Sequence]) -> Sequence:
    if all(isinstance(f, (store.Ragged, store.RaggedRows)) for f in fields):
        return store.concat(fields)
    return [item for f in fields for item in f]


def mix(datas: Sequence[TokenizedData], weights: Sequence[float], seed: int) -> TokenizedData:
    """The mixture of `datas` with `weights` (module docstring); one source with any positive weight is itself."""
    check_weights(weights, [d.source for d in datas])
    if len(datas) == 1:
        return datas[0]
    if len({d.pad_token_id for d in datas}) > 1:
        raise DataError("data.train: the sources of a mixture must be tokenized with one tokenizer")
    counts = source_counts([len(d) for d in datas], weights)
    starts = np.cumsum([0] + [len(d) for d in datas])
    index = np.concatenate([starts[i] + source_rows(len(d), c, seed, i) for i, (d, c) in
                            enumerate(zip(datas, counts, strict=True))])
    row_index = np.concatenate([np.asarray(d.row_index) for d in datas])[index]
    key = json.dumps({"sources": [d.fingerprint for d in datas], "weights": list(map(float, weights)),
                      "seed": seed, "counts": counts})
    stats = DataStats(*(sum(getattr(d.stats, f.name) for d in datas) for f in dataclasses.fields(DataStats)))
    stats = dataclasses.replace(stats, rows_out=len(index))
    first = datas[0]
    per_row = {}
    for name in ("labels", "margins"):  # per-row columns: kept when every source has them
        if all(getattr(d, name) is not None for d in datas):
            per_row[name] = np.concatenate([np.asarray(getattr(d, name)) for d in datas])[index]
        elif any(getattr(d, name) is not None for d in datas):
            raise DataError(f"data.train: some sources of the mixture have {name} and others not; mix sources of "
                            "one kind (all unpaired, or all pairs/rankings)")
    return TokenizedData(
        store.Indexed(_concat([d.prompt_ids for d in datas]), index),
        store.Indexed(_concat([d.response_ids for d in datas]), index),
        store.Indexed(_concat([d.ranks for d in datas]), index),
        row_index, first.pad_token_id, first.max_length, first.truncation_mode,
        " + ".join(dict.fromkeys(d.format_name for d in datas)),
        "mixture(" + ", ".join(f"{d.source} x{w:g}" for d, w in zip(datas, weights, strict=True)) + ")",
        stats, hashlib.sha256(key.encode()).hexdigest()[:40], all(d.from_cache for d in datas), **per_row,
    )
