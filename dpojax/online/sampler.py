"""Sampling K responses per prompt from the policy as it is (its sharded params on the training mesh, no gathered
copy), with fixed shapes: the global batch is always N prompts x K samples, every prompt left-padded to one bucket
(the longest prompt of the set rounded up: `generate.prompt_bucket`) and max_new_tokens decoded, so nothing
recompiles from step to step. The key of a call is given (the loop folds (seed, step) into it); each row draws its
own tokens from it.

Completions are token ids as sampled: the EOS token kept where the model ended, none where max_new_tokens cut the
response; with stop strings a response ends with the token that completes the first one (as `Generator`). Every
host sees every row (one all-gather of the tokens when there are several) and keeps its own share.
Glossary: `dpojax.glossary` (B rows = N x K, T prompt bucket, Z cache slots)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpojax.generate import Sampling, sample_tokens, stop_cut
from dpojax.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class SamplerSetup:
    """What stays the same for every call of a run."""

    sampling: Sampling  # temperature, top_k, top_p, max_new_tokens, stop
    bucket: int  # T: prompt slots of every row
    eos_ids: tuple[int, ...]
    pad_id: int
    context: int  # the model's max_position_embeddings
    longrope_original: int | None
    sharder: Sharder | None


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Every row of one call, prompt by prompt (K rows each)."""

    tokens: list[list[int]]  # completion ids (EOS kept as sampled)
    finish: list[str]  # "eos" | "stop" | "length"
    text: list[str]  # decoded without special tokens, cut before a stop string
    seconds: float  # wall time of the call (sampling and reading back)
    generated: int  # tokens generated over all hosts' rows


def _place(x: np.ndarray, sharder: Sharder | None) -> jax.Array:
    """A global host array (the same on every host) as a jax.Array whose rows split over the data axes."""
    if sharder is None:
        return jax.numpy.asarray(x)
    sharding = sharder.named(("batch",) + (None,) * (x.ndim - 1), x.shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _read(tree) -> Any:
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def prompt_arrays(prompts: Sequence[np.ndarray], k: int, setup: SamplerSetup):
    """(prompt_BxT left-padded, start_B, budget_B) of every prompt repeated k times, prompt by prompt."""
    rows = [p for p in prompts for _ in range(k)]
    T = setup.bucket
    prompt_BxT = np.full((len(rows), T), setup.pad_id, np.int32)
    start_B = np.array([T - len(r) for r in rows], np.int32)
    for b, r in enumerate(rows):
        prompt_BxT[b, start_B[b]:] = r
    budget_B = np.array([min(setup.sampling.max_new_tokens, setup.context - len(r)) for r in rows], np.int32)
    return prompt_BxT, start_B, budget_B


def sample(graphdef, params, prompts: Sequence[np.ndarray], k: int, key: jax.Array, setup: SamplerSetup,
           tokenizer: Any) -> Sampled:
    """K samples of each of the step's global `prompts` (every host passes the same list), every row."""
    t0 = time.perf_counter()
    prompt_BxT, start_B, budget_B = prompt_arrays(prompts, k, setup)
    out = sample_tokens(graphdef, params, *(_place(x, setup.sharder) for x in (prompt_BxT, start_B, budget_B)), key,
                        setup.sampling, setup.eos_ids, pad_id=setup.pad_id, context=setup.context,
                        longrope_original=setup.longrope_original)
    tokens_BxZ, count_B, eos_B = (np.asarray(x) for x in _read(out))
    seconds = time.perf_counter() - t0
    T, decode = setup.bucket, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    tokens, finish, text = [], [], []
    for b in range(len(prompts) * k):
        ids = tokens_BxZ[b, T:T + count_B[b]].tolist()
        cut = stop_cut(ids, setup.sampling.stop, decode)
        if cut is not None:
            tokens.append(ids[:cut[0]])
            text.append(decode(ids[:cut[0]])[:cut[1]])
            finish.append("stop")
        else:
            tokens.append(ids)
            text.append(decode(ids))
            finish.append("eos" if eos_B[b] else "length")
    return Sampled(tokens, finish, text, seconds, int(count_B.sum()))
