"""One call from a data spec (file, folder or hub id) to tokenized, cached preference rows.

The token store of a source is found without reading its rows: a small record `source-<content>-<settings>.json`
in the cache folder names the store made from that content (a hash of the file's bytes, or of the `datasets`
fingerprint) with those settings (tokenizer, max_length, ...). On a hit no row is parsed; on a miss the rows are
read, validated and tokenized as a stream (`streaming`: lazy passes over the source, no list of its rows; split
over the job's processes) and the record is written. A record of the same content with other settings is never
used; the log says what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

from dpojax import paths
from dpojax.data.formats import OnBadRow, is_ranked, is_unpaired
from dpojax.data.sources import RowStream, iter_dataset, load_rows, row_stream, source_digest
from dpojax.data.store import Hosts
from dpojax.data.streaming import scan_rows, tokenize_stream
from dpojax.data.tokenize import CACHE_VERSION, STORE_LAYOUT, TokenizedData, open_store, tokenizer_fingerprint
from dpojax.errors import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where one data set's rows are: a file, a saved folder or a hub id, with its split and hub arguments."""

    path: str
    split: str = "train"
    name: str | None = None  # hub config name
    revision: str | None = None
    data_files: tuple[str, ...] = ()


def load_preferences(
    spec: str | SourceSpec,
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
    num_proc: int | None = None,
    hosts: Hosts | None = None,
) -> TokenizedData:
    """Load `spec`, validate and normalize its rows (any format), and tokenize them like TRL 1.16 (reusing
    `cache_dir`). Every process of a job calls this (`hosts`): each row is tokenized by one of them.

    Pair data trains pair losses. Ranked or scored data trains a K-wise loss (`ranking_loss`, e.g. plackett_luce)
    on whole rankings, or a pair loss once `pairs_from_scores` ("best_vs_worst" | "all_pairs") has expanded it into
    pairs. `ranking_loss` None: the loss takes pairs and whole rankings alike (a reward model: Bradley-Terry,
    Plackett-Luce); ranked rows stay whole unless `pairs_from_scores` expands them. Unpaired rows (prompt,
    completion, label) train an unpaired loss (`unpaired_loss`: KTO), and so do pairs that `unpair` unrolls into
    unpaired rows (TRL's `unpair_preference_dataset`). Any other combination is a DataError that says what to change.
    """
    src = spec if isinstance(spec, SourceSpec) else SourceSpec(str(spec), split)
    settings = {"v": CACHE_VERSION, "layout": STORE_LAYOUT, "split": src.split, "name": src.name,
                "revision": src.revision, "data_files": list(src.data_files), "max_length": max_length,
                "truncation_mode": truncation_mode, "on_bad_row": on_bad_row, "max_responses": max_responses,
                "pairs_from_scores": pairs_from_scores, "ranking_loss": ranking_loss, "unpaired_loss": unpaired_loss,
                "unpair": unpair, "tokenizer": tokenizer_fingerprint(tokenizer)}
    hosts = hosts or Hosts()
    rows, digest = _read_everywhere(src, cache_dir, hosts)
    record = _record_path(cache_dir, digest, settings) if digest is not None else None
    found = _from_record(record, settings, hosts)
    if found is not None:
        return dataclasses.replace(found, source=_source_name(src))
    stream = row_stream(src.path, src.split, name=src.name, revision=src.revision,
                        data_files=list(src.data_files) or None) if rows is None else RowStream(
                            "", lambda: iter_dataset(rows), dataset=rows)
    source = _source_name(src)
    probe = stream.dataset if stream.dataset is not None else stream  # a data set's columns, or its first row
    _check_unpaired(source, is_unpaired(probe), unpaired_loss, unpair)
    ranked = _check_ranked(source, is_ranked(probe), pairs_from_scores, ranking_loss)
    scan = scan_rows(stream, source, on_bad_row=on_bad_row, max_responses=max_responses,
                     pairs_from_scores=pairs_from_scores if ranked else "none", unpair=unpair)
    data = tokenize_stream(stream, scan, tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                           cache_dir=cache_dir, num_proc=num_proc, hosts=hosts)
    if record is not None and hosts.index == 0:
        paths.write_text(record, json.dumps({"settings": settings, "store": f"preferences-{data.fingerprint}"}))
    return data


