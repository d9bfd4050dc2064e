"""validate: raw JSONL -> clean rows + rejects, every input line accounted for.

    finetune validate --input data/raw/train.jsonl --output data/clean/train.jsonl \
        --rejects data/rejects/train.jsonl --report metrics/validate_train.json
    (dvc.yaml stage `validate@train`; params: data, validate)

Inputs: one JSON object a line, UTF-8 (a BOM and CRLF endings are accepted), in one of the shapes
  qa      {"input": str, "output": str}            (the seed's shape)
  alpaca  {"instruction": str, "input"?: str, "output": str}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "system"?: str}
          (ShareGPT, with its common variants: `from` user/assistant, and `role`/`content` turns; the
          roles axolotl's sharegpt loader maps by default, SHAREGPT_ROLES; a `system` field, unless blank,
          becomes the first turn), written as a chat row
after renaming fields by `data.field_map`. Extra fields are ignored. The input is a file or a folder
of `*.jsonl` files, the split's sources, read in name order (another file there is refused, hidden
ones are not data); a file may be a pipe (`--input /dev/stdin`, `<(...)`, a FIFO): it is read once
into the stage's temporary folder first.
Outputs: clean rows `{"id", "messages", "source", "line"}` (id = content hash of the normalised
messages; source = the file's name, line = 1-based in it); rejects `{"source", "line", "reason", "detail", "raw"}`, line = 1-based in
that file; a report of counts, for the split and per source under `sources`. Invariant, for each
source and in all: kept + rejected + blank = lines read. A row seen in an earlier source is a duplicate.
An input with no row kept (empty, all blank or all rejected) fails here, after writing the rejects.

Every row has a fate, the one TRL or axolotl would give it, or their crash made a stated reject (each
reason a `rejected_<reason>` count in the report):
- A line that is not UTF-8: `bad_encoding` (alone: the rest of the file goes on); JSON that is not an
  object: `not_an_object`; the same row again after normalisation: `duplicate` (the first one is kept).
- A conversation (chat or sharegpt row) must be what every chat template renders: an optional system turn first, then user and
  assistant turns alternating, from a user turn (Llama 2, Mistral and Gemma templates raise on anything
  else). An assistant turn first, a system turn later, or two user (or assistant) turns in a row:
  rejected, `turn_order`, with the fix in the detail.
- A turn whose role is not one of its shape's (chat: system, user, assistant; sharegpt: SHAREGPT_ROLES):
  rejected, `unknown_role`, naming the role and the ones accepted. A conversation without an assistant
  turn trains nothing: `no_assistant_turn`. An empty conversation or a turn that is not an object with
  text fields: `schema`; an empty turn: `empty_field`, naming the turn.
- Turns after the last assistant turn (a question left unanswered): the row is kept; the trailing turns,
  which would train nothing, are dropped from the clean row (and its id), counted as `trimmed_trailing_turns`.
- A text with no visible character (whitespace, control, or only zero-width/invisible characters:
  U+200B, U+FEFF, U+2060, U+00AD, variation selectors, Hangul fillers...): `empty_field`, as an empty one.
- A line holding bare CR line breaks between its rows (an old-Mac file is one such line): rejected,
  `cr_line_breaks`, with the fix (convert CR to LF); a lone CR before the LF (CRLF) is fine.
- JSON nested deeper than the parser's 1,024 levels: `too_deep`; a field nested deep where text goes:
  `schema`, explained without walking the nesting. Numbers beyond a double (1e400, 400-digit integers):
  `invalid_json`. A line of any size is read; over `validate.max_chars` of text: `too_long`.

Streaming: the input is cut into blocks of whole lines (~4 MB, `jsonl.block_spans`); each block is
checked on its own, in a worker process a core for inputs over 16 MB, and the blocks' results are
settled in input order: duplicates rejected, lines numbered, outputs appended to temporary files that
are renamed into place only at the end. Memory: a few blocks in flight, plus the one thing that must
grow, the de-duplication index: 8 bytes a unique row in sorted numpy runs (1M rows = 8 MB; a Python
set of ints would take ~90 MB), and a fixed 4 MiB bitmap that spares most rows a lookup in them.
Speed (~5 us a row on one core here when the host is quiet, ~8 when it is busy; two workers give
~1.9x): orjson parses the raw bytes (it also checks the UTF-8, so only failing lines are decoded in
Python); a plain-Python check, exactly as strict as SCHEMAS, accepts the valid shapes, and jsonschema
only explains the rows it refuses; the texts of ASCII lines without DEL or control escapes are only
trimmed (the others are normalised text by text); the messages are serialised once, for the id hash,
the too_long check and the output line; the cyclic garbage collector is paused while a block is checked.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import unicodedata
from array import array
from binascii import hexlify
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import jsonschema
import numpy as np
import orjson

from stages.errors import StageError
from stages.jsonl import (
    as_file,
    block_lines,
    block_spans,
    cpu_count,
    dumps,
    gc_paused,
    map_ordered,
    read_span,
    sources,
    write_json,
)
from stages.outputs import staged
from stages.params import DataParams, ValidateParams

REASONS = ("invalid_json", "not_an_object", "schema", "empty_field", "duplicate", "too_long", "bad_encoding",
           "turn_order", "cr_line_breaks", "too_deep", "unknown_role", "no_assistant_turn")
# kept rows changed beyond normalisation, counted in the report: key -> how the summary line says it
NOTES = {"trimmed_trailing_turns": "with the turns after their last assistant turn dropped"}
PARALLEL_MIN_BYTES = 16 << 20  # inputs from 16 MB (~50k rows) use a worker per core; smaller ones run here

_TEXT = {"type": "string"}
_ROLES = ("system", "user", "assistant")
# ShareGPT's roles -> chat roles: the mapping axolotl's sharegpt/chat_template loaders use by default
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_CHAT_ROLES = {r: r for r in _ROLES}
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
                "minItems": 1,
                "items": {"type": "object", "required": ["role", "content"],
                          "properties": {"role": _TEXT, "content": _TEXT}},
            }
        },
    },
    "sharegpt": {  # a turn is {"from", "value"} or, failing a "from", {"role", "content"}
        "type": "object",
        "required": ["conversations"],
        "properties": {
            "conversations": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "if": {"required": ["from"]},
                    "then": {"required": ["value"], "properties": {"from": _TEXT, "value": _TEXT}},
                    "else": {"required": ["role", "content"], "properties": {"role": _TEXT, "content": _TEXT}},
                },
            },
            "system": _TEXT,
        },
    },
}
_SCHEMAS = {name: jsonschema.Draft202012Validator(schema) for name, schema in SCHEMAS.items()}

# Control characters go, except tab and newline: C0, DEL and C1 (NUL included; \r as well, so CRLF
# inside a text becomes LF). All are unprintable, so `str.isprintable()` (a fast C loop) rules them out
# for most texts before the slower search and translate.
_CONTROL = {c: None for c in [*range(0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ESCAPE = re.compile(rb"\\[bfru]")  # JSON escapes that can make one (\u: any character)
_BOM = b"\xef\xbb\xbf"
_USER, _ASSISTANT = b'[{"role":"user","content":', b'},{"role":"assistant","content":'  # see to_body
_SHA256 = hashlib.sha256()
# Characters that show nothing on their own: categories Cc, Cf (U+200B, U+FEFF, U+2060, U+00AD...),
# Z* (spaces), Mn and Me (combining marks, variation selectors), and the blank letters and symbols
# below (Hangul fillers, the braille blank), often used as invisible text.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


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
    notes: Counter = field(default_factory=Counter)  # of kept rows, by NOTES
    first_reject: str = ""  # "SOURCE line N: reason: detail" of the first one, for the no-usable-row error

    def add(self, other: "Counts") -> None:
        self.lines, self.blank, self.kept = self.lines + other.lines, self.blank + other.blank, self.kept + other.kept
        self.rejected.update(other.rejected)
        self.notes.update(other.notes)
        self.first_reject = self.first_reject or other.first_reject

    def report(self) -> dict:
        rejected = sum(self.rejected.values())
        out = {"lines": self.lines, "blank": self.blank, "kept": self.kept, "rejected": rejected}
        out["reject_fraction"] = round(rejected / max(1, self.lines - self.blank), 6)
        out.update({f"rejected_{r}": self.rejected.get(r, 0) for r in REASONS})
        out.update({n: self.notes.get(n, 0) for n in NOTES})
        return out


def normalise(text: str) -> str:
    """Control characters out (tab and newline stay), NFC, whitespace trimmed."""
    if not text.isprintable() and _CONTROL_RE.search(text):
        text = text.translate(_CONTROL)
    if not text.isascii():  # O(1) on a str; ASCII is NFC already
        text = unicodedata.normalize("NFC", text)  # returns `text` itself when it is NFC already
    return text.strip()


def nfc(text: str) -> str:
    """`normalise` for a text without control characters."""
    return unicodedata.normalize("NFC", text).strip()


def blank(text: str) -> bool:
    """Whether a tidied text shows nothing: empty, or only invisible characters (see _INVISIBLE_CATEGORIES).
    A trimmed ASCII text shows something if it is not empty; another stops at its first visible character
    (callers test `not text or not text.isascii() and blank(text)`: a call only for non-ASCII texts)."""
    if text.isascii():
        return not text
    if text[0].isalnum() and text[0] not in _BLANK_LETTERS:  # most texts: a letter or digit first
        return False
    for c in text:
        if c not in _BLANK_LETTERS and unicodedata.category(c) not in _INVISIBLE_CATEGORIES:
            return False
    return True


def to_body(obj: dict, shape: str, tidy: Callable[[str], str], notes: list[str]) -> bytes | None:
    """The row in canonical chat form, its texts passed through `tidy`, serialised: the body of its clean
    line, hashed for its id. None exactly when the row breaks its shape's schema (a plain-Python check,
    ~0.3 us against ~3 us for a compiled schema: it must agree with SCHEMAS on anything orjson returns).
    Raises Reject for a text that shows nothing once tidied, or a chat row out of turn; appends to
    `notes` what was changed in a row it keeps (NOTES)."""
    if shape == "qa":
        user, answer = obj.get("input"), obj.get("output")
        if type(user) is not str or type(answer) is not str:
            return None
        user, answer = tidy(user), tidy(answer)
        if not user or not answer or not (user.isascii() and answer.isascii()) and (blank(user) or blank(answer)):
            raise empty("input", user) if blank(user) else empty("output", answer)
    elif shape == "alpaca":
        instruction, answer, extra = obj.get("instruction"), obj.get("output"), obj.get("input", "")
        if type(instruction) is not str or type(answer) is not str or type(extra) is not str:
            return None
        instruction, answer = tidy(instruction), tidy(answer)
        if not instruction or not answer or not (instruction.isascii() and answer.isascii()) \
                and (blank(instruction) or blank(answer)):
            raise empty("instruction", instruction) if blank(instruction) else empty("output", answer)
        extra = tidy(extra)
        user = f"{instruction}\n\n{extra}" if not blank(extra) else instruction
    elif shape == "chat":
        return chat_body(obj.get("messages"), tidy, notes)
    else:
        return sharegpt_body(obj, tidy, notes)
    # orjson.dumps([{"role": "user", "content": user}, {"role": "assistant", "content": answer}]), byte
    # for byte, but ~0.1 us faster than making the two dicts and serialising them
    return b"".join((_USER, orjson.dumps(user), _ASSISTANT, orjson.dumps(answer), b"}]"))


def chat_body(messages: object, tidy: Callable[[str], str], notes: list[str]) -> bytes | None:
    """`to_body` for a chat row. Loops, not all() and any() over generators (~30% slower) nor a
    comprehension calling `tidy` (it would make `tidy` a closure cell, paid for on every call)."""
    if type(messages) is not list or not messages:
        return None
    out = []
    for m in messages:
        if type(m) is not dict or type(m.get("role")) is not str or type(m.get("content")) is not str:
            return None
        out.append({"role": m["role"], "content": tidy(m["content"])})
    return turns_body(out, _CHAT_ROLES, "messages", False, notes)


def sharegpt_body(obj: dict, tidy: Callable[[str], str], notes: list[str]) -> bytes | None:
    """`to_body` for a ShareGPT row: its turns, {"from", "value"} or {"role", "content"}, as chat turns,
    after its `system` field (a first system turn, unless blank)."""
    turns, system = obj.get("conversations"), obj.get("system", "")
    if type(turns) is not list or not turns or type(system) is not str:
        return None
    system = tidy(system)
    out = [{"role": "system", "content": system}] if system and not (not system.isascii() and blank(system)) else []
    has_system = bool(out)
    for i, m in enumerate(turns):
        if type(m) is not dict:
            return None
        role, text = ("from", "value") if "from" in m else ("role", "content")
        if type(m.get(role)) is not str or type(m.get(text)) is not str:
            return None
        out.append({"role": m[role], "content": tidy(m[text])})
    return turns_body(out, SHAREGPT_ROLES, "conversations", has_system, notes)


def turns_body(out: list[dict], roles: dict[str, str], field: str, system: bool, notes: list[str]) -> bytes:
    """The clean body of a conversation (`out`: {"role", "content"} turns, texts tidied, roles as given
    in the row's list `field`, after its `system` field's turn if `system`). Raises Reject for an
    unknown role, no assistant turn, turns out of order or an empty turn, naming the turn."""
    where = functools.partial(turn_name, field, system)
    for i, m in enumerate(out):
        role = roles.get(m["role"])
        if role is None:
            raise Reject("unknown_role", f"'{where(i)}' has the role {m['role'][:50]!r}; accepted: "
                         f"{', '.join(roles)}: rename it in the data (or drop the turn)")
        m["role"] = role
    names = [m["role"] for m in out]
    if "assistant" not in names:
        raise Reject("no_assistant_turn", f"no assistant turn among its {len(out)} turn(s), so nothing to train on: "
                     "drop the row or add the answer")
    check_turns(names, where)
    last = len(names) - 1 - names[::-1].index("assistant")
    if last < len(out) - 1:  # an unanswered turn at the end trains nothing: dropped
        del out[last + 1:]
        notes.append("trimmed_trailing_turns")
    for i, m in enumerate(out):
        if not m["content"] or not m["content"].isascii() and blank(m["content"]):
            raise empty(where(i, text=True), m["content"])
    return orjson.dumps(out)


def turn_name(field: str, system: bool, i: int, text: bool = False) -> str:
    """How a reject names turn `i` of a conversation (its text, with `text`): messages[1].content,
    conversations[0].value, or system for the turn made of a ShareGPT row's `system` field."""
    if system and i == 0:
        return "system"
    name = f"{field}[{i - system}]"
    return name + (".content" if field == "messages" else ".value") if text else name


