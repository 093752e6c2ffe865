"""Tokenize preference rows (a prompt and K responses) exactly like TRL 1.16 `DPOTrainer._prepare_dataset`, cached.

TRL's rules, in order (facts from `trl/trainer/dpo_trainer.py`; our code), applied to every response of a row:
  1. implicit prompts are extracted (done in `formats.normalize_rows`);
  2. non-conversational responses get the EOS *string* appended unless they already end with it;
  3. standard rows: ids = tokenizer(text) (special tokens added as the tokenizer does by default) for the prompt and
     each prompt+response; conversational rows: the chat template, the prompt alone with
     `add_generation_prompt=True`, and each prompt+response without it;
  4. the prompt ends where the tokenized prompt and *every* prompt+response first disagree (for a pair: TRL's min
     over chosen and rejected), so each response is prompt_response_ids[prompt_len:];
  5. with `truncation_mode="keep_start"` and a max_length, rows whose prompt alone has >= max_length tokens are
     dropped (the collator would cut every response token). Truncation itself happens at batching time.
A pair is a row with K = 2 responses [chosen, rejected]: its token ids are TRL's.

Rows are tokenized in chunks (`tokenize_chunk`, the batched fast tokenizer; chat rows render their templates in
batches too), on `num_proc` worker threads or processes (`workers`), and the result is written to a token store
(`dpojax.data.store`: flat memory-mapped columns) under the cache folder, named by the fingerprint: a hash of the
normalized rows, the tokenizer (vocab, merges, normalizers, special tokens, chat template), max_length,
truncation_mode and the data format. `TokenizedData` reads the store lazily. Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dpojax import paths
from dpojax.data import encoding, store, workers
from dpojax.data.formats import OnBadRow, PreferenceRows, normalize_rows
from dpojax.errors import DataError, ModelError

log = logging.getLogger(__name__)

CACHE_VERSION = "dpojax-preferences-v2"  # bump when the tokenization rules change (it is part of the fingerprint)
STORE_LAYOUT = "dpojax-store-v1"  # bump when the store's columns change (stores of another layout are rebuilt)
TRUNCATION_MODES = ("keep_start", "keep_end")
CHUNK_ROWS = 2048  # rows per tokenization task (what one worker tokenizes at a time)


@dataclasses.dataclass(frozen=True)
class DataStats:
    rows_in: int  # rows read from the source
    rows_skipped_bad: int  # invalid rows dropped by on_bad_row="skip"
    rows_identical: int  # rows kept although two of their responses are identical
    rows_all_tied: int  # scored rows dropped because all their scores are equal
    rows_dropped_long: int  # rows dropped because the prompt alone fills max_length (keep_start only)
    rows_out: int  # tokenized rows kept


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Token ids of each kept row: the prompt and its K_m responses, best first (ragged int32 arrays).

    The three ragged fields are sequences whose item m is an array: lists, or the lazy views of a token store
    (`dpojax.data.store`), which read memory-mapped columns and hold no per-row Python object."""

    prompt_ids: Sequence[np.ndarray]  # [M] prompt tokens
    response_ids: Sequence[list[np.ndarray]]  # [M][K_m] response tokens (the prompt excluded), best first
    ranks: Sequence[np.ndarray]  # [M] int32 [K_m]: tie-group rank of each response, 0 = best, non-decreasing
    row_index: np.ndarray  # int64 [M]: index of each row in the source
    pad_token_id: int  # tokenizer.pad_token, else eos_token (TRL's choice)
    max_length: int | None
    truncation_mode: str
    format_name: str
    source: str
    stats: DataStats
    fingerprint: str  # the cache key
    from_cache: bool = False
    margins: np.ndarray | None = None  # float32 [M]: each pair's `margin` column (reward models, `data.reward`)
    labels: np.ndarray | None = None  # bool [M]: unpaired rows' label (true: desirable); None for other formats

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @functools.cached_property
    def num_responses(self) -> int:
        """K: the most responses of any row; every batch of this data set is [N, K, T]."""
        if hasattr(self.response_ids, "counts"):  # a store's views: from the offsets alone
            return int(self.response_ids.counts().max())
        return max(len(r) for r in self.response_ids)

    @functools.cached_property
    def lengths_MxK(self) -> np.ndarray:
        """Untruncated prompt+response lengths, int64 [M, K]; 0 where a row has fewer than K responses."""
        prompts, responses = self.prompt_ids, self.response_ids
        if isinstance(prompts, store.Ragged) and isinstance(responses, store.RaggedRows):  # from the offsets alone
            return store_lengths(prompts, responses, self.num_responses)
        if (isinstance(prompts, store.Indexed) and isinstance(responses, store.Indexed)
                and isinstance(prompts.base, store.Ragged) and isinstance(responses.base, store.RaggedRows)):
            return store_lengths(prompts.base, responses.base, self.num_responses)[responses.index]
        out = np.zeros((len(self), self.num_responses), np.int64)
        for m, (prompt, responses) in enumerate(zip(self.prompt_ids, self.response_ids, strict=True)):
            out[m, : len(responses)] = [len(prompt) + len(r) for r in responses]
        return out


