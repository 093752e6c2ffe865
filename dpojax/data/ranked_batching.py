"""Ranked batches: all K responses of a prompt in one forward, [N, K, T], with a response mask.

Dimension letters: N ranked rows (prompts) in a batch, K responses per row (the dataset's largest K), T tokens.

Each sequence is prompt + response, truncated and right-padded exactly like a pair's (`batching.truncate_sequence`;
T is picked from the length buckets over the whole global batch by `batching.train_batches` / `eval_batches`).
A row with fewer than K responses gets padding responses: all pad tokens, segment id 0, no completion tokens,
`response_mask_NxK` = 0 and rank K, so they take part in no comparison, no metric and no gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from dpojax.data.batching import empty_rows, place_sequence, truncate_sequence
from dpojax.data.ranked_tokenize import TokenizedRankings
from dpojax.data.tokenize import TRUNCATION_MODES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RankedBatch:
    """N ranked rows; [:, k] is prompt + response k, responses best first; right-padded along T."""

    input_ids_NxKxT: np.ndarray  # int32, pad_token_id on padding (and on padding responses)
    segment_ids_NxKxT: np.ndarray  # int32, 1 on real tokens, 0 on padding
    positions_NxKxT: np.ndarray  # int32, 0..len-1 on real tokens, 0 on padding
    completion_mask_NxKxT: np.ndarray  # int32, 1 on response tokens (the ones whose log-probs are summed)
    response_mask_NxK: np.ndarray  # float32, 1 = real response, 0 = padding response (row with fewer than K)
    rank_NxK: np.ndarray  # int32 tie-group rank, 0 = best, non-decreasing along K; K on padding responses
    row_mask_N: np.ndarray  # float32, 1 = real row, 0 = filler row (a copy of a real one) in the last eval batch
    row_index_N: np.ndarray  # int32, index of the row in TokenizedRankings; -1 for filler rows

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.input_ids_NxKxT.shape

    def real_tokens(self) -> int:
        """Tokens of real responses in real rows (what tokens/s counts)."""
        real_NxK = self.response_mask_NxK * self.row_mask_N[:, None]
        return int(np.sum((np.asarray(self.segment_ids_NxKxT) > 0) * real_NxK[..., None]))


def collate_rankings(
    data: TokenizedRankings,
    indices: Sequence[int],
    *,
    length: int,
    max_length: int | None,
    truncation_mode: str,
    pair_mask: np.ndarray | None = None,
) -> RankedBatch:
    """The batch of rows `indices`, each sequence truncated to max_length and right-padded to exactly `length`.

    `pair_mask` (the name `batching` uses) marks real rows (1) and filler rows (0).
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    n, k = len(indices), data.num_responses
    arrays = empty_rows((n, k, length), data.pad_token_id)
    response_mask = np.zeros((n, k), np.float32)
    rank = np.full((n, k), k, np.int32)
    for row, p in enumerate(indices):
        p = int(p)
        for j, response in enumerate(data.response_ids[p]):
            ids, mask = truncate_sequence(data.prompt_ids[p], response, max_length, truncation_mode)
            if len(ids) > length:
                raise ValueError(f"row {p} response {j} has {len(ids)} tokens after truncation, more than {length}")
            place_sequence(arrays, (row, j), ids, mask)
        n_real = len(data.response_ids[p])
        response_mask[row, :n_real] = 1.0
        rank[row, :n_real] = data.ranks[p]
    row_mask = np.ones(n, np.float32) if pair_mask is None else np.asarray(pair_mask, np.float32)
    row_index = np.where(row_mask > 0, np.asarray(indices, np.int64), -1).astype(np.int32)
    return RankedBatch(*arrays, response_mask, rank, row_mask, row_index)