def check_turns(roles: list[str], where: Callable[[int], str]) -> None:
    """Raises Reject unless the turns are an optional system turn, then user and assistant alternating
    from a user turn: the one order that every chat template renders."""
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        if roles[i] == ("user", "assistant")[(i - start) % 2]:
            continue
        if roles[i] == "system" and where(0) == "system":
            fix = "a system turn besides the row's 'system' field; chat templates take one system prompt: keep one"
        elif roles[i] == "system":
            fix = "a system turn after the first turn; chat templates take the system prompt first only: " \
                  "make it the first turn or drop it"
        elif i == start:
            fix = "an assistant turn before any user turn; chat templates (Llama 2, Mistral, Gemma...) refuse " \
                  "a conversation that does not open with the user: drop it or put the user turn first"
        else:
            fix = f"a second {roles[i]} turn in a row; chat templates that need user and assistant to alternate " \
                  "refuse it: merge the two turns into one"
        raise Reject("turn_order", f"{where(i)} is {fix}")


def schema_error(obj: dict, shape: str) -> Reject:
    """Why a row that `to_body` refused breaks its schema, in jsonschema's words. It is shown the fields
    that its schema names, cut below 8 levels: the schemas look 3 levels down, so the verdict is the
    same, and its messages (a repr of the value) cannot recurse without bound on a field nested 1,000
    deep, nor walk a large ignored field."""
    obj = {k: shallow(obj[k]) for k in SCHEMAS[shape]["properties"] if k in obj}
    error = jsonschema.exceptions.best_match(_SCHEMAS[shape].iter_errors(obj))
    if error is None:
        raise AssertionError(f"to_body refused a {shape} row that its schema accepts: {obj!r:.300}")
    where = "/".join(str(p) for p in error.absolute_path) or "row"
    return Reject("schema", f"{shape} row: at '{where}': {error.message[:300]}")


