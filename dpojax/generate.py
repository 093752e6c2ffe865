"""Text generation with the training model code: prefill + KV-cache decoding under `jax.jit`.

    gen = Generator(model, cfg, tokenizer, eos_ids=eos_token_ids(model_dir, tokenizer))
    out = gen.generate(["Once upon a time", [{"role": "user", "content": "Hi!"}]], Sampling(max_new_tokens=32))
    out[0].text, out[0].tokens, out[0].finish_reason        # finish_reason: "eos" | "stop" | "length"

A batch of prompts of different lengths is LEFT-padded (positions count real tokens only, as transformers'
`generate`); shapes are static per (batch size, prompt bucket, max_new_tokens): prompts are padded to a power of
two of at least MIN_PROMPT_BUCKET tokens, the cache holds bucket + max_new_tokens slots, and a short last batch
is filled with dummy rows, so a run compiles a prefill and a decode loop per prompt bucket.
Conversational prompts (a list of {"role", "content"} messages) go through the tokenizer's chat template with the
generation prompt added; plain strings are tokenized as they are (with the tokenizer's special tokens, e.g. BOS).

Decoding runs on the device in a `lax.while_loop` of up to `chunk` steps that ends early when every row is done
(EOS or its token budget); stop strings are checked on the host between chunks (only when some are given), and
a completion is cut where its first stop string begins. Greedy when temperature == 0, else sampling with
temperature, then top-k, then top-p (transformers' order and rules), from one seed.
Dimension letters: dpojax.glossary (B rows, T prompt bucket, Z cache slots, V vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax.errors import DataError, UserError
from dpojax.models.config import ModelConfig
from dpojax.models.kv_cache import KVCache, empty_cache
from dpojax.models.transformer import Decoder

MIN_PROMPT_BUCKET = 16  # shortest prompt bucket (tokens)
STOP_CHUNK = 16  # decode steps between host checks of stop strings
FINISH_REASONS = ("eos", "stop", "length")  # EOS token | stop string | max_new_tokens or the model's context


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens; only max_new_tokens (the cache length) and greedy or not shape the compiled code."""

    max_new_tokens: int = 128  # most tokens generated per prompt (also capped by the model's context)
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p (1 = all)
    seed: int = 0  # PRNG seed of sampling
    stop: tuple[str, ...] = ()  # stop strings: the completion ends before the first one

    def __post_init__(self):
        problems = [msg for bad, msg in (
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k < 0, f"top_k must be >= 0, got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ) if bad]
        if problems:
            raise UserError("generation: " + "; ".join(problems) + ".")


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]  # the prompt's tokens (after the chat template)
    tokens: list[int]  # generated tokens, the EOS token included; cut after the one completing a stop string
    text: str  # decoded tokens without special tokens, cut before the first stop string
    finish_reason: str  # one of FINISH_REASONS


# ------------------------------------------------------------------------------------------- token choice
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """The sampling settings as device scalars (traced, so changing them does not recompile)."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32

    @classmethod
    def of(cls, s: Sampling) -> Knobs:
        return cls(jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p))


def choose(logits_BxV: jax.Array, key: jax.Array, knobs: Knobs, greedy: bool = False) -> jax.Array:
    """int32 [B]: argmax when `greedy` (static: no sampling code is compiled) or temperature == 0, else a sample
    after temperature, top-k and top-p (transformers' rules: top-k keeps logits >= the k-th largest; top-p drops the
    least likely tokens whose cumulative probability is <= 1 - top_p, always keeping the most likely one)."""
    V = logits_BxV.shape[-1]
    logits_BxV = logits_BxV.astype(jnp.float32)
    if greedy:
        return first_argmax(logits_BxV)

    def sample(logits_BxV):
        scaled_BxV = logits_BxV / knobs.temperature
        filtering = ((knobs.top_k > 0) & (knobs.top_k < V)) | (knobs.top_p < 1)
        # the sort over the vocabulary runs only when top-k or top-p is on (a branch at run time: no recompile)
        scaled_BxV = jax.lax.cond(filtering, _top_k_top_p, lambda x_BxV, _: x_BxV, scaled_BxV, knobs)
        # jax.random.categorical's Gumbel-max draw (the same noise, so the same tokens), with a faster argmax
        return first_argmax(scaled_BxV + jax.random.gumbel(key, scaled_BxV.shape, jnp.float32))

    return jax.lax.cond(knobs.temperature == 0, first_argmax, sample, logits_BxV)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
    """int32 [B]: jnp.argmax over the last axis (the first index of the largest value) as two plain reductions,
    which XLA:CPU vectorizes (its variadic argmax reduction is several times slower over a vocabulary)."""
    V = x_BxV.shape[-1]
    top_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    first_B = jnp.min(jnp.where(x_BxV == top_Bx1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first_B, V - 1).astype(jnp.int32)  # V only when the row holds NaN


def _top_k_top_p(scaled_BxV: jax.Array, knobs: Knobs) -> jax.Array:
    """-inf on the tokens that top-k and top-p remove (`choose`)."""
    V = scaled_BxV.shape[-1]
    ascending_BxV = jnp.sort(scaled_BxV, axis=-1)  # top-k masking keeps this order
    k = jnp.where((knobs.top_k > 0) & (knobs.top_k < V), knobs.top_k, V)
    ascending_BxV = jnp.where(jnp.arange(V) < V - k, -jnp.inf, ascending_BxV)
    removed_BxV = jnp.cumsum(jax.nn.softmax(ascending_BxV, axis=-1), axis=-1) <= 1 - knobs.top_p
    removed_BxV = (removed_BxV | (ascending_BxV == -jnp.inf)).at[:, -1].set(False)
    lowest_kept_Bx1 = jnp.min(jnp.where(removed_BxV, jnp.inf, ascending_BxV), axis=-1, keepdims=True)
    return jnp.where(scaled_BxV < lowest_kept_Bx1, -jnp.inf, scaled_BxV)


# ------------------------------------------------------------------------------------------ device loop
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries. tokens_BxZ: the left-padded prompt in [0, T), then the generated
    tokens; the token at slot cache.index is the next one to feed (it is not in the cache yet)."""

    cache: KVCache
    tokens_BxZ: jax.Array  # int32
    count_B: jax.Array  # int32: tokens generated so far
    budget_B: jax.Array  # int32: most tokens this row may generate
    done_B: jax.Array  # bool
    eos_B: jax.Array  # bool: ended by an EOS token
    key: jax.Array  # PRNG key of sampling (folded with the slot of each step)
    knobs: Knobs
    eos_tokens: jax.Array  # int32: the EOS ids (-1 when there are none)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the jitted functions are specialized on."""

    greedy: bool  # temperature == 0: no sampling code compiled
    pad_id: int
    max_positions: int
    longrope_original: int | None  # original_max_position_embeddings of a LongRoPE model (its refill point)


def _after_token(state: DecodeState, tok_B: jax.Array, write_at: jax.Array, st: _Static) -> DecodeState:
    """Record the chosen tokens at slot `write_at` (rows already done keep padding) and update the flags."""
    active_B = ~state.done_B
    tok_B = jnp.where(active_B, tok_B, st.pad_id)
    tokens_BxZ = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxZ, tok_B[:, None], write_at, axis=1)
    count_B = state.count_B + active_B.astype(jnp.int32)
    eos_B = state.eos_B | (active_B & jnp.isin(tok_B, state.eos_tokens))
    done_B = state.done_B | eos_B | (count_B >= state.budget_B)
    return dataclasses.replace(state, tokens_BxZ=tokens_BxZ, count_B=count_B, eos_B=eos_B, done_B=done_B)


