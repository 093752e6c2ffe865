"""Runs on object storage, against a real GCS API (fake-gcs-server on 127.0.0.1, started and stopped here).

The model, tokenizer, train and eval data are read from `gs://`, and output_dir, the tokenized-data cache,
checkpoints (Orbax through tensorstore's GCS driver), metrics.jsonl, the plot and the export are written there:
an uninterrupted run, a run killed with SIGKILL and resumed (bitwise equal metrics), a 2-process LoRA run
writing its checkpoint shards to the bucket and resumed on 1 process, and `dpojax export` to `gs://`, loadable by
transformers after download; TensorBoard events and a profiler trace land in the bucket; a LoRA run exports a
PEFT adapter folder there. A missing bucket, missing credentials or a bucket that refuses writes fail at start
with one line.
"""

from __future__ import annotations

import json
import logging
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
from tiny_models import make_tiny_checkpoint, xla_flags
from tiny_tokenizer import make_pref_rows, make_tokenizer
from tolerances import rewards_atol

from dpojax import metrics as M
from dpojax import paths
from dpojax.cli import main
from dpojax.data import load_preferences
from dpojax.models.hf import TOKENIZER_FILES

STEPS = 6
LORA = ("model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8")  # PEFT's default targets
TIMING = {"tokens_per_second", "pairs_per_second", "mfu"}
TESTS = Path(__file__).parent
REPO = TESTS.parent


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with one bucket holding the inputs, and a config that reads them from it; plus the
    uninterrupted reference run (with TensorBoard and a profile of step 2), written to gs://runs/reference by
    `dpojax train` in a subprocess."""
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
        }
        config = root / "run.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {"root": root, "config": config, "runs": runs, "emulator": emulator}
        result = _run(env, f"{runs}/reference", "train.report_to=[tensorboard]", "train.profile.start_step=2",
                      "train.profile.steps=1")
        assert result.returncode == 0, result.stderr[-3000:]
        yield env


def _env(gcs, **extra: str) -> dict:
    """The emulator's variables (inherited), 8 CPU devices, a local mirror of gs:// inputs in tmp, and one
    persistent compilation cache for the module's runs (the same executables, compiled once)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8), **_shared(gcs),
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
            if r["split"] == "train"]