def shallow(value: object, depth: int = 8) -> object:
    """`value` with each array or object deeper than `depth` levels replaced by the string "...". """
    if isinstance(value, (list, dict)) and depth == 0:
        return "..."
    if isinstance(value, list):
        return [shallow(v, depth - 1) for v in value]
    if isinstance(value, dict):
        return {k: shallow(v, depth - 1) for k, v in value.items()}
    return value


def empty(where: str, text: str) -> Reject:
    if text:
        return Reject("empty_field", f"'{where}' has no visible character, only invisible ones "
                                     f"({', '.join(sorted({f'U+{ord(c):04X}' for c in text}))[:200]})")
    return Reject("empty_field", f"'{where}' is empty after trimming whitespace and control characters")


def not_json(text: str, error: orjson.JSONDecodeError) -> Reject:
    """Why a line that orjson refused is not one row of JSON."""
    if error.msg.startswith("depth limit"):  # orjson stops at 1,024 levels
        return Reject("too_deep", f"nested more than 1024 levels deep, the JSON parser's limit: {error}")
    if "\r" in text:  # a raw CR inside JSON is only whitespace, so a row that parses before it was cut off
        try:
            orjson.loads(text.split("\r", 1)[0])
        except orjson.JSONDecodeError:
            pass
        else:
            return Reject("cr_line_breaks", f"{text.count(chr(13)) + 1} rows joined by bare CR line breaks "
                          "(old Mac line endings) in one line: convert CR to LF (`tr '\\r' '\\n' < in > out`) "
                          "and run again")
    return Reject("invalid_json", f"not valid JSON: {error}")