def _source_name(src: SourceSpec) -> str:
    path = paths.path(src.path)
    if path.is_file() and not (src.name or src.revision or src.data_files):
        return src.path
    if path.is_dir() and not (src.name or src.revision or src.data_files):
        return src.path
    return f"{src.path}:{src.name}[{src.split}]" if src.name else f"{src.path}[{src.split}]"


def _read_everywhere(src: SourceSpec, cache_dir, hosts: Hosts) -> tuple[Any, str | None]:
    """(rows when they had to be loaded to know the content, content hash) of `src`, read on every process; a
    source one process cannot read stops every process with one DataError naming the hosts and the path."""
    rows, digest, problem = None, None, ""
    try:
        if cache_dir is not None:
            digest = source_digest(src.path)
            if digest is None:  # a hub or builder dataset: its `datasets` fingerprint, once loaded (memory-mapped)
                rows, _ = load_rows(src.path, src.split, name=src.name, revision=src.revision,
                                    data_files=list(src.data_files) or None)
                digest = source_digest(src.path, rows)
        elif not (paths.path(src.path).exists() or hosts.count == 1):
            raise DataError(f"{src.path}: data file not found")
    except (DataError, OSError) as e:
        problem = f"{type(e).__name__}: {e}"
    reports = hosts.allgather(json.dumps([hosts.name, problem, digest]))
    failed = [(i, host, p) for i, (host, p, _) in enumerate(map(json.loads, reports)) if p]
    if failed:
        where = "; ".join(f"process {i} on host {h}: {p}" for i, h, p in failed)
        raise DataError(f"{src.path}: cannot be read on every host ({len(failed)} of {hosts.count} failed) - {where}. "
                        "Every host must see the same data: put it on shared storage (or a gs:// URL) or copy it "
                        "to the same path on each host")
    digests = {d for _, _, d in map(json.loads, reports)}
    if len(digests) > 1:
        raise DataError(f"{src.path}: the hosts read different contents (hashes {sorted(map(str, digests))}); "
                        "every host must see the same data")
    return rows, digest


def _record_path(cache_dir, digest: str, settings: dict):
    skey = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return paths.path(cache_dir) / f"source-{digest[:20]}-{skey[:20]}.json"


def _from_record(record, settings: dict, hosts: Hosts) -> TokenizedData | None:
    """The store a record names, when every process finds it; otherwise None, and the log says why a store of the
    same content was not used (other settings or another tokenizer)."""
    data = None
    if record is not None and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings:
            data = open_store(record.parent / saved["store"], saved["store"].removeprefix("preferences-"))
    if record is not None and data is None:
        _why_not_reused(record, settings)
    hits = hosts.allgather("hit" if data is not None else "miss")
    if not all(h == "hit" for h in hits):
        return None
    log.info("%s: tokenized rows loaded from the token store (source unchanged)", data.source)
    return data


def _why_not_reused(record, settings: dict) -> None:
    prefix = record.name.rsplit("-", 1)[0]
    for other in sorted(record.parent.glob(f"{prefix}-*.json")):
        try:
            before = json.loads(other.read_text()).get("settings", {})
        except (OSError, ValueError):
            continue
        changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if not changed:
            continue
        what = ", ".join("another tokenizer" if k == "tokenizer" else f"{k} {before.get(k)!r} -> {settings.get(k)!r}"
                         for k in changed)
        log.info("the token store of this source in %s was made with other settings (%s): not reused, tokenizing "
                 "again", other.parent, what)


def _check_ranked(source: str, ranked: bool, pairs_from_scores: str, ranking_loss: bool | None) -> bool:
    """DataError when the rows (ranked or pairs) do not suit the loss and `pairs_from_scores`; returns `ranked`."""
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
    return ranked


def _check_unpaired(source: str, unpaired_rows: bool, unpaired_loss: bool, unpair: bool) -> None:
    if unpaired_rows and not unpaired_loss:
        raise DataError(f"{source} holds unpaired rows (prompt, completion, label), which only loss.type=kto (or "
                        "apo_zero_unpaired) trains on: set loss.type=kto, or give pairs (prompt, chosen, rejected).")
    if unpaired_loss and not unpaired_rows and not unpair:
        raise DataError(f"{source} holds preference pairs, but KTO trains on unpaired rows (prompt, completion, "
                        "label): set data.unpair=true to unroll each pair into a desirable (chosen) and an undesirable "
                        "(rejected) row, as TRL's KTOTrainer does.")