def test_run_reads_and_writes_gcs(gcs):
    out = f"{gcs['runs']}/reference"
    names = gcs["emulator"].names(out)
    assert {"config.yaml", "metrics.jsonl", "training_curves.png", "export/model.safetensors",
            "export/config.json", "export/tokenizer.json"} <= set(names), names
    assert f"checkpoints/{STEPS}/commit_success.txt" in names  # Orbax's commit marker on object storage
    assert any(n.startswith(f"checkpoints/{STEPS}/params/") for n in names)
    records = M.read_metrics(f"{out}/metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(s, "train") for s in range(1, STEPS + 1)] + [(STEPS, "eval")]
    assert any(n.startswith("preferences-") for n in gcs["emulator"].names(f"{gcs['runs']}/cache"))
    assert not (Path.cwd() / "gs:").exists()  # nothing landed in a local folder named after the URL


def test_token_store_in_the_bucket_is_read_back(gcs, monkeypatch):
    """The run's token store (shards, then meta.json) and its source record are objects of the bucket; loading the
    same source again finds them there and parses no row."""
    from transformers import AutoTokenizer  # the run's tokenizer files, read locally

    monkeypatch.setenv("DPOJAX_CACHE", str(gcs["root"] / "mirror-in-process"))
    cache = f"{gcs['runs']}/cache"
    names = gcs["emulator"].names(cache)
    assert any(n.startswith("preferences-") and n.endswith("/meta.json") for n in names), names
    assert any(n.startswith("preferences-") and "/shard-00000-of-00001/" in n for n in names), names
    assert any(n.startswith("source-") for n in names), names
    data_cfg = yaml.safe_load(gcs["config"].read_text())["data"]
    tok = AutoTokenizer.from_pretrained(str(gcs["root"] / "tok"))
    data = load_preferences(data_cfg["train"], tok, max_length=48, cache_dir=cache)
    assert data.from_cache and len(data) == 32 and data.source == data_cfg["train"]


def test_tensorboard_and_profile_land_in_the_bucket(gcs):
    """Event files and the trace are written locally and uploaded (at each checkpoint and at the end; when the trace
    ends): every metrics.jsonl record is in the events, the trace opens in TensorBoard's profile plugin."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = f"{gcs['runs']}/reference"
    names = gcs["emulator"].names(out)
    assert sum(n.startswith("tensorboard/events.out.tfevents.") for n in names) == 1, names
    assert sum(n.startswith("profile/plugins/profile/") and n.endswith(".xplane.pb") for n in names) == 1, names
    assert any(n.startswith("profile/plugins/profile/") and n.endswith(".trace.json.gz") for n in names), names
    events = EventAccumulator(str(paths.local_copy(f"{out}/tensorboard")), size_guidance={"scalars": 0})
    events.Reload()
    for split in ("train", "eval"):
        want = {r["step"]: r["loss"] for r in M.read_metrics(f"{out}/metrics.jsonl") if r["split"] == split}
        got = {e.step: e.value for e in events.Scalars(f"{split}/loss")}
        assert got == pytest.approx(want, rel=1e-6), split


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


def test_unwritable_output_dir_fails_at_start(gcs, tmp_path, capsys):
    """A bucket that lists but refuses writes fails at start, before anything is written, on the probe object that
    check_urls writes and deletes under output_dir. fake-gcs-server has no IAM to deny a write with 403; it refuses
    one for real in its filesystem backend, which stores objects as files: nothing can be created under a name
    that is already an object (`taken` here), while the bucket lists and reads as usual."""
    with Emulator(tmp_path / "emulator.log", files=tmp_path / "objects") as emulator:
        bucket = emulator.create_bucket("readonly")
        paths.write_text(f"{bucket}/taken", "an object where output_dir needs a folder")
        code = main(["train", str(gcs["config"]), f"output_dir={bucket}/taken/run"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert "output_dir 'gs://readonly/taken/run': cannot create and delete objects there" in err, err
        assert "Storage Object User" in err
        assert emulator.names(bucket) == ["taken"]


def _exists(url: str) -> bool:
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()  # listings are cached; another process is writing
    return fs.exists(url)


def test_sigkill_then_resume_is_bitwise_exact(gcs):
    out = f"{gcs['runs']}/killed"
    proc = subprocess.Popen(_cmd(gcs, out, "data.eval=null", program=(str(TESTS / "held_cli.py"),)),
                            env=_env(gcs, DPOJAX_HOLD_AT="5"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_two_processes_write_their_shards_then_resume_on_one(gcs, monkeypatch, caplog):
    """A LoRA run of 2 processes (4 devices each, mesh (2,2,2)) writes its checkpoint shards to the bucket, each
    process its own, and exports a PEFT adapter folder there; with its last checkpoint gone (the pod died after
    step 2), 1 process of 8 devices (this one: no imports to pay) resumes from step 2 and redoes step 3 as the
    2 processes did."""
    import importlib.util

    import fsspec

    spec = importlib.util.spec_from_file_location("local_cpu", REPO / "launch" / "local_cpu.py")
    local_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_cpu)
    for key, value in _shared(gcs).items():
        monkeypatch.setenv(key, value)
    out = f"{gcs['runs']}/two"
    args = ["train", str(gcs["config"]), f"output_dir={out}", *LORA, "train.steps=3", "data.eval=null"]
    assert local_cpu.main(["--processes", "2", "--devices-per-process", "4", "--grace", "30", *args]) == 0
    names = gcs["emulator"].names(f"{out}/checkpoints/2")
    assert {p for n in names for p in n.split("/") if p.startswith("ocdbt.process_")} == {"ocdbt.process_0",
                                                                                         "ocdbt.process_1"}
    _check_peft_export(gcs, f"{out}/export")  # gathered by both processes, written by process 0
    _check_init_from(gcs, f"{out}/export")
    two = _train_records(out)
    fsspec.filesystem("gs").rm(f"{out}/checkpoints/3", recursive=True)
    with caplog.at_level(logging.INFO, logger="dpojax"):
        assert main(args) == 0
    assert "at step 2" in caplog.text
    one = _train_records(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    assert one[:2] == two[:2]  # kept from the 2-process run
    keys = sorted(set(two[2]) - {"step", "split"})
    for k in keys:  # rewards: beta 0.1 x differences of log-prob sums, as exact as those sums (16 ulps)
        atol = rewards_atol(two[2], 0.1) if k.startswith("rewards/") else 1e-6
        np.testing.assert_allclose(one[2][k], two[2][k], rtol=1e-5, atol=atol, err_msg=k)


def _check_init_from(gcs, url: str) -> None:
    """`model.lora.init_from` reads an adapter folder on gs:// as the same folder downloaded."""
    import jax

    from dpojax.config import load_config
    from dpojax.trainer.build import build_models, make_sharder

    def adapters(init_from):
        cfg = load_config(gcs["config"], [*LORA, f"model.lora.init_from={init_from}"])
        return jax.tree.leaves(build_models(cfg, make_sharder(cfg)).policy_params)

    remote, local = adapters(url), adapters(paths.local_copy(url))
    assert len(remote) == len(local) > 0
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _check_peft_export(gcs, url: str) -> None:
    """The adapter folder a LoRA run exported to `url`, downloaded, is a PEFT adapter of the base."""
    import peft
    import torch
    import transformers
    from safetensors.numpy import load_file

    local = paths.local_copy(url)
    assert json.loads((local / "adapter_config.json").read_text())["r"] == 4
    tensors = load_file(local / "adapter_model.safetensors")
    base = transformers.AutoModelForCausalLM.from_pretrained(gcs["root"] / "policy", dtype=torch.float32)
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        before = base(ids).logits.numpy()
        model = peft.PeftModel.from_pretrained(base, str(local))
        after = model(ids).logits.numpy()
    state = {k.replace(".default", ""): v.numpy() for k, v in model.state_dict().items() if "lora_" in k}
    assert state.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    assert np.abs(after - before).max() > 1e-4  # training moved the adapters off PEFT's identity start


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

    from dpojax.trainer import checkpoint as ckpt

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
