"""JSONL reading and atomic writing, shared by the stages.

Outputs are written to a temporary sibling and renamed into place only when the stage finishes, so an
interrupted or failing stage leaves the previous output untouched and never a half-written file that
DVC could take for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

import orjson

_BUFFER = 1 << 20  # 1 MiB write buffers: few syscalls, flat memory


def dumps(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


def read_jsonl(path: Path | str) -> Iterator[dict]:
    """Rows of a file written by a stage (already clean UTF-8 JSON objects), streamed."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside `path` (file or directory); moves it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: Path | str) -> Iterator[IO[bytes]]:
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=_BUFFER) as f:
        yield f


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_writer(path) as f:
        for row in rows:
            f.write(dumps(row))
            n += 1
    return n


def write_json(path: Path | str, obj) -> None:
    with atomic_writer(path) as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def file_md5(path: Path | str) -> str:
    """md5 of a file's bytes: the value DVC 3 records in dvc.lock for a file dependency."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BUFFER), b""):
            h.update(chunk)
    return h.hexdigest()
