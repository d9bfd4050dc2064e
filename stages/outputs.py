"""Output paths: checked before a stage starts, written beside their targets, committed together.

A stage writes only its declared outputs and replaces only what is its own kind of output:

- `check(inputs, outputs)` runs before anything is read or written (each command in stages/cli.py
  calls it with its options). It refuses, with one line naming the option, the path and the fix: an
  output whose parent is a file; a device or pipe (/dev/null, /dev/stdout); a folder where a file
  goes or a file where a folder goes; an output equal to an input or to another output, or inside
  one (or holding one); an existing path that is not this stage's own kind of output (`Kind.own`:
  e.g. a clean JSONL whose first row has id and messages, a tokenized dataset folder with
  state.json); a destination that is read-only. A missing path, an empty file and an empty folder
  are fine.
- `staged(*paths)` gives a temporary path beside each target (in a hidden folder `.NAME.tmp<pid>-...`
  of the same parent, so on the same file system) and, when the block ends without an error, renames
  them all into place: either all the new outputs or all the old ones (a rename that fails puts back
  those already moved). On an error nothing at the targets changes; a write that fails (read-only,
  full disk) is one line naming the path. The temporary folders go at the end, and those of a run that
  was killed go at the next run (a previous output moved aside by a run killed while committing is
  put back first).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from stages.errors import StageError


# --- what each kind of output looks like ------------------------------------------------------------

def first_row_has(*keys: str) -> Callable[[Path], bool]:
    """A JSONL file whose first non-blank line is an object with these keys."""
    def test(path: Path) -> bool:
        with open(path, "rb") as f:
            for line in iter(lambda: f.readline(1 << 24), b""):
                if line.strip():
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        return False
                    return isinstance(row, dict) and all(k in row for k in keys)
        return True
    return test


def json_object(path: Path) -> bool:
    """A small JSON file holding one object (a metrics or report file)."""
    if path.stat().st_size > 1 << 24:
        return False
    text = path.read_bytes()
    try:
        return not text.strip() or isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def folder_with(*names: str) -> Callable[[Path], bool]:
    """A folder that holds these files (or is empty)."""
    def test(path: Path) -> bool:
        return not any(path.iterdir()) or all((path / n).is_file() for n in names)
    return test


def only_files(suffix: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        return all(p.is_file() and p.name.endswith(suffix) for p in path.iterdir())
    return test


@dataclass(frozen=True)
class Kind:
    what: str  # in messages: "a clean JSONL (first row with id and messages)"
    folder: bool
    own: Callable[[Path], bool]  # whether an existing, non-empty path is this kind of output


CLEAN = Kind("clean rows (a JSONL whose rows have id and messages)", False, first_row_has("id", "messages"))
LEAKAGE = Kind("a leakage report (a JSONL whose rows have eval_id and kind)", False, first_row_has("eval_id", "kind"))
REJECTS = Kind("rejects (a JSONL whose rows have a reason)", False, first_row_has("reason"))
PROMPTS = Kind("prompt rows (a JSONL whose rows have id, prompt and completion)", False,
               first_row_has("id", "prompt", "completion"))
SAMPLES = Kind("eval samples (a JSONL whose rows have id, prompt and reference)", False,
               first_row_has("id", "prompt", "reference"))
METRICS = Kind("a metrics file (a JSON object)", False, json_object)
TOKENIZED = Kind("a tokenized dataset (a folder with state.json and dataset_info.json)", True,
                 folder_with("state.json", "dataset_info.json"))
BASE = Kind("a base model (a folder with base.json)", True, folder_with("base.json"))
ADAPTER = Kind("a LoRA adapter (a folder with adapter_config.json)", True,
               folder_with("adapter_config.json"))
MERGED = Kind("a merged model (a folder with config.json and lineage.json)", True,
              folder_with("config.json", "lineage.json"))
GGUF = Kind("GGUF files (a folder with parity.json)", True, folder_with("parity.json"))
PLOTS = Kind("plots (a folder of .csv files)", True, only_files(".csv"))
LIVE = Kind("a DVCLive folder (metrics.json and plots/)", True,
            lambda path: all(p.name in ("metrics.json", "plots") for p in path.iterdir()))
CHECKPOINTS = Kind("checkpoints (a folder of run folders)", True, lambda path: True)  # written in, kept


def starts_with(marker: bytes, within: int) -> Callable[[Path], bool]:
    """A file whose first `within` bytes hold `marker`."""
    def test(path: Path) -> bool:
        with open(path, "rb") as f:
            return marker in f.read(within)
    return test


REPORT = Kind("a run report (an HTML page written by finetune report)", False,
              starts_with(b'<meta name="generator" content="finetune report">', 512))
SCREENSHOT = Kind("a screenshot (a PNG file)", False, starts_with(b"\x89PNG\r\n\x1a\n", 8))


# --- the check before a stage starts ----------------------------------------------------------------

def _is_empty(path: Path) -> bool:
    return not any(path.iterdir()) if path.is_dir() else path.stat().st_size == 0


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check(inputs: dict[str, Path | Iterable[Path] | None],
          outputs: dict[str, tuple[Path | None, Kind]]) -> None:
    """Refuse (StageError, one line) outputs that would lose something; see the module docstring.
    `inputs`: option -> path(s) the command reads; `outputs`: option -> (path or None, its Kind)."""
    ins = [(opt, Path(p)) for opt, ps in inputs.items() if ps is not None
           for p in ([ps] if isinstance(ps, (str, Path)) else ps)]
    outs = [(opt, Path(p), kind) for opt, (p, kind) in outputs.items() if p is not None]
    for opt, path, kind in outs:
        parent = next((p for p in path.parents if os.path.lexists(p)), path)  # "." or "/" at the last
        if not parent.is_dir():
            raise StageError(f"{opt} {path}: {parent} is a file, not a folder; choose a path in a folder")
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise StageError(f"{opt} {path} is a device, pipe or socket, not a file a stage can replace; "
                             "give the path of a file (to see a report, print the file afterwards)")
        if path.exists() and path.is_dir() != kind.folder:
            has, needs = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
            raise StageError(f"{opt} {path} is {has}, where {opt} takes {needs}: {kind.what}; "
                             f"give the path of {needs}")
        if not os.access(parent, os.W_OK):
            raise StageError(f"{opt} {path}: cannot write in {parent} (read-only file system or no "
                             "permission); choose a writable path")
    real = [(opt, path, path.resolve()) for opt, path, _ in outs]
    for i, (opt, path, r) in enumerate(real):
        for iopt, ipath in ins:
            ir = ipath.resolve()
            if r == ir:
                raise StageError(f"{opt} {path} is also the input {iopt}; give the output a path of its own")
            if _within(r, ir) or _within(ir, r):
                inner, outer = (f"{opt} {path}", f"the input {iopt} {ipath}") if _within(r, ir) else \
                    (f"the input {iopt} {ipath}", f"{opt} {path}")
                raise StageError(f"{inner} is inside {outer}; keep outputs and inputs apart")
        for opt2, path2, r2 in real[:i]:
            if r == r2:
                raise StageError(f"{opt} {path} is also {opt2}; give each output a path of its own")
            if _within(r, r2) or _within(r2, r):
                inner, outer = (f"{opt} {path}", f"{opt2} {path2}") if _within(r, r2) else \
                    (f"{opt2} {path2}", f"{opt} {path}")
                raise StageError(f"{inner} is inside {outer}, which the stage replaces; give each output "
                                 "a path of its own")
    for opt, path, kind in outs:
        if path.exists() and not _is_empty(path) and not kind.own(path):
            raise StageError(f"{opt} {path} exists and is not {kind.what}; a stage replaces only its own "
                             "outputs: move it away or choose another path")


# --- writing ----------------------------------------------------------------------------------------

_TMP = ".tmp"
_TMP_FOLDER = re.compile(r"\..+\.tmp\d+-[^/]+")  # ".NAME.tmp<pid>-<random>", as `staged` names them


def _shown(path: Path) -> Path:
    """The path a user asked for: without the temporary folders of `staged` (which may be nested, as when
    a report is written with `jsonl.write_json` into the temporary path of an output)."""
    return Path(*(part for part in path.parts if not _TMP_FOLDER.fullmatch(part)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _clear_stale(path: Path) -> None:
    """Remove the temporary folders beside `path` left by runs that were killed (SIGKILL, power cut):
    those whose process (the pid in the name) is gone, and those of unknown origin. A run killed while
    committing, between moving the previous output aside and the new one in, left the previous one
    there: it goes back to `path`."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}{_TMP}*"):
        pid = stale.name[1 + len(path.name) + len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # a run still going (a parallel one): its folder stays
        if not os.path.lexists(path) and os.path.lexists(stale / ".previous"):
            os.replace(stale / ".previous", path)
        shutil.rmtree(stale, ignore_errors=True)


def _owns(target: Path, name: Path) -> bool:
    """Whether the file `name` (absolute) is the target, in it, one of its temporary folders or a
    parent folder made for it."""
    target = target.absolute()
    return _within(name, target) or _within(target, name) or any(
        p.parent == target.parent and p.name.startswith(f".{target.name}{_TMP}")
        for p in (name, *name.parents))


def _full(paths: list[Path]) -> list[Path]:
    full = []
    for p in paths:
        with contextlib.suppress(OSError):
            s = os.statvfs(p.parent)
            if s.f_bavail * s.f_frsize < 1 << 20:
                full.append(p)
    return full or paths


def _write_error(e: OSError, targets: list[Path], committing: bool) -> StageError | None:
    """The one-line error for an OSError met while writing the outputs; None if it is about something else."""
    where = None
    if e.filename:
        name = Path(os.fsdecode(e.filename)).absolute()
        where = [t for t in targets if _owns(t, name)]
        if not where:
            return None  # an input, or a file of the stage's own: not ours to explain
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = _full(targets)
    paths = ", ".join(str(_shown(t)) for t in (where or targets))
    step = "cannot move the new output into place at" if committing else "cannot write"
    return StageError(f"{step} {paths} ({e.strerror or e}); nothing was replaced, the previous outputs "
                      "are as they were: free space, make the folder writable or choose another path")


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each (temporary, target) into place; if one fails, put back those already done."""
    done = []  # (target, temporary, where the previous target went or None, placed)
    try:
        for tmp, target in pairs:
            if not os.path.lexists(tmp):  # not written: the target stays as it is
                continue
            if os.path.lexists(target) and tmp.is_dir() != target.is_dir():
                kinds = ["a folder" if p.is_dir() else "a file" for p in (target, tmp)]
                raise StageError(f"{target}: would replace {kinds[0]} with {kinds[1]}; nothing was replaced")
            previous = None
            if os.path.lexists(target):
                previous = tmp.parent / ".previous"
                os.replace(target, previous)
            done.append([target, tmp, previous, False])
            os.replace(tmp, target)
            done[-1][3] = True
    except BaseException:
        for target, tmp, previous, placed in reversed(done):
            if placed:
                os.replace(target, tmp)
            if previous is not None:
                os.replace(previous, target)
        raise


@contextlib.contextmanager
def staged(*paths: Path | str | None) -> Iterator[list[Path | None]]:
    """A temporary path beside each of `paths` (None for None), in a temporary folder that also takes
    scratch files; on success all are renamed into place (a path the block left unwritten stays as it
    was); on an error nothing at the targets changes. See the module docstring."""
    targets = [Path(p) for p in paths if p is not None]
    tmps: list[Path] = []
    committing = False
    try:
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale(path)
            tmps.append(Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP}{os.getpid()}-", dir=path.parent))
                        / path.name)
        it = iter(tmps)
        yield [None if p is None else next(it) for p in paths]
        committing = True
        _commit(list(zip(tmps, targets)))
    except OSError as e:
        error = _write_error(e, targets, committing)
        if error is None:
            raise
        raise error from e
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp.parent, ignore_errors=True)
