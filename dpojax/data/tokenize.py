"""Tokenize preference pairs exactly like TRL 1.16 `DPOTrainer._prepare_dataset`, cached on disk.

TRL's rules, in order (facts from `trl/trainer/dpo_trainer.py`; our code):
  1. implicit prompts are extracted (done in `formats.normalize_rows`);
  2. non-conversational chosen/rejected get the EOS *string* appended unless they already end with it;
  3. standard rows: ids = tokenizer(text) (special tokens added as the tokenizer does by default) for prompt,
     prompt+chosen and prompt+rejected; conversational rows: the chat template, the prompt alone with
     `add_generation_prompt=True`, and prompt+chosen, prompt+rejected without it;
  4. the prompt ends where the tokenized prompt and each prompt+completion first disagree (min of both), so the
     completions are prompt_completion_ids[prompt_len:];
  5. with `truncation_mode="keep_start"` and a max_length, rows whose prompt alone has >= max_length tokens are
     dropped (the collator would cut every completion token). Truncation itself happens at batching time.

The cache is an .npz (no pickle) keyed by a hash of the normalized rows, the tokenizer (vocab, merges, normalizers,
special tokens, chat template), max_length, truncation_mode and the data format.
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

from dpojax.data.formats import OnBadRow, PreferenceRows, normalize_rows
from dpojax.errors import DataError, ModelError

log = logging.getLogger(__name__)

CACHE_VERSION = "dpojax-pairs-v1"  # bump when the tokenization rules or the cache layout change
TRUNCATION_MODES = ("keep_start", "keep_end")
_ENCODE_CHUNK = 1024  # texts per tokenizer batch call


@dataclasses.dataclass(frozen=True)
class PairStats:
    rows_in: int  # rows read from the source
    rows_skipped_bad: int  # invalid rows dropped by on_bad_row="skip"
    rows_identical: int  # rows kept although chosen == rejected
    rows_dropped_long: int  # rows dropped because the prompt alone fills max_length (keep_start only)
    rows_out: int  # tokenized pairs kept


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of each kept pair: ragged int32 arrays, one per pair; completions exclude the prompt."""

    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    row_index: np.ndarray  # int64 [P]: index of each pair's row in the source
    pad_token_id: int  # tokenizer.pad_token, else eos_token (TRL's choice)
    max_length: int | None
    truncation_mode: str
    format_name: str
    source: str
    stats: PairStats
    fingerprint: str  # the cache key
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @functools.cached_property
    def lengths_Px2(self) -> np.ndarray:
        """Untruncated prompt+chosen and prompt+rejected lengths, int64 [P, 2]."""
        p = np.array([len(x) for x in self.prompt_ids], np.int64)
        c = np.array([len(x) for x in self.chosen_ids], np.int64)
        r = np.array([len(x) for x in self.rejected_ids], np.int64)
        return np.stack([p + c, p + r], axis=1).reshape(-1, 2)


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


def check_vocab(tokenizer: Any, model_vocab_size: int, what: str = "the model") -> None:
    """Raise ModelError (a UserError) when the tokenizer can produce an id that `what`'s embedding table lacks."""
    highest = max(len(tokenizer) - 1, max(tokenizer.get_vocab().values(), default=-1))
    if highest >= model_vocab_size:
        raise ModelError(
            f"tokenizer {_name(tokenizer)!r} can produce token id {highest} ({len(tokenizer)} tokens), but {what} has "
            f"vocab_size {model_vocab_size}: use the tokenizer that belongs to the model or resize its embeddings"
        )


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


def _tokenize_standard(tokenizer: Any, prefrows: PreferenceRows) -> tuple[list, list, list]:
    rows = prefrows.rows
    eos = tokenizer.eos_token
    if eos is None:
        raise ModelError(f"tokenizer {_name(tokenizer)!r} has no EOS token, which standard (text) rows need")

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    prompts = [r["prompt"] for r in rows]
    p_ids = _encode_texts(tokenizer, prompts)
    pc_ids = _encode_texts(tokenizer, [r["prompt"] + with_eos(r["chosen"]) for r in rows])
    pr_ids = _encode_texts(tokenizer, [r["prompt"] + with_eos(r["rejected"]) for r in rows])
    return p_ids, pc_ids, pr_ids


def _chat_ids(tokenizer: Any, messages: list, row: dict, **kwargs: Any) -> list[int]:
    template_kwargs = {"tools": row["tools"], **row["chat_template_kwargs"]}  # TRL's precedence
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **template_kwargs, **kwargs)
    return list(out["input_ids"])


def _tokenize_chat(tokenizer: Any, prefrows: PreferenceRows) -> tuple[list, list, list]:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{prefrows.source} is conversational, but tokenizer {_name(tokenizer)!r} has no chat template: use a "
            "tokenizer with one (an instruct/chat model's) or convert the data to plain prompt/chosen/rejected strings"
        )
    p_ids, pc_ids, pr_ids = [], [], []
    for i, row in zip(prefrows.row_index, prefrows.rows, strict=True):
        try:
            p_ids.append(_chat_ids(tokenizer, row["prompt"], row, add_generation_prompt=True))
            pc_ids.append(_chat_ids(tokenizer, row["prompt"] + row["chosen"], row))
            pr_ids.append(_chat_ids(tokenizer, row["prompt"] + row["rejected"], row))
        except Exception as e:  # noqa: BLE001 - a template that rejects a row is a data problem
            raise DataError(
                f"{prefrows.source}: row {i}, field 'prompt'/'chosen'/'rejected': the chat template of "
                f"{_name(tokenizer)!r} failed: {type(e).__name__}: {e}"
            ) from e
    return p_ids, pc_ids, pr_ids


