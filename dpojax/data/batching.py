"""Preference batches [N prompts, K responses, T tokens], right-padded to a length bucket, in a deterministic,
resumable order. A pair is K = 2 (chosen, rejected). Glossary: `dpojax.glossary`.

Each sequence is prompt + response, truncated like TRL's `DataCollatorForPreference` (`keep_start`: its first
max_length tokens; `keep_end`: its last max_length tokens; the completion mask is cut the same way), then right-padded
to T = the smallest bucket >= the longest sequence in the *global* batch, so a run compiles a handful of shapes and
every host builds the same T. K is the data set's largest number of responses; a row with fewer gets padding
responses (all pad tokens, segment id 0, no completion tokens, `response_mask_NxK` 0, rank K) that take part in no
comparison, metric or gradient. Batches are host numpy; the trainer places them on devices. With `packing`
the same prompts of each step come as packed rows instead (`dpojax.data.packing`: shared prompts, no padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from dpojax.data.packing import PackedBatch, Packing, pack
from dpojax.data.sequences import labels_of, prompt_fields, truncate_sequence
from dpojax.data.tokenize import TRUNCATION_MODES, TokenizedData
from dpojax.errors import DataError

SMALLEST_BUCKET = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """N prompts; [:, k] is prompt + response k, responses best first; right-padded along T."""

    input_ids_NxKxT: np.ndarray  # int32, pad_token_id on padding (and on padding responses)
    segment_ids_NxKxT: np.ndarray  # int32, 1 on real tokens, 0 on padding (TRL's attention_mask)
    positions_NxKxT: np.ndarray  # int32, 0..len-1 on real tokens, 0 on padding
    completion_mask_NxKxT: np.ndarray  # int32, 1 on response tokens (the ones whose log-probs are summed)
    response_mask_NxK: np.ndarray  # float32, 1 = real response, 0 = padding response (a row with fewer than K)
    rank_NxK: np.ndarray  # int32 tie-group rank, 0 = best, non-decreasing along K; K on padding responses
    prompt_mask_N: np.ndarray  # float32, 1 = real prompt, 0 = filler (a copy of a real one) in the last eval batch
    prompt_index_N: np.ndarray  # int32, index of the row in TokenizedData; -1 for fillers
    ref_logps_NxK: np.ndarray | None = None  # float32 precomputed reference log-probs (ref_model.precompute)
    label_N: np.ndarray | None = None  # float32 unpaired rows' labels (KTO): 1 desirable, 0 undesirable; else None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.input_ids_NxKxT.shape

    def real_tokens(self) -> int:
        """Tokens of real responses of real prompts (what tokens/s counts)."""
        real_NxK = np.asarray(self.response_mask_NxK) * np.asarray(self.prompt_mask_N)[:, None]
        return int(np.sum((np.asarray(self.segment_ids_NxKxT) > 0) * real_NxK[..., None]))


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


def _effective_max_length(data: TokenizedData, max_length: int | None) -> int:
    """max_length, or when there is none the longest sequence in the data set (nothing is truncated)."""
    return max_length if max_length is not None else int(data.lengths_MxK.max())


# ------------------------------------------------------------------------------------------------------- collate
def collate(
    data: TokenizedData,
    indices: Sequence[int],
    *,
    length: int,
    max_length: int | None,
    truncation_mode: str,
    prompt_mask: np.ndarray | None = None,
) -> PreferenceBatch:
    """The batch of rows `indices`, each sequence truncated to max_length and right-padded to exactly `length`.
    `prompt_mask` marks real rows (1) and filler rows (0)."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    n, k = len(indices), data.num_responses
    input_ids = np.full((n, k, length), data.pad_token_id, np.int32)
    segment_ids, positions, completion = (np.zeros((n, k, length), np.int32) for _ in range(3))
    for row, m in enumerate(indices):
        m = int(m)
        for j, response in enumerate(data.response_ids[m]):
            ids, mask = truncate_sequence(data.prompt_ids[m], response, max_length, truncation_mode)
            t = len(ids)
            if t > length:
                raise ValueError(f"row {m} response {j} has {t} tokens after truncation, more than the length {length}")
            input_ids[row, j, :t], segment_ids[row, j, :t], completion[row, j, :t] = ids, 1, mask
            positions[row, j, :t] = np.arange(t, dtype=np.int32)
    return PreferenceBatch(input_ids, segment_ids, positions, completion, *prompt_fields(data, indices, prompt_mask),
                           label_N=labels_of(data, indices))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How batches of one data set are shaped: truncation, buckets and this host's share of each global batch."""

    max_length: int | None
    truncation_mode: str
    buckets: tuple[int, ...]
    process_index: int
    process_count: int
    packing: Packing | None = None  # None: [N, K, T] rows padded to a bucket


