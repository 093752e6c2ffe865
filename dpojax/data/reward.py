"""Reward-model rows (task: reward): the tokenized preference rows as TRL 1.16's `RewardTrainer` keeps them.

TRL tokenizes each full sequence, prompt + response, as one text (standard rows: the EOS string appended unless the
response ends with it; conversational rows: the chat template over prompt + response messages, no generation
prompt). dpojax's preference tokenization (`data.tokenize`, TRL's DPO rules) makes those same ids, split at the
prompt: prompt_ids + response_ids is TRL's reward sequence, and the shared prompt lets packing compute it once.
TRL does not truncate reward data: it drops every pair whose chosen or rejected sequence has more than max_length
tokens, and so does `reward_rows` (any response of a ranking), so batching never cuts a sequence.
Glossary: `dpojax.glossary`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np

from dpojax.data.tokenize import TokenizedData
from dpojax.errors import DataError

log = logging.getLogger(__name__)


def reward_rows(data: TokenizedData, max_length: int | None) -> TokenizedData:
    """`data` without the rows that have a sequence (prompt + response) longer than `max_length` tokens (TRL's
    filter), counted in `stats.rows_dropped_long`; the fingerprint marks the filter."""
    if max_length is None:
        return data
    keep = np.flatnonzero(np.max(data.lengths_MxK, axis=1) <= max_length)
    dropped = len(data) - len(keep)
    if not len(keep):
        raise DataError(f"{data.source}: every row has a sequence (prompt + response) longer than data.max_length="
                        f"{max_length} tokens, and a reward model drops such rows as TRL does; raise data.max_length.")
    if dropped:
        log.warning("%s: dropped %d row(s) with a sequence longer than max_length=%d tokens (TRL's reward data "
                    "filter)", data.source, dropped, max_length)
    stats = dataclasses.replace(data.stats, rows_dropped_long=data.stats.rows_dropped_long + dropped,
                                rows_out=len(keep))
    fingerprint = hashlib.sha256(f"{data.fingerprint}:reward:{max_length}".encode()).hexdigest()[:40]
    return dataclasses.replace(
        data, prompt_ids=[data.prompt_ids[m] for m in keep], response_ids=[data.response_ids[m] for m in keep],
        ranks=[data.ranks[m] for m in keep], row_index=data.row_index[keep], stats=stats, fingerprint=fingerprint)
