"""Data: load rows, validate and normalize formats, tokenize like TRL 1.16 (cached), and batch."""

from dpojax.data.batching import (
    PreferenceBatch,
    collate,
    default_buckets,
    epoch_order,
    eval_batches,
    num_eval_batches,
    pick_bucket,
    steps_per_epoch,
    train_batches,
)
from dpojax.data.formats import PreferenceRows, RowFormat, extract_prompt, load_rows, normalize_rows
from dpojax.data.loader import load_pairs
from dpojax.data.tokenize import PairStats, TokenizedPairs, check_vocab, pad_token_id, tokenize_rows

__all__ = [
    "PairStats",
    "PreferenceBatch",
    "PreferenceRows",
    "RowFormat",
    "TokenizedPairs",
    "check_vocab",
    "collate",
    "default_buckets",
    "epoch_order",
    "eval_batches",
    "extract_prompt",
    "load_pairs",
    "load_rows",
    "normalize_rows",
    "num_eval_batches",
    "pad_token_id",
    "pick_bucket",
    "steps_per_epoch",
    "tokenize_rows",
    "train_batches",
]