def decode(raw: bytes) -> str:
    """A raw line as text, without its line ending; raises Reject if it is not UTF-8."""
    raw = raw.rstrip(b"\r\n")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("bad_encoding", f"not UTF-8: {e}") from None


def check_row(raw: bytes, data: DataParams, limits: ValidateParams, notes: list[str]) -> bytes | None:
    """One raw line (bytes, BOM removed) -> the body of its clean line (see `to_body`), or None for a
    blank line. Raises Reject; appends to `notes` what was changed in a row it keeps."""
    try:
        obj = orjson.loads(raw)  # takes the bytes as they are: checks UTF-8, ignores the CR/LF ending
    except orjson.JSONDecodeError:
        text = decode(raw)  # bad_encoding is raised here, before any JSON verdict
        if not text.strip():
            return None
        try:  # again on the text without its line ending, for the error message (a failing row only)
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise not_json(text, e) from None
    if not isinstance(obj, dict):
        raise Reject("not_an_object", f"a JSON {type(obj).__name__} where an object was expected")
    if data.field_map:
        # keys renamed, without a comprehension: it would make `data` a closure cell, paid for by every row
        obj = dict(zip(map(data.field_map.get, obj, obj), obj.values()))
    shape = data.format if data.format != "auto" else "chat" if "messages" in obj else \
        "sharegpt" if "conversations" in obj else "alpaca" if "instruction" in obj else "qa"
    # What the texts need, told from the raw line (`normalise` asks text by text: ~0.5 us a text, more
    # with a newline). Control characters but tab and newline come only from DEL or C1 (UTF-8 \xc2\x80 to
    # \xc2\x9f), the only ones JSON allows raw, or from escapes \b \f \r \u; only non-ASCII text can be
    # other than NFC. Int needles (0x7F: DEL, 0x5C: backslash): `0x7F in raw` is a bare memchr (~30 ns),
    # where raw.find(b"\x7f") parses its arguments and takes a buffer (~200 ns).
    is_ascii = raw.isascii()
    controls = (0x7F in raw or (not is_ascii and 0xC2 in raw)
                or (0x5C in raw and _CONTROL_ESCAPE.search(raw) is not None))
    body = to_body(obj, shape, normalise if controls else str.strip if is_ascii else nfc, notes)
    if body is None:
        raise schema_error(obj, shape)
    if len(body) > limits.max_chars:  # the body holds every character of the texts, and more: rarely counted
        n_chars = sum(len(m["content"]) for m in orjson.loads(body))
        if n_chars > limits.max_chars:
            raise Reject("too_long", f"{n_chars} characters > validate.max_chars={limits.max_chars}")
    return body


