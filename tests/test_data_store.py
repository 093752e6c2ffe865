"""dpojax.data.store, parallel tokenization, source records and mixtures: the batches are bitwise the ones the
in-memory path builds (unpacked and packed, resumed, per host), the mixture's order is deterministic, resumable and
weighted, and bad input (weights, a source one host cannot read, a cache of other settings) stops with one error
or is rebuilt with the reason logged."""

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import types

import numpy as np
import pytest
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows

from dpojax.config import DataSource, config_from_dict, to_dict
from dpojax.data import (
    Hosts,
    SourceSpec,
    TokenizedData,
    eval_batches,
    formats,
    load_preferences,
    mix,
    normalize_rows,
    store,
    streaming,
    tokenize_rows,
    train_batches,
    workers,
)
from dpojax.data import tokenize as tokenize_lib
from dpojax.data.mixture import source_counts
from dpojax.data.packing import Packing
from dpojax.data.reward import margin_column
from dpojax.errors import DataError
from dpojax.trainer.build import load_split

MAX_LEN = 14
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def in_memory(rows, tok, source="<rows>"):
    """Today's path: the per-row functions, every row a Python list of numpy arrays."""
    prefrows = normalize_rows(rows, source)
    fn = tokenize_lib._tokenize_chat if prefrows.fmt.conversational else tokenize_lib._tokenize_standard
    kept, dropped = tokenize_lib.split_at_prompt(prefrows, *fn(tok, prefrows), MAX_LEN, "keep_start")
    stats = tokenize_lib.DataStats(len(rows), 0, prefrows.rows_identical, 0, dropped, len(kept))
    return TokenizedData([p for _, p, _ in kept], [t for _, _, t in kept],
                         [np.asarray(prefrows.rows[j]["ranks"], np.int32) for j, _, _ in kept],
                         np.asarray([prefrows.row_index[j] for j, _, _ in kept], np.int64),
                         tok.pad_token_id, MAX_LEN, "keep_start", prefrows.fmt.name, source, stats, "x")


def listed(batches):
    return [[None if getattr(b, f.name) is None else np.asarray(getattr(b, f.name)).tobytes()
             for f in dataclasses.fields(b)] for b in batches]


def all_batches(data, **kw):
    out = listed(train_batches(data, 4, 7, stop_step=12, **kw))  # 2+ epochs
    out += listed(train_batches(data, 4, 7, start_step=5, stop_step=9, **kw))  # resumed
    for i in range(2):
        out += listed(train_batches(data, 4, 7, stop_step=6, process_index=i, process_count=2, **kw))
    return out + listed(eval_batches(data, 4, **kw))


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_store_batches_are_bitwise_the_in_memory_ones(fmt, tok, tmp_path, monkeypatch):
    rows = make_pref_rows(40, fmt, seed=11)
    want = in_memory(rows, tok)
    monkeypatch.setattr(tokenize_lib, "CHUNK_ROWS", 8)  # several chunks, joined in row order
    if fmt == "conversational":  # by 2 worker processes (standard: by 2 threads)
        monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 16)
        monkeypatch.setattr(workers, "THREAD_WORKERS", 1)
    got = tokenize_rows(rows, tok, max_length=MAX_LEN, cache_dir=tmp_path, num_proc=2)
    again = tokenize_rows(rows, tok, max_length=MAX_LEN, cache_dir=tmp_path)
    assert isinstance(again.prompt_ids, store.Ragged) and again.from_cache and again.stats == got.stats
    for data in (got, again):
        assert len(data) == len(want) and data.num_responses == want.num_responses
        assert data.lengths_MxK.tolist() == want.lengths_MxK.tolist()
        assert data.row_index.tolist() == want.row_index.tolist()
        assert all_batches(data) == all_batches(want)
        pack = Packing("shared_prompt", shards=2)
        assert listed(train_batches(data, 4, 3, stop_step=6, packing=pack)) == listed(
            train_batches(want, 4, 3, stop_step=6, packing=pack))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_source_record_skips_reading_and_other_settings_rebuild_with_reason(tok, tmp_path, caplog, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", make_pref_rows(20, "standard", seed=1))
    cache = tmp_path / "cache"
    first = load_preferences(str(path), tok, max_length=MAX_LEN, cache_dir=cache)
    monkeypatch.setattr("dpojax.data.loader.load_rows", lambda *a, **k: pytest.fail("rows read on a cache hit"))
    monkeypatch.setattr("dpojax.data.loader.row_stream", lambda *a, **k: pytest.fail("rows read on a cache hit"))
    second = load_preferences(str(path), tok, max_length=MAX_LEN, cache_dir=cache)
    assert second.from_cache and second.fingerprint == first.fingerprint and second.source == str(path)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        longer = load_preferences(str(path), tok, max_length=MAX_LEN + 2, cache_dir=cache)
    assert not longer.from_cache and "max_length 14 -> 16" in caplog.text and "not reused" in caplog.text
    caplog.clear()
    tok2 = load_tiny_tokenizer(tmp_path / "tok2")
    tok2.add_tokens(["zebra"])
    with caplog.at_level(logging.INFO):
        other = load_preferences(str(path), tok2, max_length=MAX_LEN, cache_dir=cache)
    assert not other.from_cache and "another tokenizer" in caplog.text
    write_jsonl(path, make_pref_rows(21, "standard", seed=1))  # new content: a new record, a new store
    assert not load_preferences(str(path), tok, max_length=MAX_LEN, cache_dir=cache).from_cache


def ranked_rows(n, seed):
    """Scored rows (ties, one row all tied) from standard pairs, with a margin column."""
    rows = []
    for i, r in enumerate(make_pref_rows(n, "standard", seed=seed)):
        scores = [1.0, 1.0, 1.0] if i == 3 else [2.0, float(i % 3), 0.0]
        rows.append({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["chosen"] + " x"],
                     "scores": scores, "margin": i / 4})
    return rows


