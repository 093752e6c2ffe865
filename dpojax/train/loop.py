"""Orchestration of `dpojax train` and `dpojax eval`: the effects (files, devices, progress) live here.

Stages: config -> mesh -> tokenizer and models -> data -> state and compiled steps -> loop (log, eval,
checkpoint) -> summary, plot, export.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dpojax import distributed, losses, metrics as M
from dpojax.config import Config, dump_yaml, load_config
from dpojax.data.batching import PreferenceBatch, eval_batches, steps_per_epoch, train_batches
from dpojax.data.loader import load_preferences
from dpojax.data.ranked_batching import RankedBatch
from dpojax.data.ranked_tokenize import TokenizedRankings
from dpojax.data.tokenize import TokenizedPairs, check_vocab
from dpojax.errors import ConfigError, ModelError, NumericsError, UserError
from dpojax.models.config import ModelConfig
from dpojax.models.hf import export_hf, init_random, load_pretrained, read_hf_config, resolve_model_dir
from dpojax.ranking import is_ranking_loss
from dpojax.sharding import Sharder, check_fsdp_sharded, make_mesh
from dpojax.train import checkpoint as ckpt
from dpojax.train.optim import make_optimizer
from dpojax.train.preemption import Preemption
from dpojax.train.ranking_step import ranking_batch_loss
from dpojax.train import reference
from dpojax.train.step import (
    StepSpec,
    TrainState,
    batch_sharding,
    compile_reference,
    compile_steps,
    compile_sync,
    init_state,
)

log = logging.getLogger("dpojax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------- models and data
@dataclasses.dataclass
class Models:
    tokenizer: Any
    tokenizer_dir: Path
    policy_cfg: ModelConfig
    policy_graphdef: Any
    policy_params: Any
    ref_graphdef: Any  # None when the loss needs no reference, or its log-probs are precomputed
    ref_params: Any
    ref_fingerprint: str = ""  # what the reference weights hash to (precompute cache key)
    ref_tables: dict | None = None  # data fingerprint -> [P, 2] precomputed reference log-probs


def load_tokenizer(cfg: Config) -> tuple[Any, Path]:
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.name_or_path
    folder = resolve_model_dir(name, cfg.model.revision)
    try:
        return AutoTokenizer.from_pretrained(str(folder)), folder
    except (OSError, ValueError) as e:
        raise ModelError(f"tokenizer: could not load a tokenizer from '{folder}': {e}") from None


def _build_model(cfg: Config, name: str, sharder: Sharder, *, random_init: bool):
    kw = dict(
        dtype=DTYPES[cfg.model.dtype],
        param_dtype=DTYPES[cfg.model.param_dtype],
        attention=cfg.model.attention,
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
        sharder=sharder,
    )
    if random_init:
        folder = resolve_model_dir(name, cfg.model.revision)
        mcfg = ModelConfig.from_hf(read_hf_config(folder))
        return init_random(mcfg, seed=cfg.model.seed, **kw), mcfg
    return load_pretrained(name, revision=cfg.model.revision, **kw)


def build_models(cfg: Config, sharder: Sharder, *, policy_source: str | None = None) -> Models:
    """Tokenizer, policy and (unless the loss is reference-free) the frozen reference, all placed on the mesh."""
    tokenizer, tok_dir = load_tokenizer(cfg)
    random_init = cfg.model.init == "random" and policy_source is None
    policy, pcfg = _build_model(cfg, policy_source or cfg.model.name_or_path, sharder, random_init=random_init)
    check_vocab(tokenizer, pcfg.vocab_size, f"the policy '{cfg.model.name_or_path}'")
    pgraph, pparams = nnx.split(policy)
    rgraph = rparams = None
    if not losses.reference_free(cfg.loss):
        same = cfg.ref_name_or_path == cfg.model.name_or_path
        if same and cfg.model.init == "random":
            rgraph, rparams = pgraph, jax.tree.map(jnp.copy, pparams)
            ref_id = _weights_id(cfg, cfg.model.name_or_path, random_seed=cfg.model.seed)
            if policy_source is not None:  # evaluating a trained policy: rebuild the initial random weights
                rgraph, rparams = nnx.split(_build_model(cfg, cfg.model.name_or_path, sharder, random_init=True)[0])
        else:
            ref, rcfg = _build_model(cfg, cfg.ref_name_or_path, sharder, random_init=False)
            if rcfg.vocab_size != pcfg.vocab_size:
                raise ModelError(
                    f"the reference '{cfg.ref_name_or_path}' has vocab_size {rcfg.vocab_size} but the policy "
                    f"'{cfg.model.name_or_path}' has {pcfg.vocab_size}; DPO needs both to share one tokenizer."
                )
            rgraph, rparams = nnx.split(ref)
            ref_id = _weights_id(cfg, cfg.ref_name_or_path)
        if cfg.ref_model.sync_every and rgraph != pgraph:
            raise ConfigError(
                "config: 'ref_model.sync_every' (TR-DPO) mixes policy weights into the reference, so both must have "
                f"the same architecture; '{cfg.ref_name_or_path}' differs from '{cfg.model.name_or_path}'."
            )
    return Models(tokenizer, tok_dir, pcfg, pgraph, pparams, rgraph, rparams,
                  ref_fingerprint=ref_id if rgraph is not None else "")  # fmt: skip


def _weights_id(cfg: Config, name: str, random_seed: int | None = None) -> str:
    """Fingerprint of reference weights, computed only when they will be precomputed (it reads the files)."""
    if not cfg.ref_model.precompute:
        return ""
    folder = resolve_model_dir(name, cfg.model.revision)
    return reference.weights_fingerprint(folder, _cache_dir(cfg), random_seed=random_seed)


def _cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or Path.home() / ".cache" / "dpojax")


def precompute_references(cfg: Config, models: Models, sharder: Sharder, pair_sets: list[TokenizedPairs]) -> None:
    """Run the reference once over each data set (cached on disk), then drop it from device memory."""
    if not cfg.ref_model.precompute or models.ref_graphdef is None:
        return
    spec = StepSpec(models.policy_graphdef, models.ref_graphdef, cfg.loss, None, None, sharder=sharder)
    forward = compile_reference(spec, models.ref_graphdef, models.ref_params, sharder)
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    sharding = batch_sharding(sharder)
    settings = {"ld_alpha": cfg.loss.ld_alpha, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype}
    tables = {}
    for pairs in pair_sets:
        key = reference.cache_key(pairs, models.ref_fingerprint, settings)
        tables[pairs.fingerprint] = reference.load_or_compute(
            _cache_dir(cfg) / f"ref-{key}.npz",
            lambda: reference.precompute(forward, models.ref_params, pairs, bs, lambda b: to_device(b, sharding),
                                         buckets=cfg.data.buckets, process_kw=_process_kw()),  # fmt: skip
        )
    models.ref_graphdef, models.ref_params, models.ref_tables = None, None, tables


def load_split(cfg: Config, tokenizer, spec: str, split: str) -> TokenizedPairs | TokenizedRankings:
    cache = str(_cache_dir(cfg))
    return load_preferences(
        spec,
        tokenizer,
        split=split,
        max_length=cfg.data.max_length,
        truncation_mode=cfg.data.truncation_mode,
        cache_dir=cache,
        on_bad_row=cfg.data.on_bad_row,
        max_responses=cfg.data.max_responses,
        pairs_from_scores=cfg.data.pairs_from_scores,
        ranking_loss=is_ranking_loss(cfg.loss),
    )


def to_device(batch: PreferenceBatch, sharding) -> PreferenceBatch:
    """Host batch (this process's rows) -> global jax.Arrays sharded over the data axes."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def _real_tokens(batch: PreferenceBatch | RankedBatch) -> int:
    if isinstance(batch, RankedBatch):
        return batch.real_tokens()
    return int(np.sum((batch.segment_ids_Nx2xT > 0) * batch.pair_mask_N[:, None, None]))


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    cfg: Config
    sharder: Sharder
    models: Models
    spec: StepSpec
    train_step: Any
    eval_step: Any
    total_steps: int
    sync_reference: Any = None  # jitted TR-DPO update, when ref_model.sync_every is set

    def checkpoint_tree(self, state: TrainState) -> Any:
        """What a checkpoint holds: the train state, plus the reference when TR-DPO changes it."""
        return {"train": state, "ref": self.models.ref_params} if self.sync_reference else state

    def from_checkpoint_tree(self, tree: Any) -> TrainState:
        if self.sync_reference:
            self.models.ref_params = tree["ref"]
            return tree["train"]
        return tree


def _check_batch(cfg: Config, sharder: Sharder, n_devices_data: int) -> None:
    if cfg.micro_batch_size % n_devices_data:
        key = "train.micro_batch_size" if cfg.train.micro_batch_size else "train.batch_size"
        raise ConfigError(
            f"config: '{key}' = {cfg.micro_batch_size} pairs must be divisible by the {n_devices_data} "
            "data-parallel devices (mesh.data * mesh.fsdp), so every device gets whole pairs; change the batch "
            "or the mesh."
        )
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    if eval_bs % n_devices_data:
        raise ConfigError(
            f"config: 'train.eval_batch_size' = {eval_bs} must be divisible by the {n_devices_data} "
            "data-parallel devices (mesh.data * mesh.fsdp)."
        )


def setup(cfg: Config, n_train_pairs: int | None, models: Models, sharder: Sharder) -> tuple[Run, TrainState]:
    n_data = sharder.mesh.shape["data"] * sharder.mesh.shape["fsdp"]
    _check_batch(cfg, sharder, n_data)
    losses.validate_loss_config(cfg.loss)
    if cfg.train.steps is not None:
        total = cfg.train.steps
    else:
        total = cfg.train.epochs * steps_per_epoch(n_train_pairs or 0, cfg.train.batch_size)
    optimizer, schedule = make_optimizer(cfg.optim, max(total, 1))
    spec = StepSpec(
        policy_graphdef=models.policy_graphdef,
        ref_graphdef=models.ref_graphdef,
        loss=cfg.loss,
        optimizer=optimizer,
        schedule=schedule,
        grad_accum=cfg.grad_accum_steps,
        sharder=sharder,
        precomputed_ref=models.ref_tables is not None,
        loss_fn=ranking_batch_loss if is_ranking_loss(cfg.loss) else None,  # ranked data: K responses per row
    )
    check_fsdp_sharded(models.policy_params, sharder.mesh)  # no big parameter silently whole on every device
    state = init_state(models.policy_params, optimizer, sharder)
    models.policy_params = None  # the state owns (and donates) them now
    train, evaluate = compile_steps(spec, state, models.ref_params, sharder)
    sync = compile_sync(models.ref_params, cfg.ref_model.mixup_alpha) if cfg.ref_model.sync_every else None
    return Run(cfg, sharder, models, spec, train, evaluate, total, sync), state


def run_eval(run: Run, params, pairs: TokenizedPairs) -> dict[str, float]:
    cfg = run.cfg
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    sharding = batch_sharding(run.sharder)
    sums = None
    table = reference.lookup(run.models.ref_tables, pairs)
    for batch in eval_batches(pairs, bs, buckets=cfg.data.buckets, **_process_kw()):
        batch = reference.attach(batch, table)
        out = run.eval_step(params, run.models.ref_params, to_device(batch, sharding))
        sums = M.add_sums(sums, jax.device_get(out))
    return M.finalize(sums)


def _process_kw() -> dict:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def _batches(cfg: Config, pairs: TokenizedPairs, start: int, stop: int) -> Iterator[PreferenceBatch]:
    return train_batches(
        pairs, cfg.train.batch_size, cfg.train.seed, start_step=start, stop_step=stop, buckets=cfg.data.buckets,
        **_process_kw(),
    )


# ------------------------------------------------------------------------------------------------ train
class _Window:
    """Host-side accumulation of step metrics between log records (read back one step late)."""

    def __init__(self):
        self.sums, self.tokens, self.steps, self.t0 = None, 0, 0, time.perf_counter()

    def add(self, step: int, out, tokens: int) -> tuple[int, bool]:
        """Add one step's metrics; returns (step, whether its update was skipped as non-finite)."""
        out = jax.device_get(out)
        self.sums = M.add_sums(self.sums, out)
        self.tokens += tokens
        self.steps += 1
        return step, bool(out["skipped_steps"][0] > 0)

    def flush(self, pairs_per_step: int, flops_per_token: float) -> dict[str, float]:
        """Every process calls this at the same steps: each counted only its own rows' tokens, so they are
        summed over processes here (one small host all-gather per log record)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = M.finalize(self.sums)
        if jax.process_count() > 1:
            self.tokens = int(np.sum(multihost_utils.process_allgather(np.asarray(self.tokens, np.int32))))
        out["tokens_per_second"] = self.tokens / dt
        out["pairs_per_second"] = self.steps * pairs_per_step / dt
        peak = M.peak_flops_per_second()
        if peak:
            out["mfu"] = self.tokens * flops_per_token / dt / peak
        self.__init__()
        return out


def _progress(total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)


def _flops_per_token(run: Run) -> float:
    """Policy forward+backward plus reference forward per real token, at the largest bucket."""
    c, t = run.models.policy_cfg, run.cfg.data.max_length
    ref = c.forward_flops_per_token(t) if run.models.ref_graphdef is not None else 0.0
    return c.flops_per_token(t) + ref


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg`; resumes from `output_dir/checkpoints` when present. Returns the final eval metrics
    (empty when the run stopped early on SIGTERM or had no eval set)."""
    distributed.initialize(cfg.distributed)  # before anything touches a device
    out_dir = Path(cfg.output_dir)
    is_main = jax.process_index() == 0
    sharder = Sharder(make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    models = build_models(cfg, sharder)
    train_pairs = load_split(cfg, models.tokenizer, cfg.data.train, cfg.data.train_split)
    eval_pairs = load_split(cfg, models.tokenizer, cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else None
    precompute_references(cfg, models, sharder, [p for p in (train_pairs, eval_pairs) if p is not None])
    run, state = setup(cfg, len(train_pairs), models, sharder)
    if run.total_steps < 1:
        raise ConfigError(
            f"config: {len(train_pairs)} training pairs make no full batch of train.batch_size="
            f"{cfg.train.batch_size}; lower the batch size or add data."
        )
    mngr = ckpt.manager(out_dir, cfg)
    state, start = _maybe_resume(mngr, run, state, cfg)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        M.truncate_after(out_dir / "metrics.jsonl", start)  # records past the checkpoint are redone
    writer = M.MetricsWriter(out_dir / "metrics.jsonl", enabled=is_main)
    log.info(
        "training %s: %d pairs, %d steps of %d pairs (%d micro-batches), mesh %s, from step %d",
        cfg.model.name_or_path, len(train_pairs), run.total_steps, cfg.train.batch_size, cfg.grad_accum_steps,
        dict(sharder.mesh.shape), start,
    )
    best = ckpt.best_manager(out_dir, cfg) if cfg.checkpoint.best_metric else None
    try:
        with Preemption() as preemption:
            state, stopped_at = _loop(run, state, Savers(mngr, best, run), writer, train_pairs, eval_pairs, start,
                                      preemption)  # fmt: skip
    finally:  # an error (e.g. divergence) still completes the saves already under way
        mngr.wait_until_finished()
        if best is not None:
            best.wait_until_finished()
    if stopped_at is not None:
        mngr.wait_until_finished()
        print(
            f"dpojax train: stopped by SIGTERM at step {stopped_at}; checkpoint saved in "
            f"{ckpt.checkpoint_dir(out_dir)}. Resume with the same command: dpojax train <config> "
            f"output_dir={out_dir}"
        )
        return {}
    final = run_eval(run, state.params, eval_pairs) if eval_pairs is not None else {}
    if final:
        writer.write(run.total_steps, "eval", final)
    mngr.wait_until_finished()
    return _finish(run, state, out_dir, final)


def _maybe_resume(mngr, run: Run, state: TrainState, cfg: Config) -> tuple[TrainState, int]:
    step = mngr.latest_step()
    if step is None:
        return state, 0
    meta = ckpt.read_meta(mngr, step)
    conflicts = ckpt.resume_conflicts(meta.get("config", {}), cfg)
    if conflicts:
        raise ConfigError(
            f"'{cfg.output_dir}' holds a checkpoint at step {step} made with a different config "
            f"({'; '.join(conflicts)}); resuming would not continue the same run. Use a new output_dir, "
            "or restore the original values."
        )
    tree, _ = ckpt.restore(mngr, step, run.checkpoint_tree(state))
    state = run.from_checkpoint_tree(tree)
    log.info("resumed from %s at step %d", ckpt.checkpoint_dir(cfg.output_dir), step)
    return state, int(step)


@dataclasses.dataclass
class Savers:
    latest: Any  # CheckpointManager of the most recent checkpoints
    best: Any  # CheckpointManager of the best one by checkpoint.best_metric, or None

    run: Any = None  # the Run, which knows what a checkpoint holds

    def save(self, step: int, state: TrainState, cfg: Config) -> None:
        if self.latest.latest_step() == step:
            return
        if not ckpt.all_finite(state.params):
            raise NumericsError(f"refusing to save a checkpoint at step {step}: the parameters are not finite.")
        ckpt.save(self.latest, step, self.run.checkpoint_tree(state), cfg)

    def save_best(self, step: int, state: TrainState, cfg: Config, metrics: dict[str, float]) -> None:
        if self.best is not None and ckpt.all_finite(state.params):
            ckpt.save(self.best, step, self.run.checkpoint_tree(state), cfg, metrics=metrics)


def _loop(run: Run, state, savers: Savers, writer, train_pairs, eval_pairs, start: int, preemption):
    """Steps start+1 .. total_steps. Returns (state, the step a SIGTERM stopped at, or None)."""
    cfg = run.cfg
    sharding = batch_sharding(run.sharder)
    flops = _flops_per_token(run)
    window, pending, bar, bad = _Window(), None, _progress(run.total_steps, start), _BadSteps(cfg)
    table = reference.lookup(run.models.ref_tables, train_pairs)
    for step, batch in enumerate(_batches(cfg, train_pairs, start, run.total_steps), start=start + 1):
        batch = reference.attach(batch, table)
        state, out = run.train_step(state, run.models.ref_params, to_device(batch, sharding))
        if run.sync_reference is not None and step % cfg.ref_model.sync_every == 0:
            run.models.ref_params = run.sync_reference(state.params, run.models.ref_params)
        if pending is not None:  # read the previous step's metrics while this one runs
            bad.check(*window.add(*pending))
        pending = (step, out, _real_tokens(batch))
        last = step == run.total_steps
        if step % cfg.train.log_every == 0 or last:
            bad.check(*window.add(*pending))
            pending = None
            record = window.flush(cfg.train.batch_size, flops)
            writer.write(step, "train", record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                pairs_s=f"{record['pairs_per_second']:.1f}",
            )
        bar.update(1)
        if eval_pairs is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and not last:
            result = run_eval(run, state.params, eval_pairs)
            writer.write(step, "eval", result)
            savers.save_best(step, state, cfg, result)
            window.t0 = time.perf_counter()
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last:
            savers.save(step, state, cfg)
        if not last and preemption.should_stop(step):
            if pending is not None:
                bad.check(*window.add(*pending))
            savers.save(step, state, cfg)
            bar.close()
            return state, step
    bar.close()
    return state, None


class _BadSteps:
    """Counts consecutive skipped (non-finite) steps; stops the run after train.max_bad_steps of them."""

    def __init__(self, cfg: Config):
        self.limit, self.run_of, self.total = cfg.train.max_bad_steps, 0, 0

    def check(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.run_of = 0
            return
        self.run_of += 1
        self.total += 1
        log.warning("step %d: non-finite loss or gradient norm; update skipped (%d in a row)", step, self.run_of)
        if self.run_of >= self.limit:
            raise NumericsError(
                f"training stopped at step {step}: {self.run_of} consecutive steps had a non-finite loss or gradient "
                f"norm (each update was skipped; no checkpoint holds NaNs). Lower optim.lr, set optim.max_grad_norm, "
                f"use model.dtype=float32, or check the data; train.max_bad_steps={self.limit} sets the limit."
            )


def _finish(run: Run, state: TrainState, out_dir: Path, final: dict) -> dict[str, Any]:
    cfg = run.cfg
    records = M.read_metrics(out_dir / "metrics.jsonl")
    train_recs = [r for r in records if r["split"] == "train"]
    model = nnx.merge(run.spec.policy_graphdef, state.params)
    export_dir = export_hf(model, run.models.policy_cfg, out_dir / "export", tokenizer_dir=run.models.tokenizer_dir)
    if jax.process_index() != 0:
        return final
    png = M.plot_curves(records, out_dir / "training_curves.png")
    table = {"train (last)": train_recs[-1]} if train_recs else {}
    if final:
        table["eval"] = final
    print("\n" + M.summary_table(table))
    print(f"\nmetrics: {out_dir / 'metrics.jsonl'}\nplot:    {png}\nexport:  {export_dir}")
    return final


# ------------------------------------------------------------------------------------------------- eval
def evaluate(cfg: Config) -> dict[str, float]:
    """Metrics of the policy (a run's newest checkpoint when `output_dir` has one) on data.eval or data.train."""
    distributed.initialize(cfg.distributed)  # before anything touches a device
    is_main = jax.process_index() == 0
    sharder = Sharder(make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    models = build_models(cfg, sharder)
    spec_name, split = (cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else (cfg.data.train, cfg.data.train_split)
    pairs = load_split(cfg, models.tokenizer, spec_name, split)
    precompute_references(cfg, models, sharder, [pairs])
    run, state = setup(cfg, len(pairs), models, sharder)
    step = 0
    found = ckpt.find_checkpoint(cfg.output_dir)
    if found is not None:
        mngr = ckpt.manager(cfg.output_dir, cfg)
        tree, _ = ckpt.restore(mngr, found.step, run.checkpoint_tree(state))
        state = run.from_checkpoint_tree(tree)
        step = found.step
        log.info("evaluating the checkpoint at step %d of %s", step, cfg.output_dir)
    result = run_eval(run, state.params, pairs)
    if is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        M.MetricsWriter(Path(cfg.output_dir) / "metrics.jsonl").write(step, "eval", result)
        print(M.summary_table({"eval": result}))
    return result


# -------------------------------------------------------------------------------------------------- CLI
def train_from_cli(config_path: str, overrides: list[str]) -> None:
    train(load_config(config_path, overrides))


def eval_from_cli(config_path: str, overrides: list[str]) -> None:
    evaluate(load_config(config_path, overrides))


def export_from_cli(source: str, out_dir: str) -> None:
    """Export the newest checkpoint of a run folder (or one checkpoint folder) as a HF folder."""
    found = ckpt.find_checkpoint(source)
    if found is None:
        raise UserError(f"export: no checkpoint found in '{source}' (expected RUN_DIR/checkpoints/<step>/).")
    run_dir = found.path.parent.parent
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    sharder = Sharder(make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    models = build_models(cfg, sharder)
    run, state = setup(cfg, None, models, sharder)
    mngr = ckpt.manager(run_dir, cfg)
    tree, _ = ckpt.restore(mngr, found.step, run.checkpoint_tree(state))
    state = run.from_checkpoint_tree(tree)
    model = nnx.merge(run.spec.policy_graphdef, state.params)
    path = export_hf(model, models.policy_cfg, out_dir, tokenizer_dir=models.tokenizer_dir)
    print(f"exported step {found.step} of {run_dir} to {path}")
