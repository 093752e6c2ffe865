"""Packed batches give the same numbers as [N, K, T] batches: per-sequence log-prob sums and every statistic the
losses read, every loss on top of them, and parameter gradients, for pairs and rankings (padding responses),
truncation in both modes (groups split over rows, keep_end groups that cannot share), every family's attention
features (sliding windows counted in positions, learned positions, soft-caps, LongRoPE), and micro-batches.
The packing itself: deterministic, no padding beyond the row rounding, nothing dropped."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import load_tiny_tokenizer, make_tokenizer
from tolerances import fp32_tol

from dpojax import losses
from dpojax.config import LossSection
from dpojax.data import collate, tokenize_rows
from dpojax.data.batching import train_batches
from dpojax.data.packing import Packing, pack, row_length
from dpojax.errors import ConfigError
from dpojax.models.config import ModelConfig
from dpojax.models.hf import init_random, read_hf_config
from dpojax.trainer.step import StepSpec, batch_loss, sequence_logps

ROWS = [
    {"prompt": "the sky is", "responses": [" blue.", " red cat.", " no."]},
    {"prompt": "what color is the sea when the sun is hot and the dog is", "responses": [" blue.", " green sea."]},
    {"prompt": "a", "responses": [" one two three four five six seven eight nine ten.", " b."]},
    {"prompt": "tell me about the cat and the dog and the sun", "responses": [" it is red.", " the sea.",
                                                                            " cats are hot and blue."]},
    {"prompt": "sun", "responses": [" hot.", " hot."]},
    {"prompt": "the dog and the cat", "responses": [" run.", " sleep and run and sleep and run.", " eat."]},
]
STAT_FIELDS = ("logps_B", "tokens_B", "completion_len_B", "ld_logps_B", "mean_logit_sum_B", "wpo_sum_B",
               "lm_logps_B", "lm_tokens_B")
# One loss section that switches on every per-sequence statistic: WPO sums, LD-DPO, and ORPO's prompt NLL.
ALL_STATS = LossSection(type=("orpo",), use_weighting=True, ld_alpha=0.5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(make_tokenizer(tmp_path_factory.mktemp("packing_tok")))


def _model(tmp_path_factory, family, seed=0):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(f"packing_{family}"), family, seed=seed)
    return nnx.split(init_random(ModelConfig.from_hf(read_hf_config(path)), seed=seed, attention="xla"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model(tmp_path_factory, "llama")


def _batches(data, max_length, truncation_mode, mode, indices=None, micro_batches=1, shards=1, prompt_nll=True):
    indices = list(range(len(data))) if indices is None else indices
    unpacked = collate(data, indices, length=max(int(data.lengths_MxK.max()), 1) if max_length is None
                       else max_length, max_length=max_length, truncation_mode=truncation_mode)
    packed = pack(data, indices, np.ones(len(indices), np.float32),
                  Packing(mode, shards=shards, micro_batches=micro_batches, prompt_nll=prompt_nll),
                  max_length=max_length, truncation_mode=truncation_mode)
    return unpacked, packed


def _spec(graphdef, loss, mode, band):
    return StepSpec(graphdef, graphdef, loss, None, None, packing=mode, band=band)


def _stats(graphdef, params, batch, loss, mode, band):
    return jax.jit(lambda p, b: sequence_logps(graphdef, p, b, _spec(graphdef, loss, mode, band)))(params, batch)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("mode", ["shared_prompt", "padding_free"])
def test_packed_statistics_and_every_loss_equal_unpacked(tok, llama, mode, truncation_mode):
    """Every per-sequence statistic, then every registered loss and its metrics, equal the [N, K, T] batch's; at
    max_length 12 sequences are cut, groups are split over parts with their prompt repeated, and under keep_end
    some groups cannot share their prompt."""
    graphdef, params = llama
    data = tokenize_rows(ROWS, tok, max_length=12, truncation_mode=truncation_mode)
    unpacked, packed = _batches(data, 12, truncation_mode, mode)
    assert packed.real_tokens() < unpacked.real_tokens() or mode == "padding_free"
    want = _stats(graphdef, params, unpacked, ALL_STATS, "none", None)
    got = _stats(graphdef, params, packed, ALL_STATS, mode, 12)
    for name in STAT_FIELDS:
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, err_msg=name)
    k = data.num_responses
    twins = [m for m in range(len(data)) if np.array_equal(data.response_ids[m][0], data.response_ids[m][1])]
    assert twins  # identical responses (kept, as TRL does) get bitwise-equal sums: accuracies count them as TRL
    for m in twins:
        assert got.logps_B[m * k] == got.logps_B[m * k + 1]
    for name in losses.LOSSES:
        section = dataclasses.replace(ALL_STATS, type=(name,))
        try:
            losses.validate_loss_config(section)
        except ConfigError:  # a loss that takes none of the pair options (e.g. plackett_luce)
            section = LossSection(type=(name,))
        outs = []
        for stats in (want, got):
            ref = jax.tree.map(lambda x: x * 0.9 + 0.1, stats)  # a reference that differs from the policy
            inputs = losses.loss_inputs_from_stats(stats, ref, num_responses=k, prompt_mask_N=unpacked.prompt_mask_N,
                                                   response_mask_NxK=unpacked.response_mask_NxK,
                                                   rank_NxK=unpacked.rank_NxK)
            if losses.is_kwise(section) or k == 2:
                outs.append(losses.preference_loss(inputs, section))
        if outs:
            (loss_a, m_a), (loss_b, m_b) = outs
            np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-6, err_msg=name)
            _same_metrics(m_b, m_a, err_msg=name)


@pytest.mark.parametrize("loss", [LossSection(type=("orpo",)), LossSection(use_weighting=True, ld_alpha=0.5),
                                  LossSection(type=("plackett_luce",))], ids=["orpo", "wpo_ld", "plackett_luce"])
def test_packed_gradients_equal_unpacked(tok, llama, loss):
    """The loss, its metrics and every parameter gradient of one step's batch, packed vs unpacked."""
    graphdef, params = llama
    data = tokenize_rows(ROWS, tok, max_length=12)
    if not losses.is_kwise(loss):
        data = tokenize_rows([dict(r, responses=r["responses"][:2]) for r in ROWS], tok, max_length=12)
    unpacked, packed = _batches(data, 12, "keep_start", "shared_prompt", prompt_nll=losses.needs_prompt_nll(loss))
    _, ref_params = _model_cache(graphdef, params)

    def run(batch, mode):
        spec = _spec(graphdef, loss, mode, 12)
        return jax.jit(jax.value_and_grad(lambda p, b: batch_loss(p, ref_params, b, spec), has_aux=True))(params, batch)

    (loss_a, m_a), g_a = run(unpacked, "none")
    (loss_b, m_b), g_b = run(packed, "shared_prompt")
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    _same_metrics(m_b, m_a)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree.leaves(g_b), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def _same_metrics(got, want, err_msg=""):
    """Metric sums packed vs unpacked. Those computed from the log-prob sums (log-odds, rewards, NLL, the loss) are
    as exact as those sums, whatever their own size: a log-odds of 0.05 is a difference of per-token means near -4.5,
    so 16 fp32 ulps of the batch's total |log-probs| (packed vs unpacked measured within 0.3 of them); the logits'
    sums as before (measured 1e-8, 100 times under)."""
    logps = abs(float(want["logps/chosen"][0])) + abs(float(want["logps/rejected"][0]))
    for key in want:
        atol = 1e-6 if key.startswith("logits/") else fp32_tol(logps, 16)
        np.testing.assert_allclose(got[key][0], want[key][0], rtol=1e-5, atol=atol, err_msg=f"{err_msg} {key}")


