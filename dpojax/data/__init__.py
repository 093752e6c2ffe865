"""Data: load rows, validate and normalize every format into one row type (a prompt and K ranked responses),
tokenize like TRL 1.16 (cached), and batch into [N prompts, K, T].

The names below are imported on first use: a tokenizer worker process imports `dpojax.data.tokenize` without
JAX (which `batching` needs), so it starts in about half the time."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it the same)

# public name -> the module that defines it
_EXPORTS = {
    "PreferenceBatch": "dpojax.data.batching",
    "collate": "dpojax.data.batching",
    "default_buckets": "dpojax.data.batching",
    "epoch_order": "dpojax.data.batching",
    "eval_batches": "dpojax.data.batching",
    "num_eval_batches": "dpojax.data.batching",
    "pick_bucket": "dpojax.data.batching",
    "steps_per_epoch": "dpojax.data.batching",
    "train_batches": "dpojax.data.batching",
    "PreferenceRows": "dpojax.data.formats",
    "RowFormat": "dpojax.data.formats",
    "extract_prompt": "dpojax.data.formats",
    "normalize_rows": "dpojax.data.formats",
    "order_and_ranks": "dpojax.data.formats",
    "SourceSpec": "dpojax.data.loader",
    "load_preferences": "dpojax.data.loader",
    "mix": "dpojax.data.mixture",
    "load_rows": "dpojax.data.sources",
    "Hosts": "dpojax.data.store",
    "DataStats": "dpojax.data.tokenize",
    "TokenizedData": "dpojax.data.tokenize",
    "check_token_ids": "dpojax.data.tokenize",
    "pad_token_id": "dpojax.data.tokenize",
    "tokenize_rows": "dpojax.data.tokenize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (`from dpojax.data import store`) is then imported by the import system
        raise AttributeError(f"module 'dpojax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from dpojax.data.batching import (  # noqa: F401 - names for type checkers only
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
    from dpojax.data.formats import (  # noqa: F401 - names for type checkers only
        PreferenceRows,
        RowFormat,
        extract_prompt,
        normalize_rows,
        order_and_ranks,
    )
    from dpojax.data.loader import SourceSpec, load_preferences  # noqa: F401 - names for type checkers only
    from dpojax.data.mixture import mix  # noqa: F401 - names for type checkers only
    from dpojax.data.sources import load_rows  # noqa: F401 - names for type checkers only
    from dpojax.data.store import Hosts  # noqa: F401 - names for type checkers only
    from dpojax.data.tokenize import (  # noqa: F401 - names for type checkers only
        DataStats,
        TokenizedData,
        check_token_ids,
        pad_token_id,
        tokenize_rows,
    )
