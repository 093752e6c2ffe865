"""Ranked and scored data: validation messages, tie handling, tokenization (K = 2 equals the pair pipeline, which
tests/test_data.py checks against TRL), pairs_from_scores, the cache, and [N, K, T] batches."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows

from dpojax.data import PreferenceBatch, eval_batches, normalize_rows, order_and_ranks, tokenize_rows, train_batches
from dpojax.data.loader import load_preferences
from dpojax.errors import DataError

MAX_LEN = 12


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def as_ranked(rows: list[dict]) -> list[dict]:
    """The pairs as ranked rows with K = 2: responses [chosen, rejected]."""
    out = []
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], **extra})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ranked_rows(n: int, fmt: str = "standard", seed: int = 0, scored: bool = False) -> list[dict]:
    """Rows with 2..4 responses made from make_pref_rows' completions (scores with ties when `scored`)."""
    rng = np.random.default_rng(seed)
    pool = make_pref_rows(4 * n, fmt, seed=seed)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        responses = [pool[4 * i + j // 2]["chosen" if j % 2 == 0 else "rejected"] for j in range(k)]
        row = {"prompt": pool[4 * i]["prompt"], "responses": responses}
        if scored:
            row["scores"] = [float(s) for s in rng.integers(0, 3, size=k)]
            row["scores"][0] = 5.0  # never all tied
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- tokenization
@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_k2_tokenizes_exactly_like_the_pairs(fmt, mode, tok):
    rows = make_pref_rows(40, fmt, seed=1)
    pairs = tokenize_rows(rows, tok, max_length=MAX_LEN, truncation_mode=mode)
    ranked = tokenize_rows(as_ranked(rows), tok, max_length=MAX_LEN, truncation_mode=mode)
    assert len(ranked) == len(pairs) and ranked.row_index.tolist() == pairs.row_index.tolist()
    assert ranked.stats.rows_dropped_long == pairs.stats.rows_dropped_long
    assert ranked.stats.rows_identical == pairs.stats.rows_identical
    for i in range(len(pairs)):
        assert ranked.prompt_ids[i].tolist() == pairs.prompt_ids[i].tolist()
        assert [r.tolist() for r in ranked.response_ids[i]] == [pairs.response_ids[i][0].tolist(),
                                                                  pairs.response_ids[i][1].tolist()]
    # ... and so do the batches (same buckets, truncation and padding)
    for a, b in zip(eval_batches(pairs, 8), eval_batches(ranked, 8), strict=True):
        assert isinstance(b, PreferenceBatch) and a.input_ids_NxKxT.shape == b.input_ids_NxKxT.shape
        for x, y in ((a.input_ids_NxKxT, b.input_ids_NxKxT), (a.segment_ids_NxKxT, b.segment_ids_NxKxT),
                     (a.positions_NxKxT, b.positions_NxKxT), (a.completion_mask_NxKxT, b.completion_mask_NxKxT),
                     (a.prompt_mask_N, b.prompt_mask_N), (a.prompt_index_N, b.prompt_index_N)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_k_responses_joint_tokenization_and_common_prefix(fmt, tok):
    rows = ranked_rows(12, fmt, seed=2)
    data = tokenize_rows(rows, tok, max_length=None)
    assert data.num_responses == 4 and len(data) == 12
    for i, row in enumerate(rows):
        if fmt == "standard":
            joint = [tok(row["prompt"] + (y if y.endswith("</s>") else y + "</s>"))["input_ids"]
                     for y in row["responses"]]
        else:
            joint = [list(tok.apply_chat_template(row["prompt"] + y, tokenize=True, return_dict=True)["input_ids"])
                     for y in row["responses"]]
        prompt = data.prompt_ids[i].tolist()
        for ids, response in zip(joint, data.response_ids[i], strict=True):
            assert prompt + response.tolist() == ids  # joint tokenization, cut at the common prefix
        assert data.lengths_MxK[i].tolist() == [len(x) for x in joint] + [0] * (4 - len(joint))
        if fmt == "conversational":
            gen = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)
            assert prompt == list(gen["input_ids"])


def test_cache_roundtrip_and_keys(tok, tmp_path):
    rows = ranked_rows(15, "conversational", seed=3, scored=True)
    first = tokenize_rows(rows, tok, max_length=MAX_LEN * 3, cache_dir=tmp_path)
    again = tokenize_rows(rows, tok, max_length=MAX_LEN * 3, cache_dir=tmp_path)
    assert not first.from_cache and again.from_cache and again.stats == first.stats
    assert [[r.tolist() for r in rs] for rs in again.response_ids] == [[r.tolist() for r in rs]
                                                                          for rs in first.response_ids]
    assert [r.tolist() for r in again.ranks] == [r.tolist() for r in first.ranks]
    assert not tokenize_rows(rows, tok, max_length=MAX_LEN * 2, cache_dir=tmp_path).from_cache
    rows[0]["scores"][1] = 9.0  # another order is another key
    assert not tokenize_rows(rows, tok, max_length=MAX_LEN * 3, cache_dir=tmp_path).from_cache


# ---------------------------------------------------------------------------------------------------- scores
def test_scores_sort_best_first_and_ties_share_a_rank(caplog):
    assert order_and_ranks([7, 9, 7, 1]) == ([1, 0, 2, 3], [0, 1, 1, 2])
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [7, 9, 7, 1]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [2, 2, 2]},  # all tied: dropped
        {"prompt": "p", "responses": ["a", "b"], "scores": [0.5, -1]},
    ]
    with caplog.at_level(logging.WARNING):
        ranked = normalize_rows(rows, "s.jsonl", max_responses=4)
    assert [r["responses"] for r in ranked.rows] == [["b", "a", "c", "d"], ["a", "b"]]
    assert [r["ranks"] for r in ranked.rows] == [[0, 1, 1, 2], [0, 1]]
    assert ranked.row_index == [0, 2] and ranked.rows_all_tied == 1
    assert "dropped 1 row(s) whose scores are all equal" in caplog.text


