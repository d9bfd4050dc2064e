"""validate: raw JSONL -> clean rows + rejects, every input line accounted for.

    finetune validate --input data/raw/train.jsonl --output data/clean/train.jsonl \
        --rejects data/rejects/train.jsonl --report metrics/validate_train.json
    (dvc.yaml stage `validate@train`; params: data, validate)

Inputs: one JSON object a line, UTF-8 (a BOM and CRLF endings are accepted), in one of the shapes
  qa      {"input": str, "output": str}            (the seed's shape)
  alpaca  {"instruction": str, "input"?: str, "output": str}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
after renaming fields by `data.field_map`. Extra fields are ignored.
Outputs: clean rows `{"id", "messages"}` (id = content hash of the normalised messages); rejects
`{"line", "reason", "detail", "raw"}`; a report of counts. Invariant: kept + rejected + blank = lines read.

Streaming: the input is cut into blocks of whole lines (~4 MB, `jsonl.block_spans`); each block is
checked on its own, in a worker process a core for inputs over 16 MB, and the blocks' results are
settled in input order: duplicates rejected, lines numbered, outputs appended to temporary files that
are renamed into place only at the end. Memory: a few blocks in flight, plus the one thing that must
grow, the de-duplication index: 8 bytes a unique row in sorted numpy runs (1M rows = 8 MB; a Python
set of ints would take ~90 MB).
Speed (~10 us a row on one core here; two workers give ~1.4x): orjson parses the raw bytes (it also
checks the UTF-8, so only failing lines are decoded in Python); a plain-Python check accepts the valid
shapes, and only rows it refuses go to the compiled schema (fastjsonschema) and, when that fails too,
to jsonschema itself for a precise message; texts from lines without escapes skip the control-character
scan; the messages are serialised once, for both the id hash and the output line; the cyclic garbage
collector is paused while a block is checked.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import unicodedata
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fastjsonschema
import jsonschema
import numpy as np
import orjson

from stages.errors import StageError
from stages.jsonl import (
    atomic_path,
    atomic_writer,
    block_lines,
    block_spans,
    cpu_count,
    dumps,
    gc_paused,
    map_ordered,
    read_span,
    write_json,
)
from stages.params import DataParams, ValidateParams

REASONS = ("invalid_json", "not_an_object", "schema", "empty_field", "duplicate", "too_long", "bad_encoding")
PARALLEL_MIN_BYTES = 16 << 20  # inputs from 16 MB (~50k rows) use a worker per core; smaller ones run here

_TEXT = {"type": "string"}
_ROLES = ("system", "user", "assistant")
SCHEMAS = {
    "qa": {"type": "object", "required": ["input", "output"], "properties": {"input": _TEXT, "output": _TEXT}},
    "alpaca": {
        "type": "object",
        "required": ["instruction", "output"],
        "properties": {"instruction": _TEXT, "input": _TEXT, "output": _TEXT},
    },
    "chat": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {"role": {"enum": list(_ROLES)}, "content": _TEXT},
                },
                "contains": {"type": "object", "properties": {"role": {"const": "assistant"}}},
            }
        },
    },
}
_FAST = {name: fastjsonschema.compile(schema) for name, schema in SCHEMAS.items()}
_SLOW = {name: jsonschema.Draft202012Validator(schema) for name, schema in SCHEMAS.items()}

# Control characters go, except tab and newline: C0, DEL and C1 (NUL included; \r as well, so CRLF
# inside a text becomes LF). All are unprintable, so `str.isprintable()` (a fast C loop) rules them out
# for most texts before the slower search and translate.
_CONTROL = {c: None for c in [*range(0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BOM = b"\xef\xbb\xbf"
_SHA256 = hashlib.sha256()


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Counts:
    lines: int = 0
    blank: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)

    def report(self) -> dict:
        rejected = sum(self.rejected.values())
        out = {"lines": self.lines, "blank": self.blank, "kept": self.kept, "rejected": rejected}
        out["reject_fraction"] = round(rejected / max(1, self.lines - self.blank), 6)
        out.update({f"rejected_{r}": self.rejected.get(r, 0) for r in REASONS})
        return out


def normalise(text: str, escaped: bool = True) -> str:
    """Control characters out (tab and newline stay), NFC, whitespace trimmed. escaped=False promises the
    text comes from a raw line with no backslash and no DEL: then an ASCII text holds no control character
    (JSON allows none raw), and the check (~0.8 us a text here) is skipped."""
    is_ascii = text.isascii()  # O(1) on a str; ASCII is NFC already
    if (escaped or not is_ascii) and not text.isprintable() and _CONTROL_RE.search(text):
        text = text.translate(_CONTROL)
    if not is_ascii:
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def detect_shape(obj: dict, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if "messages" in obj:
        return "chat"
    return "alpaca" if "instruction" in obj else "qa"


def fits_schema(obj: dict, shape: str) -> bool:
    """The schema check for rows that pass it, in plain Python (~0.3 us against ~3 us compiled). It may
    say False for a valid row (the compiled schema then decides), never True for an invalid one."""
    if shape == "qa":
        return type(obj.get("input")) is str and type(obj.get("output")) is str
    if shape == "alpaca":
        return (type(obj.get("instruction")) is str and type(obj.get("output")) is str
                and type(obj.get("input", "")) is str)
    messages = obj.get("messages")
    return (type(messages) is list and len(messages) >= 2
            and all(type(m) is dict and m.get("role") in _ROLES and type(m.get("content")) is str for m in messages)
            and any(m["role"] == "assistant" for m in messages))


def check_schema(obj: dict, shape: str) -> None:
    """For a row that `fits_schema` did not accept: the compiled schema, then jsonschema for the message."""
    try:
        _FAST[shape](obj)
    except fastjsonschema.JsonSchemaException:
        error = jsonschema.exceptions.best_match(_SLOW[shape].iter_errors(obj))
        where = "/".join(str(p) for p in error.absolute_path) or "row"
        raise Reject("schema", f"{shape} row: at '{where}': {error.message[:300]}") from None


def empty(where: str) -> Reject:
    return Reject("empty_field", f"'{where}' is empty after trimming whitespace and control characters")


def to_messages(obj: dict, shape: str, escaped: bool = True) -> tuple[list[dict], int]:
    """(the row in canonical chat form with its texts normalised, their length in characters); raises
    Reject for an empty text. `escaped`: see `normalise`."""
    if shape == "qa":
        question, answer = normalise(obj["input"], escaped), normalise(obj["output"], escaped)
        if not question or not answer:
            raise empty("output" if question else "input")
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], \
            len(question) + len(answer)
    if shape == "alpaca":
        instruction, answer = normalise(obj["instruction"], escaped), normalise(obj["output"], escaped)
        if not instruction or not answer:
            raise empty("output" if instruction else "instruction")
        extra = normalise(obj.get("input", ""), escaped)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], len(user) + len(answer)
    messages = [{"role": m["role"], "content": normalise(m["content"], escaped)} for m in obj["messages"]]
    for i, m in enumerate(messages):
        if not m["content"]:
            raise empty(f"messages[{i}].content")
    return messages, sum(len(m["content"]) for m in messages)


def decode(raw: bytes) -> str:
    """A raw line as text, without its line ending; raises Reject if it is not UTF-8."""
    raw = raw.rstrip(b"\r\n")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("bad_encoding", f"not UTF-8: {e}") from None


def check_row(raw: bytes, data: DataParams, limits: ValidateParams) -> list[dict] | None:
    """One raw line (bytes, BOM removed) -> its normalised messages, or None for a blank line.
    Raises Reject."""
    try:
        obj = orjson.loads(raw)  # takes the bytes as they are: checks UTF-8, ignores the CR/LF ending
    except orjson.JSONDecodeError:
        text = decode(raw)  # bad_encoding is raised here, before any JSON verdict
        if not text.strip():
            return None
        try:  # again on the text without its line ending, for the error message (a failing row only)
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise Reject("invalid_json", f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Reject("not_an_object", f"a JSON {type(obj).__name__} where an object was expected")
    if data.field_map:
        obj = {data.field_map.get(k, k): v for k, v in obj.items()}
    shape = detect_shape(obj, data.format)
    if not fits_schema(obj, shape):
        check_schema(obj, shape)
    # find, not `in`: bytes.__contains__ first tries the needle as an int, raising and clearing a TypeError
    messages, n_chars = to_messages(obj, shape, escaped=raw.find(b"\\") >= 0 or raw.find(b"\x7f") >= 0)
    if n_chars > limits.max_chars:
        raise Reject("too_long", f"{n_chars} characters > validate.max_chars={limits.max_chars}")
    return messages


class SeenKeys:
    """Exact de-duplication on 64-bit keys, a batch at a time: sorted numpy runs (8 bytes a key), merged
    like a binary counter so each key is copied O(log n) times; a lookup is a searchsorted per run."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """For each key, whether this is its first occurrence (in earlier batches, then earlier in `keys`)."""
        unique, first = np.unique(keys, return_index=True)  # first index of each distinct key in the batch
        new = np.ones(len(unique), dtype=bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, unique), len(run) - 1)
            new &= run[pos] != unique
        fresh = np.zeros(len(keys), dtype=bool)
        fresh[first[new]] = True
        if new.any():
            self.runs.append(unique[new])
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()  # two sorted runs: a stable sort merges them in linear time
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]), kind="stable")
        return fresh


@dataclass
class Checked:
    """What `check_block` made of one block of lines; line numbers count from 1 in the block."""

    lines: int = 0
    blank: int = 0
    clean: bytearray = field(default_factory=bytearray)  # output lines of the rows that passed, end to end
    ends: array = field(default_factory=lambda: array("q"))  # where each of those lines ends in `clean`
    where: array = field(default_factory=lambda: array("q"))  # their line numbers
    starts: array = field(default_factory=lambda: array("q"))  # where their raw lines start in the block
    keys: bytearray = field(default_factory=bytearray)  # their 8-byte de-duplication keys, end to end
    rejects: list[tuple[int, str, str, bytes]] = field(default_factory=list)  # (line number, reason, detail, raw)


def check_block(block: bytes, data: DataParams, limits: ValidateParams, file_start: bool = True) -> Checked:
    """Every line of a block checked on its own (duplicates are settled later, across blocks). Pure:
    runs in a worker process for large files. `file_start`: the block begins the file (may hold a BOM)."""
    lines = block_lines(block)
    offset = 0  # of the next line in the block
    if file_start and lines and lines[0].startswith(_BOM):
        lines[0], offset = lines[0][3:], 3
    out = Checked(lines=len(lines))
    clean, keys = out.clean, out.keys
    ends, where, starts = [], [], []  # lists while filling (array.append parses its argument: 3x slower)
    with gc_paused():
        for n, raw in enumerate(lines, start=1):
            start, offset = offset, offset + len(raw) + 1
            if not raw or raw.isspace():  # an ASCII-blank line, caught without a call
                out.blank += 1
                continue
            try:
                messages = check_row(raw, data, limits)
            except Reject as r:
                out.rejects.append((n, r.reason, r.detail, raw))
                continue
            if messages is None:
                out.blank += 1
                continue
            body = orjson.dumps(messages)  # serialised once: hashed for the id, then written as is
            sha = _SHA256.copy()  # cheaper than a new hash object (~0.3 us a row)
            sha.update(body)
            key = sha.digest()[:8]
            clean += b'{"id":"'  # appending to one bytearray: no intermediate copies of the line
            clean += key.hex().encode()
            clean += b'","messages":'
            clean += body
            clean += b"}\n"
            ends.append(len(clean))
            where.append(n)
            starts.append(start)
            keys += key
    out.ends, out.where, out.starts = array("q", ends), array("q", where), array("q", starts)
    return out


def reject_line(n: int, reason: str, detail: str, raw: bytes) -> bytes:
    text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
    return dumps({"line": n, "reason": reason, "detail": detail, "raw": text})


def settle(checked: Checked, first_line: int, clean: bytes, seen: SeenKeys,
           raw_between: Callable[[int, int | None], bytes], counts: Counts) -> tuple[list, bytes]:
    """A checked block's (clean lines, as pieces to write in order; rejects lines) once its duplicates
    are known; updates `counts`. Blocks come in input order, the first at line `first_line`: the first
    occurrence of a row is kept, later ones are rejected. `raw_between(start, end)`: bytes of the block,
    for the reject of a duplicate."""
    counts.lines += checked.lines
    counts.blank += checked.blank
    fresh = seen.first_seen(np.frombuffer(bytes(checked.keys), dtype="<u8"))  # as int.from_bytes(.., "little")
    rejects = checked.rejects
    pieces, start = [], 0
    dups = np.flatnonzero(~fresh).tolist()  # a few a block: ~0.15% of rows
    for i in dups:  # cut the duplicates out of `clean`, keeping the stretches between them
        pieces.append(memoryview(clean)[start:checked.ends[i - 1] if i else 0])
        start = checked.ends[i]
        raw = raw_between(checked.starts[i], checked.starts[i + 1] if i + 1 < len(checked.starts) else None)
        rejects.append((checked.where[i], "duplicate", "same text as an earlier row after normalisation",
                        raw.split(b"\n", 1)[0]))
    pieces.append(memoryview(clean)[start:])
    if dups:
        rejects.sort(key=lambda r: r[0])
    counts.kept += len(fresh) - len(dups)
    counts.rejected.update(reason for _, reason, _, _ in rejects)
    return pieces, b"".join(reject_line(first_line + n - 1, reason, detail, raw) for n, reason, detail, raw in rejects)


def check_part(input: str, offset: int, size: int, data: DataParams, limits: ValidateParams, part: str) -> Checked:
    """One task, in a worker process for large files: read a block of the input, check it, write its
    clean lines to the file `part`. Files, not pipes, carry the blocks: a pipe costs the parent ~2 us a row."""
    checked = check_block(read_span(input, offset, size), data, limits, file_start=offset == 0)
    with open(part, "wb") as f:
        f.write(checked.clean)
    checked.clean = bytearray()
    return checked


def block_bytes(input: Path, offset: int, size: int, start: int, end: int | None) -> bytes:
    """Bytes [start, end) of the block at `offset` (end None: to its end), read again: for the reject of
    a duplicate, a few times a block."""
    return read_span(input, offset + start, (end or size) - start)


def run(input: Path, output: Path, rejects: Path, report: Path | None, data: DataParams,
        limits: ValidateParams) -> dict:
    if not input.exists():
        raise StageError(f"{input}: no such file (point --input at a JSONL file of rows)")
    counts, seen, first_line = Counts(), SeenKeys(), 1
    workers = cpu_count() if input.stat().st_size >= PARALLEL_MIN_BYTES else 1
    with atomic_path(output) as tmp, open(tmp, "wb", buffering=1 << 20) as good, atomic_writer(rejects) as bad:
        tasks = ((str(input), offset, size, data, limits, str(tmp.parent / f"part-{offset}"))
                 for offset, size in block_spans(input))
        for (_, offset, size, *_, part), checked in map_ordered(check_part, tasks, workers):
            with open(part, "rb") as f:
                clean = f.read()
            os.unlink(part)
            raw_between = functools.partial(block_bytes, input, offset, size)
            pieces, rejected = settle(checked, first_line, clean, seen, raw_between, counts)
            good.writelines(pieces)
            bad.write(rejected)
            first_line += checked.lines
    summary = counts.report()
    if report:
        write_json(report, summary)
    assert summary["kept"] + summary["rejected"] + summary["blank"] == summary["lines"]
    by_reason = ", ".join(f"{r}={c}" for r, c in counts.rejected.most_common()) or "none"
    print(f"validate {input}: {summary['lines']} lines, kept {summary['kept']}, blank {summary['blank']}, "
          f"rejected {summary['rejected']} ({by_reason})", file=sys.stderr)
    if summary["reject_fraction"] > limits.max_reject_fraction:
        raise StageError(
            f"{input}: {summary['rejected']} of {summary['lines'] - summary['blank']} rows rejected "
            f"({summary['reject_fraction']:.1%} > validate.max_reject_fraction={limits.max_reject_fraction}); "
            f"see {rejects} for each line and reason, fix the data or raise the limit in params.yaml"
        )
    return summary