def split_at_prompt(
    source: str, items, max_length: int | None, truncation_mode: str, what: str = "completion"
) -> tuple[list[tuple[int, np.ndarray, list[np.ndarray]]], int]:
    """TRL steps 4-5 for any number of continuations per row: `items` yields (row, prompt ids, [prompt +
    continuation ids, ...]); each is cut at the prompt's common prefix with all its continuations, and rows whose
    prompt fills max_length (keep_start) are dropped. Returns ([(row, prompt, [tails])], number dropped)."""
    kept, dropped, warned = [], 0, False
    for i, p, full in items:
        n = min(common_prefix_length(p, f) for f in full)
        if n < len(p) and not warned:
            warned = True
            log.warning(
                "%s: row %d: the tokenized prompt is not a prefix of prompt+%s (chat template or a token merge "
                "across the boundary); as TRL does, the %s starts where they diverge. Shown once.",
                source, i, what, what,
            )  # fmt: skip
        if max_length is not None and truncation_mode == "keep_start" and n >= max_length:
            dropped += 1
            continue
        kept.append((i, np.asarray(p[:n], np.int32), [np.asarray(f[n:], np.int32) for f in full]))
    return kept, dropped


# ---------------------------------------------------------------------------------------------------- cache
def _fingerprint(prefrows: PreferenceRows, tokenizer: Any, max_length: int | None, truncation_mode: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    head = [tokenizer_fingerprint(tokenizer), max_length, truncation_mode, prefrows.fmt.name]
    head += [prefrows.rows_in, prefrows.rows_skipped_bad, prefrows.rows_identical]
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


def _save_cache(path: Path, pairs: TokenizedPairs) -> None:
    big = ("prompt_ids", "chosen_ids", "rejected_ids", "row_index", "from_cache", "stats")
    meta = {f.name: getattr(pairs, f.name) for f in dataclasses.fields(pairs) if f.name not in big}
    meta["stats"] = dataclasses.asdict(pairs.stats)
    arrays = {"row_index": pairs.row_index, "meta": np.array(json.dumps(meta))}
    for name in ("prompt", "chosen", "rejected"):
        arrays[f"{name}_flat"], arrays[f"{name}_offsets"] = _ragged_to_flat(getattr(pairs, f"{name}_ids"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: concurrent writers (hosts, workers) never leave a torn file


def _load_cache(path: Path) -> TokenizedPairs | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            ragged = {n: _flat_to_ragged(z[f"{n}_flat"], z[f"{n}_offsets"]) for n in ("prompt", "chosen", "rejected")}
            row_index = z["row_index"]
        meta["stats"] = PairStats(**meta["stats"])
        return TokenizedPairs(
            prompt_ids=ragged["prompt"],
            chosen_ids=ragged["chosen"],
            rejected_ids=ragged["rejected"],
            row_index=row_index,
            from_cache=True,
            **meta,
        )
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
) -> TokenizedPairs:
    """Validate, normalize and tokenize preference rows the way TRL 1.16's DPOTrainer does; reuse the disk cache.

    `rows` is a list of dicts, a `datasets.Dataset`, or `PreferenceRows` from `formats.normalize_rows`.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be a positive integer or None, got {max_length}")
    prefrows = rows if isinstance(rows, PreferenceRows) else normalize_rows(rows, source, on_bad_row=on_bad_row)
    key = _fingerprint(prefrows, tokenizer, max_length, truncation_mode)
    path = Path(cache_dir) / f"pairs-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cache(path)
        if cached is not None:
            log.info("%s: tokenized pairs loaded from cache %s", prefrows.source, path)
            return _report(dataclasses.replace(cached, source=prefrows.source))
    pad_id = pad_token_id(tokenizer)
    p_ids, pc_ids, pr_ids = (_tokenize_chat if prefrows.fmt.conversational else _tokenize_standard)(tokenizer, prefrows)
    items = zip(prefrows.row_index, p_ids, zip(pc_ids, pr_ids, strict=True), strict=True)
    split, dropped = split_at_prompt(prefrows.source, items, max_length, truncation_mode)
    kept = [i for i, _, _ in split]
    prompts = [p for _, p, _ in split]
    chosens, rejecteds = [c for _, _, (c, _) in split], [r for _, _, (_, r) in split]
    if not prompts:
        raise DataError(f"{prefrows.source}: every prompt has >= max_length={max_length} tokens; raise max_length")
    stats = PairStats(prefrows.rows_in, prefrows.rows_skipped_bad, prefrows.rows_identical, dropped, len(prompts))
    pairs = TokenizedPairs(
        prompts, chosens, rejecteds, np.asarray(kept, np.int64), pad_id, max_length,
        truncation_mode, prefrows.fmt.name, prefrows.source, stats, key,
    )  # fmt: skip
    if path is not None:
        _save_cache(path, pairs)
    return _report(pairs)


def _report(pairs: TokenizedPairs) -> TokenizedPairs:
    if pairs.stats.rows_dropped_long:
        log.warning(
            "%s: dropped %d row(s) whose prompt alone has >= max_length=%s tokens (truncation_mode='keep_start')",
            pairs.source,
            pairs.stats.rows_dropped_long,
            pairs.max_length,
        )
    return pairs
