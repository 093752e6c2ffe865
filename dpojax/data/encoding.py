"""The tokenizer's own token ids, with less Python around the encoding.

`tokenizer(texts)` of a fast tokenizer (`transformers`' TokenizersBackend) is the backend's `encode_batch` plus a
conversion of every encoding into lists (ids, attention mask, ...); `apply_chat_template(tokenize=True)` renders
the template and then calls `tokenizer(rendered, add_special_tokens=False)`. Here the backend is called directly
(`encode_batch_fast`: no character offsets) and only the ids are read. Each batch first encodes its first text
the tokenizer's own way (which also resets the backend's truncation and padding, as every call of the tokenizer
does) and compares: any tokenizer whose call does more than the plain backend (a subclass that overrides the
encoding, truncation or padding left on the backend, ids that differ) is encoded by its own call instead. The ids
are the same either way; only the time differs.
"""

from __future__ import annotations

from typing import Any

ENCODE_CHUNK = 1024  # texts per tokenizer batch call


def _plain_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` whose `encode_batch` alone makes `tokenizer(texts)`'s ids, or None."""
    try:  # the fast tokenizer classes of transformers 5 (optional: a tokenizer of another kind is called as is)
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if not (isinstance(tokenizer, TokenizersBackend) and cls._encode_plus is TokenizersBackend._encode_plus
            and cls.__call__ is PreTrainedTokenizerBase.__call__):
        return None
    backend = tokenizer.backend_tokenizer
    if (backend.truncation is not None or backend.padding is not None
            or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))):
        return None
    return backend


def _batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    first = tokenizer(text=texts[:1], add_special_tokens=add_special_tokens)["input_ids"][0]
    backend = _plain_backend(tokenizer)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
        if list(ids[0]) == list(first):
            return ids
    return tokenizer(text=texts, add_special_tokens=add_special_tokens)["input_ids"]


def encode_texts(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=...)["input_ids"]`, ENCODE_CHUNK texts per batch."""
    out: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        out += _batch_ids(tokenizer, texts[start : start + ENCODE_CHUNK], add_special_tokens)
    return out


def encode_chats(tokenizer: Any, conversations: list[list[dict]], **kwargs: Any) -> list[list[int]]:
    """`tokenizer.apply_chat_template(conversations, tokenize=True, tools=None, **kwargs)["input_ids"]`: the
    templates rendered in batches, the rendered texts encoded as the template call encodes them (no special tokens
    added)."""
    out: list[list[int]] = []
    for start in range(0, len(conversations), ENCODE_CHUNK):
        texts = tokenizer.apply_chat_template(conversations[start : start + ENCODE_CHUNK], tokenize=False, tools=None,
                                              **kwargs)
        out += _batch_ids(tokenizer, texts, add_special_tokens=False)
    return out


def prepare(tokenizer: Any) -> None:
    """One call of the tokenizer in this thread: the state its calls set on the backend (truncation and padding
    off, special tokens split or not) is set before threads share it (a change while another thread encodes
    fails); later calls find it set and change nothing."""
    tokenizer(text=["a"], add_special_tokens=False)
