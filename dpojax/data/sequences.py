"""One prompt's sequences and per-prompt fields, shared by the [N, K, T] batch (`batching`) and packed rows
(`packing`): both cut each sequence the same way and describe their prompts with the same fields.
Glossary: `dpojax.glossary`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpojax.data.tokenize import TokenizedData


def truncate_sequence(prompt: np.ndarray, completion: np.ndarray, max_length: int | None, mode: str):
    """(ids, completion mask) of prompt + completion, cut to max_length like TRL's collator (`mode`)."""
    ids = np.concatenate([prompt, completion])
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
    if max_length is not None and len(ids) > max_length:
        sl = slice(None, max_length) if mode == "keep_start" else slice(len(ids) - max_length, None)
        ids, mask = ids[sl], mask[sl]
    return ids, mask


def prompt_fields(data: TokenizedData, indices: Sequence[int], prompt_mask: np.ndarray | None = None):
    """(response_mask_NxK, rank_NxK, prompt_mask_N, prompt_index_N) of data rows `indices`: padding responses (a row
    with fewer than K) get mask 0 and rank K; `prompt_mask` marks real prompts (1, the default) and fillers (0),
    whose index is -1."""
    n, k = len(indices), data.num_responses
    response_mask_NxK = np.zeros((n, k), np.float32)
    rank_NxK = np.full((n, k), k, np.int32)
    for row, m in enumerate(indices):
        n_real = len(data.response_ids[int(m)])
        response_mask_NxK[row, :n_real] = 1.0
        rank_NxK[row, :n_real] = data.ranks[int(m)]
    prompt_mask_N = np.ones(n, np.float32) if prompt_mask is None else np.asarray(prompt_mask, np.float32)
    prompt_index_N = np.where(prompt_mask_N > 0, np.asarray(indices, np.int64), -1).astype(np.int32)
    return response_mask_NxK, rank_NxK, prompt_mask_N, prompt_index_N


def labels_of(data: TokenizedData, indices: Sequence[int]) -> np.ndarray | None:
    """float32 [N] labels of unpaired rows `indices` (1 desirable, 0 undesirable); None for other formats."""
    if data.labels is None:
        return None
    return np.asarray(data.labels, bool)[np.asarray(indices, np.int64)].astype(np.float32)
