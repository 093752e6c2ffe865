"""Packed preference batches: every prompt computed once, no padding, the same numbers as the [N, K, T] batch.

A prompt group is `[prompt | response_1 | ... | response_K]` laid out along one row. Each response's positions
continue from the end of its prompt (as if it alone followed the prompt); a token attends causally to its own
response and to its group's prompt, never to another response or group (`branch_ids`: 0 on the prompt, k + 1 on
response k; `segment_ids`: one id per group part in a row, 0 on padding). Rows are long: each micro-batch packs its
prompts' groups into a few rows per data-parallel shard, balanced by a deterministic longest-first assignment, and
the row length is rounded up to a sixteenth of an octave, so a run compiles a handful of (rows, length) shapes.
Shared-prompt rows may hold up to ROW_CAPACITY x max_length tokens (the XLA kernel reads only a band of keys);
padding-free rows at most max_length (splash and cuDNN compute every causal block of a row).

Truncation stays per sequence (prompt + one response, TRL's rules; `sequences.truncate_sequence`), so packing never
cuts further than the [N, K, T] batch does:
- `keep_start` keeps every sequence's first max_length tokens: the kept prompt (min(P, max_length) tokens) is the
  same for every response, so it is shared and each response keeps what is left of it.
- `keep_end` keeps the last max_length tokens: when no sequence of the group was cut its prompt is intact and
  shared; otherwise the responses may keep different parts of the prompt and the group falls back to one
  sequence per response (each its own branch with an empty shared prompt): still packed, nothing shared.
- A group longer than max_length (UltraFeedback-like: 150 + 4 x 250 tokens at 1024) is split into parts of at most
  max_length tokens, each `[prompt | some responses]` with the prompt repeated. So no attention segment is longer
  than max_length, which is the band the attention kernel uses to skip key blocks (`models.attention`).

The log-prob head scores entries, not positions: entry e of a row predicts token `target[e]` from the hidden state
at `src[e]` and adds to the sums of `owner[e]`, a slot `n * (K + 1) + k` of the micro-batch's prompt n (k = K: the
shared prompt, which only ORPO's prompt NLL reads). A response's first token is predicted from its prompt's last
position, every other token from the token before it in its own response. Entries come first in each row, in row
order, so the head skips chunks past the longest row's entries. Flags per entry: `completion` (the scored
completion tokens: logps/tokens), `lm` (every token after the first of its sequence: ORPO's prompt+response NLL),
`ld_shared` (LD-DPO: within the prompt's shortest response length, counting scored tokens in order).

Identical responses of a prompt (TRL keeps such rows) are laid out once: the copy's entries read the original's
positions, so their sums are bitwise equal (as in the [N, K, T] batch, where they are equal computations) and a
metric such as `rewards/accuracies` (chosen > rejected) counts them as TRL does.

`pack` builds the global batch on every host (deterministic in the batch's prompts only: resume is exact and every
host count builds the same global batch) and returns this host's contiguous share of rows and prompts. With A
micro-batches, micro-batch a holds prompts a, a + A, ... (as for unpacked batches) and rows a, a + A, ....
Glossary: `dpojax.glossary` (P rows, J row length, I entries = J per row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from dpojax.data.sequences import labels_of, prompt_fields, truncate_sequence
from dpojax.data.tokenize import TokenizedData

MODES = ("auto", "none", "padding_free", "shared_prompt")
ROW_QUANTUM = 64  # row lengths are multiples of this (fewer shapes, so fewer compiles, for short rows)
ROW_CAPACITY = 8  # shared_prompt rows hold up to this many times max_length tokens (the XLA kernel reads a band)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """P packed rows of J tokens (this host's share) and the N prompts they hold; per-prompt fields as in
    `PreferenceBatch`, so the loss side does not see the difference."""

    input_ids_PxJ: np.ndarray  # int32, pad_token_id on padding
    positions_PxJ: np.ndarray  # int32, position within the token's own sequence (prompt 0..P-1, response P..)
    segment_ids_PxJ: np.ndarray  # int32, one id per group part within the row; 0 on padding
    branch_ids_PxJ: np.ndarray  # int32, 0 on a shared prompt, k + 1 on response k
    src_PxI: np.ndarray  # int32, entry e: position of the hidden state that predicts target e
    target_PxI: np.ndarray  # int32, entry e: the predicted token
    owner_PxI: np.ndarray  # int32, entry e: slot n * (K + 1) + k within its micro-batch (0 on empty entries)
    completion_PxI: np.ndarray  # float32, entry e is a scored completion token
    lm_PxI: np.ndarray  # float32, entry e counts in the prompt+response NLL (only filled for losses that use it)
    ld_shared_PxI: np.ndarray  # float32, entry e is within its prompt's shared length (LD-DPO)
    completion_len_NxK: np.ndarray  # float32, completion tokens of each sequence (TRL's IPO normaliser)
    response_mask_NxK: np.ndarray
    rank_NxK: np.ndarray
    prompt_mask_N: np.ndarray
    prompt_index_N: np.ndarray
    ref_logps_NxK: np.ndarray | None = None
    # float32: how many sequences of the [N, K, T] batch hold the token (a shared prompt's token: its responses, an
    # aliased response's: 2; 0 on padding and filler prompts), the token weights of MoE router statistics
    token_weight_PxJ: np.ndarray | None = None
    # int32 (reward models, `Packing.scores`): where each sequence is scored, row * J + position within its
    # micro-batch's rows: its last token whose id is not the pad id (an alias: its original's); 0 for padding
    score_at_NxK: np.ndarray | None = None
    label_N: np.ndarray | None = None  # float32 unpaired rows' labels (KTO): 1 desirable, 0 undesirable; else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids_PxJ.shape

    def real_tokens(self) -> int:
        """Computed positions that hold a token (a shared prompt counts once): what tokens/s counts."""
        return int(np.sum(np.asarray(self.segment_ids_PxJ) > 0))


@dataclasses.dataclass(frozen=True)
class Packing:
    """How to pack: `mode` (padding_free | shared_prompt), the data-parallel `shards` (rows per micro-batch are a
    multiple), the `micro_batches` A per step, and whether entries for ORPO's prompt+response NLL are needed."""

    mode: str
    shards: int = 1
    micro_batches: int = 1
    prompt_nll: bool = False
    scores: bool = False  # fill `PackedBatch.score_at_NxK` (a reward model scores each sequence at one position)

    @property
    def row_capacity(self) -> int:
        """Most tokens of a row, in units of max_length: padding-free rows are for kernels that mask by segment ids
        alone (splash, cuDNN), which compute every causal block of a row, so they stay max_length long; shared-prompt
        rows run on the XLA kernel, whose cost grows with row length x max_length, so they may be longer."""
        return ROW_CAPACITY if self.mode == "shared_prompt" else 1


@dataclasses.dataclass
class _Part:
    """One attention segment: the shared prefix and some of the group's branches."""

    prompt_slot: int  # n * (K + 1) + K of the group's prompt
    n: int  # prompt index within the micro-batch
    prefix: np.ndarray
    branches: list  # (k, ids, completion mask, alias): alias j = the same tokens as branch j, not laid out again
    first: bool  # the group's first part (its prompt's NLL entries are emitted once)
    ld_shared: int  # the group's shared length (scored completion tokens)
    weight: float = 1.0  # 1 for a real prompt, 0 for a filler (its tokens get token weight 0)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(ids) for _, ids, _, alias in self.branches if alias is None)


def _sequences(data: TokenizedData, m: int, max_length: int | None, mode: str):
    return [truncate_sequence(data.prompt_ids[m], r, max_length, mode) for r in data.response_ids[m]]


def _group_parts(data: TokenizedData, m: int, n: int, k_max: int, *, max_length: int | None, truncation: str,
                 share: bool, weight: float = 1.0) -> tuple[list[_Part], np.ndarray]:
    """The parts of prompt row m (micro-batch index n) and its completion lengths [K]."""
    prompt = np.asarray(data.prompt_ids[m])
    seqs = _sequences(data, m, max_length, truncation)
    completion_len = np.zeros(k_max, np.float32)
    scored = np.zeros(k_max, np.int64)  # scored completion tokens per sequence (the first position never scores)
    for k, (_ids, mask) in enumerate(seqs):
        completion_len[k] = mask.sum()
        scored[k] = mask[1:].sum()
    ld_shared = int(scored.min())  # padding responses count 0 tokens, as in the [N, K, T] batch
    if truncation == "keep_start":
        p = min(len(prompt), max_length) if max_length is not None else len(prompt)
    else:
        intact = max_length is None or all(len(prompt) + len(r) <= max_length for r in data.response_ids[m])
        p = len(prompt) if intact else 0
    if not share:
        p = 0
    prefix = prompt[:p]
    branches = []
    for k, (ids, mask) in enumerate(seqs):
        alias = next((j for j, (ids_j, mask_j) in enumerate(seqs[:k])
                      if np.array_equal(ids_j, ids) and np.array_equal(mask_j, mask)), None)
        branches.append((k, ids[p:], mask[p:], alias))
    cap = max_length if max_length is not None else max(len(ids) for ids, _ in seqs)
    slot = n * (k_max + 1) + k_max
    parts, part_of = [], {}
    for branch in branches:
        k, ids, _, alias = branch
        if alias is not None:  # identical responses (TRL keeps such rows) read the same positions: equal sums
            part = parts[part_of[alias]]
        elif p == 0 or not parts or (parts[-1].branches and parts[-1].length + len(ids) > cap):
            # a new part: with nothing shared one segment per sequence (what splash and cuDNN express)
            parts.append(_Part(slot, n, prefix, [], not parts, ld_shared, weight))
            part = parts[-1]
        else:
            part = parts[-1]
        part.branches.append(branch)
        part_of[k] = parts.index(part)
    return parts, completion_len


def _assign(lengths: Sequence[int], bins: int) -> list[list[int]]:
    """Longest first onto the least-filled bin (ties: lowest index): a deterministic balanced assignment."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fill, out = [0] * bins, [[] for _ in range(bins)]
    for i in order:
        b = min(range(bins), key=lambda j: (fill[j], j))
        fill[b] += lengths[i]
        out[b].append(i)
    return [sorted(parts) for parts in out]


def row_length(n_tokens: int) -> int:
    """n_tokens rounded up to a sixteenth of an octave, and to a multiple of ROW_QUANTUM (which is coarser below 2,048
    tokens): at most ~6% padding from 1,024 tokens on."""
    n = max(n_tokens, ROW_QUANTUM)
    step = max(ROW_QUANTUM, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


class _RowWriter:
    def __init__(self, length: int, pad_id: int, scores: bool = False):
        self.ids = np.full(length, pad_id, np.int32)
        self.pos, self.seg, self.branch = (np.zeros(length, np.int32) for _ in range(3))
        self.src, self.target, self.owner = (np.zeros(length, np.int32) for _ in range(3))
        self.completion, self.lm, self.ld, self.weight = (np.zeros(length, np.float32) for _ in range(4))
        self.t = 0  # next token position
        self.e = 0  # next entry
        self.pad_id, self.scores = pad_id, scores
        self.scored_at: dict[tuple[int, int], int] = {}  # (prompt n, response k) -> its scored position (`scores`)

    def entries(self, src, target, owner, completion, lm, ld):
        """Append entries (arrays of one length, or scalars broadcast over it)."""
        e, n = self.e, len(src)
        self.src[e : e + n], self.target[e : e + n], self.owner[e : e + n] = src, target, owner
        self.completion[e : e + n], self.lm[e : e + n], self.ld[e : e + n] = completion, lm, ld
        self.e += n

    def write(self, part: _Part, segment: int, k_max: int, prompt_nll: bool):
        start, p = self.t, len(part.prefix)
        self.ids[start : start + p], self.pos[start : start + p] = part.prefix, np.arange(p)
        self.seg[start : start + p] = segment
        self.weight[start : start + p] = part.weight * len(part.branches)  # each branch's sequence holds the prompt
        if prompt_nll and part.first and p > 1:  # the prompt's tokens after its first, each from the one before
            self.entries(start + np.arange(p - 1), part.prefix[1:], part.prompt_slot, 0.0, 1.0, 0.0)
        t, placed = start + p, {}
        for k, ids, mask, alias in part.branches:
            n = len(ids)
            if alias is None:
                self.ids[t : t + n], self.pos[t : t + n] = ids, p + np.arange(n)
                self.seg[t : t + n], self.branch[t : t + n] = segment, k + 1
                self.weight[t : t + n] = part.weight
                placed[k] = t
            else:  # the alias's sequence holds its original's tokens too
                self.weight[placed[alias] : placed[alias] + n] += part.weight
            at = placed[k if alias is None else alias]  # an alias scores its original's positions
            if self.scores:
                self.scored_at[part.n, k] = self._last_real(part.prefix, start, ids, at)
            # token i is predicted from the one before it; the first from the prompt's last (none without a prompt)
            src = at + np.arange(n) - 1
            if n:
                src[0] = start + p - 1 if p > 0 else -1
            completion = np.asarray(mask, np.float32) * (src >= 0)
            scored = np.cumsum(completion)  # scored completion tokens so far (LD-DPO's shared length)
            take = (src >= 0) & ((completion > 0) | prompt_nll)
            ld = ((completion > 0) & (scored <= part.ld_shared)).astype(np.float32)
            self.entries(src[take], np.asarray(ids)[take], part.n * (k_max + 1) + k, completion[take], 1.0, ld[take])
            if alias is None:
                t += n
        self.t = t


    def _last_real(self, prefix: np.ndarray, start: int, ids, at: int) -> int:
        """The position of the rightmost token of prefix + ids whose id is not the pad id (the first position when
        there is none), as transformers' sequence classifiers pick the scored token."""
        full = np.concatenate([prefix, np.asarray(ids, prefix.dtype)])
        where = np.concatenate([start + np.arange(len(prefix)), at + np.arange(len(ids))])
        real = np.flatnonzero(full != self.pad_id)
        return int(where[real[-1] if len(real) else 0])


def pack(data: TokenizedData, indices: Sequence[int], prompt_mask: np.ndarray, packing: Packing, *,
         max_length: int | None, truncation_mode: str, process_index: int = 0,
         process_count: int = 1) -> PackedBatch:
    """The packed global batch of rows `indices` (prompt_mask: 1 real, 0 filler), this host's share of it."""
    n_global, k_max, a = len(indices), data.num_responses, packing.micro_batches
    if n_global % a:
        raise ValueError(f"{n_global} prompts do not split into {a} micro-batches")
    share = packing.mode == "shared_prompt"
    micro_parts, completion_len = [], np.zeros((n_global, k_max), np.float32)
    for micro in range(a):
        parts = []
        for n, p in enumerate(range(micro, n_global, a)):
            group, completion_len[p] = _group_parts(data, int(indices[p]), n, k_max, max_length=max_length,
                                                    truncation=truncation_mode, share=share,
                                                    weight=float(prompt_mask[p]))
            parts.extend(group)
        micro_parts.append(parts)
    cap = max_length if max_length is not None else int(data.lengths_MxK.max())
    shards, capacity = packing.shards, packing.row_capacity * cap
    total = max(sum(part.length for part in parts) for parts in micro_parts)
    rows = shards * max(1, -(-total // (shards * capacity)))  # rows per micro-batch, a multiple of the shards
    while True:  # balanced rows; more of them while one would exceed its capacity (parts are at most `cap` long)
        assignments = [_assign([part.length for part in parts], rows) for parts in micro_parts]
        longest = max(sum(parts[i].length for i in row) for parts, rows_ in zip(micro_parts, assignments)
                      for row in rows_)
        if longest <= capacity:
            break
        rows += shards
    length = row_length(longest)
    writers = []
    for parts, rows_ in zip(micro_parts, assignments):
        micro_writers = []
        for row in rows_:
            w = _RowWriter(length, data.pad_token_id, packing.scores)
            for segment, i in enumerate(row, start=1):
                w.write(parts[i], segment, k_max, packing.prompt_nll)
            micro_writers.append(w)
        writers.append(micro_writers)
    ordered = [writers[r % a][r // a] for r in range(rows * a)]  # row r of micro-batch a sits at r * A + a

    def stack(name):
        return np.stack([getattr(w, name) for w in ordered])

    response_mask, rank, prompt_mask, prompt_index = prompt_fields(data, indices, prompt_mask)
    if rows * a % process_count or n_global % process_count:
        raise ValueError(f"{rows * a} rows / {n_global} prompts do not split over {process_count} hosts")
    score_at = _score_positions(writers, n_global, k_max, length) if packing.scores else None
    r_share, n_share = rows * a // process_count, n_global // process_count
    rs = slice(process_index * r_share, (process_index + 1) * r_share)
    ns = slice(process_index * n_share, (process_index + 1) * n_share)
    return PackedBatch(
        stack("ids")[rs], stack("pos")[rs], stack("seg")[rs], stack("branch")[rs], stack("src")[rs],
        stack("target")[rs], stack("owner")[rs], stack("completion")[rs], stack("lm")[rs], stack("ld")[rs],
        completion_len[ns], response_mask[ns], rank[ns], prompt_mask[ns], prompt_index[ns],
        token_weight_PxJ=stack("weight")[rs], score_at_NxK=None if score_at is None else score_at[ns],
        label_N=None if data.labels is None else labels_of(data, indices)[ns],
    )


def _score_positions(writers: list[list[_RowWriter]], n_global: int, k_max: int, length: int) -> np.ndarray:
    """int32 [N, K]: each sequence's scored position, row * length + position within its micro-batch's rows."""
    a = len(writers)
    out = np.zeros((n_global, k_max), np.int32)
    for micro, micro_writers in enumerate(writers):
        for row, w in enumerate(micro_writers):
            for (n, k), position in w.scored_at.items():
                out[micro + n * a, k] = row * length + position
    return out