@pytest.mark.parametrize("kind", ["unpair", "all_pairs", "skip"])
def test_streamed_source_is_the_in_memory_one(kind, tok, tmp_path, monkeypatch):
    """load_preferences reads, validates and tokenizes a file as a stream, in chunks and shards of a few rows
    (unpairing blocks of 4; 2 workers for the source with bad rows): the same rows, key, counts and batches as the
    whole-list path, and the same errors."""
    monkeypatch.setattr(tokenize_lib, "CHUNK_ROWS", 3)
    monkeypatch.setattr(streaming, "SHARD_CHUNKS", 2)
    monkeypatch.setattr(formats, "UNPAIR_BLOCK", 4)
    rows = ranked_rows(23, seed=4) if kind == "all_pairs" else make_pref_rows(23, "standard", seed=4)
    if kind == "skip":
        rows[5:7] = [{"prompt": 3, "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": None}]
    if kind == "skip":  # chunks tokenized by 2 workers (threads here: the order and the window of chunks in flight)
        monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 4)
        monkeypatch.setattr(streaming, "_pool", lambda n: contextlib.nullcontext(
            concurrent.futures.ThreadPoolExecutor(n) if n else None))
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    kw = {"unpaired_loss": kind == "unpair", "unpair": kind == "unpair", "on_bad_row": "skip" if kind == "skip"
          else "error", "pairs_from_scores": "all_pairs" if kind == "all_pairs" else "none"}
    got = load_preferences(str(path), tok, max_length=MAX_LEN, cache_dir=tmp_path / "c", num_proc=2, **kw)
    prefrows = normalize_rows(rows, str(path), on_bad_row=kw["on_bad_row"], pairs_from_scores=kw["pairs_from_scores"])
    prefrows = formats.unpair_rows(prefrows) if kind == "unpair" else prefrows
    want = tokenize_rows(prefrows, tok, max_length=MAX_LEN, cache_dir=tmp_path / "w", num_proc=1)
    assert store.read_meta(tmp_path / "c" / f"preferences-{got.fingerprint}")["shards"] > 1
    assert got.fingerprint == want.fingerprint and got.stats == want.stats and got.format_name == want.format_name
    assert got.row_index.tolist() == want.row_index.tolist() and all_batches(got) == all_batches(want)
    assert (got.labels is None) == (kind != "unpair")
    assert kind != "unpair" or got.labels.tolist() == want.labels.tolist()
    if kind == "all_pairs":
        assert margin_column(str(path), "train").tolist() == [r["margin"] for r in rows]
    if kind == "skip":
        with pytest.raises(DataError, match=r"2 bad row\(s\) of 23:\n  row 5, field 'prompt'.*\n  row 6, field "):
            load_preferences(str(path), tok, max_length=MAX_LEN, cache_dir=tmp_path / "c")


