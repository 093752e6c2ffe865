"""The policy as a Hugging Face folder (or a PEFT adapter folder): at the end of a run, and from a checkpoint
(`dpojax export`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from dpojax import paths
from dpojax.config import Config, load_config
from dpojax.errors import UserError
from dpojax.models import lora
from dpojax.models.hf import copy_tokenizer_files, export_hf
from dpojax.models.score import export_score_model
from dpojax.trainer import checkpoint as ckpt
from dpojax.trainer import reward_task
from dpojax.trainer.build import Models, build_models, make_sharder
from dpojax.trainer.evaluation import restore_policy_params


def export_policy(cfg: Config, models: Models, params, out_dir, *, merged: bool = False):
    """The policy as a HF folder; a LoRA policy as a PEFT adapter folder (plus the tokenizer files), or with `merged`
    as a HF folder of the base with the adapters merged in (models.ref_params must then hold the base). A reward
    model (task: reward) is written as a `*ForSequenceClassification` folder."""
    if cfg.task == "reward":  # a *ForSequenceClassification folder; LoRA: the adapters merged in
        model = (nnx.merge(models.policy_graphdef, params) if models.lora is None else
                 reward_task.merged_score_model(models.policy_graphdef, params, models.ref_params, models.lora))
        return export_score_model(model, out_dir, tokenizer_dir=models.tokenizer_dir)
    if models.lora is None:
        model = nnx.merge(models.policy_graphdef, params)
        return export_hf(model, models.policy_cfg, out_dir, tokenizer_dir=models.tokenizer_dir)
    setup = models.lora
    if merged:
        base = lora.merged_state(models.ref_params, params, list(setup.groups), setup.scale)
        return export_hf(nnx.merge(setup.base_graphdef, base), models.policy_cfg, out_dir,
                         tokenizer_dir=models.tokenizer_dir)
    path = lora.save_peft(out_dir, params, list(setup.groups), models.policy_cfg, cfg.model.lora,
                          cfg.model.name_or_path)
    if jax.process_index() == 0:
        copy_tokenizer_files(models.tokenizer_dir, path)
    return path


@dataclasses.dataclass(frozen=True)
class Exported:
    step: int  # the checkpoint's step
    run_dir: Path  # the run folder it came from
    path: Path  # the folder written


def export_checkpoint(source: str, out_dir: str, *, merged: bool = False) -> Exported:
    """Export the newest checkpoint of a run folder (or one checkpoint folder) as a HF folder: the policy is built
    abstractly and its parameters alone are restored (no optimizer state, no reference, no base weights). A LoRA
    run gives a PEFT adapter folder, or with `merged` a HF folder of the merged model (which reads the base)."""
    paths.check_urls([("export source", str(source)), ("export folder", str(out_dir))], written=["export folder"])
    found = ckpt.find_checkpoint(source)
    if found is None:
        raise UserError(f"export: no checkpoint found in '{source}' (expected RUN_DIR/checkpoints/<step>/).")
    run_dir = found.path.parent.parent
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    if merged and not cfg.model.lora.enabled:
        raise UserError(f"export: --merged merges LoRA adapters, but '{run_dir}' trained every weight; drop --merged.")
    with_base = merged or (cfg.task == "reward" and cfg.model.lora.enabled)  # a reward model is always exported merged
    models = build_models(cfg, make_sharder(cfg), policy_from_checkpoint=True, with_reference=with_base)
    params = restore_policy_params(cfg, models, found.step)
    return Exported(found.step, run_dir, export_policy(cfg, models, params, paths.path(out_dir), merged=merged))
