"""Tokenize ranked rows with the pair pipeline's (TRL 1.16's) rules, K responses per prompt, cached on disk.

The rules of `tokenize.py`, applied to K completions instead of two: EOS string appended to non-conversational
responses that lack it; the prompt and each prompt+response tokenized jointly (chat template for conversational
rows, the prompt with `add_generation_prompt=True`); the prompt ends where the tokenized prompt and *every*
prompt+response first disagree (with K=2 exactly TRL's min over chosen and rejected); rows whose prompt alone has
>= max_length tokens are dropped under `keep_start`. Truncation happens at batching time (`ranked_batching`).
A ranked row with responses [a, b] therefore gets the same token ids as the pair (chosen=a, rejected=b).

Glossary: P rows (prompts) in the dataset, K the most responses of a row in the dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dpojax.data.formats import OnBadRow
from dpojax.data.ranked import RankedRows, normalize_ranked
from dpojax.data.tokenize import (
    TRUNCATION_MODES,
    _chat_ids,
    _encode_texts,
    _flat_to_ragged,
    _name,
    _ragged_to_flat,
    pad_token_id,
    split_at_prompt,
    tokenizer_fingerprint,
)
from dpojax.errors import DataError, ModelError

log = logging.getLogger(__name__)

CACHE_VERSION = "dpojax-rankings-v1"  # bump when the tokenization rules or the cache layout change


@dataclasses.dataclass(frozen=True)
class RankingStats:
    rows_in: int  # rows read from the source
    rows_skipped_bad: int  # invalid rows dropped by on_bad_row="skip"
    rows_identical: int  # rows kept although two of their responses are identical
    rows_all_tied: int  # scored rows dropped because all their scores are equal
    rows_dropped_long: int  # rows dropped because the prompt alone fills max_length (keep_start only)
    rows_out: int  # tokenized rows kept


@dataclasses.dataclass(frozen=True)
class TokenizedRankings:
    """Token ids of each kept row: the prompt and its responses, best first (ragged int32 arrays)."""

    prompt_ids: list[np.ndarray]
    response_ids: list[list[np.ndarray]]  # [P][K_p] completions (the prompt excluded), best first
    ranks: list[np.ndarray]  # [P] int32 [K_p]: tie-group rank of each response, 0 = best, non-decreasing
    row_index: np.ndarray  # int64 [P]: index of each row in the source
    pad_token_id: int
    max_length: int | None
    truncation_mode: str
    format_name: str
    source: str
    stats: RankingStats
    fingerprint: str  # the cache key
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @functools.cached_property
    def num_responses(self) -> int:
        """K: the most responses of any row; every batch of this dataset is [N, K, T]."""
        return max(len(r) for r in self.response_ids)

    @functools.cached_property
    def lengths_PxK(self) -> np.ndarray:
        """Untruncated prompt+response lengths, int64 [P, K]; 0 where a row has fewer than K responses."""
        out = np.zeros((len(self), self.num_responses), np.int64)
        for p, (prompt, responses) in enumerate(zip(self.prompt_ids, self.response_ids, strict=True)):
            out[p, : len(responses)] = [len(prompt) + len(r) for r in responses]
        return out


# ------------------------------------------------------------------------------------------------ TRL's rules
def _tokenize_standard(tokenizer: Any, ranked: RankedRows) -> tuple[list, list[list]]:
    eos = tokenizer.eos_token
    if eos is None:
        raise ModelError(f"tokenizer {_name(tokenizer)!r} has no EOS token, which standard (text) rows need")
    rows = ranked.rows
    p_ids = _encode_texts(tokenizer, [r["prompt"] for r in rows])
    texts = [r["prompt"] + (y if y.endswith(eos) else y + eos) for r in rows for y in r["responses"]]
    flat = iter(_encode_texts(tokenizer, texts))
    return p_ids, [[next(flat) for _ in r["responses"]] for r in rows]


def _tokenize_chat(tokenizer: Any, ranked: RankedRows) -> tuple[list, list[list]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{ranked.source} is conversational, but tokenizer {_name(tokenizer)!r} has no chat template: use a "
            "tokenizer with one (an instruct/chat model's) or convert the data to plain prompt/responses strings"
        )
    p_ids, pr_ids = [], []
    for i, row in zip(ranked.row_index, ranked.rows, strict=True):
        try:
            p_ids.append(_chat_ids(tokenizer, row["prompt"], row, add_generation_prompt=True))
            pr_ids.append([_chat_ids(tokenizer, row["prompt"] + y, row) for y in row["responses"]])
        except Exception as e:  # noqa: BLE001 - a template that rejects a row is a data problem
            raise DataError(
                f"{ranked.source}: row {i}, field 'prompt'/'responses': the chat template of "
                f"{_name(tokenizer)!r} failed: {type(e).__name__}: {e}"
            ) from e
    return p_ids, pr_ids


# ---------------------------------------------------------------------------------------------------- cache
def _fingerprint(ranked: RankedRows, tokenizer: Any, max_length: int | None, truncation_mode: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    head = [tokenizer_fingerprint(tokenizer), max_length, truncation_mode, ranked.fmt.name]
    head += [ranked.rows_in, ranked.rows_skipped_bad, ranked.rows_identical, ranked.rows_all_tied]
    h.update(json.dumps(head).encode())
    for i, row in zip(ranked.row_index, ranked.rows, strict=True):
        h.update(json.dumps([i, row], sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:40]


_BIG = ("prompt_ids", "response_ids", "ranks", "row_index", "from_cache", "stats")


def _save_cache(path: Path, data: TokenizedRankings) -> None:
    meta = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in _BIG}
    meta["stats"] = dataclasses.asdict(data.stats)
    arrays = {"row_index": data.row_index, "meta": np.array(json.dumps(meta))}
    arrays["prompt_flat"], arrays["prompt_offsets"] = _ragged_to_flat(data.prompt_ids)
    arrays["response_flat"], arrays["response_offsets"] = _ragged_to_flat([r for rs in data.response_ids for r in rs])
    arrays["ranks_flat"], arrays["ranks_offsets"] = _ragged_to_flat(data.ranks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: concurrent writers (hosts, workers) never leave a torn file


def _load_cache(path: Path) -> TokenizedRankings | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            prompts = _flat_to_ragged(z["prompt_flat"], z["prompt_offsets"])
            flat_responses = _flat_to_ragged(z["response_flat"], z["response_offsets"])
            ranks = _flat_to_ragged(z["ranks_flat"], z["ranks_offsets"])
            row_index = z["row_index"]
        cuts = np.cumsum([0] + [len(r) for r in ranks])
        responses = [flat_responses[cuts[p] : cuts[p + 1]] for p in range(len(ranks))]
        meta["stats"] = RankingStats(**meta["stats"])
        return TokenizedRankings(prompts, responses, ranks, row_index, from_cache=True, **meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable token cache %s: %s", path, e)
        return None


# ----------------------------------------------------------------------------------------------------- entry
def tokenize_rankings(
    rows: Any,
    tokenizer: Any,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    max_responses: int = 8,
    cache_dir: str | os.PathLike | None = None,
    source: str = "<rows>",
    on_bad_row: OnBadRow = "error",
) -> TokenizedRankings:
    """Validate, normalize (best first) and tokenize ranked or scored rows; reuse the disk cache.

    `rows` is a list of dicts, a `datasets.Dataset`, or `RankedRows` from `ranked.normalize_ranked`.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be a positive integer or None, got {max_length}")
    if isinstance(rows, RankedRows):
        ranked = rows
    else:
        ranked = normalize_ranked(rows, source, max_responses=max_responses, on_bad_row=on_bad_row)
    key = _fingerprint(ranked, tokenizer, max_length, truncation_mode)
    path = Path(cache_dir) / f"rankings-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cache(path)
        if cached is not None:
            log.info("%s: tokenized rankings loaded from cache %s", ranked.source, path)
            return _report(dataclasses.replace(cached, source=ranked.source))
    pad_id = pad_token_id(tokenizer)
    p_ids, pr_ids = (_tokenize_chat if ranked.fmt.conversational else _tokenize_standard)(tokenizer, ranked)
    items = zip(ranked.row_index, p_ids, pr_ids, strict=True)
    split, dropped = split_at_prompt(ranked.source, items, max_length, truncation_mode, what="response")
    ranks_of = dict(zip(ranked.row_index, (row["ranks"] for row in ranked.rows), strict=True))
    kept = [i for i, _, _ in split]
    prompts, responses = [p for _, p, _ in split], [tails for _, _, tails in split]
    ranks = [np.asarray(ranks_of[i], np.int32) for i in kept]
    if not prompts:
        raise DataError(f"{ranked.source}: every prompt has >= max_length={max_length} tokens; raise max_length")
    stats = RankingStats(ranked.rows_in, ranked.rows_skipped_bad, ranked.rows_identical, ranked.rows_all_tied,
                         dropped, len(prompts))  # fmt: skip
    data = TokenizedRankings(
        prompts, responses, ranks, np.asarray(kept, np.int64), pad_id, max_length, truncation_mode,
        ranked.fmt.name, ranked.source, stats, key,
    )  # fmt: skip
    if path is not None:
        _save_cache(path, data)
    return _report(data)


def _report(data: TokenizedRankings) -> TokenizedRankings:
    if data.stats.rows_dropped_long:
        log.warning(
            "%s: dropped %d row(s) whose prompt alone has >= max_length=%s tokens (truncation_mode='keep_start')",
            data.source,
            data.stats.rows_dropped_long,
            data.max_length,
        )
    return data
