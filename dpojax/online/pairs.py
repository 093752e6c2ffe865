"""Scored samples -> the preference rows and batch the offline path builds (pure, host numpy).

A group is one prompt's K samples and their rewards. `best_vs_worst` makes one pair (the first sample of the
highest reward against the last of the lowest, as data.pairs_from_scores does), `all_pairs` every pair of samples
whose rewards differ (best first), `ranking` one row of the K samples ordered by reward (ties share a rank), for a
ranking loss. A group whose samples all score the same gives nothing: it is dropped and counted.

Shapes stay fixed: a group always takes `rows_per_group` rows of the batch (1, or K(K-1)/2 for all_pairs); the rows
it does not fill, and a dropped group's, are fillers (a copy of a real row, prompt_mask 0: they add nothing to the
loss, its gradients or its metrics), so a step of N prompts is a batch of N x rows_per_group rows. The rows are
prompt ids + completion ids exactly as sampled; the batch is the offline one (`batching.collate` to a length
bucket, or `packing.pack`), this host's share of the global batch. Glossary: `dpojax.glossary`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dpojax.data.batching import PreferenceBatch, collate, pick_bucket
from dpojax.data.formats import order_and_ranks
from dpojax.data.packing import PackedBatch, Packing, pack
from dpojax.data.tokenize import DataStats, TokenizedData

MODES = ("best_vs_worst", "all_pairs", "ranking")


def rows_per_group(mode: str, k: int) -> int:
    return k * (k - 1) // 2 if mode == "all_pairs" else 1


def group_rows(rewards_K: Sequence[float], mode: str) -> list[tuple[list[int], list[int]]]:
    """The rows of one group as (sample indices best first, their ranks); [] when every reward is the same."""
    order, ranks = order_and_ranks([float(r) for r in rewards_K])
    if ranks[-1] == 0:
        return []
    if mode == "ranking":
        return [(order, ranks)]
    if mode == "best_vs_worst":
        return [([order[0], order[-1]], [0, 1])]
    n = len(order)
    return [([order[i], order[j]], [0, 1]) for i in range(n) for j in range(i + 1, n) if ranks[i] < ranks[j]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run shapes its training batches (as the offline loader does for its data)."""

    buckets: tuple[int, ...]  # padded lengths (data.buckets, or the one bucket of the longest prompt + new tokens)
    max_length: int | None
    truncation_mode: str
    pad_id: int
    packing: Packing | None = None  # None: [N, K, T] rows padded to a bucket


@dataclasses.dataclass(frozen=True)
class StepRows:
    """One step's global preference rows: the data, the batch's row indices into it and their prompt mask."""

    data: TokenizedData
    indices: np.ndarray  # int64 [N * rows_per_group]
    mask: np.ndarray  # float32, 1 real row, 0 filler
    tied: int  # groups dropped because all their rewards were equal


def step_rows(prompt_ids: Sequence[np.ndarray], completions: Sequence[Sequence[int]], rewards_B: np.ndarray, k: int,
              mode: str, layout: Layout, source: str) -> StepRows:
    """The rows of N groups (prompt n's samples are completions[n*K:(n+1)*K], scored rewards_B[n*K:(n+1)*K])."""
    per = rows_per_group(mode, k)
    prompts, responses, ranks, groups, indices, mask, tied = [], [], [], [], [], [], 0
    for n, prompt in enumerate(prompt_ids):
        rows = group_rows(rewards_B[n * k:(n + 1) * k], mode)
        tied += not rows
        for samples, rank in rows:
            indices.append(len(prompts))
            prompts.append(np.asarray(prompt, np.int32))
            responses.append([np.asarray(completions[n * k + j], np.int32) for j in samples])
            ranks.append(np.asarray(rank, np.int32))
        mask += [1.0] * len(rows) + [0.0] * (per - len(rows))
        groups.append(len(rows))
    if not prompts:  # every group tied: one filler row, of the shape a real row has
        width = k if mode == "ranking" else 2
        prompts, ranks = [np.asarray(prompt_ids[0], np.int32)], [np.arange(width, dtype=np.int32)]
        responses = [[np.asarray(completions[j], np.int32) for j in range(width)]]
    filled, at = [], 0
    for real in groups:  # each group's real rows, then fillers copying its first row (or row 0)
        first = at if real else 0
        filled += list(range(at, at + real)) + [first] * (per - real)
        at += real
    stats = DataStats(len(prompt_ids), 0, 0, tied, 0, len(indices))
    data = TokenizedData(prompts, responses, ranks, np.arange(len(prompts), dtype=np.int64), layout.pad_id,
                         layout.max_length, layout.truncation_mode, "online", source, stats, "online")
    return StepRows(data, np.asarray(filled, np.int64), np.asarray(mask, np.float32), tied)


def host_batch(rows: StepRows, layout: Layout, process_index: int = 0,
               process_count: int = 1) -> PreferenceBatch | PackedBatch:
    """This host's share of the step's global batch, built as the offline loader builds one (`batching._build`)."""
    data, idx, mask = rows.data, rows.indices, rows.mask
    if layout.packing is not None:
        return pack(data, idx, mask, layout.packing, max_length=layout.max_length,
                    truncation_mode=layout.truncation_mode, process_index=process_index, process_count=process_count)
    longest = int(data.lengths_MxK[idx].max())
    if layout.max_length is not None:
        longest = min(longest, layout.max_length)
    share = len(idx) // process_count
    local = slice(process_index * share, (process_index + 1) * share)
    return collate(data, idx[local], length=pick_bucket(longest, layout.buckets), max_length=layout.max_length,
                   truncation_mode=layout.truncation_mode, prompt_mask=mask[local])