def store_lengths(prompt_ids: store.Ragged, response_ids: store.RaggedRows, k: int) -> np.ndarray:
    """lengths_MxK of a store's views, vectorized over the offsets."""
    counts = response_ids.counts()
    out = np.zeros((len(counts), k), np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.arange(len(rows)) - firsts
    out[rows, cols] = prompt_ids.lengths()[rows] + response_ids.responses.lengths()
    return out


# --------------------------------------------------------------------------------------------------- tokenizer
def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def pad_token_id(tokenizer: Any) -> int:
    """TRL's pad id: the tokenizer's pad token, else its EOS token."""
    token = tokenizer.pad_token or tokenizer.eos_token
    if token is None:
        raise ModelError(f"tokenizer {_name(tokenizer)!r} has neither a pad token nor an EOS token to pad with")
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ModelError(f"tokenizer {_name(tokenizer)!r}: pad token {token!r} is not in its vocabulary")
    return int(vocab[token])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over everything that changes the ids: vocab/merges/normalizer/post-processor, specials, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    extra = {
        "chat_template": template,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "len": len(tokenizer),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _rows_to_check(data: TokenizedData, vocab_size: int) -> Sequence[int]:
    """Every row, or for a store only the first row holding a too large id (a scan of the flat columns instead of a
    loop over rows)."""
    if not isinstance(data.prompt_ids, store.Ragged) or not isinstance(data.response_ids, store.RaggedRows):
        return range(len(data))
    rows = [data.prompt_ids.first_at_least(vocab_size)]
    response = data.response_ids.responses.first_at_least(vocab_size)
    if response >= 0:
        rows.append(int(np.searchsorted(np.cumsum(data.response_ids.counts()), response, side="right")))
    return [min(m for m in rows if m >= 0)] if max(rows) >= 0 else []


def check_token_ids(data: TokenizedData, vocab_size: int, tokenizer: Any, what: str = "the model") -> TokenizedData:
    """Raise ModelError (a UserError) when a token id that occurs in the tokenized data is >= `what`'s vocab_size,
    naming the row, the token and the id. A tokenizer that merely defines extra tokens is fine (as in TRL). A pad
    id outside the vocabulary (padding is never scored nor attended by real tokens) is replaced by 0."""
    for m in _rows_to_check(data, vocab_size):
        prompt, responses = data.prompt_ids[m], data.response_ids[m]
        for ids in (prompt, *responses):
            if len(ids) and int(ids.max()) >= vocab_size:
                bad = int(ids[ids >= vocab_size][0])
                token = tokenizer.convert_ids_to_tokens(bad) if hasattr(tokenizer, "convert_ids_to_tokens") else "?"
                raise ModelError(
                    f"{data.source}: row {int(data.row_index[m])} has token {token!r} (id {bad}), but {what} has "
                    f"vocab_size {vocab_size}: use the tokenizer that belongs to the model, resize its embeddings, "
                    "or remove that token from the data"
                )
    if data.pad_token_id >= vocab_size:
        log.info("%s: pad id %d is outside the vocabulary (%d); padding with id 0 instead (never scored)",
                 data.source, data.pad_token_id, vocab_size)
        return dataclasses.replace(data, pad_token_id=0)
    return data


# ------------------------------------------------------------------------------------------------ TRL's rules
def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (the prompt's ids start the prompt+response's), compared in C
        return n
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize_standard(tokenizer: Any, prefrows: PreferenceRows) -> tuple[list, list[list]]:
    eos = tokenizer.eos_token
    if eos is None:
        raise ModelError(f"tokenizer {_name(tokenizer)!r} has no EOS token, which standard (text) rows need")
    rows = prefrows.rows
    p_ids = encoding.encode_texts(tokenizer, [r["prompt"] for r in rows])
    texts = [r["prompt"] + (y if y.endswith(eos) else y + eos) for r in rows for y in r["responses"]]
    flat = iter(encoding.encode_texts(tokenizer, texts))
    return p_ids, [[next(flat) for _ in r["responses"]] for r in rows]


def _chat_ids(tokenizer: Any, messages: list, row: dict, **kwargs: Any) -> list[int]:
    template_kwargs = {"tools": row["tools"], **row["chat_template_kwargs"]}  # TRL's precedence
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **template_kwargs, **kwargs)
    return list(out["input_ids"])


def _plain_chat(rows: list[dict]) -> bool:
    """Rows without tools or template arguments: their templates can be rendered and encoded in batches."""
    return all(row.get("tools") is None and not row.get("chat_template_kwargs") for row in rows)


def _tokenize_chat(tokenizer: Any, prefrows: PreferenceRows) -> tuple[list, list[list]]:
    fields = ("prompt/completion" if prefrows.fmt.unpaired else "prompt/responses" if prefrows.fmt.ranked
              else "prompt/chosen/rejected")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{prefrows.source} is conversational, but tokenizer {_name(tokenizer)!r} has no chat template: use a "
            f"tokenizer with one (an instruct/chat model's) or convert the data to plain {fields} strings"
        )
    rows = prefrows.rows
    if _plain_chat(rows):  # the same template calls, batched (one encode per batch); a failure is redone per row
        try:
            p_ids = encoding.encode_chats(tokenizer, [row["prompt"] for row in rows], True)
            flat = iter(encoding.encode_chats(tokenizer, [row["prompt"] + y for row in rows for y in row["responses"]]))
            return p_ids, [[next(flat) for _ in row["responses"]] for row in rows]
        except Exception:  # noqa: BLE001 - the per-row loop below names the row whose template fails
            pass
    p_ids, pr_ids = [], []
    for i, row in zip(prefrows.row_index, rows, strict=True):
        try:
            p_ids.append(_chat_ids(tokenizer, row["prompt"], row, add_generation_prompt=True))
            pr_ids.append([_chat_ids(tokenizer, row["prompt"] + y, row) for y in row["responses"]])
        except Exception as e:  # noqa: BLE001 - a template that rejects a row is a data problem
            names = "'" + fields.replace("/", "'/'") + "'"
            raise DataError(
                f"{prefrows.source}: row {i}, field {names}: the chat template of "
                f"{_name(tokenizer)!r} failed: {type(e).__name__}: {e}"
            ) from e
    return p_ids, pr_ids


