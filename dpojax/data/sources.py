"""Read preference rows from a .jsonl/.json/.parquet/.csv file, a saved dataset folder (local or gs:// / s3://),
or a hub dataset id."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from dpojax import paths
from dpojax.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HASH_CHUNK = 1 << 24
_BATCH_ROWS = 1024  # rows per Arrow batch of a parquet file or a `datasets.Dataset` read lazily


@dataclasses.dataclass(frozen=True)
class RowStream:
    """A source's rows, read again (lazily, in order) each time it is iterated: JSON lines line by line, CSV record
    by record, parquet and `datasets` data sets Arrow batch by Arrow batch; a .json file (one JSON document) and a
    list are held whole. `dataset` is the memory-mapped `datasets.Dataset` when the source is one."""

    source: str
    open: Callable[[], Iterator[Any]]
    dataset: Any = None

    def __iter__(self) -> Iterator[Any]:
        return self.open()


def row_stream(spec: str, split: str = "train", *, name: str | None = None, revision: str | None = None,
               data_files: Any = None) -> RowStream:
    """The rows `load_rows` returns, as a RowStream: a file is read lazily at each pass, a data set folder or hub id
    is loaded (memory-mapped) once and read in Arrow batches."""
    path = paths.path(str(spec))
    prefixes = (".", "/", "~", *paths.REMOTE_SCHEMES)
    looks_like_path = path.suffix.lower() in LOCAL_SUFFIXES or str(spec).startswith(prefixes)
    hub = name or revision or data_files
    if (path.is_file() or (looks_like_path and not path.is_dir())) and not hub:
        if not path.is_file():
            raise DataError(f"{spec}: data file not found")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return RowStream(str(spec), lambda: _iter_jsonl(path))
        if suffix == ".csv":
            return RowStream(str(spec), lambda: _iter_csv(path))
        if suffix == ".parquet":
            return RowStream(str(spec), lambda: _iter_parquet(path))
        rows = _load_file(path)
        return RowStream(str(spec), lambda: iter(rows))
    data, source = load_rows(spec, split, name=name, revision=revision, data_files=data_files)
    return RowStream(source, lambda: iter_dataset(data), dataset=data)


def iter_dataset(data: Any) -> Iterator[dict]:
    """The rows of a `datasets.Dataset`, one Arrow batch converted to dicts at a time."""
    for start in range(0, len(data), _BATCH_ROWS):
        yield from data.select(range(start, min(start + _BATCH_ROWS, len(data)))).to_list()


def _iter_jsonl(path: epath.Path) -> Iterator[Any]:
    rows = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no} (row {rows}): invalid JSON: {e}") from e
            rows += 1
            yield row


def _iter_csv(path: epath.Path) -> Iterator[dict]:
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield dict(row)


def _iter_parquet(path: epath.Path) -> Iterator[dict]:
    import pyarrow.parquet as pq  # optional dependency, needed only for .parquet files

    with path.open("rb") as f:
        try:
            batches = pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS)
            for batch in batches:
                yield from batch.to_pylist()
        except Exception as e:  # noqa: BLE001 - any failure becomes one DataError naming the file
            raise DataError(f"{path}: not a readable parquet file: {e}") from e


def load_rows(spec: str, split: str = "train", *, name: str | None = None, revision: str | None = None,
              data_files: Any = None) -> tuple[list[dict] | Any, str]:
    """Rows from a .jsonl/.json/.parquet/.csv file, a dataset folder saved by `save_to_disk` (either local or at a
    gs:// / s3:// URL), or a Hugging Face hub dataset id (or a `datasets` builder such as "json"), with its config
    `name`, `revision` and `data_files`.

    Returns (rows, source_name): a list of dicts (or a `datasets.Dataset` for folders and hub ids) and the name that
    error messages use for this source.
    """
    path = paths.path(str(spec))
    prefixes = (".", "/", "~", *paths.REMOTE_SCHEMES)
    looks_like_path = path.suffix.lower() in LOCAL_SUFFIXES or str(spec).startswith(prefixes)
    hub_args = {k: v for k, v in (("name", name), ("revision", revision), ("data_files", data_files)) if v}
    if (path.is_file() or (looks_like_path and not path.is_dir())) and not hub_args:
        if not path.is_file():
            raise DataError(f"{spec}: data file not found")
        return _load_file(path), str(spec)
    import datasets  # heavy import, only when needed

    source = str(spec) if path.is_dir() and not hub_args else f"{spec}[{split}]"
    if name:
        source = f"{spec}:{name}[{split}]"
    try:
        if path.is_dir() and (path / "state.json").is_file() and not hub_args:
            data = datasets.load_from_disk(str(paths.local_copy(path)))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(str(spec), split=split, **hub_args)
    except Exception as e:  # noqa: BLE001 - any loader failure is a data error for the user
        raise DataError(f"{source}: could not load the dataset: {type(e).__name__}: {e}") from e
    return data, source


def source_digest(spec: str, rows: Any = None) -> str | None:
    """A hash of a source's content without parsing it: a file's bytes, or every file of a saved dataset folder;
    for a hub/builder dataset (`rows` loaded) its `datasets` fingerprint; None when there is no such hash."""
    path = paths.path(str(spec))
    h = hashlib.sha256(str(spec).encode())
    if rows is not None:
        fingerprint = getattr(rows, "_fingerprint", None)
        return None if fingerprint is None else hashlib.sha256(f"{spec}:{fingerprint}".encode()).hexdigest()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with f.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _load_file(path: epath.Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # optional dependency, needed only for .parquet files

        try:
            with path.open("rb") as f:
                return pq.read_table(f).to_pylist()
        except Exception as e:  # noqa: BLE001 - any failure becomes one DataError naming the file
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: epath.Path) -> list[dict]:
    return list(_iter_jsonl(path))


def _read_json(path: epath.Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines saved with a .json suffix
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:  # column-oriented: {"prompt": [...], "chosen": [...], ...}
            keys = list(data)
            return [dict(zip(keys, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
    raise DataError(f"{path}: expected a JSON list of rows or a dict of equal-length columns")
