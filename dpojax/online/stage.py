"""One online call's host work, put together: the call's prompts -> K samples each (`sampler`) -> this host's
share scored (`rewards`, on the host whose prompts they are; the rewards are then shared) -> the global preference
rows (`pairs`); plus what the loop records of it (metrics, the online_samples.jsonl lines). Every host holds every
sample and reward of the call, so each builds the same global rows and takes its share of the batch."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpojax.online import pairs as pairs_lib
from dpojax.online.prompts import PromptSet
from dpojax.online.rewards import Reward
from dpojax.online.sampler import SamplerSetup, sample

METRICS = ("online/reward_mean", "online/reward_std", "online/tied_share", "online/completion_length",
           "online/eos_rate", "online/gen_tokens_per_second", "online/gen_time_share", "online/score_time_share")


def _fold(seed: jax.Array, path: jax.Array) -> jax.Array:
    key = jax.random.key(seed)
    for i in range(path.shape[0]):
        key = jax.random.fold_in(key, path[i])
    return key


@functools.lru_cache(maxsize=None)
def _folder(sharding):
    return jax.jit(_fold, out_shardings=sharding)


def step_key(seed: int, *path: int, sharding=None) -> jax.Array:
    """The sampling key of a call: `seed` folded with its step (online) or (round, chunk) (iterative), made by one
    small program so that it is one global array, replicated over `sharding`'s mesh, on every host (a host-made key
    cannot be placed on other hosts' devices)."""
    return _folder(sharding)(np.uint32(seed), np.asarray(path, np.uint32))


@dataclasses.dataclass(frozen=True)
class Scored:
    """A call's N prompts x K samples (global, prompt by prompt) and their rewards."""

    indices: np.ndarray  # int64 [N]: the prompts' rows in the prompt set
    tokens: list[list[int]]  # [N * K] completion ids
    text: list[str]
    finish: list[str]
    rewards_B: np.ndarray  # float32 [N * K]
    gen_seconds: float
    score_seconds: float
    generated: int  # tokens generated (all hosts)


def _share(n: int) -> slice:
    per = n // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def sample_and_score(graphdef, params, prompts: PromptSet, indices: np.ndarray, k: int, key: jax.Array,
                     setup: SamplerSetup, tokenizer: Any, reward: Reward) -> Scored:
    """Sample K responses to each prompt of `indices` (global; every host passes the same), score this host's
    prompts' samples and gather every host's rewards."""
    got = sample(graphdef, params, [prompts.prompt_ids[int(i)] for i in indices], k, key, setup, tokenizer)
    t0 = time.perf_counter()
    mine = _share(len(indices))
    local = indices[mine]
    rows = range(mine.start * k, mine.stop * k)
    fields = {name: [v for v in values for _ in range(k)] for name, values in prompts.fields_of(local).items()}
    rewards = reward.score([prompts.prompts[int(i)] for i in local for _ in range(k)], [got.text[b] for b in rows],
                           [got.tokens[b] for b in rows], fields)
    if jax.process_count() > 1:
        rewards = np.asarray(multihost_utils.process_allgather(rewards, tiled=True))
    return Scored(np.asarray(indices, np.int64), got.tokens, got.text, got.finish, np.asarray(rewards, np.float32),
                  got.seconds, time.perf_counter() - t0, got.generated)


def step_rows(scored: Scored, prompts: PromptSet, k: int, mode: str, layout: pairs_lib.Layout) -> pairs_lib.StepRows:
    return pairs_lib.step_rows([prompts.prompt_ids[int(i)] for i in scored.indices], scored.tokens,
                               scored.rewards_B, k, mode, layout, prompts.source)


@dataclasses.dataclass
class OnlineWindow:
    """Host sums of the online metrics over a log window (every host holds the same: the calls are global)."""

    rewards: list = dataclasses.field(default_factory=list)
    groups: int = 0
    tied: int = 0
    lengths: int = 0
    eos: int = 0
    samples: int = 0
    generated: int = 0
    gen_s: float = 0.0
    score_s: float = 0.0
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, scored: Scored, tied: int, k: int) -> None:
        self.rewards.append(scored.rewards_B)
        self.groups += len(scored.indices)
        self.tied += tied
        self.lengths += sum(len(t) for t in scored.tokens)
        self.eos += sum(f == "eos" for f in scored.finish)
        self.samples += len(scored.tokens)
        self.generated += scored.generated
        self.gen_s += scored.gen_seconds
        self.score_s += scored.score_seconds

    def restart_clock(self) -> None:
        """Leave the time so far out of the window's time shares (an eval's time)."""
        self.t0 = time.perf_counter()

    def flush(self) -> dict[str, float]:
        """The window's metrics (names: METRICS, docs/metrics.md); starts the next window."""
        if not self.samples:
            return {}
        dt = max(time.perf_counter() - self.t0, 1e-9)
        r = np.concatenate(self.rewards).astype(np.float64)
        out = dict(zip(METRICS, (r.mean(), r.std(), self.tied / self.groups, self.lengths / self.samples,
                                 self.eos / self.samples, self.generated / max(self.gen_s, 1e-9), self.gen_s / dt,
                                 self.score_s / dt)))
        self.__init__()  # the next window: every field back to its default
        return {name: float(v) for name, v in out.items()}


def sample_lines(step: int, scored: Scored, prompts: PromptSet, k: int, **extra) -> list[str]:
    """online_samples.jsonl lines of a call, one per prompt: its step, prompt, K completions (text and the sampled
    token ids), finish reasons, rewards (and `extra`, e.g. the round)."""
    lines = []
    for n, i in enumerate(scored.indices):
        b = slice(n * k, (n + 1) * k)
        lines.append(json.dumps({"step": step, **extra, "prompt_index": int(i), "prompt": prompts.prompts[int(i)],
                                 "completions": scored.text[b],
                                 "completion_ids": [list(map(int, t)) for t in scored.tokens[b]],
                                 "finish": scored.finish[b],
                                 "rewards": [float(x) for x in scored.rewards_B[b]]}, ensure_ascii=False))
    return lines