def split_at_prompt(prefrows: PreferenceRows, p_ids: list, pr_ids: list, max_length: int | None,
                    truncation_mode: str) -> tuple[list[tuple[int, np.ndarray, list[np.ndarray]]], int]:
    """TRL steps 4-5: each row's prompt is cut at its common prefix with all its prompt+response ids, and rows whose
    prompt fills max_length (keep_start) are dropped. Returns ([(position in prefrows, prompt, [responses])],
    number dropped)."""
    kept, dropped, diverged = _split(prefrows, p_ids, pr_ids, max_length, truncation_mode)
    if diverged is not None:
        _warn_diverged(prefrows, diverged)
    return kept, dropped


def _warn_diverged(prefrows: PreferenceRows, row: int) -> None:
    what = "response" if prefrows.fmt.ranked else "completion"
    log.warning(
        "%s: row %d: the tokenized prompt is not a prefix of prompt+%s (chat template or a token merge "
        "across the boundary); as TRL does, the %s starts where they diverge. Shown once.",
        prefrows.source, row, what, what,
    )


def _split(prefrows: PreferenceRows, p_ids: list, pr_ids: list, max_length: int | None, truncation_mode: str):
    """split_at_prompt's work: (kept, dropped, source index of the first row whose prompt diverged or None)."""
    kept, dropped, diverged = [], 0, None
    for j, (p, full) in enumerate(zip(p_ids, pr_ids, strict=True)):
        n = min(common_prefix_length(p, f) for f in full)
        if n < len(p) and diverged is None:
            diverged = int(prefrows.row_index[j])
        if max_length is not None and truncation_mode == "keep_start" and n >= max_length:
            dropped += 1
            continue
        kept.append((j, np.asarray(p[:n], np.int32), [np.asarray(f[n:], np.int32) for f in full]))
    return kept, dropped, diverged