class SeenKeys:
    """Exact de-duplication on 64-bit keys (digest prefixes: uniformly random), a batch at a time: sorted
    numpy runs (8 bytes a key), merged like a binary counter so each key is copied O(log n) times. A
    lookup is a searchsorted per run, a chain of cache misses (~0.4 us a key at 1M keys); a bitmap of
    the keys' top 25 bits (4 MiB) spares it to most new keys: 97% at 1M keys, 94% at 2M."""

    def __init__(self, bits: int = 25):
        self.runs: list[np.ndarray] = []
        self.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        self.shift = np.uint64(64 - bits)

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """For each key, whether this is its first occurrence (in earlier batches, then earlier in `keys`)."""
        unique, first = np.unique(keys, return_index=True)  # first index of each distinct key in the batch
        top = unique >> self.shift  # the bitmap's bit for these top bits is set once a key has them
        byte = (top >> np.uint64(3)).astype(np.intp)
        bit = np.uint8(1) << (top & np.uint64(7)).astype(np.uint8)
        maybe = np.flatnonzero(self.bitmap[byte] & bit)  # the other keys are new for sure
        np.bitwise_or.at(self.bitmap, byte, bit)
        new, candidates = np.ones(len(unique), dtype=bool), unique[maybe]
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, candidates), len(run) - 1)
            new[maybe] &= run[pos] != candidates
        fresh = np.zeros(len(keys), dtype=bool)
        fresh[first[new]] = True
        if new.any():
            self.runs.append(unique[new])
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            merged = np.concatenate([self.runs[-2], self.runs.pop()])
            merged.sort(kind="stable")  # two sorted runs: merged in linear time, in place (no third copy)
            self.runs[-1] = merged
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
    notes: list[tuple[int, str]] = field(default_factory=list)  # (index among the rows that passed, note)


