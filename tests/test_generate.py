"""Generation: greedy decoding equals transformers' `generate(do_sample=False)` token for token for every family
(a left-padded batch of different prompt lengths, 32 new tokens, a Gemma 2 prompt longer than its window, Phi-3
crossing LongRoPE's switch point); sampling is reproducible and keeps to top-k/top-p on a tiny model's
distribution; stop strings, EOS and chat templates; a 2x4 CPU mesh decodes as one device."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import load_tiny_tokenizer, make_tokenizer

from dpojax.generate import Generator, Knobs, Sampling, choose
from dpojax.models import load_pretrained

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gemma", "gemma2", "gemma3_text", "phi3")
PROMPTS = [[5, 9, 17, 33, 60], [7, 3, 99, 12, 41, 8, 77, 23, 5, 61, 90], [44, 10, 6]]  # 11 > Gemma 2's window 4
NEW = 32
EOS = 2


@pytest.fixture(autouse=True, scope="module")
def _quick_compiles():
    """XLA's cheaper compile mode for this module (most compiles here are run once): about a third less compile
    time, the same tokens."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _sharpened_checkpoint(path, family, factor=6.0, **kw):
    """A tiny checkpoint whose q/k projections are scaled up, so attention is peaked and positions matter (with
    the default small weights LongRoPE's factor switch, for one, never changes an argmax)."""
    import torch
    import transformers

    make_tiny_checkpoint(path, family, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and any(k in name for k in ("q_proj", "k_proj", "c_attn", "query_key_value",
                                                                   "qkv_proj")):
                p.mul_(factor)
    model.save_pretrained(path)
    return path, model


def _hf_greedy(model, prompts, new=NEW):
    import torch

    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0,
                         eos_token_id=EOS)
    rows = [r[T:].tolist() for r in out]
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(family, tmp_path):
    path, hf_model = _sharpened_checkpoint(tmp_path / family, family)
    model, cfg = load_pretrained(path)
    ours = Generator(model, cfg, eos_ids=(EOS,), batch_size=4).generate_ids(PROMPTS, Sampling(max_new_tokens=NEW))
    assert [c.tokens for c in ours] == _hf_greedy(hf_model, PROMPTS)
    assert [c.finish_reason for c in ours] == ["eos" if c.tokens[-1] == EOS else "length" for c in ours]
    assert all(len(c.tokens) == NEW for c in ours if c.finish_reason == "length")


# ------------------------------------------------------------------------------ sampling, stops, chat, mesh
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with the test tokenizer's files in its folder, and a Generator for it."""
    root = tmp_path_factory.mktemp("gen")
    path, _ = _sharpened_checkpoint(root / "llama", "llama", factor=3.0)
    make_tokenizer(path)
    tokenizer = load_tiny_tokenizer(path)
    model, cfg = load_pretrained(path)
    return path, tokenizer, Generator(model, cfg, tokenizer, eos_ids=(EOS,), batch_size=4)


def test_top_k_top_p_keep_to_the_model_distribution(tiny):
    import jax

    _, _, gen = tiny
    model = nnx.merge(gen.graphdef, gen.params)
    ids = np.asarray([[1, 5, 9, 17, 33]])
    logits = np.asarray(model.logits(model(ids, np.arange(5)[None], np.ones_like(ids)))[0, -1], np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k, knobs: choose(logits[None].astype(np.float32), k, knobs)[0], (0, None)))
    for knobs, kept in ((Knobs.of(Sampling(temperature=1.0, top_k=5)), order[:5]),
                        (Knobs.of(Sampling(temperature=1.0, top_p=0.7)),
                         order[: np.searchsorted(np.cumsum(probs[order]), 0.7) + 1])):
        counts = np.bincount(np.asarray(draw(keys, knobs)), minlength=len(probs))
        assert set(np.flatnonzero(counts)) <= set(kept.tolist())
        expected = probs[kept] / probs[kept].sum()
        np.testing.assert_allclose(counts[kept] / n, expected, atol=0.015)
    hot = np.bincount(np.asarray(draw(keys, Knobs.of(Sampling(temperature=2.0)))), minlength=len(probs)) / n
    flat = np.exp((logits - logits.max()) / 2.0)
    np.testing.assert_allclose(hot, flat / flat.sum(), atol=0.015)


def test_sampling_is_reproducible_from_the_seed(tiny):
    _, _, gen = tiny
    s = Sampling(max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a, b = gen.generate_ids(PROMPTS, s), gen.generate_ids(PROMPTS, s)
    c = gen.generate_ids(PROMPTS, Sampling(max_new_tokens=NEW, temperature=0.7, top_k=0, top_p=1.0, seed=4))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_stop_strings_eos_and_chat_template(tiny):
    _, tokenizer, gen = tiny
    chat = [{"role": "user", "content": "what color is the sky?"}]
    prompts = ["the sky is", chat]
    free = gen.generate(prompts, Sampling(max_new_tokens=NEW))
    assert free[1].prompt_ids == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"]
    assert free[0].prompt_ids == tokenizer("the sky is")["input_ids"]
    text = free[0].text
    assert len(text) > 6, free[0]
    stop = text[3:6]
    cut = gen.generate(prompts, Sampling(max_new_tokens=NEW, stop=(stop,)))
    assert cut[0].finish_reason == "stop" and cut[0].text == text[: text.index(stop)]
    assert stop in tokenizer.decode(cut[0].tokens) and stop not in tokenizer.decode(cut[0].tokens[:-1])
    assert cut[0].tokens == free[0].tokens[: len(cut[0].tokens)]
    # the first generated token as EOS: the row ends at once, with "eos" (same compiled code: EOS ids are data)
    first = free[0].tokens[0]
    eos_gen = Generator(nnx.merge(gen.graphdef, gen.params), gen.cfg, tokenizer, eos_ids=(first,), batch_size=4)
    ended = eos_gen.generate(["the sky is"], Sampling(max_new_tokens=NEW))[0]
    first_text = tokenizer.decode([first], skip_special_tokens=True)
    assert (ended.tokens, ended.finish_reason, ended.text) == ([first], "eos", first_text)


def test_mesh_decoding_equals_one_device(tiny):
    from dpojax.sharding import Sharder, make_mesh

    path, tokenizer, gen = tiny
    prompts = [[1] + PROMPTS[i % 3][: 2 + i] for i in range(6)]  # two batches of 4, the last one short
    sharder = Sharder(make_mesh(data=2, fsdp=2, tensor=2))
    model, cfg = load_pretrained(path, sharder=sharder)
    mesh_gen = Generator(model, cfg, eos_ids=(EOS,), batch_size=4)
    assert mesh_gen.params["layers"]["self_attn"]["k_proj"]["kernel"].value.sharding.spec[1] == "fsdp"
    s = Sampling(max_new_tokens=NEW)
    assert [c.tokens for c in mesh_gen.generate_ids(prompts, s)] == [c.tokens for c in gen.generate_ids(prompts, s)]