def _positions(slots: jax.Array, start_B: jax.Array, st: _Static) -> jax.Array:
    """Each row's position of cache slots (real tokens count from 0; padding gets 0)."""
    return jnp.clip(slots[None, :] - start_B[:, None], 0, st.max_positions - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "st"))
def _prefill(graphdef, params, prompt_BxT, start_B, budget_B, key, knobs: Knobs, eos_tokens, *, slots: int,
             st: _Static) -> DecodeState:
    model: Decoder = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, T = prompt_BxT.shape
    cache = empty_cache(cfg.num_layers, B, slots, cfg.num_kv_heads, cfg.head_dim, start_B, model.dtype, model.sharder)
    longest = T - jnp.min(start_B) if st.longrope_original is not None else None
    hidden_BxTxD, cache = model.decode(prompt_BxT, _positions(jnp.arange(T), start_B, st), cache, longest)
    tok_B = choose(model.logits(hidden_BxTxD[:, -1:])[:, 0], jax.random.fold_in(key, T), knobs, st.greedy)
    tokens_BxZ = jnp.zeros((B, slots), jnp.int32).at[:, :T].set(prompt_BxT)
    state = DecodeState(cache, tokens_BxZ, jnp.zeros((B,), jnp.int32), budget_B, jnp.zeros((B,), bool),
                        jnp.zeros((B,), bool), key, knobs, eos_tokens)
    return _after_token(state, tok_B, jnp.asarray(T, jnp.int32), st)