def check_block(block: bytes, data: DataParams, limits: ValidateParams, file_start: bool = True,
                tag: bytes = b"") -> Checked:
    """Every line of a block checked on its own (duplicates are settled later, across blocks). Pure:
    runs in a worker process for large files. `file_start`: the block begins the file (may hold a BOM);
    `tag`: bytes put after the messages of each clean line (`,"source":"NAME"`)."""
    lines = block_lines(block)
    offset = 0  # of the next line in the block
    if file_start and lines and lines[0].startswith(_BOM):
        lines[0], offset = lines[0][3:], 3
    out = Checked(lines=len(lines))
    clean, keys = out.clean, out.keys
    ends, where, starts = [], [], []  # lists while filling (array.append parses its argument: 3x slower)
    notes: list[str] = []  # of the row being checked
    with gc_paused():
        for n, raw in enumerate(lines, start=1):
            start, offset = offset, offset + len(raw) + 1
            try:
                body = check_row(raw, data, limits, notes)
            except Reject as r:
                out.rejects.append((n, r.reason, r.detail, raw))
                notes.clear()
                continue
            if notes:
                out.notes += [(len(ends), note) for note in notes]
                notes.clear()
            if body is None:
                out.blank += 1
                continue
            sha = _SHA256.copy()  # cheaper than a new hash object (~0.3 us a row)
            sha.update(body)
            key = sha.digest()[:8]
            clean += b'{"id":"'  # appending to one bytearray: no intermediate copies of the line
            clean += hexlify(key)
            clean += b'","messages":'
            clean += body
            clean += tag
            clean += b"}\n"
            ends.append(len(clean))
            where.append(n)
            starts.append(start)
            keys += key
    out.ends, out.where, out.starts = array("q", ends), array("q", where), array("q", starts)
    return out


