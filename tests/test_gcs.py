"""Runs on object storage, against a real GCS API (fake-gcs-server on 127.0.0.1, started and stopped here).

The model, tokenizer, train and eval data are read from `gs://`, and output_dir, the tokenized-data cache,
checkpoints (Orbax through tensorstore's GCS driver), metrics.jsonl, the plot and the export are written there:
an uninterrupted run, a run killed with SIGKILL and resumed (bitwise equal metrics), a 2-process run writing
its checkpoint shards to the bucket and resumed on 1 process, and `dpojax export` to `gs://`, loadable by
transformers after download. A missing bucket or missing credentials fail at start with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from gcs_emulator import Emulator
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer

from dpojax import metrics as M, paths
from dpojax.cli import main
from dpojax.models.hf import TOKENIZER_FILES

pytestmark = pytest.mark.serial  # every test shares the module's emulator and its subprocess reference run
STEPS = 6
TIMING = {"tokens_per_second", "pairs_per_second", "mfu"}
TESTS = Path(__file__).parent
REPO = TESTS.parent


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with one bucket holding the inputs, and a config that reads them from it; plus the
    uninterrupted reference run, written to gs://runs/reference by `dpojax train` in a subprocess."""
    root = tmp_path_factory.mktemp("gcs")
    with Emulator(root / "emulator.log") as emulator:
        inputs, runs = emulator.create_bucket("inputs"), emulator.create_bucket("runs")
        emulator.upload(make_tiny_checkpoint(root / "policy", seed=0), f"{inputs}/policy")
        emulator.upload(make_tokenizer(root / "tok"), f"{inputs}/tok")
        emulator.upload(_jsonl(root / "train.jsonl", make_pref_rows(32, "standard", seed=5)), f"{inputs}/train.jsonl")
        emulator.upload(_jsonl(root / "eval.jsonl", make_pref_rows(8, "standard", seed=6)), f"{inputs}/eval.jsonl")
        cfg = {
            "model": {"name_or_path": f"{inputs}/policy", "tokenizer": f"{inputs}/tok"},
            "data": {"train": f"{inputs}/train.jsonl", "eval": f"{inputs}/eval.jsonl", "max_length": 48,
                     "cache_dir": f"{runs}/cache"},
            "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
            "train": {"batch_size": 8, "steps": STEPS, "log_every": 1},
            "checkpoint": {"every": 2, "keep": 10},
            "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        }  # fmt: skip
        config = root / "run.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {"root": root, "config": config, "runs": runs, "emulator": emulator}
        result = _run(env, f"{runs}/reference")
        assert result.returncode == 0, result.stderr[-3000:]
        yield env


def _env(gcs, **extra: str) -> dict:
    """The emulator's variables (inherited), 8 CPU devices, a local mirror of gs:// inputs in tmp, and one
    persistent compilation cache for the module's runs (the same executables, compiled once)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", **_shared(gcs),
                **extra)


def _shared(gcs) -> dict:
    return {"DPOJAX_CACHE": str(gcs["root"] / "mirror"), "JAX_COMPILATION_CACHE_DIR": str(gcs["root"] / "jax"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _cmd(gcs, out: str, *overrides: str, program=("-m", "dpojax.cli")) -> list[str]:
    return [sys.executable, *program, "train", str(gcs["config"]), f"output_dir={out}", *overrides]


def _run(gcs, out: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(gcs, out, *overrides), env=_env(gcs), capture_output=True, text=True, timeout=300)


def _train_records(url: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in M.read_metrics(f"{url}/metrics.jsonl")
            if r["split"] == "train"]  # fmt: skip


def test_run_reads_and_writes_gcs(gcs):
    out = f"{gcs['runs']}/reference"
    names = gcs["emulator"].names(out)
    assert {"config.yaml", "metrics.jsonl", "training_curves.png", "export/model.safetensors",
            "export/config.json", "export/tokenizer.json"} <= set(names), names  # fmt: skip
    assert f"checkpoints/{STEPS}/commit_success.txt" in names  # Orbax's commit marker on object storage
    assert any(n.startswith(f"checkpoints/{STEPS}/params/") for n in names)
    records = M.read_metrics(f"{out}/metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(s, "train") for s in range(1, STEPS + 1)] + [(STEPS, "eval")]
    assert any(n.startswith("preferences-") for n in gcs["emulator"].names(f"{gcs['runs']}/cache"))
    assert not (Path.cwd() / "gs:").exists()  # nothing landed in a local folder named after the URL


def test_missing_bucket_fails_at_start(gcs, capsys):
    code = main(["train", str(gcs["config"]), "output_dir=gs://no-such-bucket/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0, err
    assert "output_dir 'gs://no-such-bucket/run'" in err and "bucket 'no-such-bucket' does not exist" in err
    assert not paths.path("gs://runs/never").exists()


def test_missing_credentials_fail_at_start(gcs, tmp_path, monkeypatch, capsys):
    """No emulator, no key file, no gcloud login: the first gs:// URL is named with what to set."""
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # an empty gcloud config: no login
    code = main(["train", str(gcs["config"]), f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "data.train 'gs://inputs/train.jsonl': no Google Cloud credentials found" in err
    assert "GOOGLE_APPLICATION_CREDENTIALS" in err
    assert not (tmp_path / "run").exists()


def _exists(url: str) -> bool:
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()  # listings are cached; another process is writing
    return fs.exists(url)


def test_sigkill_then_resume_is_bitwise_exact(gcs):
    out = f"{gcs['runs']}/killed"
    proc = subprocess.Popen(_cmd(gcs, out, "data.eval=null", program=(str(TESTS / "held_cli.py"),)),
                            env=_env(gcs, DPOJAX_HOLD_AT="5"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:  # held after step 5's record, while checkpoint 4 is committed in the background
            seen.append(line)
            if "HELD AT STEP" in line:
                break
        assert "HELD AT STEP 5" in "".join(seen), "".join(seen)[-3000:]
        deadline = time.monotonic() + 120
        while not _exists(f"{out}/checkpoints/4/commit_success.txt"):
            assert time.monotonic() < deadline, "checkpoint 4 never committed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not _exists(f"{out}/export")
    # flushed when checkpoint 4 was saved: every record up to it is there (records past it are redone)
    assert [r["step"] for r in M.read_metrics(f"{out}/metrics.jsonl")][:4] == [1, 2, 3, 4]
    result = _run(gcs, out, "data.eval=null")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stderr
    assert _train_records(out) == _train_records(f"{gcs['runs']}/reference")


@pytest.mark.skipif(os.environ.get("DPOJAX_SLOW_TESTS") != "1",
                    reason="two more runs, one of 2 processes (36 s on 2 idle cores); DPOJAX_SLOW_TESTS=1 runs it")
def test_two_processes_write_their_shards_then_resume_on_one(gcs, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_cpu", REPO / "launch" / "local_cpu.py")
    local_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_cpu)
    for key, value in _shared(gcs).items():
        monkeypatch.setenv(key, value)
    out = f"{gcs['runs']}/two"
    code = local_cpu.main(["--processes", "2", "--devices-per-process", "4", "--grace", "30", "train",
                           str(gcs["config"]), f"output_dir={out}", "train.steps=4", "data.eval=null"])  # fmt: skip
    assert code == 0
    names = gcs["emulator"].names(f"{out}/checkpoints/4/params")
    assert {n.split("/")[0] for n in names if n.startswith("ocdbt.process_")} == {"ocdbt.process_0", "ocdbt.process_1"}
    result = _run(gcs, out, "data.eval=null")  # one process, 8 devices, the same mesh
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stderr
    ours, ref = _train_records(out), _train_records(f"{gcs['runs']}/reference")
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        keys = sorted(set(a) - {"step", "split"})
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-5, atol=1e-6, err_msg=str(keys))


def test_export_to_gcs_loads_in_transformers(gcs):
    import torch
    import transformers
    from safetensors.numpy import load_file

    run, out = f"{gcs['runs']}/reference", f"{gcs['runs']}/exported"
    assert main(["export", run, out]) == 0
    names = gcs["emulator"].names(out)
    assert {"config.json", "model.safetensors"} <= set(names) and set(names) - {"config.json", "model.safetensors"}
    assert set(names) <= {"config.json", "model.safetensors", *TOKENIZER_FILES}
    local = paths.local_copy(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    trained = load_file(paths.local_copy(f"{run}/export") / "model.safetensors")  # written at the end of training
    state = model.state_dict()
    assert set(trained) <= set(state)
    for name, value in trained.items():  # the last checkpoint, exported again, is the trained policy, bit for bit
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)


def test_metrics_on_object_storage_are_rewritten_whole(gcs):
    """No append on object stores: records are buffered and the object rewritten at each flush (the loop flushes
    at every checkpoint); a resumed run's writer keeps what is there, and truncation drops what is redone."""
    url = f"{gcs['runs']}/metrics-unit/metrics.jsonl"
    writer = M.MetricsWriter(url, flush_every_s=3600)
    writer.write(1, "train", {"loss": 0.5})  # the first record is flushed at once (the run is visibly alive)
    writer.write(2, "train", {"loss": np.float32(0.25)})
    assert [r["step"] for r in M.read_metrics(url)] == [1]
    writer.flush()
    assert M.read_metrics(url) == [{"step": 1, "split": "train", "loss": 0.5},
                                   {"step": 2, "split": "train", "loss": 0.25}]
    M.truncate_after(url, 1)
    resumed = M.MetricsWriter(url, flush_every_s=0)
    resumed.write(2, "train", {"loss": 0.125})
    assert [(r["step"], r["loss"]) for r in M.read_metrics(url)] == [(1, 0.5), (2, 0.125)]
    other = M.MetricsWriter(f"{gcs['runs']}/other/metrics.jsonl", enabled=False)  # a process other than 0
    other.write(1, "train", {"loss": 0.5})
    other.flush()
    assert not _exists(f"{gcs['runs']}/other/metrics.jsonl")


def test_uncommitted_checkpoint_is_ignored_then_redone(gcs):
    """A save killed midway on GCS leaves `<step>/` without Orbax's commit_success.txt: neither Orbax nor
    `find_checkpoint` takes it, and saving that step again replaces it."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dpojax.train import checkpoint as ckpt

    run = f"{gcs['runs']}/partial"

    def manager():
        return ocp.CheckpointManager(ckpt.checkpoint_dir(run), options=ocp.CheckpointManagerOptions(create=True))

    tree = {"w": jnp.arange(4.0)}
    with manager() as m:
        m.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
    paths.write_text(f"{run}/checkpoints/2/params/partial", "killed mid-save")
    with manager() as m:
        assert m.latest_step() == 1 and ckpt.find_checkpoint(run).step == 1
        m.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
        m.wait_until_finished()
        assert m.latest_step() == 2 and ckpt.find_checkpoint(run).step == 2
    assert "params/partial" not in gcs["emulator"].names(f"{run}/checkpoints/2")
