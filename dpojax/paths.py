"""Every path a run reads or writes, local or on object storage (`gs://`, `s3://`), behind one API: etils `epath`,
the path type Orbax itself uses (its `gs://`/`s3://` backend is fsspec: gcsfs / s3fs, the `gcs` extra).

What differs on object storage, and how dpojax handles it:
- No append and no rename: a file is written whole (an object appears complete or not at all), so
  `write_bytes`/`write_text` write in place there and through a temporary file + `os.replace` locally, and
  `LineAppender` (metrics.jsonl, samples.jsonl) buffers lines and rewrites the object.
- Libraries that need a local file (safetensors memory maps, tokenizers, `datasets.load_from_disk`) get a local
  mirror from `local_copy`, re-downloaded when the remote size or checksum changes.
- Writers that only know local files (TensorBoard's event writer, the JAX profiler, whose own gs:// client
  cannot be pointed at an emulator and whose fsspec "append" rewrites the object) write into a local
  `staging_dir` that `upload_tree` copies to the URL (at each checkpoint and at the end).
- A URL without credentials, with a missing bucket, or (for what a run writes) where an object cannot be
  created and deleted fails at start (`check_urls`) with one line naming the URL and what to set, before
  anything is written.

A local GCS emulator is used when `STORAGE_EMULATOR_HOST` is set (the variable google-cloud-storage and gcsfs
read): `use_emulator_if_set` points tensorstore (Orbax's array writer) at it too.
"""

from __future__ import annotations

import errno
import fnmatch
import http.client
import importlib.util
import os
import pathlib
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Iterable

from etils import epath

from dpojax.errors import UserError

REMOTE_SCHEMES = ("gs://", "s3://")
_COPY_CHUNK = 16 << 20


class StorageError(UserError):
    """An object-storage URL that cannot be used: no credentials, a missing bucket, a missing client package."""


def is_remote(p: str | os.PathLike) -> bool:
    return os.fspath(p).startswith(REMOTE_SCHEMES)