def reject_line(source: str, n: int, reason: str, detail: str, raw: bytes) -> bytes:
    text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
    return dumps({"source": source, "line": n, "reason": reason, "detail": detail, "raw": text})


def settle(checked: Checked, first_line: int, clean: bytes, seen: SeenKeys,
           raw_between: Callable[[int, int | None], bytes], counts: Counts, source: str = "") -> tuple[list, bytes]:
    """A checked block's (clean lines, as pieces to write in order; rejects lines) once its duplicates
    are known; updates `counts`. Blocks come in input order, the first at line `first_line`: the first
    occurrence of a row is kept, later ones are rejected. `raw_between(start, end)`: bytes of the block,
    for the reject of a duplicate; `source`: the file's name, written in each reject."""
    counts.lines += checked.lines
    counts.blank += checked.blank
    fresh = seen.first_seen(np.frombuffer(bytes(checked.keys), dtype="<u8"))  # as int.from_bytes(.., "little")
    rejects = checked.rejects
    dups = np.flatnonzero(~fresh).tolist()  # a few a block: ~0.15% of rows
    for i in dups:
        raw = raw_between(checked.starts[i], checked.starts[i + 1] if i + 1 < len(checked.starts) else None)
        rejects.append((checked.where[i], "duplicate", "same text as an earlier row after normalisation",
                        raw.split(b"\n", 1)[0]))
    # each kept line, its closing `}\n` replaced by its line number in the file (known only now) and `}\n`
    pieces, start, view, keep = [], 0, memoryview(clean), fresh.tolist()
    for end, n, kept in zip(checked.ends, checked.where, keep):
        if kept:
            pieces.append(view[start:end - 2])
            pieces.append(b',"line":%d}\n' % (first_line + n - 1))
        start = end
    if dups:
        rejects.sort(key=lambda r: r[0])
    counts.kept += len(fresh) - len(dups)
    counts.rejected.update(reason for _, reason, _, _ in rejects)
    counts.notes.update(note for i, note in checked.notes if fresh[i])
    if rejects and not counts.first_reject:
        n, reason, detail, _ = rejects[0]
        counts.first_reject = f"{source} line {first_line + n - 1}: {reason}: {detail[:200]}".replace("\n", " ")
    return pieces, b"".join(reject_line(source, first_line + n - 1, reason, detail, raw) for n, reason, detail, raw in rejects)


def check_part(input: str, offset: int, size: int, data: DataParams, limits: ValidateParams, part: str,
               tag: bytes = b"") -> Checked:
    """One task, in a worker process for large files: read a block of the input, check it, write its
    clean lines to the file `part`. Files, not pipes, carry the blocks: a pipe costs the parent ~2 us a row."""
    checked = check_block(read_span(input, offset, size), data, limits, file_start=offset == 0, tag=tag)
    with open(part, "wb") as f:
        f.write(checked.clean)
    checked.clean = bytearray()
    return checked


def block_bytes(source: BinaryIO, offset: int, size: int, start: int, end: int | None) -> bytes:
    """Bytes [start, end) of the block at `offset` of the open input (end None: to its end), read again:
    for the reject of a duplicate, a few times a block."""
    source.seek(offset + start)
    return source.read((end or size) - start)