def test_pairs_from_scores(tok, tmp_path):
    rows = [
        {"prompt": "the sky is", "responses": [" red.", " blue.", " green.", " hot."], "scores": [1, 3, 1, 0]},
        {"prompt": "what sun", "responses": [" yes.", " no."], "scores": [0, 1]},
    ]
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    kw = dict(max_length=None, cache_dir=tmp_path / "cache")
    bvw = load_preferences(str(path), tok, pairs_from_scores="best_vs_worst", **kw)
    allp = load_preferences(str(path), tok, pairs_from_scores="all_pairs", **kw)
    ranked = load_preferences(str(path), tok, ranking_loss=True, **kw)
    assert bvw.num_responses == 2 and allp.num_responses == 2 and ranked.num_responses == 4
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True).strip()
    pairs = lambda d: [(decode(c), decode(r)) for c, r in d.response_ids]
    assert pairs(bvw) == [("blue.", "hot."), ("no.", "yes.")]
    # the tied " red." and " green." (score 1) make no pair with each other
    assert pairs(allp) == [("blue.", "red."), ("blue.", "green."), ("blue.", "hot."), ("red.", "hot."),
                           ("green.", "hot."), ("no.", "yes.")]
    assert allp.row_index.tolist() == [0, 0, 0, 0, 0, 1]
    assert [r.tolist() for r in ranked.ranks] == [[0, 1, 1, 2], [0, 1]]


def test_data_and_loss_must_match(tok, tmp_path):
    ranked = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt": "a", "responses": [" b", " c"]}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    with pytest.raises(DataError, match="loss.type=plackett_luce, or expand"):
        load_preferences(str(ranked), tok, max_length=None)
    with pytest.raises(DataError, match="needs ranked or scored rows"):
        load_preferences(str(pairs), tok, max_length=None, ranking_loss=True)
    with pytest.raises(DataError, match="pairs_from_scores=none"):
        load_preferences(str(ranked), tok, max_length=None, ranking_loss=True, pairs_from_scores="all_pairs")
    assert load_preferences(str(pairs), tok, max_length=None, pairs_from_scores="all_pairs").num_responses == 2


# ------------------------------------------------------------------------------------------------ bad input
GOOD = {"prompt": "the sky is", "responses": [" blue.", " red.", " green."]}
CONV = {"prompt": [{"role": "user", "content": "sky?"}],
        "responses": [[{"role": "assistant", "content": "blue."}], [{"role": "assistant", "content": "red."}]]}
