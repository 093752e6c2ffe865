"""TensorBoard and W&B get metrics.jsonl's records (read back with their own formats), tracking changes nothing in
metrics.jsonl, and train.profile writes a trace openable in TensorBoard / Perfetto."""

from __future__ import annotations

import collections
import contextlib
import gzip
import io
import json
import math
import os
from pathlib import Path

import jax
import pytest
from jax._src import compilation_cache

from dpojax.cli import main
from dpojax.metrics import read_metrics
from dpojax.tracking import TensorBoard, wandb_mode

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
TIMING = ("tokens_per_second", "pairs_per_second", "mfu")  # wall-clock figures: differ between any two runs


def _overrides(root: Path) -> list[str]:
    """The demo config, shortened: 32 train and 16 eval rows, 4 steps of 8 pairs in one length bucket."""
    demo = REPO / "configs" / "demo"
    for name, n in (("train.jsonl", 32), ("eval.jsonl", 16)):
        if not (root / name).exists():
            (root / name).write_text("".join((demo / name).read_text().splitlines(keepends=True)[:n]))
    return [f"data.cache_dir={root}/cache", f"model.name_or_path={demo / 'model'}",
            f"data.train={root / 'train.jsonl'}", f"data.eval={root / 'eval.jsonl'}", "train.batch_size=8",
            "train.steps=4", "data.buckets=[32]"]


def _short_run(root: Path, out: Path, *extra: str) -> Path:
    args = ["train", str(DEMO), f"output_dir={out}", *_overrides(root), "train.log_every=1", "train.eval_every=2",
            "checkpoint.every=null", *extra]
    assert main(args) == 0
    return out


def _throughput(root: Path) -> tuple[dict, str]:
    """benchmarks/throughput.py on the same config: 2 warm-up + 2 timed steps (the same 4-step schedule, so the
    same compiled step)."""
    from benchmarks import throughput

    set_args = [arg for o in _overrides(root) if not o.startswith("train.") for arg in ("--set", o)]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = throughput.main(["--config", str(DEMO), "--batch", "8", "--warmup", "2", "--steps", "2",
                                  "--json", str(root / "throughput.json"), *set_args])
    return result, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run twice: with TensorBoard, W&B (offline) and a profile of step 3, and without; then the
    throughput benchmark on that config. The later runs read their compiled steps from a persistent compilation
    cache the first one filled."""
    root = tmp_path_factory.mktemp("tracking")
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    env = {k: os.environ.get(k) for k in ("WANDB_SILENT", "WANDB_CONSOLE")}
    os.environ.update(WANDB_SILENT="true", WANDB_CONSOLE="off")
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        on = _short_run(root, root / "on", "train.report_to=[tensorboard, wandb]", "train.wandb.mode=offline",
                        "train.profile.start_step=3", "train.profile.steps=1")
        off = _short_run(root, root / "off")
        bench = _throughput(root)
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()  # later tests in this process neither read nor fill it
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return on, off, bench


def _by_step(records: list[dict]) -> dict[int, dict[str, float]]:
    """{step: {"<split>/<name>": value}} of metrics.jsonl's finite numeric values."""
    out = collections.defaultdict(dict)
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                out[r["step"]][f"{r['split']}/{k}"] = float(v)
    return dict(out)


def test_tracking_leaves_metrics_jsonl_unchanged(runs):
    on, off = (read_metrics(run / "metrics.jsonl") for run in runs[:2])
    assert [(r["step"], r["split"]) for r in on] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"),
                                                     (4, "train"), (4, "eval")]
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in records] for records in (on, off)]
    assert strip[0] == strip[1]
    assert not (runs[1] / "tensorboard").exists() and not (runs[1] / "wandb").exists()
    assert not (runs[1] / "profile").exists()


def test_tensorboard_events_hold_the_records(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[0] / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = _by_step(read_metrics(runs[0] / "metrics.jsonl"))
    tags = {tag for values in expected.values() for tag in values}
    assert set(events.Tags()["scalars"]) == tags and "eval/rewards/accuracies" in tags
    for tag in tags:
        got = {e.step: e.value for e in events.Scalars(tag)}
        want = {step: values[tag] for step, values in expected.items() if tag in values}
        assert got.keys() == want.keys(), tag
        for step, value in want.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # stored as float32


def _wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a .wandb file: a 7-byte W&B header, then LevelDB log blocks of 32 KiB, each record
    in chunks of (crc32c: 4, length: 2 little-endian, type: 1 full | 2 first | 3 middle | 4 last) + payload."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_records(runs):
    from wandb.proto import wandb_internal_pb2

    files = list((runs[0] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history = collections.defaultdict(dict)
    for raw in _wandb_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num].update({k: v for k, v in items.items() if not k.startswith("_")})
    expected = _by_step(read_metrics(runs[0] / "metrics.jsonl"))
    assert history.keys() == expected.keys()
    for step, values in expected.items():
        assert history[step].keys() == values.keys(), step
        assert history[step] == pytest.approx(values, rel=1e-12)


def test_profile_folder_holds_a_trace(runs):
    traces = list((runs[0] / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0  # TensorBoard's profile plugin reads this
    perfetto = list((runs[0] / "profile").glob("plugins/profile/*/*.trace.json.gz"))
    assert perfetto and json.load(gzip.open(perfetto[0]))["traceEvents"]  # ui.perfetto.dev opens this


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"


def test_throughput_script_on_a_config(runs):
    result, out = runs[2]
    for field in ("tokens/s", "pairs/s", "step time", "median", "compile time", "peak memory", "policy forward",
                  "attention causal", "reference forward", "remat recompute", "MFU per chip", "HFU per chip", "H200",
                  "v5e", "CPU"):
        assert field in out, field
    assert result["timed_steps"] == 2 and result["chips"] == jax.device_count() and result["batch_pairs"] == 8
    assert result["attention"] == "xla" and result["reference_in_step"]
    assert result["flops_per_step"]["tokens"] > 0 and result["flops_per_step"]["model"] > 0
    assert 0 < result["mfu"] < result["hfu"] and result["peak_memory_bytes"] > 0
    assert json.loads((runs[0].parent / "throughput.json").read_text())["tokens_per_s"] == result["tokens_per_s"]


def test_tensorboard_resume_drops_the_redone_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoard(tmp_path)
    for step in (1, 2, 3, 4):
        first.write(step, "train", {"loss": float(step)})
    first.close()
    resumed = TensorBoard(tmp_path, start=2)  # the checkpoint was at step 2: steps 3 and 4 run again
    for step in (3, 4):
        resumed.write(step, "train", {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
