"""Preference batches: [chosen; rejected] right-padded to a length bucket, in a deterministic, resumable order.

Dimension letters: N pairs in a batch, 2 = (chosen, rejected), T tokens (a length bucket), P pairs in the dataset.

Each sequence is prompt + completion, truncated like TRL's `DataCollatorForPreference` (`keep_start`: its first
max_length tokens; `keep_end`: its last max_length tokens; the completion mask is cut the same way), then right-padded
to T = the smallest bucket >= the longest sequence in the *global* batch, so a run compiles a handful of shapes and
every host builds the same T. Batches are host numpy; the trainer places them on devices.
`train_batches` and `eval_batches` batch ranked data (`ranked_tokenize.TokenizedRankings`) the same way, one
ranked row in place of one pair, into `ranked_batching.RankedBatch` [N, K, T].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from dpojax.data.tokenize import TRUNCATION_MODES, TokenizedPairs
from dpojax.errors import DataError

SMALLEST_BUCKET = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """N preference pairs; [:, 0] is prompt+chosen, [:, 1] is prompt+rejected; right-padded along T."""

    input_ids_Nx2xT: np.ndarray  # int32, pad_token_id on padding
    segment_ids_Nx2xT: np.ndarray  # int32, 1 on real tokens, 0 on padding (TRL's attention_mask)
    positions_Nx2xT: np.ndarray  # int32, 0..len-1 on real tokens, 0 on padding
    completion_mask_Nx2xT: np.ndarray  # int32, 1 on completion tokens (the ones whose log-probs are summed)
    pair_mask_N: np.ndarray  # float32, 1 = real pair, 0 = filler pair (a copy of a real one) in the last eval batch
    pair_index_N: np.ndarray  # int32, index of the pair in TokenizedPairs; -1 for filler pairs
    ref_logps_Nx2: np.ndarray | None = None  # float32 precomputed reference log-probs (ref_model.precompute)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.input_ids_Nx2xT.shape


# ------------------------------------------------------------------------------------------------------ buckets
def default_buckets(max_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Powers of two from `smallest` (or the largest power of two <= max_length, if that is smaller) up to
    max_length, plus max_length itself: e.g. 300 -> (64, 128, 256, 300); 20 -> (16, 20)."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    b = min(smallest, 1 << (max_length.bit_length() - 1))
    buckets = []
    while b < max_length:
        buckets.append(b)
        b *= 2
    return (*buckets, max_length)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(f"sequence length {length} exceeds the largest bucket {max(buckets)}")


def _effective_max_length(pairs: TokenizedPairs, max_length: int | None) -> int:
    """max_length, or when there is none the longest sequence in the dataset (nothing is truncated)."""
    return max_length if max_length is not None else int(_lengths(pairs).max())


# ------------------------------------------------------------------------------------------------------- collate
def _truncated(pairs: TokenizedPairs, k: int, side: int, max_length: int | None, mode: str):
    completion = (pairs.chosen_ids, pairs.rejected_ids)[side][k]
    return truncate_sequence(pairs.prompt_ids[k], completion, max_length, mode)


def truncate_sequence(prompt: np.ndarray, completion: np.ndarray, max_length: int | None, mode: str):
    """(ids, completion mask) of prompt + completion, cut to max_length like TRL's collator (`mode`)."""
    ids = np.concatenate([prompt, completion])
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
    if max_length is not None and len(ids) > max_length:
        sl = slice(None, max_length) if mode == "keep_start" else slice(len(ids) - max_length, None)
        ids, mask = ids[sl], mask[sl]
    return ids, mask


def empty_rows(shape: tuple[int, ...], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, segment_ids, positions, completion_mask) of `shape` [..., T]: all padding."""
    return (np.full(shape, pad_token_id, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
            np.zeros(shape, np.int32))


def place_sequence(arrays, at: tuple[int, ...], ids: np.ndarray, mask: np.ndarray) -> None:
    """Write one sequence at index `at` of the `empty_rows` arrays, right-padded: its ids, segment id 1,
    positions 0.. and completion mask."""
    input_ids, segment_ids, positions, completion = arrays
    n = len(ids)
    input_ids[at][:n] = ids
    segment_ids[at][:n] = 1
    positions[at][:n] = np.arange(n, dtype=np.int32)
    completion[at][:n] = mask


def collate(
    pairs: TokenizedPairs,
    indices: Sequence[int],
    *,
    length: int,
    max_length: int | None,
    truncation_mode: str,
    pair_mask: np.ndarray | None = None,
) -> PreferenceBatch:
    """Build the batch of pairs `indices`, truncated to max_length and right-padded to exactly `length` tokens."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    n = len(indices)
    arrays = empty_rows((n, 2, length), pairs.pad_token_id)
    for row, k in enumerate(indices):
        for side in (0, 1):
            ids, mask = _truncated(pairs, int(k), side, max_length, truncation_mode)
            if len(ids) > length:
                raise ValueError(f"pair {k} has {len(ids)} tokens after truncation, more than the length {length}")
            place_sequence(arrays, (row, side), ids, mask)
    pair_mask = np.ones(n, np.float32) if pair_mask is None else np.asarray(pair_mask, np.float32)
    pair_index = np.where(pair_mask > 0, np.asarray(indices, np.int64), -1).astype(np.int32)
    return PreferenceBatch(*arrays, pair_mask, pair_index)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How batches of one dataset are shaped: truncation, buckets and this host's share of each global batch."""

    max_length: int | None
    truncation_mode: str
    buckets: tuple[int, ...]
    process_index: int
    process_count: int


