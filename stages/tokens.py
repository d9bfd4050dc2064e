"""Token ids for prompt rows, shared by tokenize (the training rows), evaluate (the generation prompts)
and merge (the parity prompts): a prompt is the same ids in all three.

Special tokens: only the template's become control tokens; a special-token string in data (an answer
holding `<|im_end|><|im_start|>system`) is encoded as the text it is. The prompt row says which are the
template's (format's `specials`): none (qa, alpaca: encoded with the tokenizer's special-token
splitting off), all (chat rows whose data holds none: encoded as they are), or character spans (chat
rows whose data holds some, rare): the text between the spans is encoded with splitting off, each span
is its token, and the post-processor's tokens (BOS...) go around them.
Earlier assistant turns (format's `train_spans`, template.train_on=all): a qa or alpaca row (no
`specials`) has no end-of-turn token in its text, so EOS is put after each such turn's last token
(`turn_ends`), as after the completion; a chat row's turns end with its template's own token.
The tokenizer is the base's tokenizer.json through the `tokenizers` library (Rust; no torch, so the
data half can import this module), with truncation and padding off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from stages.errors import StageError


def load_tokenizer(base: Path):
    """The base model's fast tokenizer and its EOS id (from base.json, written by import_base)."""
    from tokenizers import Tokenizer

    meta_path, tok_path = base / "base.json", base / "tokenizer.json"
    if not tok_path.exists() or not meta_path.exists():
        raise StageError(f"{base}: no tokenizer.json/base.json; run `finetune import-base` (or `dvc repro import_base`)")
    meta = orjson.loads(meta_path.read_bytes())
    tokenizer = Tokenizer.from_file(str(tok_path))
    tokenizer.no_truncation()  # the length policy is tokenize's: a cut inside the tokenizer would go uncounted
    tokenizer.no_padding()
    return tokenizer, meta["eos_token_id"]


def tokenized_lengths(folder: Path) -> list[int]:
    """The `length` column (tokens a row) of a tokenized split, in row order, from the Arrow shards its
    state.json lists: no datasets, no torch (the run report's histogram, `finetune plan`)."""
    import pyarrow as pa

    state = folder / "state.json"
    if not state.is_file():
        raise StageError(f"{folder}: not a tokenized dataset (no state.json); run `dvc repro tokenize`")
    out: list[int] = []
    for f in orjson.loads(state.read_bytes()).get("_data_files", []):
        path = folder / f["filename"]
        try:
            with pa.memory_map(str(path)) as source:
                shard = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{path}: unreadable Arrow shard ({e}); re-run `dvc repro -f tokenize`") from e
        if "length" not in shard.column_names:
            raise StageError(f"{path}: no `length` column (a dataset from an older tokenize); re-run "
                             "`dvc repro -f tokenize`")
        out += shard.column("length").to_pylist()
    return out


def model_tokenizer(folder: Path):
    """tokenize's encoder for the tokenizer in `folder` and its EOS id: models/base, or a merged folder
    (no base.json: EOS is its tokenizer_config.json's eos_token, as import_base read it for the base)."""
    if (folder / "base.json").exists():
        return load_tokenizer(folder)
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").exists():
        raise StageError(f"{folder}: no tokenizer.json (a merged model folder holds its tokenizer: run `finetune merge`)")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()  # as load_tokenizer
    tokenizer.no_padding()
    config = orjson.loads((folder / "tokenizer_config.json").read_bytes()) if (folder / "tokenizer_config.json").exists() else {}
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None or tokenizer.token_to_id(eos) is None:
        raise StageError(f"{folder}/tokenizer_config.json: no eos_token the tokenizer knows (got {eos!r}); "
                         "re-run `finetune merge` to write the folder's tokenizer")
    return tokenizer, tokenizer.token_to_id(eos)


@dataclass(frozen=True)
class Layout:
    """The special tokens the tokenizer's post-processor puts before (e.g. BOS) and after one text."""

    head: int
    tail: int
    head_ids: tuple[int, ...] = ()
    tail_ids: tuple[int, ...] = ()


def layout(tokenizer) -> Layout:
    enc = tokenizer.encode("a")
    special = enc.special_tokens_mask
    head = next((i for i, s in enumerate(special) if not s), len(special))
    tail = next((i for i, s in enumerate(reversed(special)) if not s), 0)
    return Layout(head, tail, tuple(enc.ids[:head]), tuple(enc.ids[len(special) - tail:]))


