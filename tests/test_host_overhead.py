"""The train loop keeps ahead of the devices: a producer thread builds, counts and sends the batches (in step order,
the same batches as built inline); the loop thread dispatches step s, then waits for step s-1 (one host sync per
step, on a step already dispatched before) and reads metrics only through `window.fetch`: a log window's steps in one
read, at the log step (after the next step was dispatched), and the step it just dispatched only at the last step
(also at an eval, a checkpoint or a stop, which wait for it anyway). A producer error reaches the loop as itself; the
thread is gone when `train` returns. The host-time figures: benchmarks/host_overhead.py.

A host sync is caught where jax funnels it: `ArrayImpl._value` (float, int, bool, item, tolist, device_get, np.asarray
of a non-CPU array), `ArrayImpl.block_until_ready` and the batched `block_until_ready` of several arrays (a
transfer guard does not fire on CPU, where the copy is zero-copy; np.asarray of a CPU array takes the buffer protocol
and is not seen). The same count run on a loop made to wait for the step it just dispatched shows it catches that.
"""

from __future__ import annotations

import gc
import threading
import time

import jax
import numpy as np
import pytest
from jax._src import api as jax_api
from jax._src import array as jax_array
from tiny_models import tiny_run_files

from dpojax.config import config_from_dict
from dpojax.trainer import loop, prefetch, reference, window

STEPS = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("host"), rows=16, data_seed=5)


def make_cfg(files, out_dir):
    return config_from_dict({
        "model": {"name_or_path": files["policy"], "tokenizer": files["tok"]},
        "data": {"train": files["data"], "max_length": 32, "cache_dir": files["cache"]},
        "train": {"batch_size": 8, "steps": STEPS, "log_every": 3},
        "output_dir": str(out_dir),
    })


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dpojax-batches"]


class SyncCounter:
    """Patches the loop's step (to know which step made each device array) and jax's host syncs (to record, in the
    loop thread, which step each sync waits for and how many steps were dispatched by then)."""

    def __init__(self, monkeypatch):
        self.dispatched, self.batches, self.runs = [], [], []  # each step's metrics output; its batch; the run
        self.made_by: dict[int, int] = {}  # id of a device array a step returned -> that step (1-based)
        self.syncs: list[tuple[str, int, int]] = []  # (kind, step waited for, steps dispatched by then)
        self.fetched: list[tuple[int, int]] = []  # (step whose metrics window.fetch read, steps dispatched by then)
        setup_train, fetch = loop.setup_train, window.fetch
        value, block = jax_array.ArrayImpl._value, jax_array.ArrayImpl.block_until_ready
        batched = jax_api.xc.batched_block_until_ready
        counter = self

        def counting_setup(*args, **kw):
            run, state = setup_train(*args, **kw)
            step = run.train_step.flat

            def dispatch(state_leaves, ref_leaves, batch):  # the step's metrics come out stacked in one array
                self.batches.append(batch)
                leaves, out = step(state_leaves, ref_leaves, batch)
                self.dispatched.append(out)
                self.made_by.update((id(x), len(self.dispatched)) for x in [out, *leaves])
                return leaves, out

            run.train_step.flat = dispatch
            self.runs.append(run)
            return run, state

        def counting_fetch(tree):
            self.fetched.extend((self.made_by[id(x)], len(self.dispatched)) for x in jax.tree.leaves(tree))
            return fetch(tree)

        def watched_value(self):
            counter.seen("read", self)
            return value.fget(self)

        def watched_block(self):
            counter.seen("wait", self)
            return block(self)

        def watched_batched(arrays):
            for x in arrays:
                counter.seen("wait", x)
            return batched(arrays)

        monkeypatch.setattr(loop, "setup_train", counting_setup)
        monkeypatch.setattr(window, "fetch", counting_fetch)
        monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(watched_value))
        monkeypatch.setattr(jax_array.ArrayImpl, "block_until_ready", watched_block)
        monkeypatch.setattr(jax_api.xc, "batched_block_until_ready", watched_batched)

    def seen(self, kind: str, x) -> None:
        step = self.made_by.get(id(x))
        if step is not None and threading.current_thread() is threading.main_thread():
            self.syncs.append((kind, step, len(self.dispatched)))

    def on_just_dispatched(self) -> list[int]:
        """The steps at which the loop thread synced on the step it had just dispatched."""
        return sorted({n for _, step, n in self.syncs if step == n})


