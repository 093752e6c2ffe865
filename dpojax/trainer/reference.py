"""Precomputed reference log-probs (`ref_model.precompute: true`).

The reference runs once over a data set (batched and sharded like evaluation) and its per-response log-probs
(an [M prompts, K responses] table; 0 for the padding responses of rows with fewer than K, never read) are cached
on disk under a key made of the tokenized data's fingerprint, a hash of the reference weights and the settings
that change the numbers; training then needs no reference in memory. A changed reference
(other weights, other file) makes another key, so a stale cache is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path

import jax
import numpy as np

from dpojax import paths
from dpojax.data.batching import PreferenceBatch, eval_batches
from dpojax.data.tokenize import TokenizedData

log = logging.getLogger("dpojax")
CACHE_VERSION = "dpojax-ref-v2"
_HASH_CHUNK = 1 << 24


def _file_digest(path: Path, memo: dict) -> str:
    """sha256 of a file's bytes, memoized by (path, size, mtime) so a large checkpoint is read once."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def weights_fingerprint(model_dir: Path, cache_dir, *, random_seed: int | None = None) -> str:
    """Hash of a reference (a local folder): config.json plus every safetensors file, or config.json plus the
    seed of a randomly initialised one. `cache_dir` (local or a URL) keeps the file digests."""
    memo_path = paths.path(cache_dir) / "weights-digests.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    if random_seed is not None:
        h.update(f"random:{random_seed}".encode())
    else:
        for path in sorted(model_dir.glob("*.safetensors")):
            h.update(path.name.encode() + _file_digest(path, memo).encode())
    paths.write_text(memo_path, json.dumps(memo))
    return h.hexdigest()[:24]


def cache_key(data: TokenizedData, weights: str, settings: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, "data": data.fingerprint, "weights": weights, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def precompute(forward, ref_params, data: TokenizedData, batch_size: int, to_device, *, batch_kw: dict) -> np.ndarray:
    """[M, K] reference log-probs of every response, in the order of `data` (0 for padding responses)."""
    table = np.zeros((len(data), data.num_responses), np.float32)
    done = np.zeros(len(data), bool)
    for batch in eval_batches(data, batch_size, **batch_kw):
        index_N, logps_NxK = jax.device_get(forward(ref_params, to_device(batch)))
        index_N = np.asarray(index_N)
        real = index_N >= 0
        table[index_N[real]] = np.asarray(logps_NxK)[real]
        done[index_N[real]] = True
    if not done.all():
        raise RuntimeError("internal: some prompts got no reference log-probs")
    return table


def load_or_compute(path, compute) -> np.ndarray:
    """The cached table at `path` (local or a URL), or `compute()`'s, then cached there by process 0."""
    path = paths.path(path)
    if path.is_file():
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
            log.info("reference log-probs loaded from cache %s", path)
            return f["ref_logps"]
    table = compute()
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, ref_logps=table)
        paths.write_bytes(path, buffer.getvalue())
        what = "pairs" if table.shape[1] == 2 else "rankings"
        log.info("reference log-probs computed for %d %s and cached in %s", len(table), what, path)
    return table


def attach(batch: PreferenceBatch, table: np.ndarray | None) -> PreferenceBatch:
    """The batch with its prompts' precomputed reference log-probs (fillers get a real row's values)."""
    if table is None:
        return batch
    index = np.maximum(np.asarray(batch.prompt_index_N), 0)
    return dataclasses.replace(batch, ref_logps_NxK=table[index].astype(np.float32))


def lookup(tables: dict[str, np.ndarray] | None, data: TokenizedData) -> np.ndarray | None:
    return None if tables is None else tables[data.fingerprint]

