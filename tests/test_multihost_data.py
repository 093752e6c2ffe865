"""Tokenize once per job, with two real processes (JAX's coordination service, gloo on CPU): each row is tokenized by
exactly one process, both build the global batches one process builds, and a source one process cannot read stops
both with the host and the path."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows

from dpojax.data import load_preferences, train_batches

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("local_cpu", REPO / "launch" / "local_cpu.py")
local_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(local_cpu)
pytestmark = pytest.mark.skipif(os.environ.get("DPOJAX_SLOW_TESTS") != "1", reason="slow (~1 min): set "
                                "DPOJAX_SLOW_TESTS=1")


def _run_two(args_of, tmp_path):
    coordinator = f"127.0.0.1:{local_cpu.free_port()}"
    logs, procs = [tmp_path / f"p{i}.log" for i in range(2)], []
    for i in range(2):
        env = {**local_cpu.process_env(i, 2, coordinator, 1), "PYTHONPATH": os.pathsep.join([str(REPO),
                                                                                              str(REPO / "tests")])}
        with open(logs[i], "wb") as f:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "multihost_data.py"), *args_of(i)],
                                          stdout=f, stderr=subprocess.STDOUT, env=env))
    codes = [p.wait(timeout=300) for p in procs]
    return codes, [log.read_text() for log in logs]


def test_each_row_tokenized_once_and_batches_equal_one_process(tmp_path):
    tok_dir = tmp_path / "tok"
    tok = load_tiny_tokenizer(tok_dir)
    rows = make_pref_rows(60, "conversational", seed=9)
    data_path = tmp_path / "a.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    codes, logs = _run_two(lambda i: [str(tok_dir), str(data_path), str(cache), str(tmp_path / f"out{i}.npz")],
                           tmp_path)
    assert codes == [0, 0], logs
    spans = [tuple(map(int, re.search(r"tokenizing rows (\d+)\.\.(\d+) of 60 on process", log).groups()))
             for log in logs]
    assert spans == [(0, 30), (30, 60)], spans  # disjoint, covering every row once
    one = load_preferences(str(data_path), tok, max_length=14, cache_dir=tmp_path / "solo")
    outs = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    assert str(outs[0]["fingerprint"]) == str(outs[1]["fingerprint"]) == one.fingerprint
    want = list(train_batches(one, 8, 3, stop_step=6))
    got_ids = np.concatenate([o["ids"] for o in outs], axis=1)
    got_index = np.concatenate([o["index"] for o in outs], axis=1)
    assert np.array_equal(got_ids, np.stack([b.input_ids_NxKxT for b in want]))
    assert np.array_equal(got_index, np.stack([b.prompt_index_N for b in want]))
    again = load_preferences(str(data_path), tok, max_length=14, cache_dir=cache)  # one process reads 2 shards
    assert again.from_cache and [b.input_ids_NxKxT.tolist() for b in train_batches(again, 8, 3, stop_step=6)] == [
        b.input_ids_NxKxT.tolist() for b in want]


def test_source_missing_on_one_host_stops_both(tmp_path):
    tok_dir = tmp_path / "tok"
    load_tiny_tokenizer(tok_dir)
    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(8, "standard", seed=1)))
    paths = [str(good), str(tmp_path / "only-on-host-0" / "a.jsonl")]  # process 1 does not see the file
    codes, logs = _run_two(lambda i: [str(tok_dir), paths[i], str(tmp_path / "cache"), str(tmp_path / "o.npz")],
                           tmp_path)
    assert codes[0] != 0 and codes[1] != 0
    for log in logs:
        assert "cannot be read on every host" in log and "only-on-host-0/a.jsonl" in log and "on host" in log