def _model_cache(graphdef, params):
    return graphdef, jax.tree.map(lambda x: x * 0.98, params)  # a reference close to, but not, the policy


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "gemma3_text", "phi3", "gpt_neox", "qwen3"])
def test_every_family_gives_the_same_log_probs_packed(tmp_path_factory, tok, family):
    """Learned positions (GPT-2), sliding windows of 4 counted in positions and soft-caps (Gemma 2/3), LongRoPE past
    16 positions (Phi-3), partial rotary and parallel residual (NeoX), q/k norms (Qwen3): same sums packed."""
    graphdef, params = _model(tmp_path_factory, family)
    data = tokenize_rows(ROWS, tok, max_length=20)
    unpacked, packed = _batches(data, 20, "keep_start", "shared_prompt", prompt_nll=False)
    loss = LossSection(type=("sigmoid",))
    want = _stats(graphdef, params, unpacked, loss, "none", None)
    got = _stats(graphdef, params, packed, loss, "shared_prompt", 20)
    for name in ("logps_B", "tokens_B", "mean_logit_sum_B"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, err_msg=name)


def test_micro_batches_and_shards_lay_out_rows_for_the_step(tok):
    """With A micro-batches, micro-batch a holds prompts a, a + A, ... (as unpacked) in rows a, a + A, ...; rows per
    micro-batch are a multiple of the data shards; every response token is scored exactly once; the same
    prompts give the same batch (deterministic) and 2 hosts get the two halves of the 1-host batch."""
    data = tokenize_rows(ROWS * 3, tok, max_length=16)
    assert len(data) >= 12
    idx = np.arange(12)
    one = pack(data, idx, np.ones(12), Packing("shared_prompt", shards=2, micro_batches=3), max_length=16,
               truncation_mode="keep_start")
    again = pack(data, idx, np.ones(12), Packing("shared_prompt", shards=2, micro_batches=3), max_length=16,
                 truncation_mode="keep_start")
    jax.tree.map(np.testing.assert_array_equal, one, again)
    rows = one.input_ids_PxJ.shape[0]
    assert rows % 6 == 0 and one.input_ids_PxJ.shape[1] == row_length(one.input_ids_PxJ.shape[1])
    unpacked = collate(data, idx, length=16, max_length=16, truncation_mode="keep_start")
    scored_NxK = unpacked.completion_mask_NxKxT[..., 1:].sum(-1)
    k = data.num_responses
    for a in range(3):
        owner = one.owner_PxI[a::3]
        comp = one.completion_PxI[a::3]
        counts = np.bincount(owner[comp > 0], minlength=4 * (k + 1)).reshape(4, k + 1)[:, :k]
        np.testing.assert_array_equal(counts, scored_NxK[a::3])
    halves = [pack(data, idx, np.ones(12), Packing("shared_prompt", shards=2, micro_batches=3), max_length=16,
                   truncation_mode="keep_start", process_index=i, process_count=2) for i in range(2)]
    jax.tree.map(lambda whole, *parts: np.testing.assert_array_equal(np.concatenate(parts), whole), one, *halves)
    # the training iterator packs the same prompts as it batches them unpacked
    plain = next(train_batches(data, 12, seed=1, max_length=16))
    packed = next(train_batches(data, 12, seed=1, max_length=16, packing=Packing("shared_prompt")))
    np.testing.assert_array_equal(packed.prompt_index_N, plain.prompt_index_N)
    assert packed.real_tokens() / packed.input_ids_PxJ.size >= 0.8