@dataclasses.dataclass(frozen=True)
class Chunk:
    """The tokenized rows of one chunk: store columns, rows dropped (prompt too long), first diverging row."""

    arrays: dict
    dropped: int
    diverged: int | None


def tokenize_chunk(tokenizer: Any, prefrows: PreferenceRows, max_length: int | None, truncation_mode: str) -> Chunk:
    """TRL's rules (module docstring) on the rows of `prefrows`, as store columns (`store.shard_arrays`)."""
    p_ids, pr_ids = (_tokenize_chat if prefrows.fmt.conversational else _tokenize_standard)(tokenizer, prefrows)
    kept, dropped, diverged = _split(prefrows, p_ids, pr_ids, max_length, truncation_mode)
    extra = {}
    if prefrows.fmt.unpaired:  # one more per-row column of the store
        extra["labels"] = np.asarray([prefrows.rows[j]["label"] for j, _, _ in kept], bool)
    arrays = store.shard_arrays([p for _, p, _ in kept], [tails for _, _, tails in kept],
                                [np.asarray(prefrows.rows[j]["ranks"], np.int32) for j, _, _ in kept],
                                [prefrows.row_index[j] for j, _, _ in kept], **extra)
    return Chunk(arrays, dropped, diverged)


def tokenize_chunks(tokenizer: Any, prefrows: PreferenceRows, max_length: int | None, truncation_mode: str,
                    pool: concurrent.futures.Executor | None = None) -> Chunk:
    """`tokenize_chunk` over CHUNK_ROWS rows at a time (one batched encode each; on `pool`'s threads when given),
    joined in row order."""
    work = functools.partial(tokenize_chunk, tokenizer, max_length=max_length, truncation_mode=truncation_mode)
    chunks = [_rows_slice(prefrows, a, a + CHUNK_ROWS) for a in range(0, len(prefrows.rows), CHUNK_ROWS)]
    done = list(pool.map(work, chunks) if pool is not None else map(work, chunks))
    diverged = next((c.diverged for c in done if c.diverged is not None), None)
    return Chunk(store.join_shards([c.arrays for c in done]), sum(c.dropped for c in done), diverged)


def _rows_slice(prefrows: PreferenceRows, lo: int, hi: int) -> PreferenceRows:
    return dataclasses.replace(prefrows, rows=prefrows.rows[lo:hi], row_index=prefrows.row_index[lo:hi])


def tokenize_parallel(tokenizer: Any, prefrows: PreferenceRows, max_length: int | None, truncation_mode: str,
                      num_proc: int | None = None) -> Chunk:
    """`tokenize_chunks` over all rows with `workers.worker_plan`'s workers: threads take chunks in turn;
    processes take `num_proc` contiguous shares (spawned, each gets the tokenizer once). The columns are joined in
    row order, so the result does not depend on the workers."""
    n_workers, processes = workers.worker_plan(num_proc, len(prefrows.rows), CHUNK_ROWS)
    if not processes:
        encoding.prepare(tokenizer)  # any state the tokenizer's call resets is reset before threads share it
        with workers.pool(n_workers, False) as pool:
            return tokenize_chunks(tokenizer, prefrows, max_length, truncation_mode, pool)
    n = len(prefrows.rows)
    shares = [_rows_slice(prefrows, *row_share(n, i, n_workers)) for i in range(n_workers)]
    work = functools.partial(tokenize_chunks, tokenizer, max_length=max_length, truncation_mode=truncation_mode)
    with workers.pool(n_workers, True) as pool:
        done = list(pool.map(work, shares))
    diverged = next((c.diverged for c in done if c.diverged is not None), None)
    return Chunk(store.join_shards([c.arrays for c in done]), sum(c.dropped for c in done), diverged)


# ---------------------------------------------------------------------------------------------------- cache
def rows_digest(rows: Iterable[tuple[int, dict]]) -> str:
    """sha256 of (source index, normalized row) pairs in order: the row part of the store's key."""
    h = hashlib.sha256()
    for i, row in rows:
        h.update(_ROW_JSON.encode([i, row]).encode())
    return h.hexdigest()


_ROW_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str)