def read_point(step: int, log_every: int = 3) -> int:
    """Steps dispatched when `step`'s metrics are read: those of a log window at the step after its log step, the
    last step's at once."""
    log_step = min(-(-step // log_every) * log_every, STEPS)
    return log_step if log_step == STEPS else log_step + 1


def test_loop_syncs_on_the_previous_step_and_reads_once_per_log_window(files, tmp_path, monkeypatch):
    counter = SyncCounter(monkeypatch)
    loop.train(make_cfg(files, tmp_path / "run"))
    assert counter.on_just_dispatched() == [STEPS]  # no host sync on the step just dispatched but at the last one
    # one wait per step, for the step before it (then finished: it ran while the host dispatched this one)
    waits = [(step, n) for kind, step, n in counter.syncs if kind == "wait" and n < STEPS]
    assert waits == [(n - 1, n) for n in range(2, STEPS)]
    # every step's metrics read once, in one read per log window (log_every 3): steps 1-3 once step 4 is dispatched
    assert sorted(counter.fetched) == sorted((step, read_point(step)) for step in range(1, STEPS + 1))
    reads = [(step, n) for kind, step, n in counter.syncs if kind == "read" and n < STEPS]
    assert reads == [(step, 4) for step in (1, 2, 3)]  # no other read before the last step's save and export
    assert batch_threads() == []  # the producer thread is gone

    # the batches the producer thread sent, step by step, are the ones the loop thread builds inline
    run = counter.runs[0]
    data = loop.load_split(run.cfg, run.models, run.cfg.data.train, run.cfg.data.train_split)
    table = reference.lookup(run.models.ref_tables, data)
    inline = [reference.attach(b, table) for b in prefetch.host_batches(run, data, 0, STEPS)]
    assert len(counter.batches) == len(inline) == STEPS
    for sent, built in zip(counter.batches, inline):
        for a, b in zip(jax.tree.leaves(jax.device_get(sent)), jax.tree.leaves(built)):
            np.testing.assert_array_equal(a, b)


def test_sync_count_catches_a_loop_that_waits_for_the_step_it_dispatched(files, tmp_path, monkeypatch):
    counter = SyncCounter(monkeypatch)
    monkeypatch.setattr(window, "wait", lambda x: jax.block_until_ready(counter.dispatched[-1]))  # the broken loop
    loop.train(make_cfg(files, tmp_path / "run"))
    assert counter.on_just_dispatched() == list(range(2, STEPS + 1))


def test_producer_error_reaches_the_loop_as_itself(files, tmp_path, monkeypatch):
    model_flops, calls = prefetch.model_flops, []

    def failing_flops(run, batch):  # runs in the producer thread, for each batch
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise ValueError("row 17 of data.jsonl: a made-up batch error")
        return model_flops(run, batch)

    monkeypatch.setattr(prefetch, "model_flops", failing_flops)
    with pytest.raises(ValueError, match=r"^row 17 of data.jsonl: a made-up batch error$"):
        loop.train(make_cfg(files, tmp_path / "run"))
    assert set(calls) == {"dpojax-batches"}
    assert batch_threads() == []


def test_steps_run_with_the_heap_frozen_and_hand_it_back(files, tmp_path, monkeypatch):
    """The objects alive when the loop starts are out of reach of Python's collections while it runs (a full
    collection of them stalled a thread for ~0.35 s); they are handed back when `train` returns, also after an error."""
    steps, seen = loop.run_steps, []

    def watched(*args, **kw):
        seen.append(gc.get_freeze_count())
        return steps(*args, **kw)

    monkeypatch.setattr(loop, "run_steps", watched)
    assert gc.get_freeze_count() == 0
    loop.train(make_cfg(files, tmp_path / "run"))
    assert len(seen) == 1 and seen[0] > 50_000, seen  # jax, flax, transformers, the models: all frozen
    assert gc.get_freeze_count() == 0

    def failing(*args, **kw):
        seen.append(gc.get_freeze_count())
        raise ValueError("a made-up loop error")

    monkeypatch.setattr(loop, "run_steps", failing)
    with pytest.raises(ValueError, match="a made-up loop error"):
        loop.train(make_cfg(files, tmp_path / "run2"))
    assert seen[1] > 50_000 and gc.get_freeze_count() == 0


def test_prefetch_keeps_order_and_stops_when_closed():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    ahead = prefetch.Prefetch(items(), depth=2)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    time.sleep(0.1)  # the producer fills the queue and waits
    assert len(made) <= 5 + 2 + 1  # at most `depth` ready plus one in hand
    t0 = time.perf_counter()
    ahead.close()
    assert time.perf_counter() - t0 < 1.0 and batch_threads() == []
    with pytest.raises(StopIteration):
        next(ahead)


@pytest.mark.parametrize("k", [1, 2])
def test_host_overhead_benchmark_runs(k):
    """benchmarks/host_overhead.py times the loop it patches and the same compiled step run back to back, one step
    per dispatch and K at once (each dispatch's steps counted)."""
    from benchmarks import host_overhead

    r = host_overhead.main(["--steps", "24", "--skip", "2", "--log-every", "4", "--set",
                            f"train.steps_per_dispatch={k}"])
    assert r["step_ms"] > 0 and r["python_calls_per_dispatch"] == 0
    assert 0 < r["host_ms"] < r["wall_ms"] and r["dispatch_ms"] > 0 and r["produce_cpu_ms"] > 0