def _layout(data, batch_size, max_length, truncation_mode, buckets, process_index, process_count,
            packing=None) -> _Layout:
    if batch_size < 1:
        raise DataError(f"batch size must be a positive number of prompts, got {batch_size}")
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} prompts does not split evenly over {process_count} hosts")
    max_length = data.max_length if max_length is None else max_length
    mode = truncation_mode or data.truncation_mode
    buckets = tuple(buckets) if buckets else default_buckets(_effective_max_length(data, max_length))
    if packing is not None and batch_size % packing.micro_batches:
        raise DataError(f"batch size {batch_size} prompts does not split into {packing.micro_batches} micro-batches")
    return _Layout(max_length, mode, buckets, process_index, process_count, packing)


def _build(data: TokenizedData, idx: np.ndarray, mask: np.ndarray, lay: _Layout) -> PreferenceBatch | PackedBatch:
    """The batch for global row indices `idx`: T from the whole global batch, rows for this host only."""
    if lay.packing is not None:
        return pack(data, idx, mask, lay.packing, max_length=lay.max_length, truncation_mode=lay.truncation_mode,
                    process_index=lay.process_index, process_count=lay.process_count)
    longest = int(data.lengths_MxK[idx].max())
    if lay.max_length is not None:
        longest = min(longest, lay.max_length)
    share = len(idx) // lay.process_count
    local = slice(lay.process_index * share, (lay.process_index + 1) * share)
    return collate(data, idx[local], length=pick_bucket(longest, lay.buckets), max_length=lay.max_length,
                   truncation_mode=lay.truncation_mode, prompt_mask=mask[local])


# --------------------------------------------------------------------------------------------------------- order
def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A deterministic permutation of range(n_rows), different for each (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Full batches in one epoch; the incomplete last batch of each epoch is dropped."""
    return n_rows // batch_size


def train_batches(
    data: TokenizedData,
    batch_size: int,
    seed: int,
    *,
    start_step: int = 0,
    stop_step: int | None = None,
    max_length: int | None = None,
    truncation_mode: str | None = None,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    packing: Packing | None = None,
) -> Iterator[PreferenceBatch | PackedBatch]:
    """Training batches for global steps start_step, start_step+1, ... (until stop_step, or forever).

    Step s uses epoch s // steps_per_epoch, shuffled by `epoch_order(M, seed, epoch)`; each epoch yields
    M // batch_size full batches and drops the remaining M % batch_size rows (they come back, in other positions,
    in later epochs). Starting at start_step gives exactly the batches a run from step 0 yields there (exact resume).
    `batch_size` (prompts) is the global batch; with several hosts each gets its contiguous batch_size //
    process_count rows. max_length and truncation_mode default to the ones the data was tokenized with. With
    `packing` the same prompts come as a `PackedBatch` (`dpojax.data.packing`).
    """
    lay = _layout(data, batch_size, max_length, truncation_mode, buckets, process_index, process_count, packing)
    spe = steps_per_epoch(len(data), batch_size)
    if spe == 0:
        raise DataError(f"{data.source}: {len(data)} rows are fewer than one batch of {batch_size}")
    ones = np.ones(batch_size, np.float32)
    step, order_epoch, order = start_step, None, None
    while stop_step is None or step < stop_step:
        epoch, k = divmod(step, spe)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(data), seed, epoch)
        yield _build(data, order[k * batch_size : (k + 1) * batch_size], ones, lay)
        step += 1


def eval_batches(
    data: TokenizedData,
    batch_size: int,
    *,
    max_length: int | None = None,
    truncation_mode: str | None = None,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    packing: Packing | None = None,
) -> Iterator[PreferenceBatch | PackedBatch]:
    """Every row exactly once, in data set order. The last batch is filled up to batch_size with copies of its first
    row marked prompt_mask_N = 0 (copies, not empty rows, so per-token averages never divide by zero)."""
    lay = _layout(data, batch_size, max_length, truncation_mode, buckets, process_index, process_count, packing)
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        mask = np.ones(batch_size, np.float32)
        mask[len(idx) :] = 0.0
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        yield _build(data, idx, mask, lay)


def num_eval_batches(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)