def fingerprint(prefrows: PreferenceRows, tokenizer: Any, max_length: int | None, truncation_mode: str,
                rows_hash: str | None = None) -> str:
    """The store's key: the tokenizer, the settings, `prefrows`' counts and `rows_digest` of its rows (or
    `rows_hash`, that digest computed elsewhere, e.g. while a stream was validated, for a `prefrows` that holds
    only the counts)."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    head = [tokenizer_fingerprint(tokenizer), max_length, truncation_mode, prefrows.fmt.name,
            prefrows.pairs_from_scores, prefrows.rows_in, prefrows.rows_skipped_bad, prefrows.rows_identical,
            prefrows.rows_all_tied]
    h.update(json.dumps(head).encode())
    if rows_hash is None:
        rows_hash = rows_digest(zip(prefrows.row_index, prefrows.rows, strict=True))
    h.update(rows_hash.encode())
    return h.hexdigest()[:40]


def store_meta(data: TokenizedData, shards: int, tokenizer_fp: str) -> dict:
    """What a store's meta.json records: everything of TokenizedData but its columns, and how it was made."""
    meta = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in _COLUMN_FIELDS}
    meta.update(stats=dataclasses.asdict(data.stats), layout=STORE_LAYOUT, shards=shards, tokenizer=tokenizer_fp)
    return meta


_COLUMN_FIELDS = ("prompt_ids", "response_ids", "ranks", "row_index", "from_cache", "stats", "margins",
                  *store.ROW_COLUMNS)


