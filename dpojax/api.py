"""What the public API adds to the package's own functions: loading a policy/reference pair in one call, and
`train` / `evaluate` that take a Config, a plain dict or a YAML path. `dpojax/__init__.py` re-exports these with the
rest of the public names (see docs/python-api.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from jax.sharding import Mesh

from dpojax.config import Config, config_from_dict, load_config, to_dict
from dpojax.models.config import ModelConfig
from dpojax.sharding import Sharder, make_mesh
from dpojax.trainer import build, evaluation, loop


@dataclasses.dataclass
class ModelPair:
    """A policy and its frozen reference, placed on `sharder`'s mesh (what `load_policy_and_reference` returns).

    `*_graphdef` is the static NNX graph (hashable; goes into `make_spec`), `*_params` the nnx.State of arrays (a
    pytree: what `jax.grad` differentiates and `train_step` updates). `ref_graphdef`/`ref_params` are None without a
    reference. With `init="random"` and the reference left at its default they are a copy of the policy's weights.
    """

    tokenizer: Any  # transformers tokenizer of the policy folder (or `tokenizer=`)
    model_config: ModelConfig  # dpojax's view of the policy's config.json
    policy_graphdef: Any
    policy_params: Any
    ref_graphdef: Any
    ref_params: Any
    sharder: Sharder  # the mesh and logical-axis rules the parameters are placed with (pass it to `make_spec`)


def load_policy_and_reference(policy: str | Path, reference: str | Path | None = None, *,
                              with_reference: bool = True, tokenizer: str | Path | None = None,
                              dtype: Literal["float32", "bfloat16"] = "float32",
                              param_dtype: Literal["float32", "bfloat16"] = "float32", attention: str = "auto",
                              init: Literal["pretrained", "random"] = "pretrained", seed: int = 0,
                              revision: str | None = None, mesh: Mesh | None = None) -> ModelPair:
    """Load a HF causal LM folder (or hub id) as the policy and another (default: the same weights) as the frozen
    reference, each parameter placed directly on its shards of `mesh` (default: `make_mesh()`, all devices on the
    data axis). `init="random"` builds the policy from its config.json alone (seeded; the demo model).

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights. Not pure: reads files."""
    raw = {"model": {"name_or_path": str(policy), "dtype": dtype, "param_dtype": param_dtype, "attention": attention,
                     "init": init, "seed": seed, "revision": revision,
                     "tokenizer": None if tokenizer is None else str(tokenizer)},
           "ref_model": {"name_or_path": None if reference is None else str(reference)}}
    cfg = config_from_dict(raw)
    sharder = Sharder(make_mesh() if mesh is None else mesh)
    models = build.build_models(cfg, sharder, with_reference=with_reference)
    return ModelPair(models.tokenizer, models.policy_cfg, models.policy_graphdef, models.policy_params,
                     models.ref_graphdef, models.ref_params, sharder)


def as_config(config: Config | dict | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated Config from a Config, a dict of sections (as the YAML) or a YAML path, plus dotted overrides."""
    if isinstance(config, Config):
        return config_from_dict(to_dict(config), overrides) if overrides else config
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(config, overrides)


def train(config: Config | dict | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Train as `dpojax train` does (run folder, checkpoints, resume, export) from a Config, a dict of sections or
    a YAML path, with optional `section.key=value` overrides. Returns the final eval metrics ({} without an eval set
    or when stopped by SIGTERM). Not pure: writes `output_dir`."""
    return loop.train(as_config(config, overrides))


def evaluate(config: Config | dict | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Evaluate as `dpojax eval` does (the newest checkpoint of `output_dir` when there is one, else
    `model.name_or_path`) and return the eval metrics (TRL's names). Appends a record to `output_dir/metrics.jsonl`."""
    return evaluation.evaluate(as_config(config, overrides))
