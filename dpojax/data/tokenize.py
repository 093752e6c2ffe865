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

The cache is an .npz (no pickle) keyed by a hash of the normalized rows, the tokenizer (vocab, merges, normalizers,
special tokens, chat template), max_length, truncation_mode and the data format. Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
from typing import Any

import numpy as np

from dpojax import paths
from dpojax.data.formats import OnBadRow, PreferenceRows, normalize_rows
from dpojax.errors import DataError, ModelError

log = logging.getLogger(__name__)

CACHE_VERSION = "dpojax-preferences-v2"  # bump when the tokenization rules or the cache layout change
TRUNCATION_MODES = ("keep_start", "keep_end")
_ENCODE_CHUNK = 1024  # texts per tokenizer batch call


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
    """Token ids of each kept row: the prompt and its K_m responses, best first (ragged int32 arrays)."""

    prompt_ids: list[np.ndarray]  # [M] prompt tokens
    response_ids: list[list[np.ndarray]]  # [M][K_m] response tokens (the prompt excluded), best first
    ranks: list[np.ndarray]  # [M] int32 [K_m]: tie-group rank of each response, 0 = best, non-decreasing
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
        return max(len(r) for r in self.response_ids)

    @functools.cached_property
    def lengths_MxK(self) -> np.ndarray:
        """Untruncated prompt+response lengths, int64 [M, K]; 0 where a row has fewer than K responses."""
        out = np.zeros((len(self), self.num_responses), np.int64)
        for m, (prompt, responses) in enumerate(zip(self.prompt_ids, self.response_ids, strict=True)):
            out[m, : len(responses)] = [len(prompt) + len(r) for r in responses]
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


def check_token_ids(data: TokenizedData, vocab_size: int, tokenizer: Any, what: str = "the model") -> TokenizedData:
    """Raise ModelError (a UserError) when a token id that occurs in the tokenized data is >= `what`'s vocab_size,
    naming the row, the token and the id. A tokenizer that merely defines extra tokens is fine (as in TRL). A pad
    id outside the vocabulary (padding is never scored nor attended by real tokens) is replaced by 0."""
    for m, (prompt, responses) in enumerate(zip(data.prompt_ids, data.response_ids, strict=True)):
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
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        out += tokenizer(text=texts[start : start + _ENCODE_CHUNK])["input_ids"]
    return out


def _tokenize_standard(tokenizer: Any, prefrows: PreferenceRows) -> tuple[list, list[list]]:
    eos = tokenizer.eos_token
    if eos is None:
        raise ModelError(f"tokenizer {_name(tokenizer)!r} has no EOS token, which standard (text) rows need")
    rows = prefrows.rows
    p_ids = _encode_texts(tokenizer, [r["prompt"] for r in rows])
    texts = [r["prompt"] + (y if y.endswith(eos) else y + eos) for r in rows for y in r["responses"]]
    flat = iter(_encode_texts(tokenizer, texts))
    return p_ids, [[next(flat) for _ in r["responses"]] for r in rows]


def _chat_ids(tokenizer: Any, messages: list, row: dict, **kwargs: Any) -> list[int]:
    template_kwargs = {"tools": row["tools"], **row["chat_template_kwargs"]}  # TRL's precedence
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **template_kwargs, **kwargs)
    return list(out["input_ids"])


def _tokenize_chat(tokenizer: Any, prefrows: PreferenceRows) -> tuple[list, list[list]]:
    fields = ("prompt/completion" if prefrows.fmt.unpaired else "prompt/responses" if prefrows.fmt.ranked
              else "prompt/chosen/rejected")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{prefrows.source} is conversational, but tokenizer {_name(tokenizer)!r} has no chat template: use a "
            f"tokenizer with one (an instruct/chat model's) or convert the data to plain {fields} strings"
        )
    p_ids, pr_ids = [], []
    for i, row in zip(prefrows.row_index, prefrows.rows, strict=True):
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
    what = "response" if prefrows.fmt.ranked else "completion"
    kept, dropped, warned = [], 0, False
    for j, (p, full) in enumerate(zip(p_ids, pr_ids, strict=True)):
        n = min(common_prefix_length(p, f) for f in full)
        if n < len(p) and not warned:
            warned = True
            log.warning(
                "%s: row %d: the tokenized prompt is not a prefix of prompt+%s (chat template or a token merge "
                "across the boundary); as TRL does, the %s starts where they diverge. Shown once.",
                prefrows.source, prefrows.row_index[j], what, what,
            )
        if max_length is not None and truncation_mode == "keep_start" and n >= max_length:
            dropped += 1
            continue
        kept.append((j, np.asarray(p[:n], np.int32), [np.asarray(f[n:], np.int32) for f in full]))
    return kept, dropped


