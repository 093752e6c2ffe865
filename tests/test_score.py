"""Sequence-classification (reward) models: scores equal transformers' *ForSequenceClassification logits, sharded
equals unsharded, export round trips, refusals, and the RewardModel adapter (shared or different tokenizer)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_models import padded_batch
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import PUNCT, SPECIALS, WORDS, make_tokenizer

from dpojax.errors import ModelError
from dpojax.models.score import (
    _scores_jit,
    export_score_model,
    init_score_model,
    load_score_model,
    score_sequences,
    sequence_logits,
    sequence_scores,
)
from dpojax.reward import RewardModel, vocabulary_fingerprint
from dpojax.sharding import Sharder, make_mesh


def torch_scores(path, ids_BxT, seg_BxT):
    """transformers' logits [B, Q] (attention mask = the real tokens)."""
    import torch
    import transformers

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = model.eval()(input_ids=torch.tensor(ids_BxT, dtype=torch.long), attention_mask=torch.tensor(seg_BxT))
    return out.logits.numpy()


def scoring_batch():
    """Right-padded rows of 12, 9, 5 and 1 tokens (pad id 0); row 1's last real token IS the pad id, which
    transformers skips (it scores the rightmost token that is not the pad id): so must we."""
    ids, pos, seg = padded_batch()
    ids[1, 8] = 0
    return ids, pos, seg


def rows_of(ids_BxT, seg_BxT):
    return [list(r[s > 0]) for r, s in zip(ids_BxT, seg_BxT)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "mistral", "phi3", "gemma3_text"])
def test_scores_match_transformers(family, tmp_path):
    path = make_tiny_checkpoint(tmp_path / family, family, num_labels=1,
                                **({"head_dim": 16} if family == "qwen3" else {}))
    model, cfg = load_score_model(path)
    ids, pos, seg = scoring_batch()
    ref_B = torch_scores(path, ids, seg)[:, 0]
    assert np.abs(ref_B).max() > 0.5 and np.ptp(ref_B) > 0.1  # not trivially small or equal
    ours_B = np.asarray(jax.jit(sequence_scores, static_argnums=0)(*nnx.split(model), ids, pos, seg))
    np.testing.assert_allclose(ours_B, ref_B, atol=1e-4, rtol=0)
    assert cfg.family == family and model.pad_token_id == 0
    if family == "llama":  # the host wrapper: same numbers, one compile per bucket, none on the next call
        np.testing.assert_allclose(score_sequences(model, rows_of(ids, seg), batch_size=4), ref_B, atol=1e-4, rtol=0)
        compiled = _scores_jit._cache_size()
        again = score_sequences(model, rows_of(ids, seg)[::-1] + [[5, 6, 7]], batch_size=4)
        np.testing.assert_allclose(again[:4], ref_B[::-1], atol=1e-4, rtol=0)
        assert _scores_jit._cache_size() == compiled


def test_without_pad_token_scores_the_last_token(tmp_path):
    """pad_token_id None: transformers scores the last position (one row at a time); ours, each row's last token."""
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", num_labels=1, pad_token_id=None)
    model, _ = load_score_model(path)
    assert model.pad_token_id is None
    ids, _, seg = scoring_batch()
    rows = rows_of(ids, seg)
    ref = [torch_scores(path, np.asarray([r]), np.ones((1, len(r)), np.int64))[0, 0] for r in rows]
    np.testing.assert_allclose(score_sequences(model, rows, batch_size=4), ref, atol=1e-4, rtol=0)


