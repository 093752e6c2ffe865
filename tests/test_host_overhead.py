"""The train loop keeps ahead of the devices: it reads device values only through `loop.fetch`, once per step, and
the step it just dispatched only where it needs its values (log records, the last step); everywhere else it reads
the previous step's metrics while the next step runs. The host-time figures: benchmarks/host_overhead.py."""

from __future__ import annotations

import json

from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax.config import config_from_dict
from dpojax.train import loop


def test_loop_reads_metrics_a_step_late_except_where_needed(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(16, "standard", seed=5)))
    cfg = config_from_dict({
        "model": {"name_or_path": str(make_tiny_checkpoint(tmp_path / "policy", seed=0)),
                  "tokenizer": str(make_tokenizer(tmp_path / "tok"))},
        "data": {"train": str(data), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 8, "steps": 7, "log_every": 3},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    dispatched, reads = [], []  # outputs of each step, in order; (step read, steps dispatched by then)
    setup_train, fetch = loop.setup_train, loop.fetch

    def counting_setup(*args, **kw):
        run, state = setup_train(*args, **kw)
        step = run.train_step

        def dispatch(*a):
            state, out = step(*a)
            dispatched.append(out)
            return state, out

        run.train_step = dispatch
        return run, state

    def counting_fetch(tree):
        reads.append((next(i + 1 for i, out in enumerate(dispatched) if out is tree), len(dispatched)))
        return fetch(tree)

    monkeypatch.setattr(loop, "setup_train", counting_setup)
    monkeypatch.setattr(loop, "fetch", counting_fetch)
    loop.train(cfg)
    assert sorted(step for step, _ in reads) == list(range(1, 8))  # every step's metrics read once
    same_step = [step for step, dispatched_by_then in reads if step == dispatched_by_then]
    assert same_step == [3, 6, 7]  # log records (log_every 3) and the last step; otherwise one step late