def path(p: str | os.PathLike) -> epath.Path:
    """An `epath.Path` of a local path (`~` expanded) or an object-store URL."""
    text = os.fspath(p)
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def absolute(p: str | os.PathLike) -> epath.Path:
    """`path(p)`, made absolute when local (a URL is absolute already)."""
    text = os.fspath(p)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_bytes(dst: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically: a reader sees the old file or the new one, never a torn one."""
    if is_remote(dst):
        with path(dst).open("wb") as f:  # one object upload: visible only once complete
            f.write(data)
        return
    local = pathlib.Path(os.path.expanduser(os.fspath(dst)))
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, local)


def write_text(dst: str | os.PathLike, text: str) -> None:
    write_bytes(dst, text.encode("utf-8"))


_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_FILE_IN_TEXT = re.compile(r"""(?:local file|path|file)[:=]?\s*["']([^"']+)["']""")


def no_space(e: BaseException | None, default: str | os.PathLike) -> str | None:
    """The full disk behind `e` (ENOSPC or EDQUOT, raised as such or wrapped by Orbax/TensorStore), in words that
    name the path written and the free space there; None when `e` is something else."""
    for _ in range(8):  # e, then its causes
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return _no_space_words(_NO_SPACE[e.errno], e.filename or default)
        for code, words in _NO_SPACE.items():
            if os.strerror(code) in str(e):
                found = _FILE_IN_TEXT.search(str(e))
                return _no_space_words(words, found.group(1) if found else default)
        e = e.__cause__ or e.__context__
    return None


def _no_space_words(words: str, where: str | os.PathLike) -> str:
    where = os.fspath(where)
    if is_remote(where):
        return f"{words} writing {where}"
    existing = pathlib.Path(os.path.expanduser(where)).absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    return (f"{words} writing {where} ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on its "
            "file system)")


_STORE_ERROR_MODULES = ("aiohttp", "gcsfs", "google", "requests", "urllib3", "s3fs", "botocore")
_STORE_STATUS = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:")  # TensorStore's words for a store that is gone


def store_failure(e: BaseException | None, url: str | os.PathLike) -> str | None:
    """When `url` is on object storage and `e` (or one of its causes) is the store failing (unreachable, timing
    out, answering with errors, after the clients' own retries), the error in words naming the URL; else None."""
    if not is_remote(url):
        return None
    for _ in range(8):
        if e is None:
            return None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.partition(".")[0] in \
                _STORE_ERROR_MODULES or any(status in str(e) for status in _STORE_STATUS):
            return f"object storage failed under {os.fspath(url)}: {type(e).__name__}: {first}"
        e = e.__cause__ or e.__context__
    return None


def probe(url: str | os.PathLike, timeout_s: float = 10.0) -> str | None:
    """One HTTP request to the object store of `url` (its bucket): None when the store answers (any status below
    500, a refusal of the anonymous request included: the store is there), else what went wrong, in words. No
    client library and no retries: this asks whether the store is reachable now, at most `timeout_s` seconds."""
    scheme, rest = os.fspath(url).split("://", 1)
    bucket = rest.split("/", 1)[0]
    if scheme == "gs":
        host = os.environ.get("STORAGE_EMULATOR_HOST", "")
        base = ("https://storage.googleapis.com" if host in ("", "default") else
                host if host.startswith(("http://", "https://")) else f"http://{host}")
        target = f"{base.rstrip('/')}/storage/v1/b/{bucket}?fields=name"
    else:
        base = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
        target = f"{base.rstrip('/')}/{bucket}"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    return None if status < 500 else f"HTTP status {status} from {target}"


class StoreWatch:
    """While a run writes to object storage: a thread that asks the store every `every_s` seconds whether it
    answers (`probe`), and calls `on_down(words)` once (from that thread) when it has not answered for `timeout_s`
    seconds in a row. The clients' own retries wait out a short outage; this bounds a long one, wherever the run
    waits for the store (TensorStore retries a write for up to ~15 minutes, a request to a host that drops packets
    waits minutes per try). A context manager; nothing to do for a local `url`."""

    def __init__(self, url: str | os.PathLike, timeout_s: float, on_down, probe=probe, every_s: float | None = None):
        self.url, self.timeout_s, self.on_down, self.probe = os.fspath(url), timeout_s, on_down, probe
        self.every_s = every_s if every_s is not None else min(10.0, timeout_s / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StoreWatch":
        if is_remote(self.url):
            self._thread = threading.Thread(target=self._watch, name="dpojax-store-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # not joined: a probe under way (at most 10 s) must not hold the end of the run

    def _watch(self) -> None:
        down_since = None
        while not self._stop.wait(self.every_s):
            asked = time.monotonic()
            error = self.probe(self.url, min(10.0, self.timeout_s))
            if error is None:
                down_since = None
                continue
            down_since = asked if down_since is None else down_since
            if time.monotonic() - down_since >= self.timeout_s and not self._stop.is_set():
                self.on_down(f"object storage failed under {self.url}: it has not answered for "
                             f"{time.monotonic() - down_since:.0f} s ({error})")
                return


def makedirs(p: str | os.PathLike) -> None:
    """A folder locally; nothing to do on object storage (prefixes need no folder objects)."""
    if not is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two places (local, gs://, s3://), streamed in chunks."""
    if not is_remote(dst):
        pathlib.Path(os.path.expanduser(os.fspath(dst))).parent.mkdir(parents=True, exist_ok=True)
    with path(src).open("rb") as fin, path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


class LineAppender:
    """Adds lines to a text file (metrics.jsonl, samples.jsonl): appended to a local file; on object storage, which
    has no append, the file's lines are kept in memory and the whole object is rewritten at most every
    `flush_every_s` seconds and at every `flush()`. `enabled=False` (a process other than 0) writes nothing."""

    def __init__(self, dst: str | os.PathLike, enabled: bool = True, flush_every_s: float = 30.0):
        self.path, self.enabled, self.flush_every_s = path(dst), enabled, flush_every_s
        self.remote = is_remote(dst)
        self._text: list[str] = []
        self._dirty, self._flushed_at = False, float("-inf")
        if enabled and self.remote and self.path.exists():
            text = self.path.read_text()
            self._text = [text if text.endswith("\n") or not text else text + "\n"]
        elif enabled and not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, line: str) -> None:
        if not self.enabled:
            return
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line + "\n")
            return
        self._text.append(line + "\n")
        self._dirty = True
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Make every line added so far durable (local appends already are)."""
        if self.enabled and self.remote and self._dirty:
            write_text(self.path, "".join(self._text))
            self._dirty, self._flushed_at = False, time.monotonic()

    close = flush


def staging_dir() -> pathlib.Path:
    """A new, empty local folder for files bound for object storage (`upload_tree`); the caller removes it."""
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(dir=root))


def upload_tree(local: pathlib.Path, dst: str | os.PathLike) -> None:
    """Every file under the local folder `local` copied to the same relative place under `dst` (whole files)."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        copy_file(f, path(dst) / f.relative_to(local).as_posix())


# ------------------------------------------------------------------------------------------ local mirrors
def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DPOJAX_CACHE", "~/.cache/dpojax")).expanduser()


def _fs(url: str):
    import fsspec  # optional dependency, needed only for gs:// and s3:// URLs

    return fsspec.filesystem(url.split("://", 1)[0])


def _stamp(info: dict) -> str:
    """What identifies one version of an object: size plus the store's checksum or generation."""
    for key in ("md5Hash", "crc32c", "generation", "ETag", "etag", "mtime", "updated"):
        if info.get(key):
            return f"{info.get('size')}:{info[key]}"
    return str(info.get("size"))


def local_copy(url: str | os.PathLike, patterns: Iterable[str] | None = None) -> pathlib.Path:
    """A local path holding the same bytes as `url`: the path itself when local; for a URL, a mirror under
    `$DPOJAX_CACHE/remote/` of the file, or of the folder's files (recursively; only names matching `patterns`
    when given). A file is downloaded again only when its size or checksum changed."""
    text = os.fspath(url)
    if not is_remote(text):
        return pathlib.Path(os.path.expanduser(text))
    fs, text = _fs(text), text.rstrip("/")
    scheme, key = text.split("://", 1)
    dest = cache_root() / "remote" / scheme / key
    if fs.isfile(text):
        _download(fs, text, fs.info(text), dest)
        return dest
    found = fs.find(text, detail=True)
    if not found:
        raise StorageError(f"{text}: no such file or folder")
    prefix = text.split("://", 1)[1] + "/"
    for name, info in sorted(found.items()):
        rel = name.split("://", 1)[-1][len(prefix):]
        if rel and (patterns is None or any(fnmatch.fnmatch(pathlib.PurePosixPath(rel).name, p) for p in patterns)):
            _download(fs, f"{scheme}://{name.split('://', 1)[-1]}", info, dest / rel)
    return dest


def _download(fs, url: str, info: dict, dest: pathlib.Path) -> None:
    stamp_file = dest.with_name(f".{dest.name}.stamp")
    stamp = _stamp(info)
    if dest.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    fs.get_file(url, str(tmp))
    os.replace(tmp, dest)  # concurrent processes on one machine each write whole files
    write_text(stamp_file, stamp)


# ------------------------------------------------------------------------------------------ checks at start
def use_emulator_if_set() -> None:
    """With `STORAGE_EMULATOR_HOST` set (a local GCS emulator, as google-cloud-storage and gcsfs read it), point
    tensorstore at it as well, with a placeholder token, and keep gcsfs off the control-plane API that
    emulators lack. Explicit settings win."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


use_emulator_if_set()  # before gcsfs or tensorstore read their settings

_CREDENTIALS_HELP = {
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
          "`gcloud auth application-default login` (on a TPU VM or GCE the VM's service account is used)",
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
}
_PACKAGE = {"gs": "gcsfs", "s3": "s3fs"}


def check_urls(urls: Iterable[tuple[str, str | None]], written: Iterable[str] = ()) -> None:
    """Fail early, with one line naming the URL and the fix, when an object-store URL in `urls` ((what, url)
    pairs, checked in order; local paths and None are skipped) lacks its client package, credentials, or bucket;
    or, when its `what` is in `written` (e.g. "output_dir"), when an object cannot be written there and deleted."""
    urls = [(what, url) for what, url in urls if url is not None and is_remote(url)]
    writes = {url: what for what, url in urls if what in set(written)}
    seen = set()
    for what, url in urls:
        if url in seen:
            continue
        seen.add(url)
        scheme = url.split("://", 1)[0]
        _check_package(what, url, scheme)
        if scheme == "gs":
            _check_gcs_credentials(what, url)
        _check_bucket(what, url, scheme)
        if url in writes:
            _check_writable(writes[url], url)


def _check_package(what: str, url: str, scheme: str) -> None:
    if importlib.util.find_spec(_PACKAGE[scheme]) is None:
        raise StorageError(f"{what} '{url}': reading and writing {scheme}:// needs the {_PACKAGE[scheme]} package: "
                           f"pip install 'dpojax[gcs]' (or pip install {_PACKAGE[scheme]})")


def _check_gcs_credentials(what: str, url: str) -> None:
    if os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        return
    import google.auth  # optional dependency, needed only for gs:// URLs
    import google.auth.exceptions  # as above

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        raise StorageError(f"{what} '{url}': no Google Cloud credentials found; {_CREDENTIALS_HELP['gs']}") from None


def _check_bucket(what: str, url: str, scheme: str) -> None:
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{what} '{url}': the URL names no bucket (expected {scheme}://BUCKET/PATH)")
    try:
        fs = _fs(url)
        fs.invalidate_cache()
        fs.ls(f"{scheme}://{bucket}", detail=False)  # one listing: needs only object-list permission
    except FileNotFoundError:
        raise StorageError(f"{what} '{url}': bucket '{bucket}' does not exist; create it (gcloud storage buckets "
                           f"create {scheme}://{bucket}) or fix the URL") from None
    except Exception as e:  # noqa: BLE001 - 401/403 and the like (gcsfs raises HttpError or OSError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"{what} '{url}': cannot access bucket '{bucket}' ({first}); "
                           f"{_CREDENTIALS_HELP[scheme]}, with permission to list and write objects") from None


PROBE = ".dpojax-probe"


def _check_writable(what: str, url: str) -> None:
    """Write one empty object under `url` and delete it, as every later write, overwrite (metrics.jsonl) and
    Orbax's pruning of old checkpoints will. The name is unique to the process: every host of a pod probes."""
    probe = path(url) / f"{PROBE}-{socket.gethostname()}-{os.getpid()}"
    try:
        write_bytes(probe, b"")
        probe.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - 403 (HttpError), 404 or 412 raised as OSError subclasses, ...
        first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        raise StorageError(f"{what} '{url}': cannot create and delete objects there ({first}); grant the account "
                           f"write access to bucket '{bucket}' (on GCS the Storage Object User role: create, "
                           f"overwrite, delete) or choose another {what}") from None