def run(input: Path, output: Path, rejects: Path, report: Path | None, data: DataParams,
        limits: ValidateParams) -> dict:
    """`input`: a JSONL file or a folder of them (`sources`). Each clean row carries its source's name
    and its line there (`source`, `line`), each reject its source and its line too; the report has the
    counts of the whole split and, under `sources`, of each file. A row found again in a later source
    is a duplicate there."""
    inputs = sources(input)
    counts, seen, by_source = Counts(), SeenKeys(), {}
    with staged(output, rejects, report) as (tmp, rejects_tmp, report_tmp), \
            open(tmp, "wb", buffering=1 << 20) as good, open(rejects_tmp, "wb", buffering=1 << 20) as bad:
        for name, file in inputs:
            by_source[name] = check_source(name, file, tmp.parent, data, limits, seen, good, bad)
            counts.add(by_source[name])
        summary = counts.report()
        summary["sources"] = {name: c.report() for name, c in by_source.items()}
        if report:
            write_json(report_tmp, summary)
    assert summary["kept"] + summary["rejected"] + summary["blank"] == summary["lines"]
    by_reason = ", ".join(f"{r}={c}" for r, c in counts.rejected.most_common()) or "none"
    noted = "".join(f" ({c} {NOTES[n]})" for n, c in counts.notes.items())
    each = "" if len(inputs) == 1 else " [" + "; ".join(
        f"{n}: kept {c.kept}, rejected {sum(c.rejected.values())}" for n, c in by_source.items()) + "]"
    print(f"validate {input}: {summary['lines']} lines, kept {summary['kept']}{noted}, blank {summary['blank']}, "
          f"rejected {summary['rejected']} ({by_reason}){each}", file=sys.stderr)
    if not summary["kept"]:
        first = f"; first: {counts.first_reject}" if counts.first_reject else ""
        raise StageError(f"{input}: no usable row ({summary['lines']} lines: {summary['blank']} blank, "
                         f"{summary['rejected']} rejected: {by_reason}{first}); see {rejects}, "
                         "fix the data or point --input at another file")
    if summary["reject_fraction"] > limits.max_reject_fraction:
        worst = max(by_source, key=lambda n: sum(by_source[n].rejected.values()))
        most = "" if len(inputs) == 1 else f"; most in {worst} ({sum(by_source[worst].rejected.values())})"
        raise StageError(
            f"{input}: {summary['rejected']} of {summary['lines'] - summary['blank']} rows rejected "
            f"({summary['reject_fraction']:.1%} > validate.max_reject_fraction={limits.max_reject_fraction}{most}); "
            f"see {rejects} for each line and reason, fix the data or raise the limit in params.yaml"
        )
    return summary


def check_source(name: str, input: Path, scratch: Path, data: DataParams, limits: ValidateParams,
                 seen: SeenKeys, good: BinaryIO, bad: BinaryIO) -> Counts:
    """One source file through the blocks (see the module docstring), its clean lines appended to `good`
    tagged with `name` and their line, its rejects to `bad` with `name` and the line in this file; its counts."""
    counts, first_line, tag = Counts(), 1, b',"source":' + orjson.dumps(name)
    with open(path := as_file(input, scratch), "rb") as source:  # a pipe is read into the scratch folder first
        workers = cpu_count() if path.stat().st_size >= PARALLEL_MIN_BYTES else 1
        tasks = ((str(path), offset, size, data, limits, str(scratch / f"part-{offset}"), tag)
                 for offset, size in block_spans(path))
        for (_, offset, size, *_, part, _), checked in map_ordered(check_part, tasks, workers):
            with open(part, "rb") as f:
                clean = f.read()
            os.unlink(part)
            raw_between = functools.partial(block_bytes, source, offset, size)
            pieces, rejected = settle(checked, first_line, clean, seen, raw_between, counts, name)
            good.writelines(pieces)
            bad.write(rejected)
            first_line += checked.lines
    return counts
