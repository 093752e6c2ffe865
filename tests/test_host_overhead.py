"""The train loop keeps ahead of the devices: a producer thread builds, counts and sends the batches (in step order,
the same batches as built inline); the loop thread reads device values only through `loop.fetch`, once per step,
and the step it just dispatched only at the last step (also at an eval, a checkpoint or a stop, which wait for it
anyway); everywhere else, log records included, it reads the previous step's metrics while the next step runs. A
producer error reaches the loop as itself; the thread is gone when `train` returns. The host-time figures: benchmarks/host_overhead.py.

A host read of a device value is caught where jax funnels it (`ArrayImpl._value`: float, int, bool, item, tolist,
device_get; a transfer guard does not fire on CPU, where the copy is zero-copy); np.asarray of a CPU array takes
the buffer protocol and is not seen."""

from __future__ import annotations

import json
import threading
import time

import jax
import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from jax._src import array as jax_array

from dpojax.config import config_from_dict
from dpojax.train import loop, reference

STEPS = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("host")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(16, "standard", seed=5)))
    return {"policy": str(make_tiny_checkpoint(tmp / "policy", seed=0)), "tok": str(make_tokenizer(tmp / "tok")),
            "data": str(data), "cache": str(tmp / "cache")}


def make_cfg(files, out_dir):
    return config_from_dict({
        "model": {"name_or_path": files["policy"], "tokenizer": files["tok"]},
        "data": {"train": files["data"], "max_length": 32, "cache_dir": files["cache"]},
        "train": {"batch_size": 8, "steps": STEPS, "log_every": 3},
        "output_dir": str(out_dir),
    })  # fmt: skip


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dpojax-batches"]


def test_loop_reads_metrics_a_step_late_except_where_needed(files, tmp_path, monkeypatch):
    dispatched, reads, batches = [], [], []  # outputs of each step; (step read, steps dispatched by then); batches
    runs, other_reads, in_fetch = [], [], []  # steps dispatched at each host read of a device value outside fetch
    setup_train, fetch, value = loop.setup_train, loop.fetch, jax_array.ArrayImpl._value

    def counting_setup(*args, **kw):
        run, state = setup_train(*args, **kw)
        step = run.train_step.flat

        def dispatch(state_leaves, ref_leaves, batch):  # the step's metrics come out stacked in one array
            batches.append(batch)
            leaves, out = step(state_leaves, ref_leaves, batch)
            dispatched.append(out)
            return leaves, out

        run.train_step.flat = dispatch
        runs.append(run)
        return run, state

    def counting_fetch(tree):
        reads.append((next(i + 1 for i, out in enumerate(dispatched) if out is tree), len(dispatched)))
        in_fetch.append(True)
        try:
            return fetch(tree)
        finally:
            in_fetch.pop()

    def watched_value(self):
        if dispatched and not in_fetch and threading.current_thread() is threading.main_thread():
            other_reads.append(len(dispatched))
        return value.fget(self)

    monkeypatch.setattr(loop, "setup_train", counting_setup)
    monkeypatch.setattr(loop, "fetch", counting_fetch)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(watched_value))
    loop.train(make_cfg(files, tmp_path / "run"))
    assert sorted(step for step, _ in reads) == list(range(1, STEPS + 1))  # every step's metrics read once
    same_step = [step for step, dispatched_by_then in reads if step == dispatched_by_then]
    assert same_step == [STEPS]  # the last step; every other one late, log records (log_every 3) too
    assert other_reads and set(other_reads) == {STEPS}  # no other read before the last step's save and export
    assert batch_threads() == []  # the producer thread is gone

    # the batches the producer thread sent, step by step, are the ones the loop thread builds inline
    run = runs[0]
    data = loop.load_split(run.cfg, run.models, run.cfg.data.train, run.cfg.data.train_split)
    table = reference.lookup(run.models.ref_tables, data)
    inline = [reference.attach(b, table) for b in loop._batches(run, data, 0, STEPS)]
    assert len(batches) == len(inline) == STEPS
    for sent, built in zip(batches, inline):
        for a, b in zip(jax.tree.leaves(jax.device_get(sent)), jax.tree.leaves(built)):
            np.testing.assert_array_equal(a, b)


def test_producer_error_reaches_the_loop_as_itself(files, tmp_path, monkeypatch):
    model_flops, calls = loop._model_flops, []

    def failing_flops(run, batch):  # runs in the producer thread, for each batch
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise ValueError("row 17 of data.jsonl: a made-up batch error")
        return model_flops(run, batch)

    monkeypatch.setattr(loop, "_model_flops", failing_flops)
    with pytest.raises(ValueError, match=r"^row 17 of data.jsonl: a made-up batch error$"):
        loop.train(make_cfg(files, tmp_path / "run"))
    assert set(calls) == {"dpojax-batches"}
    assert batch_threads() == []


def test_prefetch_keeps_order_and_stops_when_closed():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    ahead = loop._Prefetch(items(), depth=2)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    time.sleep(0.1)  # the producer fills the queue and waits
    assert len(made) <= 5 + 2 + 1  # at most `depth` ready plus one in hand
    t0 = time.perf_counter()
    ahead.close()
    assert time.perf_counter() - t0 < 1.0 and batch_threads() == []
    with pytest.raises(StopIteration):
        next(ahead)
