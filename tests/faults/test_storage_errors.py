"""The words for storage failures, as `dpojax train` reports them, and the watch of an object store (cheap: part of
`make test`)."""

from __future__ import annotations

import errno
import os
import socket
import threading

from dpojax import paths, supervise
from dpojax.trainer import checkpoint as ckpt


def test_no_space_names_the_path_and_the_free_space(tmp_path):
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "metrics.jsonl"))
    words = paths.no_space(e, tmp_path)
    assert words.startswith(f"no space left on device writing {tmp_path / 'run' / 'metrics.jsonl'} (")
    assert "MiB free of" in words and words.endswith("MiB on its file system)")
    # TensorStore's error, wrapped in Orbax's bare Exception: the file named in its text
    inner = ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{tmp_path}/ckpt/_sharding": '
                       "[OS error 28: No space left on device]")
    try:
        raise Exception("Encountered error while writing") from inner
    except Exception as wrapped:  # noqa: BLE001 - the wrapper Orbax raises
        assert paths.no_space(wrapped, tmp_path).startswith(f"no space left on device writing {tmp_path}/ckpt/")
    assert paths.no_space(OSError(errno.EDQUOT, "quota"), tmp_path).startswith("disk quota exceeded writing")
    assert paths.no_space(ValueError("bad value"), tmp_path) is None
    assert paths.no_space(OSError(errno.EACCES, "denied"), tmp_path) is None


def test_store_failure_names_the_url():
    try:
        raise RuntimeError("save failed") from ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4443)")
    except RuntimeError as e:
        words = paths.store_failure(e, "gs://runs/a")
        assert paths.store_failure(e, "/local/run") is None  # a local folder: not the object store
    assert words == ("object storage failed under gs://runs/a: ConnectionRefusedError: [Errno 111] Connect call "
                     "failed ('127.0.0.1', 4443)")
    assert paths.store_failure(ValueError("UNAVAILABLE: gcs down"), "gs://runs/a").endswith("UNAVAILABLE: gcs down")
    assert paths.store_failure(ValueError("a bug"), "gs://runs/a") is None


def test_store_watch_calls_once_after_the_timeout_in_a_row():
    """The watch of a gs:// output_dir: a store that answers again resets the count; one that stays down for the
    timeout is reported once, with the probe's words. A local folder is not watched."""
    answers = iter([None, "ConnectionRefusedError: down", None] + ["ConnectionRefusedError: down"] * 1000)
    reported = threading.Event()
    words = []

    def down(w):
        words.append(w)
        reported.set()

    with paths.StoreWatch("gs://runs/a", 0.2, down, probe=lambda url, timeout_s: next(answers), every_s=0.01):
        assert reported.wait(10)
    assert len(words) == 1 and words[0].startswith("object storage failed under gs://runs/a: it has not answered for ")
    assert words[0].endswith(" s (ConnectionRefusedError: down)")
    with paths.StoreWatch("/local/run", 0.01, down, probe=lambda url, timeout_s: "down", every_s=0.001) as watch:
        assert watch._thread is None


def test_probe_of_a_store_that_is_not_there(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    assert paths.probe("gs://runs/a", 2).startswith("ConnectionRefusedError")
    assert ckpt.describe_newest("gs://runs/a", known=4) == ("step 4 (gs://runs/a/checkpoints/4), the newest this run "
                                                            "saved or found (the store does not answer)")
    assert ckpt.describe_newest("gs://runs/a") == "unknown now (the store does not answer)"


def test_verdict_read_from_the_worker_log():
    """The runtime's words, as JAX 0.10 writes them, name the lost process; the host from the hosts line."""
    hosts = "distributed: hosts 0=tpu-a 1=tpu-b\n"
    unhealthy = ("E1207 coordination_service.cc:1549] Use error polling to propagate the following error to all "
                 "tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks "
                 "have crashed.\nF1207 client.h:80] Terminating process because the JAX distributed service "
                 "detected fatal errors.\n*** Check failure stack trace: ***\n")
    assert supervise.read_verdict(hosts + unhealthy) == supervise.Verdict(1, "tpu-b", True, None)
    leader = ("F1207 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
              "absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
              "preempted/died/restarted unexpectedly\n")
    assert supervise.read_verdict(hosts + leader) == supervise.Verdict(0, "tpu-a", True, None)
    crash = hosts + "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nKeyError: 'params'\n"
    assert supervise.read_verdict(crash) == supervise.Verdict(None, None, False, "KeyError: 'params'")
    line = supervise.message(supervise.Verdict(1, "tpu-b", True), -6, 0, "/no/such/run", ["train", "c.yaml"], "L")
    assert line == ("dpojax train: lost process 1 (host tpu-b): process 0 stopped; last complete checkpoint: none "
                    "yet (the run starts over); the steps after it are redone. Resume on every process with: "
                    "dpojax train c.yaml  (details: L)")
