"""Evaluating a policy: the eval metrics of a data set (`run_eval`, also the train loop's evals), `dpojax eval`
(`evaluate`: a run's newest checkpoint, or the configured model), and restoring a checkpoint's policy alone."""

from __future__ import annotations

import dataclasses
import logging

import jax

from dpojax import distributed, paths
from dpojax import metrics as M
from dpojax.config import Config
from dpojax.data.batching import eval_batches
from dpojax.data.tokenize import TokenizedData
from dpojax.trainer import checkpoint as ckpt
from dpojax.trainer import reference, reward_task
from dpojax.trainer import window as W
from dpojax.trainer.build import (
    Models,
    Run,
    batch_kw,
    build_models,
    load_split,
    make_sharder,
    precompute_references,
    setup_eval,
    to_device,
)
from dpojax.trainer.step import batch_sharding

log = logging.getLogger("dpojax")

WRITTEN = ("output_dir", "data.cache_dir")  # the config keys of config_urls that a run writes to


def config_urls(cfg: Config) -> list[tuple[str, str | None]]:
    """(config key, path) of everything a run reads or writes, for `paths.check_urls`."""
    train = ([("data.train", cfg.data.train)] if isinstance(cfg.data.train, str)
             else [(f"data.train[{i}].path", s.path) for i, s in enumerate(cfg.data.train)])
    return [("output_dir", cfg.output_dir), *train, ("data.eval", cfg.data.eval),
            ("data.cache_dir", cfg.data.cache_dir), ("model.name_or_path", cfg.model.name_or_path),
            ("model.tokenizer", cfg.model.tokenizer), ("ref_model.name_or_path", cfg.ref_model.name_or_path),
            ("model.lora.init_from", cfg.model.lora.init_from),
            ("train.compilation_cache", cfg.train.compilation_cache)]


def run_eval(run: Run, params, data: TokenizedData, ref_params=None) -> dict[str, float]:
    """The eval metrics of `params` on `data` against the reference `ref_params` (default: the run's; the train
    loop passes the one TR-DPO moved)."""
    cfg = run.cfg
    ref_params = run.models.ref_params if ref_params is None else ref_params
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    sharding = batch_sharding(run.sharder)
    sums = None
    table = reference.lookup(run.models.ref_tables, data)
    for batch in eval_batches(data, bs, **batch_kw(cfg, run.spec, run.sharder, train=False)):
        batch = reference.attach(batch, table)
        out = run.eval_step(params, ref_params, to_device(batch, sharding))
        sums = M.add_sums(sums, W.fetch(out))
    # a metric no eval row fed (KTO's rewards/margins when no batch held both labels) is left out, as TRL does
    return {k: v for k, v in M.finalize(sums).items() if sums[k][1] > 0}


def restore_policy_params(cfg: Config, models: Models, step: int):
    """The policy parameters of checkpoint `step` of cfg.output_dir, restored into the shardings of
    `models.policy_params` (only them)."""
    mngr = ckpt.manager(cfg.output_dir, cfg)
    params = ckpt.restore(mngr, step, {"params": models.policy_params})["params"]
    mngr.close()
    return params


def evaluate(cfg: Config) -> dict[str, float]:
    """Metrics of the policy (a run's newest checkpoint when `output_dir` has one) on data.eval or data.train."""
    distributed.initialize(cfg.distributed)  # before anything touches a device
    paths.check_urls(config_urls(cfg), written=WRITTEN)
    is_main = jax.process_index() == 0
    sharder = make_sharder(cfg)
    found = ckpt.find_checkpoint(cfg.output_dir)
    if cfg.task == "reward" and found is None:  # a causal LM's head would be random: nothing to evaluate
        reward_task.check_trained_head(cfg.model.name_or_path, cfg.model.revision)
    models = build_models(cfg, sharder, policy_from_checkpoint=found is not None)
    spec_name, split = (cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else (cfg.data.train, cfg.data.train_split)
    data = load_split(cfg, models, spec_name, split)
    models = precompute_references(cfg, models, sharder, [data])
    step = 0
    if found is not None:
        models = dataclasses.replace(models, policy_params=restore_policy_params(cfg, models, found.step))
        step = found.step
        log.info("evaluating the checkpoint at step %d of %s", step, cfg.output_dir)
    run = setup_eval(cfg, models, sharder)
    result = run_eval(run, models.policy_params, data)
    if is_main:
        writer = M.MetricsWriter(paths.absolute(cfg.output_dir) / "metrics.jsonl")
        writer.write(step, "eval", result)
        writer.close()
        print(M.summary_table({"eval": result}))
    return result