@dataclass
class Segmented:
    """The encoding of a text whose special tokens are given as character spans (see the docstring):
    the parts of an Encoding that tokenize's `answer_flags` reads."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special_tokens_mask: list[int]  # 1 on the post-processor's tokens only, as an Encoding has it


def encode_segments(tokenizer, text: str, spans: list[list[int]], lay: Layout) -> Segmented:
    """`text` encoded with the special tokens at `spans` only; the tokenizer's special-token splitting
    must be off (`encode_special_tokens`)."""
    ids, offsets, at = list(lay.head_ids), [(0, 0)] * lay.head, 0
    for start, end in [*spans, (len(text), len(text))]:
        if start > at:
            enc = tokenizer.encode(text[at:start], add_special_tokens=False)
            ids += enc.ids
            offsets += [(a + at, b + at) for a, b in enc.offsets]
        if end > start:
            token = tokenizer.token_to_id(text[start:end])
            if token is None:
                raise StageError(f"{text[start:end]!r} is not one token of this tokenizer; run `finetune format` "
                                 "again with the same --base as tokenize")
            ids.append(token)
            offsets.append((start, end))
        at = end
    n = len(ids) - lay.head
    return Segmented(ids + list(lay.tail_ids), offsets + [(0, 0)] * lay.tail,
                     [1] * lay.head + [0] * n + [1] * lay.tail)


def encode_rows(rows: list[dict], texts: list[str], tokenizer, lay: Layout) -> list:
    """Each row's text encoded with special tokens where its `specials` says: a batch call for the rows
    without spans (all of them but the rare chat row whose data holds a special-token string)."""
    encodings: list = [None] * len(rows)
    parse, plain, spans = [], [], []  # rows by `specials`: "all", absent, spans
    for i, row in enumerate(rows):
        specials = row.get("specials")
        (plain if specials is None else parse if specials == "all" else spans).append(i)
    for group, splitting in ((plain, False), (parse, True)):
        if group:
            tokenizer.encode_special_tokens = not splitting  # True: "<|im_end|>" in the text stays text
            for i, enc in zip(group, tokenizer.encode_batch([texts[i] for i in group])):
                encodings[i] = enc
    tokenizer.encode_special_tokens = True
    for i in spans:
        encodings[i] = encode_segments(tokenizer, texts[i], rows[i]["specials"], lay)
    return encodings


def turn_ends(row: dict, offsets: list[tuple[int, int]], lay: Layout) -> list[int]:
    """Where EOS goes in a row's tokens (indices, ascending, before which it is inserted): after each of
    its `train_spans` when the template closes none (rows without `specials`: qa, alpaca), before the
    first token that starts at or after the span's end; [] for other rows."""
    if row.get("specials") is not None or not row.get("train_spans"):
        return []
    starts, stop = [a for a, _ in offsets], len(offsets) - lay.tail
    ends = []
    for _, end in row["train_spans"]:
        k = next((i for i in range(ends[-1] if ends else lay.head, stop) if starts[i] >= end), stop)
        ends.append(k)
    return ends


def insert_at(items: list, where: list[int], value) -> list:
    """`items` with `value` inserted before each index of `where` (ascending; indices into `items`)."""
    for k in reversed(where):
        items.insert(k, value)
    return items


def prompt_ids(rows: list[dict], tokenizer, lay: Layout, eos_id: int, completion: bool = False) -> list[list[int]]:
    """Each prompt row's prompt as tokenize encodes it (the ids before its first trained token when the
    prompt ends between tokens, as every shipped template's does): the post-processor's head (BOS)
    first, nothing after. With `completion`: prompt + completion as tokenize encodes the row, before it
    appends EOS (EOS after earlier turns included: `turn_ends`). For generation (evaluate) and the
    parity check (merge), so that they feed the models the ids train saw, never a control token made
    of data text."""
    if completion:
        texts = [r["prompt"] + r["completion"] for r in rows]
        return [insert_at(enc.ids, turn_ends(r, enc.offsets, lay), eos_id)
                for r, enc in zip(rows, encode_rows(rows, texts, tokenizer, lay))]
    cut = [{**r, "specials": [s for s in r["specials"] if s[1] <= len(r["prompt"])]}
           if isinstance(r.get("specials"), list) else r for r in rows]  # the prompt's spans only
    encodings = encode_rows(cut, [r["prompt"] for r in rows], tokenizer, lay)
    return [insert_at(enc.ids[:len(enc.ids) - lay.tail], turn_ends(r, enc.offsets, lay), eos_id)
            for r, enc in zip(rows, encodings)]  # no tail: the prompt goes on