def _layout(pairs, batch_pairs, max_length, truncation_mode, buckets, process_index, process_count) -> _Layout:
    if batch_pairs < 1:
        raise DataError(f"batch size must be a positive number of pairs, got {batch_pairs}")
    if batch_pairs % process_count:
        raise DataError(f"batch size {batch_pairs} pairs does not split evenly over {process_count} hosts")
    max_length = pairs.max_length if max_length is None else max_length
    mode = truncation_mode or pairs.truncation_mode
    buckets = tuple(buckets) if buckets else default_buckets(_effective_max_length(pairs, max_length))
    return _Layout(max_length, mode, buckets, process_index, process_count)


def _build(pairs: TokenizedPairs, lengths_Px2: np.ndarray, idx: np.ndarray, mask: np.ndarray, lay: _Layout):
    """The batch for global pair indices `idx`: T from the whole global batch, rows for this host only."""
    longest = int(lengths_Px2[idx].max())
    if lay.max_length is not None:
        longest = min(longest, lay.max_length)
    share = len(idx) // lay.process_count
    local = slice(lay.process_index * share, (lay.process_index + 1) * share)
    return _collate_any(
        pairs,
        idx[local],
        length=pick_bucket(longest, lay.buckets),
        max_length=lay.max_length,
        truncation_mode=lay.truncation_mode,
        pair_mask=mask[local],
    )


def _lengths(data) -> np.ndarray:
    """Untruncated sequence lengths: [P, 2] for pairs, [P, K] for rankings (`ranked_tokenize.TokenizedRankings`)."""
    return data.lengths_Px2 if isinstance(data, TokenizedPairs) else data.lengths_PxK


def _collate_any(data, indices, **kw):
    """Pairs -> PreferenceBatch [N, 2, T]; rankings -> `ranked_batching.RankedBatch` [N, K, T]."""
    if isinstance(data, TokenizedPairs):
        return collate(data, indices, **kw)
    from dpojax.data.ranked_batching import collate_rankings  # it imports this module

    return collate_rankings(data, indices, **kw)


# --------------------------------------------------------------------------------------------------------- order
def epoch_order(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """A deterministic permutation of range(n_pairs), different for each (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


def steps_per_epoch(n_pairs: int, batch_pairs: int) -> int:
    """Full batches in one epoch; the incomplete last batch of each epoch is dropped."""
    return n_pairs // batch_pairs


def train_batches(
    pairs: TokenizedPairs,
    batch_pairs: int,
    seed: int,
    *,
    start_step: int = 0,
    stop_step: int | None = None,
    max_length: int | None = None,
    truncation_mode: str | None = None,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[PreferenceBatch]:
    """Training batches for global steps start_step, start_step+1, ... (until stop_step, or forever).

    Step s uses epoch s // steps_per_epoch, shuffled by `epoch_order(P, seed, epoch)`; each epoch yields
    P // batch_pairs full batches and drops the remaining P % batch_pairs pairs (they come back, in other positions,
    in later epochs). Starting at start_step gives exactly the batches a run from step 0 yields there (exact resume).
    `batch_pairs` is the global batch; with several hosts each gets its contiguous batch_pairs // process_count rows.
    max_length and truncation_mode default to the ones the pairs were tokenized with.
    """
    lay = _layout(pairs, batch_pairs, max_length, truncation_mode, buckets, process_index, process_count)
    spe = steps_per_epoch(len(pairs), batch_pairs)
    if spe == 0:
        raise DataError(f"{pairs.source}: {len(pairs)} pairs are fewer than one batch of {batch_pairs}")
    lengths = _lengths(pairs)
    ones = np.ones(batch_pairs, np.float32)
    step, order_epoch, order = start_step, None, None
    while stop_step is None or step < stop_step:
        epoch, k = divmod(step, spe)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(pairs), seed, epoch)
        yield _build(pairs, lengths, order[k * batch_pairs : (k + 1) * batch_pairs], ones, lay)
        step += 1


def eval_batches(
    pairs: TokenizedPairs,
    batch_pairs: int,
    *,
    max_length: int | None = None,
    truncation_mode: str | None = None,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[PreferenceBatch]:
    """Every pair exactly once, in dataset order. The last batch is filled up to batch_pairs with copies of its first
    pair marked pair_mask_N = 0 (copies, not empty rows, so per-token averages never divide by zero)."""
    lay = _layout(pairs, batch_pairs, max_length, truncation_mode, buckets, process_index, process_count)
    lengths = _lengths(pairs)
    for start in range(0, len(pairs), batch_pairs):
        idx = np.arange(start, min(start + batch_pairs, len(pairs)))
        mask = np.ones(batch_pairs, np.float32)
        mask[len(idx) :] = 0.0
        idx = np.concatenate([idx, np.full(batch_pairs - len(idx), idx[0])])
        yield _build(pairs, lengths, idx, mask, lay)


def num_eval_batches(n_pairs: int, batch_pairs: int) -> int:
    return -(-n_pairs // batch_pairs)
