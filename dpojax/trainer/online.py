"""An online run's data side (docs/online.md): the prompt set, the reward, the fixed sampling and batch shapes, and
`OnlineSource`, which gives the loop each step's global preference rows, sampled from the policy as the loop
holds it. `loop.run_online` drives it; the step itself is the offline one.

schedule `online`: step s samples K responses to its N = train.batch_size prompts (the prompt set shuffled per
epoch by (train.seed, epoch), as offline rows are) with key (online.seed, s). schedule `iterative`: round r samples
its prompts_per_round prompts (N at a time, key (online.seed, r, chunk)) with the policy at the round's start, then
trains epochs_per_round epochs over them, one sampled chunk of N prompts per step (chunk order shuffled per epoch
by (train.seed, r, epoch)); with reference `previous_round` the reference becomes the policy at each round's start.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np
from flax import nnx

from dpojax import paths
from dpojax.config import Config
from dpojax.data.batching import epoch_order
from dpojax.data.tokenize import pad_token_id
from dpojax.errors import ConfigError
from dpojax.generate import Sampling, eos_token_ids, prompt_bucket
from dpojax.online import pairs as pairs_lib
from dpojax.online import stage
from dpojax.online.prompts import PromptSet, load_prompts
from dpojax.online.rewards import Reward, load_reward
from dpojax.online.sampler import SamplerSetup
from dpojax.reward import RewardModel
from dpojax.sharding import Sharder
from dpojax.trainer.build import DTYPES, Models, Run
from dpojax.trainer.step import packing_of, shardings_of

log = logging.getLogger("dpojax")


def round_prompts(cfg: Config, n_prompts: int) -> int:
    """Prompts sampled per round of an iterative run."""
    n = cfg.train.batch_size
    return cfg.online.prompts_per_round or n_prompts // n * n


def online_steps(cfg: Config, n_prompts: int) -> int:
    """The run's optimizer steps: online, train.steps or epochs x (prompts // batch_size); iterative, rounds x
    epochs_per_round x (round prompts // batch_size). ConfigError when the prompt set is too small."""
    o, n = cfg.online, cfg.train.batch_size
    per_round = round_prompts(cfg, n_prompts) if o.schedule == "iterative" else n
    if n_prompts < max(n, per_round):
        raise ConfigError(f"config: the prompt set '{o.prompts}' has {n_prompts} prompts, fewer than one "
                          f"{'round' if o.schedule == 'iterative' else 'batch'} of {max(n, per_round)}; lower "
                          "train.batch_size (or online.prompts_per_round) or add prompts.")
    if o.schedule == "iterative":
        return o.rounds * o.epochs_per_round * (per_round // n)
    return cfg.train.steps or cfg.train.epochs * (n_prompts // n)


def load_online(cfg: Config, models: Models, sharder: Sharder) -> tuple[PromptSet, Reward]:
    """The prompt set and the reward: a function, or a reward model sharded like the policy on `sharder`'s mesh
    (both checked before anything compiles)."""
    prompts = load_prompts(cfg.online.prompts, cfg.online.prompts_split, models.tokenizer,
                           models.policy_cfg.max_position_embeddings)
    if cfg.online.reward_model is None:
        return prompts, load_reward(cfg.online.reward)
    if jax.process_count() > 1:  # each host scores its own samples; a model on the global mesh cannot do that yet
        raise ConfigError("online.reward_model is supported in single-process runs only so far; with several "
                          "processes use a reward function (online.reward).")
    reward = RewardModel.load(cfg.online.reward_model, policy_tokenizer=models.tokenizer, dtype=DTYPES[cfg.model.dtype],
                              sharder=sharder, batch_size=cfg.train.batch_size * cfg.online.samples_per_prompt)
    return prompts, reward


def with_round_reference(run: Run) -> Run:
    """`run`, with `sync_reference` the copy of the policy into the reference at each round's start when
    online.reference is previous_round (so checkpoints hold the reference too, as under TR-DPO). Not donated: the
    initial reference stays valid for whatever else holds it (the samples' reference completions)."""
    if not (run.cfg.online.enabled and run.cfg.online.reference == "previous_round"):
        return run
    copy = jax.jit(lambda p, r: jax.tree.map(lambda x, y: x.astype(y.dtype), p, r),
                   out_shardings=shardings_of(run.models.ref_params))
    return dataclasses.replace(run, sync_reference=copy)


@dataclasses.dataclass(frozen=True)
class OnlinePlan:
    """What stays fixed over an online run."""

    prompts: PromptSet
    reward: Reward
    sampler: SamplerSetup
    layout: pairs_lib.Layout
    k: int  # samples per prompt
    steps_per_round: int  # iterative; 0 for schedule online


def plan(cfg: Config, run: Run, prompts: PromptSet, reward: Reward) -> OnlinePlan:
    """The sampling shapes (prompt bucket of the longest prompt, max_new_tokens), the batch layout (data.buckets,
    or one bucket: the longest prompt + max_new_tokens within data.max_length; packing as configured)."""
    o, s, models = cfg.online, cfg.online.sampling, run.models
    vocab = models.policy_cfg.vocab_size
    pad = pad_token_id(models.tokenizer)
    pad = pad if pad < vocab else 0  # as `check_token_ids`: padding is never scored
    packing = packing_of(run.spec, run.sharder, train=True)
    longest = min(prompts.longest + s.max_new_tokens, cfg.data.max_length)
    cp = models.policy_cfg
    longrope = cp.rope.original_max_position_embeddings if cp.rope.type == "longrope" and cp.position == "rope" \
        else None
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        stop=s.stop)
    sampler = SamplerSetup(sampling, prompt_bucket(prompts.longest), eos_token_ids(models.tokenizer_dir,
                                                                                   models.tokenizer),
                           pad, cp.max_position_embeddings, longrope, run.sharder)
    layout = pairs_lib.Layout(tuple(cfg.data.buckets or (longest,)), cfg.data.max_length, cfg.data.truncation_mode,
                              pad, packing)
    spr = online_steps(cfg, len(prompts)) // o.rounds if o.schedule == "iterative" else 0
    return OnlinePlan(prompts, reward, sampler, layout, o.samples_per_prompt, spr)


def policy_params(run: Run, leaves: list):
    """The policy's params as the loop holds them (LoRA: the adapters merged onto the frozen base), sharded."""
    params = run.train_step.state_of(leaves).params
    return nnx.merge_state(run.models.ref_params, params) if run.models.lora is not None else params


class OnlineSource:
    """Each step's global preference rows (`rows`), sampled from the policy the loop holds; keeps the log window's
    online metrics (`window`) and appends every call's prompts, samples and rewards to online_samples.jsonl
    (process 0)."""

    def __init__(self, cfg: Config, plan_: OnlinePlan, out_dir):
        self.cfg, self.plan = cfg, plan_
        self.window = stage.OnlineWindow()
        self.out = paths.LineAppender(paths.path(out_dir) / "online_samples.jsonl",
                                      enabled=jax.process_index() == 0)
        self.round: tuple[int, list[pairs_lib.StepRows]] | None = None  # iterative: (round, its chunks' rows)

    def _call(self, run: Run, leaves: list, indices: np.ndarray, key, step: int, **extra) -> pairs_lib.StepRows:
        p, o = self.plan, self.cfg.online
        scored = stage.sample_and_score(run.models.policy_graphdef, policy_params(run, leaves), p.prompts, indices,
                                        p.k, key, p.sampler, run.models.tokenizer, p.reward)
        rows = stage.step_rows(scored, p.prompts, p.k, o.pairs, p.layout)
        self.window.add(scored, rows.tied, p.k)
        for line in stage.sample_lines(step, scored, p.prompts, p.k, **extra):
            self.out.add(line)
        self.out.flush()
        return rows

    def _indices(self, i: int, size: int) -> np.ndarray:
        """Prompts of the i-th draw of `size` prompts: the set shuffled per epoch, as offline rows are."""
        m = len(self.plan.prompts)
        epoch, j = divmod(i, m // size)
        return epoch_order(m, self.cfg.train.seed, epoch)[j * size:(j + 1) * size]

    def starts_round(self, step: int) -> int | None:
        """The round that step `step` starts (iterative), else None."""
        spr = self.plan.steps_per_round
        return (step - 1) // spr if spr and (step - 1) % spr == 0 else None

    def rows(self, run: Run, step: int, leaves: list) -> pairs_lib.StepRows:
        """Step `step`'s rows (online: sampled now; iterative: from its round's samples, drawn at the round's first
        step, or at a resume inside the round, by the policy then)."""
        n = self.cfg.train.batch_size
        key = functools.partial(stage.step_key, self.cfg.online.seed, sharding=run.sharder.named(()))
        if not self.plan.steps_per_round:
            return self._call(run, leaves, self._indices(step - 1, n), key(step), step)
        r, j = divmod(step - 1, self.plan.steps_per_round)
        chunks = self.plan.steps_per_round // self.cfg.online.epochs_per_round
        if self.round is None or self.round[0] != r:
            ppr = chunks * n
            prompts = self._indices(r, ppr)
            if j:
                log.warning("online: resumed inside round %d; its samples are drawn again by the policy of the "
                            "checkpoint (an exact resume needs a checkpoint at a round's end)", r)
            self.round = (r, [self._call(run, leaves, prompts[c * n:(c + 1) * n], key(r, c),
                                         step - j, round=r) for c in range(chunks)])
        epoch, q = divmod(j, chunks)
        chunk = np.random.default_rng([self.cfg.train.seed, r, epoch]).permutation(chunks)[q]
        return self.round[1][chunk]


def describe(cfg: Config, plan_: OnlinePlan) -> str:
    o = cfg.online
    return (f"online ({o.schedule}): {len(plan_.prompts)} prompts from {plan_.prompts.source}, K={plan_.k} samples "
            f"of <= {o.sampling.max_new_tokens} tokens, reward {plan_.reward.name}, {o.pairs}")