def test_sharded_scores_equal_unsharded(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", num_labels=1)
    sharder = Sharder(make_mesh(data=1, fsdp=4, tensor=2))
    sharded, _ = load_score_model(path, sharder=sharder)
    assert sharded.score.weight[...].sharding.spec == P(None, "fsdp")
    plain, _ = load_score_model(path)
    ids, _, seg = scoring_batch()
    rows = rows_of(ids, seg) * 2
    np.testing.assert_allclose(score_sequences(sharded, rows, batch_size=8), score_sequences(plain, rows),
                               atol=1e-5, rtol=0)


def test_export_round_trip_and_new_head(tmp_path):
    """A loaded reward model and a new one on a causal LM's decoder both export to folders transformers loads
    (no missing or unexpected weights) with the scores we compute."""
    ids, pos, seg = scoring_batch()
    reward = make_tiny_checkpoint(tmp_path / "rm", "qwen2", num_labels=1)
    causal = make_tiny_checkpoint(tmp_path / "lm", "llama")  # untied: its lm_head.weight is dropped
    for name, (model, _) in {"loaded": load_score_model(reward), "new": init_score_model(causal, seed=3)}.items():
        ours = np.asarray(jax.jit(sequence_scores, static_argnums=0)(*nnx.split(model), ids, pos, seg))
        out = export_score_model(model, tmp_path / f"export-{name}")
        config = json.loads((out / "config.json").read_text())
        assert config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == 0
        assert config["architectures"][0].endswith("ForSequenceClassification")
        np.testing.assert_allclose(torch_scores(out, ids, seg)[:, 0], ours, atol=1e-4, rtol=0)
        again, _ = load_score_model(out)
        np.testing.assert_allclose(np.asarray(sequence_scores(*nnx.split(again), ids, pos, seg)), ours, atol=1e-6)


def test_refusals(tmp_path):
    causal = make_tiny_checkpoint(tmp_path / "lm", "llama")
    with pytest.raises(ModelError, match=r"no score head \(score.weight\).*LlamaForCausalLM.*init_score_model"):
        load_score_model(causal)
    two = make_tiny_checkpoint(tmp_path / "two", "llama", num_labels=2)
    model, _ = load_score_model(two)  # a classifier loads; its per-label logits match transformers
    ids, pos, seg = scoring_batch()
    logits = np.asarray(jax.jit(sequence_logits, static_argnums=0)(*nnx.split(model), ids, pos, seg))
    np.testing.assert_allclose(logits, torch_scores(two, ids, seg), atol=1e-4, rtol=0)
    for use in (lambda: score_sequences(model, [[5, 6]]), lambda: RewardModel(model),
                lambda: sequence_scores(*nnx.split(model), ids, pos, seg)):
        with pytest.raises(ModelError, match="num_labels = 2"):
            use()


def policy_ids_of(tokenizer, text):
    return tokenizer(text)["input_ids"]


def _char_tokenizer(path):
    """The tiny tokenizer's characters and special tokens (same strings) without merges, ids in another order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(WORDS)) | set(PUNCT) | {"▁"}, reverse=True)
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", additional_special_tokens=list(SPECIALS[4:])).save_pretrained(path)
    return path


def test_reward_model_shared_and_other_tokenizer(tmp_path):
    """Same tokenizer: the policy's ids are scored as they are. Another tokenizer (its own ids for the same text):
    the ids are retokenized, and the rewards are those of the reward tokenizer's encoding of the text."""
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    texts = ["the sky is blue.", "what color is the sea?</s>", "a big cat likes fish"]
    policy_ids = [policy_tok(t)["input_ids"] for t in texts]

    shared = make_tiny_checkpoint(tmp_path / "shared", "llama", num_labels=1)
    policy_tok.save_pretrained(shared)
    rm = RewardModel.load(shared, policy_tokenizer=policy_tok, batch_size=4)
    assert not rm.retokenizes
    model, _ = load_score_model(shared)
    np.testing.assert_array_equal(rm.score_ids(policy_ids), score_sequences(model, policy_ids, batch_size=4))
    chat = [{"role": "user", "content": "what color is the sky?"}]
    completion = policy_tok(" blue.", add_special_tokens=False)["input_ids"]
    prompt_ids = policy_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    np.testing.assert_array_equal(  # online DPO's reward interface: the prompt as the sampler encodes it
        rm.score(["the sky is", chat], ["", ""], [completion, completion], {}),
        score_sequences(model, [policy_ids_of(policy_tok, "the sky is") + completion, prompt_ids + completion],
                        batch_size=4))

    other = make_tiny_checkpoint(tmp_path / "other", "llama", num_labels=1)
    reward_tok = AutoTokenizer.from_pretrained(_char_tokenizer(other))
    assert vocabulary_fingerprint(reward_tok) != vocabulary_fingerprint(policy_tok)
    rm = RewardModel.load(other, policy_tokenizer=policy_tok, batch_size=4)
    assert rm.retokenizes
    reward_ids = [reward_tok(t)["input_ids"] for t in texts]
    assert [rm.retokenize(ids) for ids in policy_ids] == reward_ids
    model, _ = load_score_model(other)
    expected = score_sequences(model, reward_ids, batch_size=4)
    np.testing.assert_array_equal(rm.score_ids(policy_ids), expected)
    np.testing.assert_array_equal(rm.score_texts(texts), expected)