BAD_CASES = [
    (GOOD, {"responses": None}, "responses", "missing"),
    (GOOD, {"responses": " blue."}, "responses", "expected a list of responses"),
    (GOOD, {"responses": [" blue."]}, "responses", "at least 2"),
    (GOOD, {"responses": [" a"] * 5}, "responses", "more than data.max_responses=4"),
    (GOOD, {"responses": [" a", " b", ""]}, "responses[2]", "empty"),
    (GOOD, {"responses": [" a", 7]}, "responses[1]", "got int"),
    (GOOD, {"responses": [" a", [{"role": "assistant", "content": "x"}]]}, "responses[1]", "mixed formats"),
    (GOOD, {"prompt": None}, "prompt", "missing"),
    (GOOD, {"scores": [1, 2, 3]}, "scores", "mixed formats: has scores"),
    ({**GOOD, "scores": [1, 2, 3]}, {"scores": [1, 2]}, "scores", "has 2 values for 3 responses"),
    ({**GOOD, "scores": [1, 2, 3]}, {"scores": [1, "x", 3]}, "scores", "scores[1]"),
    ({**GOOD, "scores": [1, 2, 3]}, {"scores": None}, "scores", "missing"),
    (CONV, {"responses": [[{"role": "assistant"}], CONV["responses"][1]]}, "responses[0]", "message 0 needs"),
    (CONV, {"prompt": "sky?"}, "prompt", "mixed formats"),
]


@pytest.mark.parametrize("good,change,field,needle", BAD_CASES)
def test_bad_row_names_file_row_and_field(good, change, field, needle, tok, tmp_path):
    rows = [dict(good) for _ in range(6)]
    rows[4] = {**good, **change}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preferences(str(path), tok, max_length=None, max_responses=4, ranking_loss=True)
    msg = str(err.value)
    assert "bad.jsonl: 1 bad row(s) of 6" in msg and f"row 4, field '{field}'" in msg and needle in msg, msg
    skipped = load_preferences(str(path), tok, max_length=None, max_responses=4, ranking_loss=True, on_bad_row="skip")
    assert len(skipped) == 5 and skipped.stats.rows_skipped_bad == 1 and 4 not in skipped.row_index.tolist()


def test_missing_column_everywhere(tok, tmp_path):
    path = write_jsonl(tmp_path / "noprompt.jsonl", [{"responses": [" a", " b"]}] * 3)
    with pytest.raises(DataError, match="noprompt.jsonl: every row lacks the 'prompt' field"):
        load_preferences(str(path), tok, max_length=None, ranking_loss=True)


# ---------------------------------------------------------------------------------------------------- batches
def test_batches_pad_responses_and_rows(tok):
    data = tokenize_rows(ranked_rows(10, "standard", seed=4, scored=True), tok, max_length=64)
    assert len(data) == 10
    batches = list(eval_batches(data, 4))
    assert len(batches) == 3
    b = batches[-1]
    n_real = [len(r) for r in data.response_ids]
    assert b.shape[:2] == (4, 4) and b.prompt_mask_N.tolist() == [1, 1, 0, 0]
    assert b.prompt_index_N.tolist() == [8, 9, -1, -1]
    for batch, start in zip(batches, (0, 4, 8)):
        for row in range(4):
            p = int(batch.prompt_index_N[row]) if batch.prompt_mask_N[row] else start  # filler: a copy of the first
            k = n_real[p]
            assert batch.response_mask_NxK[row].tolist() == [1.0] * k + [0.0] * (4 - k)
            assert batch.rank_NxK[row, :k].tolist() == data.ranks[p].tolist()
            assert (batch.rank_NxK[row, k:] == 4).all()
            assert (batch.segment_ids_NxKxT[row, k:] == 0).all() and (batch.completion_mask_NxKxT[row, k:] == 0).all()
            assert (batch.input_ids_NxKxT[row, k:] == data.pad_token_id).all()
    # training batches: deterministic, resumable, and the same [N, K, T] layout
    a = list(train_batches(data, 4, seed=1, stop_step=5))
    b2 = list(train_batches(data, 4, seed=1, start_step=3, stop_step=5))
    np.testing.assert_array_equal(a[3].input_ids_NxKxT, b2[0].input_ids_NxKxT)
    assert all(x.prompt_mask_N.sum() == 4 for x in a)
    real = sum(int((x.segment_ids_NxKxT[i, j] > 0).sum()) for x in a[:1] for i in range(4) for j in range(4)
               if x.response_mask_NxK[i, j])
    assert a[0].real_tokens() == real