def open_store(folder, fingerprint: str | None = None) -> TokenizedData | None:
    """The TokenizedData of a complete store (lazy views over its memory-mapped shards), or None (logged) when it
    is absent, incomplete, of another layout or of another fingerprint than the one asked for."""
    meta = store.read_meta(folder)
    if meta is None:
        return None
    if meta.get("layout") != STORE_LAYOUT or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
        log.info("token store %s: layout %s, fingerprint %s, not the %s/%s asked for; tokenizing again", folder,
                 meta.get("layout"), meta.get("fingerprint"), STORE_LAYOUT, fingerprint)
        return None
    try:
        shards = [store.read_shard(paths.path(folder) / store.shard_name(i, meta["shards"]))
                  for i in range(meta["shards"])]
        columns = store.views(shards)
        kept = {k: v for k, v in meta.items() if k in {f.name for f in dataclasses.fields(TokenizedData)}}
        kept["stats"] = DataStats(**meta["stats"])
        return TokenizedData(**columns, **kept, from_cache=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable token store %s: %s", folder, e)
        return None


def row_share(n: int, index: int, count: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of n that process `index` of `count` tokenizes."""
    return n * index // count, n * (index + 1) // count


# ----------------------------------------------------------------------------------------------------- entry
def tokenize_rows(
    rows: Any,
    tokenizer: Any,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    cache_dir: str | os.PathLike | None = None,
    source: str = "<rows>",
    on_bad_row: OnBadRow = "error",
    max_responses: int = 8,
    num_proc: int | None = None,
    hosts: store.Hosts | None = None,
) -> TokenizedData:
    """Validate, normalize and tokenize preference rows of any format the way TRL 1.16's DPOTrainer tokenizes
    pairs; reuse the token store under `cache_dir`. `rows` is a list of dicts, a `datasets.Dataset`, or
    `formats.PreferenceRows`. `num_proc` worker processes tokenize (default: one per CPU).

    With several processes (`hosts`, one call on each) each tokenizes its contiguous share of the rows and writes it
    as one shard of the store; all then read every shard, so each row is tokenized once in the whole job.
    """
    check_settings(max_length, truncation_mode)
    hosts = hosts or store.ONE_HOST
    if isinstance(rows, PreferenceRows):
        prefrows = rows
    else:
        prefrows = normalize_rows(rows, source, on_bad_row=on_bad_row, max_responses=max_responses)
    key = fingerprint(prefrows, tokenizer, max_length, truncation_mode)
    folder = paths.path(cache_dir) / f"preferences-{key}" if cache_dir is not None else None
    cached = cached_store(prefrows.source, key, folder, hosts)
    if cached is not None:
        return cached
    return report(_tokenize_to_store(prefrows, tokenizer, key, folder, max_length, truncation_mode, num_proc,
                                      hosts))


def check_settings(max_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be a positive integer or None, got {max_length}")


def cached_store(source: str, key: str, folder, hosts: store.Hosts) -> TokenizedData | None:
    """The store of `key` in `folder` when every process finds it, else None."""
    cached = open_store(folder, key) if folder is not None else None
    if hosts.count > 1:
        if folder is None:
            raise DataError(f"{source}: tokenizing on {hosts.count} processes needs a shared cache_dir")
        hits = hosts.allgather("hit" if cached is not None else "miss")
        cached = cached if all(h == "hit" for h in hits) else None
    if cached is None:
        return None
    log.info("%s: tokenized rows loaded from the token store %s", source, folder)
    return report(dataclasses.replace(cached, source=source))


def _tokenize_to_store(prefrows: PreferenceRows, tokenizer: Any, key: str, folder, max_length: int | None,
                       truncation_mode: str, num_proc: int | None, hosts: store.Hosts) -> TokenizedData:
    """This process's share of the rows tokenized (one shard), written to `folder`, and the whole store read back;
    without a folder (no cache) all rows, held in memory."""
    pad_token_id(tokenizer)  # a tokenizer without a pad or EOS token fails before any row is tokenized
    lo, hi = row_share(len(prefrows.rows), hosts.index, hosts.count)
    log.info("%s: tokenizing rows %d..%d of %d on process %d of %d (%s)", prefrows.source, lo, hi,
             len(prefrows.rows), hosts.index, hosts.count, hosts.name)
    part = dataclasses.replace(prefrows, rows=prefrows.rows[lo:hi], row_index=prefrows.row_index[lo:hi])
    chunk = tokenize_parallel(tokenizer, part, max_length, truncation_mode, num_proc)
    if folder is not None:
        store.write_shard(folder / store.shard_name(hosts.index, hosts.count), chunk.arrays)
    return finish_store(prefrows, len(prefrows.rows), [chunk.arrays], hosts.count, chunk, tokenizer, key, folder,
                        max_length, truncation_mode, hosts)


def finish_store(prefrows: PreferenceRows, n_rows: int, shards: list[dict], n_shards: int, chunk: Chunk,
                 tokenizer: Any, key: str, folder, max_length: int | None, truncation_mode: str,
                 hosts: store.Hosts) -> TokenizedData:
    """After this process wrote its shards (or, without a folder, holds all `shards`): the counts gathered, the
    meta written by process 0 and the store read back. `chunk` carries this process's dropped and diverged rows;
    `prefrows` the counts of the source (its rows may be empty when they were streamed), `n_rows` rows in all."""
    infos = [json.loads(x) for x in hosts.allgather(json.dumps([chunk.dropped, chunk.diverged]))]
    diverged = next((d for _, d in infos if d is not None), None)
    if diverged is not None:
        _warn_diverged(prefrows, diverged)
    dropped = sum(d for d, _ in infos)
    kept = n_rows - dropped
    if not kept:
        raise DataError(f"{prefrows.source}: every prompt has >= max_length={max_length} tokens; raise max_length")
    stats = DataStats(prefrows.rows_in, prefrows.rows_skipped_bad, prefrows.rows_identical, prefrows.rows_all_tied,
                      dropped, kept)
    columns = store.views(shards) if folder is None else {"prompt_ids": [], "response_ids": [], "ranks": [],
                                                           "row_index": np.zeros(0, np.int64)}
    data = TokenizedData(**columns, pad_token_id=pad_token_id(tokenizer), max_length=max_length,
                         truncation_mode=truncation_mode, format_name=prefrows.fmt.name, source=prefrows.source,
                         stats=stats, fingerprint=key)
    if folder is None:
        return data
    hosts.barrier(f"dpojax-tokens-{key}")  # every shard is written
    if hosts.index == 0:
        store.write_meta(folder, store_meta(data, n_shards, tokenizer_fingerprint(tokenizer)))
    hosts.barrier(f"dpojax-tokens-meta-{key}")
    opened = open_store(folder, key)  # memory-mapped: this process's rows leave its memory, the others' arrive
    if opened is None:
        raise DataError(f"{prefrows.source}: the token store {folder} just written cannot be read back")
    return dataclasses.replace(opened, from_cache=False)


def report(data: TokenizedData) -> TokenizedData:
    if data.stats.rows_dropped_long:
        log.warning(
            "%s: dropped %d row(s) whose prompt alone has >= max_length=%s tokens (truncation_mode='keep_start')",
            data.source,
            data.stats.rows_dropped_long,
            data.max_length,
        )
    return data