# ---------------------------------------------------------------------------------------------------- cache
def _fingerprint(prefrows: PreferenceRows, tokenizer: Any, max_length: int | None, truncation_mode: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    head = [tokenizer_fingerprint(tokenizer), max_length, truncation_mode, prefrows.fmt.name,
            prefrows.pairs_from_scores, prefrows.rows_in, prefrows.rows_skipped_bad, prefrows.rows_identical,
            prefrows.rows_all_tied]
    h.update(json.dumps(head).encode())
    for i, row in zip(prefrows.row_index, prefrows.rows, strict=True):
        h.update(json.dumps([i, row], sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:40]


def _ragged_to_flat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return flat, offsets


def _flat_to_ragged(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]


_BIG = ("prompt_ids", "response_ids", "ranks", "row_index", "from_cache", "stats", "margins", "labels")


def _save_cache(path, data: TokenizedData) -> None:
    meta = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in _BIG}
    meta["stats"] = dataclasses.asdict(data.stats)
    arrays = {"row_index": data.row_index, "meta": np.array(json.dumps(meta))}
    arrays["prompt_flat"], arrays["prompt_offsets"] = _ragged_to_flat(data.prompt_ids)
    arrays["response_flat"], arrays["response_offsets"] = _ragged_to_flat([r for rs in data.response_ids for r in rs])
    arrays["ranks_flat"], arrays["ranks_offsets"] = _ragged_to_flat(data.ranks)
    if data.labels is not None:
        arrays["labels"] = data.labels
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    paths.write_bytes(path, buffer.getvalue())  # atomic: concurrent writers (hosts, workers) never leave a torn file


def _load_cache(path) -> TokenizedData | None:
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            prompts = _flat_to_ragged(z["prompt_flat"], z["prompt_offsets"])
            flat_responses = _flat_to_ragged(z["response_flat"], z["response_offsets"])
            ranks = _flat_to_ragged(z["ranks_flat"], z["ranks_offsets"])
            row_index = z["row_index"]
            labels = z["labels"] if "labels" in z.files else None
        cuts = np.cumsum([0] + [len(r) for r in ranks])
        responses = [flat_responses[cuts[m] : cuts[m + 1]] for m in range(len(ranks))]
        meta["stats"] = DataStats(**meta["stats"])
        return TokenizedData(prompts, responses, ranks, row_index, from_cache=True, labels=labels, **meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable token cache %s: %s", path, e)
        return None


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
) -> TokenizedData:
    """Validate, normalize and tokenize preference rows of any format the way TRL 1.16's DPOTrainer tokenizes
    pairs; reuse the disk cache. `rows` is a list of dicts, a `datasets.Dataset`, or `formats.PreferenceRows`.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be a positive integer or None, got {max_length}")
    if isinstance(rows, PreferenceRows):
        prefrows = rows
    else:
        prefrows = normalize_rows(rows, source, on_bad_row=on_bad_row, max_responses=max_responses)
    key = _fingerprint(prefrows, tokenizer, max_length, truncation_mode)
    path = paths.path(cache_dir) / f"preferences-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cache(path)
        if cached is not None:
            log.info("%s: tokenized rows loaded from cache %s", prefrows.source, path)
            return _report(dataclasses.replace(cached, source=prefrows.source))
    pad_id = pad_token_id(tokenizer)
    p_ids, pr_ids = (_tokenize_chat if prefrows.fmt.conversational else _tokenize_standard)(tokenizer, prefrows)
    split, dropped = split_at_prompt(prefrows, p_ids, pr_ids, max_length, truncation_mode)
    if not split:
        raise DataError(f"{prefrows.source}: every prompt has >= max_length={max_length} tokens; raise max_length")
    stats = DataStats(prefrows.rows_in, prefrows.rows_skipped_bad, prefrows.rows_identical, prefrows.rows_all_tied,
                      dropped, len(split))
    data = TokenizedData(
        [p for _, p, _ in split], [tails for _, _, tails in split],
        [np.asarray(prefrows.rows[j]["ranks"], np.int32) for j, _, _ in split],
        np.asarray([prefrows.row_index[j] for j, _, _ in split], np.int64), pad_id, max_length, truncation_mode,
        prefrows.fmt.name, prefrows.source, stats, key,
        labels=np.asarray([prefrows.rows[j]["label"] for j, _, _ in split], bool) if prefrows.fmt.unpaired else None,
    )
    if path is not None:
        _save_cache(path, data)
    return _report(data)


def _report(data: TokenizedData) -> TokenizedData:
    if data.stats.rows_dropped_long:
        log.warning(
            "%s: dropped %d row(s) whose prompt alone has >= max_length=%s tokens (truncation_mode='keep_start')",
            data.source,
            data.stats.rows_dropped_long,
            data.max_length,
        )
    return data
