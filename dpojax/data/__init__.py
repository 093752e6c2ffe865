"""Data: load rows, validate and normalize every format into one row type (a prompt and K ranked responses),
tokenize like TRL 1.16 (cached), and batch into [N prompts, K, T]."""

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
from dpojax.data.formats import PreferenceRows, RowFormat, extract_prompt, normalize_rows, order_and_ranks
from dpojax.data.loader import SourceSpec, load_preferences
from dpojax.data.mixture import mix
from dpojax.data.sources import load_rows
from dpojax.data.store import Hosts
from dpojax.data.tokenize import DataStats, TokenizedData, check_token_ids, pad_token_id, tokenize_rows

__all__ = [
    "DataStats",
    "Hosts",
    "PreferenceBatch",
    "PreferenceRows",
    "RowFormat",
    "SourceSpec",
    "TokenizedData",
    "check_token_ids",
    "collate",
    "default_buckets",
    "epoch_order",
    "eval_batches",
    "extract_prompt",
    "load_preferences",
    "load_rows",
    "mix",
    "normalize_rows",
    "num_eval_batches",
    "order_and_ranks",
    "pad_token_id",
    "pick_bucket",
    "steps_per_epoch",
    "tokenize_rows",
    "train_batches",
]