def _step(model: Decoder, state: DecodeState, st: _Static) -> DecodeState:
    cache, index = state.cache, state.cache.index
    tok_Bx1 = jax.lax.dynamic_slice_in_dim(state.tokens_BxZ, index, 1, axis=1)
    pos_Bx1 = _positions(index[None], cache.start_B, st)
    if st.longrope_original is None:
        hidden_Bx1xD, cache = model.decode(tok_Bx1, pos_Bx1, cache)
    else:  # transformers recomputes the whole cache when the sequence first outgrows LongRoPE's short factors
        longest = index - jnp.min(cache.start_B) + 1
        Z = state.tokens_BxZ.shape[1]

        def refill(_):
            hidden_BxZxD, full = model.decode(state.tokens_BxZ, _positions(jnp.arange(Z), cache.start_B, st),
                                              cache, longest)
            return (jax.lax.dynamic_slice_in_dim(hidden_BxZxD, index, 1, axis=1),
                    dataclasses.replace(full, index=index + 1))

        hidden_Bx1xD, cache = jax.lax.cond(longest == st.longrope_original + 1, refill,
                                           lambda _: model.decode(tok_Bx1, pos_Bx1, cache, longest), None)
    tok_B = choose(model.logits(hidden_Bx1xD)[:, 0], jax.random.fold_in(state.key, index + 1), state.knobs, st.greedy)
    return _after_token(dataclasses.replace(state, cache=cache), tok_B, index + 1, st)


@functools.partial(jax.jit, static_argnames=("graphdef", "st"))
def _decode_loop(graphdef, params, state: DecodeState, max_steps, *, st: _Static) -> DecodeState:
    """Up to `max_steps` decode steps; stops early when every row is done."""
    model: Decoder = nnx.merge(graphdef, params)
    Z = state.tokens_BxZ.shape[1]

    def cond(carry):
        i, s = carry
        return (i < max_steps) & ~jnp.all(s.done_B) & (s.cache.index + 1 < Z)

    def body(carry):
        i, s = carry
        return i + 1, _step(model, s, st)

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))[1]


# ------------------------------------------------------------------------------------------------- host side
def prompt_bucket(length: int) -> int:
    """The static prompt length for `length` tokens: a power of two, at least MIN_PROMPT_BUCKET."""
    return max(MIN_PROMPT_BUCKET, 1 << max(0, length - 1).bit_length())


