"""The tokenizer's own token ids, with less Python around the encoding.

`tokenizer(texts)` of a fast tokenizer (`transformers`' TokenizersBackend) is the backend's `encode_batch` plus a
conversion of every encoding into lists (ids, attention mask, ...); `apply_chat_template(tokenize=True)` copies
every message, renders the template and then calls `tokenizer(rendered, add_special_tokens=False)`. Here the
backend is called directly (`encode_batch_fast`: no character offsets), only the ids are read, and plain messages
are rendered without the copies (`_render_plain`). Each batch first renders and encodes its first text the
tokenizer's own way (which also resets the backend's truncation and padding, as every call of the tokenizer does)
and compares: any tokenizer whose call does more than the plain backend (a subclass that overrides the encoding,
truncation or padding left on the backend, ids that differ) or whose template call differs is called as is for
the whole batch. The ids are the same either way; only the time differs.
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


def encode_chats(tokenizer: Any, conversations: list[list[dict]], add_generation_prompt: bool = False
                 ) -> list[list[int]]:
    """`tokenizer.apply_chat_template(conversations, tokenize=True, tools=None, add_generation_prompt=...)`'s ids:
    the templates rendered in batches (`_render_plain` when the first conversation's text is the template call's
    own), the texts encoded as the template call encodes them (no special tokens added)."""
    out: list[list[int]] = []
    for start in range(0, len(conversations), ENCODE_CHUNK):
        batch = conversations[start : start + ENCODE_CHUNK]
        texts = _render_plain(tokenizer, batch, add_generation_prompt)
        if texts is None or texts[0] != _render(tokenizer, batch[:1], add_generation_prompt)[0]:
            texts = _render(tokenizer, batch, add_generation_prompt)
        out += _batch_ids(tokenizer, texts, add_special_tokens=False)
    return out


def _render(tokenizer: Any, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    return tokenizer.apply_chat_template(conversations, tokenize=False, tools=None,
                                         add_generation_prompt=add_generation_prompt)


def _render_plain(tokenizer: Any, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str] | None:
    """The template call's texts for conversations of plain messages (dicts of strings, no reasoning field), from
    the tokenizer's compiled template itself: `apply_chat_template` first copies every message into plain data,
    which changes nothing in such messages but costs as much as the rendering. None for any other conversation (or
    another transformers, whose helpers differ)."""
    try:  # apply_chat_template's own (private) helpers: the same compiled template and template variables
        from transformers.utils import chat_template_utils as ctu

        compiled = ctu._compile_jinja_template(tokenizer.get_chat_template(None, None))
        variables = ctu._plain_template_data(dict(tokenizer.special_tokens_map))
        reasoning = frozenset(ctu._REASONING_FIELDS)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    for conversation in conversations:
        for m in conversation:
            if type(m) is not dict or any(type(k) is not str or type(v) is not str or k in reasoning
                                          for k, v in m.items()):
                return None
    return [compiled.render(messages=c, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                            **variables) for c in conversations]


def prepare(tokenizer: Any) -> None:
    """One call of the tokenizer in this thread: the state its calls set on the backend (truncation and padding
    off, special tokens split or not) is set before threads share it (a change while another thread encodes
    fails); later calls find it set and change nothing."""
    tokenizer(text=["a"], add_special_tokens=False)
