"""dpojax.data formats + tokenize: TRL 1.16 parity, validation errors, cache."""

import json
import logging
import re

import numpy as np
import pytest
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows

from dpojax.data import (
    check_token_ids,
    encoding,
    extract_prompt,
    load_preferences,
    load_rows,
    normalize_rows,
    tokenize_rows,
)
from dpojax.errors import DataError, UserError

FORMATS = ["standard", "conversational", "implicit", "implicit_conversational"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL/transformers deprecations
MAX_LEN = 12  # small enough that the long prompts of make_pref_rows are dropped under keep_start


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok_no_template(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok_plain"), chat_template=False)


def trl_prepared(rows, tok, tmp_path, max_length, truncation_mode="keep_start"):
    """TRL 1.16's DPOTrainer-prepared train dataset for `rows` on a tiny torch Llama."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), max_length=max_length, truncation_mode=truncation_mode, report_to=[],
        use_cpu=True, bf16=False, disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=transformers.LlamaForCausalLM(cfg),
        ref_model=transformers.LlamaForCausalLM(cfg),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    return trainer.train_dataset


def assert_same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    ours_by_name = {"prompt_ids": ours.prompt_ids, "chosen_ids": [r[0] for r in ours.response_ids],
                    "rejected_ids": [r[1] for r in ours.response_ids]}  # a pair: responses [chosen, rejected]
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for k, (a, b) in enumerate(zip(ours_by_name[name], theirs[name], strict=True)):
            assert a.tolist() == list(b), (name, k)


# ------------------------------------------------------------------------------------------------- TRL parity
@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenize_matches_trl_keep_start(fmt, tok, tmp_path):
    rows = make_pref_rows(40, fmt, seed=1)
    ours = tokenize_rows(rows, tok, max_length=MAX_LEN, truncation_mode="keep_start")
    theirs = trl_prepared(rows, tok, tmp_path, MAX_LEN)
    assert ours.stats.rows_dropped_long > 0
    assert ours.stats.rows_dropped_long == 40 - len(theirs)
    assert ours.stats.rows_in == 40 and ours.stats.rows_out == len(theirs)
    assert_same_ids(ours, theirs)


def test_tokenize_matches_trl_keep_end_from_dataset(tok, tmp_path):
    import datasets

    rows = make_pref_rows(30, "standard", seed=2)
    ours = tokenize_rows(datasets.Dataset.from_list(rows), tok, max_length=MAX_LEN, truncation_mode="keep_end")
    theirs = trl_prepared(rows, tok, tmp_path, MAX_LEN, "keep_end")
    assert ours.stats.rows_dropped_long == 0 and len(theirs) == 30
    assert_same_ids(ours, theirs)
    assert ours.row_index.tolist() == list(range(30))


@pytest.mark.parametrize(
    "chosen,rejected",
    [
        ("the sky is blue", "the sky is red"),  # differ after a space: the space goes to the completions
        ("what sun", "what sea"),  # differ mid-word
        ("same text", "same text"),  # identical: TRL cuts one character before the end
        ("abc", "abcdef"),  # prefix
        ("xyz ", "abc"),  # differ at 0 and chosen ends with a space: TRL's cut at -1
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]),
    ],
)
def test_extract_prompt_matches_trl(chosen, rejected):
    from trl.data_utils import extract_prompt as trl_extract

    want = trl_extract({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (want["prompt"], want["chosen"], want["rejected"])


def test_eos_not_doubled_and_pad_id(tok):
    rows = [{"prompt": "the sky", "chosen": " is blue.</s>", "rejected": " is red."}]
    pairs = tokenize_rows(rows, tok, max_length=None)
    eos = tok.eos_token_id
    assert pairs.response_ids[0][0].tolist().count(eos) == 1 and pairs.response_ids[0][1][-1] == eos
    assert pairs.prompt_ids[0][0] == tok.bos_token_id and pairs.pad_token_id == tok.pad_token_id
    assert pairs.prompt_ids[0].dtype == np.int32


def test_encoding_is_the_tokenizers_own_call(tok, monkeypatch):
    """dpojax.data.encoding's ids are `tokenizer(texts)`'s and `apply_chat_template(tokenize=True)`'s: through the
    backend directly, and through the tokenizer's own call where the fast path does not apply (a message that is
    not plain, truncation left on the backend, a tokenizer class that encodes its own way)."""
    from tokenizers import Tokenizer  # the subclass below needs its own backend
    from transformers import PreTrainedTokenizerFast  # a tokenizer class that encodes its own way

    texts = [r["prompt"] + r["chosen"] for r in make_pref_rows(12, "standard", seed=5)]
    chats = [r["prompt"] + r["chosen"] for r in make_pref_rows(12, "conversational", seed=5)]
    chats[0] = [{**chats[0][0], "name": None}] + chats[0][1:]  # not plain: the template call renders the batch
    monkeypatch.setattr(encoding, "ENCODE_CHUNK", 5)
    for special in (True, False):
        assert encoding.encode_texts(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    for prompt in (True, False):
        want = tok.apply_chat_template(chats, tokenize=True, return_dict=True, add_generation_prompt=prompt)
        assert encoding.encode_chats(tok, chats, prompt) == [list(ids) for ids in want["input_ids"]]
    tok.backend_tokenizer.enable_truncation(3)  # the tokenizer's own call turns it off: so does the first batch
    assert encoding.encode_texts(tok, texts) == tok(texts)["input_ids"]
    assert tok.backend_tokenizer.truncation is None

    class Shouting(PreTrainedTokenizerFast):  # encodes its own way: never bypassed
        def _encode_plus(self, text, *args, **kwargs):
            return super()._encode_plus([t.upper() for t in text], *args, **kwargs)

    loud = Shouting(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), eos_token="</s>")
    assert encoding._plain_backend(loud) is None and encoding._plain_backend(tok) is not None
    assert encoding.encode_texts(loud, texts) == loud(texts)["input_ids"] != tok(texts)["input_ids"]


# ------------------------------------------------------------------------------------------------------- cache
def test_cache_hit_and_misses(tok, tmp_path):
    rows = make_pref_rows(20, "conversational", seed=3)
    cache = tmp_path / "cache"
    first = tokenize_rows(rows, tok, max_length=MAX_LEN, cache_dir=cache)
    second = tokenize_rows(rows, tok, max_length=MAX_LEN, cache_dir=cache)
    assert not first.from_cache and second.from_cache
    assert second.fingerprint == first.fingerprint and second.stats == first.stats
    assert [a.tolist() for a in first.prompt_ids] == [a.tolist() for a in second.prompt_ids]
    assert [[r.tolist() for r in rs] for rs in first.response_ids] == [[r.tolist() for r in rs]
                                                                       for rs in second.response_ids]
    assert second.row_index.tolist() == first.row_index.tolist()
    assert not tokenize_rows(rows, tok, max_length=MAX_LEN + 4, cache_dir=cache).from_cache
    assert not tokenize_rows(rows, tok, max_length=MAX_LEN, truncation_mode="keep_end", cache_dir=cache).from_cache
    assert not tokenize_rows(rows[:-1], tok, max_length=MAX_LEN, cache_dir=cache).from_cache
    tok2 = load_tiny_tokenizer(tmp_path / "tok2")
    tok2.chat_template = tok2.chat_template.replace("<|assistant|>{% endif %}", "<|assistant|> {% endif %}")
    assert not tokenize_rows(rows, tok2, max_length=MAX_LEN, cache_dir=cache).from_cache
    assert all(p.name.startswith("preferences-") and (p / "meta.json").is_file() for p in cache.iterdir())


# -------------------------------------------------------------------------------------------------- bad input
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD_CASES = [
    ({"prompt": "the sky", "rejected": " red"}, "chosen", "missing"),
    ({"prompt": "the sky", "chosen": 3, "rejected": " red"}, "chosen", "got int"),
    ({"prompt": "the sky", "chosen": "", "rejected": " red"}, "chosen", "empty"),
    ({"prompt": "the sky", "chosen": " blue", "rejected": None}, "rejected", "missing"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": " a", "rejected": " b"}, "prompt", "mixed formats"),
    ({"prompt": "the sky", "chosen": [{"content": "blue"}], "rejected": " b"}, "chosen", "mixed formats"),
]


@pytest.mark.parametrize("bad,field,words", BAD_CASES)
def test_bad_row_names_file_row_and_field(bad, field, words, tmp_path, tok):
    rows = make_pref_rows(6, "standard")
    rows.insert(4, bad)
    rows, source = load_rows(str(write_jsonl(tmp_path / "prefs.jsonl", rows)))
    with pytest.raises(DataError) as e:
        tokenize_rows(rows, tok, max_length=MAX_LEN, source=source)
    msg = str(e.value)
    assert "prefs.jsonl" in msg and "row 4" in msg and f"field '{field}'" in msg and words in msg, msg


def test_bad_messages_in_conversational_data(tmp_path):
    rows = make_pref_rows(5, "conversational")
    rows[1]["chosen"] = [{"content": "no role"}]
    rows[2]["rejected"] = []
    rows[3]["prompt"] = "a plain string"
    with pytest.raises(DataError) as e:
        normalize_rows(rows, "conv.jsonl")
    msg = str(e.value)
    assert "3 bad row(s) of 5" in msg
    for line in ("row 1, field 'chosen': message 0", "row 2, field 'rejected': empty", "row 3, field 'prompt': mixed"):
        assert line in msg, msg


def test_all_bad_rows_in_one_error_capped_and_skip_policy(tmp_path, tok, caplog):
    rows = make_pref_rows(40, "standard")
    for i in range(5, 35):
        rows[i]["rejected"] = i  # 30 bad rows
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_preferences(str(path), tok, max_length=None)
    msg = str(e.value)
    assert "30 bad row(s) of 40" in msg and msg.count("field 'rejected'") == 20 and "10 more" in msg
    assert "row 5," in msg and "row 24," in msg and "row 25," not in msg
    with caplog.at_level(logging.WARNING):
        pairs = load_preferences(str(path), tok, max_length=None, on_bad_row="skip")
    assert pairs.stats.rows_skipped_bad == 30 and len(pairs) == 10
    assert pairs.row_index.tolist() == [*range(5), *range(35, 40)]
    assert "skipped 30 bad row(s)" in caplog.text


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"every row lacks the 'rejected' field"):
        normalize_rows([{"prompt": "a", "chosen": "b"}] * 3, "x.jsonl")


def test_identical_pairs_warned_and_kept(tok, caplog):
    rows = [
        {"prompt": "the", "chosen": " sky", "rejected": " sky"},
        {"prompt": "a", "chosen": " cat", "rejected": " dog"},
    ]
    with caplog.at_level(logging.WARNING):
        pairs = tokenize_rows(rows, tok, max_length=None)
    assert pairs.stats.rows_identical == 1 and len(pairs) == 2
    assert "1 row(s) have chosen == rejected" in caplog.text


def test_no_chat_template_is_a_user_error(tok_no_template):
    with pytest.raises(UserError, match="no chat template"):
        tokenize_rows(make_pref_rows(3, "conversational"), tok_no_template, max_length=None, source="c.jsonl")


def test_chat_template_failure_names_row(tok):
    rows = make_pref_rows(3, "conversational")
    rows[2]["chosen"] = [{"role": "robot", "content": "beep"}]
    with pytest.raises(DataError, match=r"<rows>: row 2.*unknown role"):
        tokenize_rows(rows, tok, max_length=None)


def test_token_ids_are_checked_against_the_model_vocab_not_the_tokenizer_size(tmp_path):
    """Only a token id that occurs in the data and is >= vocab_size is refused (naming row, token and id); a
    tokenizer that merely defines more tokens than the model has (e.g. an added unk token) is fine, as in TRL."""
    tok = load_tiny_tokenizer(tmp_path / "tok")
    vocab_size = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})  # like Qwen2Tokenizer's added unk token
    assert len(tok) == vocab_size + 1
    data = tokenize_rows(make_pref_rows(6, "standard"), tok, max_length=None)
    assert len(check_token_ids(data, vocab_size, tok)) == len(data)  # accepted: the extra token never occurs
    highest = max(int(x.max()) for x in [*data.prompt_ids, *(r for rs in data.response_ids for r in rs)])
    token = tok.convert_ids_to_tokens(highest)
    with pytest.raises(UserError, match=rf"row \d+ has token {re.escape(repr(token))} \(id {highest}\), but model x "
                                        rf"has vocab_size {highest}"):
        check_token_ids(data, highest, tok, "model x")


# -------------------------------------------------------------------------------------------------------- load
def test_load_rows_file_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_pref_rows(4, "standard")
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    lines = ["prompt,chosen,rejected"] + [",".join(json.dumps(r[k]) for k in rows[0]) for r in rows]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    for name in ("a.jsonl", "a.json", "b.json", "a.parquet", "a.csv"):
        got, source = load_rows(str(tmp_path / name))
        assert list(got) == rows and source.endswith(name), name
    conv = make_pref_rows(3, "conversational")
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "c.parquet")
    assert load_rows(str(tmp_path / "c.parquet"))[0] == conv
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2"):
        load_rows(str(tmp_path / "bad.jsonl"))