def test_source_unreadable_on_one_host_stops_all_naming_host_and_path(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", make_pref_rows(8, "standard", seed=1))

    def gather(text):  # process 1 (host "node-b") failed to read the file
        return [text, json.dumps(["node-b", f"DataError: {path}: data file not found", None])]

    hosts = Hosts(0, 2, "node-a", gather)
    with pytest.raises(DataError, match=r"cannot be read on every host .*process 1 on host node-b.*not found"):
        load_preferences(str(path), tok, max_length=MAX_LEN, cache_dir=tmp_path / "c", hosts=hosts)


@pytest.mark.parametrize("weights,words", [((1.0, -0.5), "must be a finite number >= 0"),
                                           ((0.0, 0.0), "every mixture weight is 0")])
def test_bad_mixture_weights(weights, words, tok):
    data = tokenize_rows(make_pref_rows(8, "standard", seed=1), tok, max_length=None)
    with pytest.raises(DataError, match=words):
        mix([data, data], weights, seed=0)


def test_mixture_order_resume_weights_and_host_count(tok, tmp_path):
    cache = tmp_path / "cache"
    a = write_jsonl(tmp_path / "a.jsonl", make_pref_rows(30, "standard", seed=2))
    b = write_jsonl(tmp_path / "b.jsonl", make_pref_rows(90, "conversational", seed=3))
    sources = [load_preferences(str(a), tok, max_length=None, cache_dir=cache),
               load_preferences(SourceSpec("json", "train", data_files=(str(b),)), tok, max_length=None,
                                cache_dir=cache)]
    assert sources[1].source == "json[train]" and len(sources[1]) == 90
    weights = (3.0, 1.0)
    data = mix(sources, weights, seed=5)
    assert len(data) == 120 and source_counts([30, 90], weights) == [90, 30]
    assert data.fingerprint == mix(sources, weights, seed=5).fingerprint != mix(sources, weights, seed=6).fingerprint
    assert data.num_responses == 2 and data.lengths_MxK.shape == (120, 2)
    steps = list(train_batches(data, 8, 1, stop_step=30))  # 2 epochs of 15 steps
    assert listed(steps[20:26]) == listed(train_batches(data, 8, 1, start_step=20, stop_step=26))
    shares = [list(train_batches(data, 8, 1, stop_step=4, process_index=i, process_count=2)) for i in range(2)]
    for step in range(4):
        joined = np.concatenate([shares[i][step].prompt_index_N for i in range(2)])
        assert joined.tolist() == steps[step].prompt_index_N.tolist()
    # rows 0..89 of the mixture come from source a (3 passes), 90..119 from b (a third of it)
    from_a = [float(np.mean(s.prompt_index_N < 90)) for s in steps]
    assert np.mean(from_a[:15]) == 0.75  # one epoch: exactly the weights
    first_half = np.mean(from_a[:7])  # 56 rows drawn without replacement from 120: sd ~ 0.04
    assert abs(first_half - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 56)
    for m in (0, 45, 100, 119):
        src, local = (sources[0], m % 30) if m < 90 else (sources[1], None)
        if local is not None:
            assert data.prompt_ids[m].tolist() == src.prompt_ids[local].tolist()


def test_mixture_config_parses_and_round_trips(tok, tmp_path):
    raw = {"model": {"name_or_path": "m"}, "data": {"train": [
        {"path": "a.jsonl", "weight": 3}, "b.jsonl",
        {"path": "org/set", "name": "cfg", "revision": "v1", "split": "train_prefs", "data_files": "x.jsonl"}]}}
    cfg = config_from_dict(raw)
    assert cfg.data.train == (DataSource("a.jsonl", 3.0), DataSource("b.jsonl"),
                              DataSource("org/set", 1.0, "train_prefs", "cfg", "v1", ("x.jsonl",)))
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "a.jsonl"}}).data.train == "a.jsonl"
    a = write_jsonl(tmp_path / "a.jsonl", make_pref_rows(10, "standard", seed=2))
    b = write_jsonl(tmp_path / "b.jsonl", make_pref_rows(30, "standard", seed=3))
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "train": {"seed": 4}, "data": {
        "cache_dir": str(tmp_path / "c"), "max_length": 64, "train": [{"path": str(a), "weight": 1},
                                                                      {"path": str(b), "weight": 2}]}})
    models = types.SimpleNamespace(tokenizer=tok, policy_cfg=types.SimpleNamespace(vocab_size=len(tok)))
    data = load_split(cfg, models, cfg.data.train, "train")
    assert len(data) == 40 and data.source.startswith("mixture(") and data.fingerprint == load_split(
        cfg, models, cfg.data.train, "train").fingerprint
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=(DataSource(str(a), -1.0),)))
    with pytest.raises(DataError, match="finite number >= 0"):
        load_split(bad, models, bad.data.train, "train")