def encode_prompt(tokenizer: Any, prompt: str | Sequence[dict]) -> list[int]:
    """A plain string as tokenized by the tokenizer; a list of messages through its chat template."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("a conversational prompt (a list of messages) needs a tokenizer with a chat template; this "
                        "one has none: give plain text prompts or use an instruct/chat model's tokenizer.")
    return list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def eos_token_ids(model_dir: str | pathlib.Path | None, tokenizer: Any = None) -> tuple[int, ...]:
    """The EOS ids `generate` stops at, as transformers: generation_config.json's eos_token_id, else
    config.json's; the tokenizer's EOS token when neither names one."""
    for name in ("generation_config.json", "config.json"):
        path = pathlib.Path(model_dir) / name if model_dir is not None else None
        if path is not None and path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)


class Generator:
    """Generates with one model (its params as loaded, sharded or not). The compiled prefill and decode loop are
    shared by every call (and Generator) with the same model structure, shapes, and greedy or not."""

    def __init__(self, model: Decoder, cfg: ModelConfig, tokenizer: Any = None, *, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, batch_size: int = 8):
        self.graphdef, self.params = nnx.split(model)
        self.cfg, self.tokenizer, self.sharder = cfg, tokenizer, model.sharder
        self.eos_ids, self.pad_id, self.batch_size = tuple(int(e) for e in eos_ids), int(pad_id), batch_size
        self.context = cfg.max_position_embeddings
        longrope = cfg.rope.type == "longrope" and cfg.position == "rope"
        self._longrope_original = cfg.rope.original_max_position_embeddings if longrope else None

    def generate(self, prompts: Sequence[str | Sequence[dict]], sampling: Sampling = Sampling(),
                 progress: Callable[[int], Any] | None = None) -> list[Completion]:
        """Completions of text or conversational prompts (needs the tokenizer)."""
        return self.generate_ids([encode_prompt(self.tokenizer, p) for p in prompts], sampling, progress)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                     progress: Callable[[int], Any] | None = None) -> list[Completion]:
        """Completions of tokenized prompts, `batch_size` at a time; `progress(n)` after each batch of n."""
        self.check_prompts(prompt_ids)
        out: list[Completion] = []
        for lo in range(0, len(prompt_ids), self.batch_size):
            batch = [list(map(int, p)) for p in prompt_ids[lo:lo + self.batch_size]]
            out += self._generate_batch(batch, sampling)
            if progress is not None:
                progress(len(batch))
        return out

    def check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        """DataError naming the first prompt that is empty or leaves no room in the model's context."""
        for i, ids in enumerate(prompt_ids):
            if not 0 < len(ids) < self.context:
                raise DataError(f"prompt {i} has {len(ids)} tokens; a prompt needs 1 to {self.context - 1} tokens "
                                f"(the model's context is {self.context}): shorten it or leave it out.")

    def _static(self, sampling: Sampling) -> _Static:
        return _Static(sampling.temperature == 0, self.pad_id, self.context, self._longrope_original)

    def _place(self, x: np.ndarray) -> jax.Array:
        if self.sharder is None:
            return jnp.asarray(x)
        return jax.device_put(x, self.sharder.named(("batch",) + (None,) * (x.ndim - 1), x.shape))

    def _generate_batch(self, batch: list[list[int]], sampling: Sampling) -> list[Completion]:
        n, B = len(batch), self.batch_size
        rows = batch + [[self.pad_id]] * (B - n)  # dummy rows keep the batch shape static
        T = prompt_bucket(max(len(r) for r in rows))
        prompt_BxT = np.full((B, T), self.pad_id, np.int32)
        start_B = np.array([T - len(r) for r in rows], np.int32)
        for b, r in enumerate(rows):
            prompt_BxT[b, start_B[b]:] = r
        budget_B = np.array([min(sampling.max_new_tokens, self.context - len(r)) for r in rows], np.int32)
        st = self._static(sampling)
        eos_tokens = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
        state = _prefill(self.graphdef, self.params, self._place(prompt_BxT), self._place(start_B),
                         self._place(budget_B), jax.random.key(sampling.seed), Knobs.of(sampling), eos_tokens,
                         slots=T + sampling.max_new_tokens, st=st)
        stopped = np.zeros(B, bool)
        chunk = STOP_CHUNK if sampling.stop else sampling.max_new_tokens
        while True:
            state = _decode_loop(self.graphdef, self.params, state, jnp.asarray(chunk, jnp.int32), st=st)
            tokens_BxZ, count_B, done_B = jax.device_get((state.tokens_BxZ, state.count_B, state.done_B))
            if sampling.stop:
                for b in np.flatnonzero(~done_B[:n]):
                    stopped[b] = self._stop_at(tokens_BxZ[b, T:T + count_B[b]].tolist(), sampling.stop) is not None
                if stopped.any():
                    done_B = done_B | stopped
                    state = dataclasses.replace(state, done_B=self._place(done_B))
            if done_B.all():
                break
        eos_B = np.asarray(jax.device_get(state.eos_B))
        return [self._completion(batch[b], tokens_BxZ[b, T:T + count_B[b]].tolist(), bool(eos_B[b]), sampling)
                for b in range(n)]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _stop_at(self, tokens: list[int], stop: tuple[str, ...]) -> int | None:
        return stop_at(tokens, stop, self._decode)

    def _completion(self, prompt: list[int], tokens: list[int], eos: bool, sampling: Sampling) -> Completion:
        cut = stop_cut(tokens, sampling.stop, self._decode)
        if cut is not None:
            return Completion(prompt, tokens[:cut[0]], self._decode(tokens[:cut[0]])[:cut[1]], "stop")
        return Completion(prompt, tokens, self._decode(tokens), "eos" if eos else "length")


def stop_at(tokens: list[int], stop: tuple[str, ...], decode: Callable[[list[int]], str]) -> int | None:
    """Where the first stop string begins in the decoded tokens, or None."""
    text = decode(tokens)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def stop_cut(tokens: list[int], stop: tuple[str, ...], decode: Callable[[list[int]], str]) -> tuple[int, int] | None:
    """(tokens kept, characters kept): the fewest tokens whose text holds a stop string, and that text up to where
    the first stop string begins; None when there is none (or no stop strings)."""
    if not stop or stop_at(tokens, stop, decode) is None:
        return None
    n = next(k for k in range(1, len(tokens) + 1) if stop_at(tokens[:k], stop, decode) is not None)
    return n, stop_at(tokens[:n], stop, decode)


def sample_tokens(graphdef, params, prompt_BxT: jax.Array, start_B: jax.Array, budget_B: jax.Array, key: jax.Array,
                  sampling: Sampling, eos_ids: Sequence[int], *, pad_id: int, context: int,
                  longrope_original: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The device part of `Generator` as one pure call on a split model (graphdef + params, sharded as they are):
    prefill then decode up to sampling.max_new_tokens (stop strings are left to the caller), with fixed shapes.
    Returns (tokens_BxZ: the left-padded prompts then the new tokens, count_B: tokens generated, eos_B: ended by
    an EOS token), on the devices."""
    st = _Static(sampling.temperature == 0, int(pad_id), int(context), longrope_original)
    eos_tokens = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)
    state = _prefill(graphdef, params, prompt_BxT, start_B, budget_B, key, Knobs.of(sampling), eos_tokens,
                     slots=prompt_BxT.shape[1] + sampling.max_new_tokens, st=st)
    state = _decode_loop(graphdef, params, state, jnp.asarray(sampling.max_new_tokens, jnp.int32), st=st)
    return state.tokens_BxZ, state.count_B, state.eos_B
