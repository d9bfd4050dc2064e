"""JSONL reading and atomic writing, shared by the stages.

Outputs are written to a temporary sibling and renamed into place only when the stage finishes
(`stages.outputs.staged`; `atomic_path` for a single output), so an interrupted or failing stage leaves
the previous output untouched and never a half-written file that DVC could take for a finished one.

Large inputs are cut into blocks of whole lines (`block_spans`), which `map_ordered` can hand to worker
processes with a bounded number in flight: results come back in input order and memory stays flat
(a few blocks of ~4 MiB) however long the file is. The workers end with the stage's process, even
when it is killed (SIGKILL): none is left computing, or waiting forever, under PID 1.
A split's input is one JSONL file or a folder of them (`sources`: validate reads them, lineage hashes them).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

import orjson

from stages.errors import StageError
from stages.outputs import staged

_BUFFER = 1 << 20  # 1 MiB write buffers: few syscalls, flat memory
BLOCK = 4 << 20  # bytes of whole lines a block: ~13,000 rows of ~300 bytes; one task for a worker
T = TypeVar("T")


def dumps(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


def read_jsonl(path: Path | str) -> Iterator[dict]:
    """Rows of a file written by a stage (already clean UTF-8 JSON objects), streamed."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def block_spans(path: Path | str, size: int = BLOCK) -> Iterator[tuple[int, int]]:
    """(offset, length) of consecutive blocks of whole lines that cover a file, each about `size` bytes
    (more when a line is longer), ending after a b"\\n" or at the end of the file. Found by seeking: the
    caller reads nothing here, each block is read where it is processed."""
    total = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < total:
            end = start + size
            if end >= total:
                end = total
            else:  # move the cut to just after the next newline
                f.seek(end - 1)
                while chunk := f.read(1 << 16):
                    newline = chunk.find(b"\n")
                    if newline >= 0:
                        end += newline
                        break
                    end += len(chunk)
                end = min(end, total)
            yield start, end - start
            start = end


def read_span(path: Path | str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def as_file(path: Path, scratch: Path) -> Path:
    """`path` when it is a regular file; a pipe (`--input /dev/stdin`, `<(...)`, a FIFO), which can be read
    only once and has no size, is first copied into the folder `scratch` (a stage's temporary folder,
    beside its output, removed with it) and the copy returned. A folder is refused."""
    if path.is_file():
        return path
    if path.is_dir():
        raise StageError(f"{path}: a folder where a JSONL file goes (point --input at a file)")
    copy = scratch / f"input-{path.name}"
    with open(path, "rb") as source, open(copy, "wb") as sink:
        while chunk := source.read(_BUFFER):
            sink.write(chunk)
    return copy


def block_lines(block: bytes) -> list[bytes]:
    """The lines of a block (see `block_spans`) without their b"\\n", as iterating the file would give them."""
    lines = block.split(b"\n")
    if not lines[-1]:  # the empty string after the block's final newline is not a line
        lines.pop()
    return lines


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for loops that make many short-lived containers (parsed rows)
    and no reference cycles, where the collector would rescan the same young objects over and over
    (~30% of validate's time). Refcounting still frees everything; the previous state comes back after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# libc's prctl, looked up here: a child between fork and exec (a subprocess preexec_fn) must not dlopen
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent(parent: int) -> None:
    """Make this process end when `parent` (the pid of its parent) does, even killed by SIGKILL: on
    Linux the kernel then sends it SIGKILL (PR_SET_PDEATHSIG, kept across exec); a parent already gone
    ends it now. Safe as a subprocess `preexec_fn`."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _end_with_parent(parent: int) -> None:
    """Worker initializer: `die_with_parent`, and where the kernel cannot do it (not Linux) a thread that
    notices the parent changed and ends the worker within a second."""
    die_with_parent(parent)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def map_ordered(fn: Callable[..., T], tasks: Iterable[tuple], workers: int, in_flight: int = 0
                ) -> Iterator[tuple[tuple, T]]:
    """(task, fn(*task)) for each task, in order; `fn` runs in `workers` processes (in this one when
    workers <= 1). At most `in_flight` tasks (default 2 per worker) are read ahead, so memory stays flat."""
    if workers <= 1:
        for task in tasks:
            yield task, fn(*task)
        return
    # fork starts a worker in milliseconds and inherits the imports; elsewhere spawn, the safe default.
    # An executor, not a Pool: a worker that dies (killed, out of memory) fails the stage, not hangs it.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_end_with_parent,
                               initargs=(os.getpid(),))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.submit(fn, *task)))
            if len(pending) >= (in_flight or 2 * workers):
                task, future = pending.popleft()
                yield task, future.result()
        while pending:
            task, future = pending.popleft()
            yield task, future.result()
    finally:  # on an error or an early stop too: the queued tasks are dropped, the workers end
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """`stages.outputs.staged` for one output: a temporary path beside `path` (file or directory), in a
    temporary directory that also takes scratch files, renamed onto `path` on success."""
    with staged(path) as (tmp,):
        yield tmp


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


def weights_hash(files: list[Path]) -> tuple[str, int]:
    """sha256 over the safetensors files (name + bytes, sorted by name) and their parameter count."""
    from safetensors import safe_open

    h, n_params = hashlib.sha256(), 0
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                n_params += n
    return h.hexdigest(), n_params


def sources(input: Path) -> list[tuple[str, Path]]:
    """(source name, path) of each input file: a folder's `*.jsonl` files by name (the split's sources),
    or the one file (a pipe too) named by its file name. Anything else in a folder is refused rather
    than skipped, so no line is left out unseen; hidden files (.gitignore...) are not data."""
    if not input.is_dir():
        if not input.exists():
            raise StageError(f"{input}: no such file or folder (point --input at a JSONL file, or a folder of them)")
        return [(input.name, input)]
    files = sorted(p for p in input.iterdir() if not p.name.startswith("."))
    other = [p for p in files if not (p.is_file() and p.suffix == ".jsonl")]
    if other:
        raise StageError(f"{other[0]}: not a .jsonl file, in the source folder {input} (every file there is a "
                         "source of the split): move it out, or rename it *.jsonl if it is one")
    if not files:
        raise StageError(f"{input}: a source folder with no .jsonl file in it (put the split's JSONL files there)")
    return [(p.name, p) for p in files]
