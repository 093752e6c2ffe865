"""dpojax: Direct Preference Optimization and its family of losses, in JAX, for Hugging Face causal LMs.

The public API (docs/python-api.md): every name in `__all__`, imported on first use so that `import dpojax` and
the CLI stay fast. Everything else in the package is private and may change.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it the same)

__version__ = "0.1.0"

# public name -> the module that defines it (one line per name: add a name here and in docs/python-api.md)
_EXPORTS = {
    # models
    "load_policy_and_reference": "dpojax.api",
    "ModelPair": "dpojax.api",
    # data
    "load_preferences": "dpojax.data.loader",
    "train_batches": "dpojax.data.batching",
    "eval_batches": "dpojax.data.batching",
    "PreferenceBatch": "dpojax.data.batching",
    "PackedBatch": "dpojax.data.packing",
    # pure steps
    "sequence_logps": "dpojax.trainer.step",
    "batch_loss": "dpojax.trainer.step",
    "train_step": "dpojax.trainer.step",
    "eval_step": "dpojax.trainer.step",
    "make_spec": "dpojax.trainer.step",
    "StepSpec": "dpojax.trainer.step",
    "TrainState": "dpojax.trainer.step",
    "init_state": "dpojax.trainer.step",
    # losses
    "preference_loss": "dpojax.losses",
    "register_loss": "dpojax.losses",
    "LOSSES": "dpojax.losses",
    "LossParams": "dpojax.losses",
    "LossInputs": "dpojax.losses",
    "Terms": "dpojax.losses",
    "finalize_metrics": "dpojax.losses",
    # sharding
    "make_mesh": "dpojax.sharding",
    "Sharder": "dpojax.sharding",
    # config and runs
    "Config": "dpojax.config",
    "config_from_dict": "dpojax.config",
    "load_config": "dpojax.config",
    "train": "dpojax.api",
    "evaluate": "dpojax.api",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpojax' has no attribute {name!r}")
    value = importlib.import_module(module)
    if module != f"dpojax.{name}":  # `train` is the (callable) package itself
        value = getattr(value, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from dpojax.api import ModelPair, evaluate, load_policy_and_reference, train  # noqa: F401 - names for type checkers only
    from dpojax.config import Config, config_from_dict, load_config  # noqa: F401 - names for type checkers only
    from dpojax.data.batching import PreferenceBatch, eval_batches, train_batches  # noqa: F401 - names for type checkers only
    from dpojax.data.loader import load_preferences  # noqa: F401 - names for type checkers only
    from dpojax.data.packing import PackedBatch  # noqa: F401 - names for type checkers only
    from dpojax.losses import LOSSES, LossInputs, LossParams, Terms, finalize_metrics, preference_loss, register_loss  # noqa: F401 - names for type checkers only
    from dpojax.sharding import Sharder, make_mesh  # noqa: F401 - names for type checkers only
    from dpojax.trainer.step import (  # noqa: F401 - names for type checkers only
        StepSpec,
        TrainState,
        batch_loss,
        eval_step,
        init_state,
        make_spec,
        sequence_logps,
        train_step,
    )
