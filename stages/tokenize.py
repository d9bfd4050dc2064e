"""tokenize: prompts -> token ids + labels (a `datasets` dataset on disk), with a length report.

    finetune tokenize --input data/prompts/train.jsonl --output data/tokenized/train \
        --base models/base --report metrics/tokenize_train.json --rejects data/rejects/tokenize_train.jsonl
    (dvc.yaml stage `tokenize@train`; params: tokenize)

Each row is tokenized as prompt + completion in one pass (the tokenizer sees the real text, so no
artefact at the seam), and the character offsets split the tokens: labels are -100 on the prompt
(unless `tokenize.train_on_prompt`), the completion's ids otherwise, and EOS is appended as a trained
token (unless the completion already ends with it, as chat templates render it). A row of several
assistant turns (format's `train_spans`, template.train_on=all) also trains each token that starts in
an earlier turn's span, and the EOS put after that turn when its template has no end token (qa,
alpaca: stages/tokens.py's `turn_ends`); nothing of the system and user turns. Over
`tokenize.max_length` tokens: `drop` rejects the row; `truncate` cuts the prompt from the LEFT (the
newest context and the whole answer stay: an earlier turn cut in part keeps the labels of what is
left, as TRL's truncation does). A completion that does not fit even without a prompt is rejected,
never cut, so a kept row always trains its last turn. Rejected rows go to --rejects with a reason
and are counted.

Special tokens: only the template's become control tokens; a special-token string in data (an answer
holding `<|im_end|><|im_start|>system`) is encoded as the text it is, as format's `specials` says
(stages/tokens.py, whose encoding evaluate and merge use for their prompts too); EOS is appended by id.
The input may be a pipe (`--input /dev/stdin`): it is read once into the stage's temporary folder first.

Streaming and speed: the prompts file is cut into blocks of whole lines (~8 MB, ~25k rows); each block
becomes one .arrow shard, `tokenize.batch_size` rows at a time through the `tokenizers` library's batch
API (Rust; no torch). Large inputs use a worker process a core, each with a one-thread tokenizer, so
the cores stay busy while Python handles a batch; small ones run here on the tokenizer's threads. The
seam is found with a char_to_token call or two a row instead of copying every token's offsets into
Python; labels are masked with numpy; each batch is written as one Arrow record batch. The directory
has the layout `datasets.save_to_disk` writes, so `datasets.load_from_disk` reads it as is. Memory: a
block and a batch a worker, plus 4 bytes a row for the length report.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from stages.errors import StageError
from stages.jsonl import (
    as_file,
    block_lines,
    block_spans,
    cpu_count,
    dumps,
    map_ordered,
    read_span,
    write_json,
)
from stages.outputs import staged
from stages.params import TokenizeParams
from stages.tokens import Layout, Segmented, encode_rows, insert_at, layout, load_tokenizer, turn_ends

# The Arrow schema datasets gives these features (int32 lists), with the metadata load_from_disk reads,
# spelled out so that the workers need no `import datasets` (~1 s and ~90 MB each); a test holds it
# equal to datasets.Features(...).arrow_schema.
_INT32_LIST = {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}
SCHEMA = pa.schema(
    [pa.field("id", pa.string()), pa.field("input_ids", pa.list_(pa.int32())),
     pa.field("labels", pa.list_(pa.int32())), pa.field("length", pa.int32())],
    metadata={"huggingface": json.dumps({"info": {"features": {
        "id": {"dtype": "string", "_type": "Value"}, "input_ids": _INT32_LIST, "labels": _INT32_LIST,
        "length": {"dtype": "int32", "_type": "Value"}}}})},
)
BLOCK = 8 << 20  # bytes of prompt rows a task and an .arrow shard: ~25,000 rows, ~30 MB of tokens
PARALLEL_MIN_BYTES = 16 << 20  # inputs from 16 MB (~50k rows) use a worker per core; smaller ones run here

Kept = tuple[str, list[int], "int | list[bool]"]  # (id, input_ids, mask): see tokenize_batch


def ends_with_eos(row: dict, text: str, eos_text: str) -> bool:
    """Whether the template closed the completion with the EOS token (chat templates: `...<|im_end|>`)."""
    specials = row.get("specials")
    if specials is None:
        return False
    end = len(text.rstrip())
    if specials == "all":
        return text.endswith(eos_text, 0, end)
    return bool(specials) and specials[-1][1] == end and text[specials[-1][0]:end] == eos_text


def answer_flags(enc, cut: int) -> list[bool]:
    """The rule, token by token: a token is trained when the post-processor did not add it and it starts
    at or after `cut`, the first character of the completion."""
    return [s == 0 and start >= cut for (start, _), s in zip(enc.offsets, enc.special_tokens_mask)]


def first_answer_token(enc, cut: int, text_len: int, lay: Layout) -> int | None:
    """The index from which `answer_flags` is True, found with a few calls instead of copying every
    offset into Python (~1/5 of the tokenizer's own time). Token starts never decrease along the text,
    so it is the first token covering a character at or after `cut`, moved on by one when that token
    starts before `cut` (it spans the seam: prompt), or back over empty tokens that start at or after
    `cut` (a lone space with trimmed offsets). None when this shortcut does not apply: special tokens
    after the text, or no token covering the next 8 characters."""
    if lay.tail:
        return None
    k, char = enc.char_to_token(cut), cut
    while k is None and char + 1 < min(text_len, cut + 8):  # a character no token covers (trimmed offsets)
        char += 1
        k = enc.char_to_token(char)
    if k is None or k < lay.head:
        return None
    if enc.token_to_chars(k)[0] < cut:
        return k + 1
    while k > lay.head and enc.token_to_chars(k - 1)[0] >= cut:
        k -= 1
    return k


def tokenize_batch(rows: list[dict], tokenizer, eos_id: int, params: TokenizeParams, lay: Layout
                   ) -> tuple[list[Kept], list[dict], Counter]:
    """Prompt rows -> (kept rows, rejects, counts of "truncated" rows and "trained_tokens"). A kept row is
    (id, input_ids, mask): `mask` is the number of leading tokens whose label is -100 or, for the rare
    row whose trained tokens are not one run at the end, a trained flag per token."""
    kept, rejects, counts = [], [], Counter()
    texts = [r["prompt"] + r["completion"] for r in rows]
    keep_head = 1 if lay.head else 0  # keep BOS
    eos_text = tokenizer.id_to_token(eos_id)
    for row, text, enc in zip(rows, texts, encode_rows(rows, texts, tokenizer, lay)):
        ids, cut = enc.ids, len(row["prompt"])
        # A chat template already closes the answer with the end token (`...<|im_end|>\n`): no second one.
        ended = ends_with_eos(row, text, eos_text)
        spans = row.get("train_spans")
        n_prompt = None if type(enc) is Segmented or spans else first_answer_token(enc, cut, len(text), lay)
        if n_prompt is not None:
            flags = None
            if not ended:
                ids.append(eos_id)
        else:
            flags = answer_flags(enc, cut)
            if ids and ids[-1] == eos_id and enc.special_tokens_mask[-1]:  # the post-processor already ended it
                flags[-1] = True
            elif not ended:
                ids, flags = ids + [eos_id], flags + [True]
            n_prompt = flags.index(True) if True in flags else len(ids)  # where the completion starts
            if spans:  # the earlier assistant turns are trained too
                offsets = enc.offsets
                for k, (start, _) in enumerate(offsets[:n_prompt]):
                    flags[k] = any(a <= start < b for a, b in spans) and not enc.special_tokens_mask[k]
                ends = turn_ends(row, offsets, lay)
                ids, flags, n_prompt = insert_at(ids, ends, eos_id), insert_at(flags, ends, True), n_prompt + len(ends)
        reason = None
        if len(ids) > params.max_length:
            excess = len(ids) - params.max_length
            if params.overlength == "drop":
                reason = f"{len(ids)} tokens > tokenize.max_length={params.max_length} (overlength=drop)"
            elif n_prompt - keep_head < excess:
                reason = (f"the completion alone needs {len(ids) - n_prompt + keep_head} tokens > "
                          f"tokenize.max_length={params.max_length}; it is never cut")
            else:
                del ids[keep_head:keep_head + excess]
                if flags is not None:
                    del flags[keep_head:keep_head + excess]
                n_prompt -= excess
                counts["truncated"] += 1
        if reason is None and n_prompt >= len(ids):
            reason = "no trained tokens"
        if reason:
            rejects.append({"id": row["id"], "reason": "too_long" if "max_length" in reason
                            else "no_trained_tokens", "detail": reason})
            continue
        if params.train_on_prompt:
            mask = 0
        elif flags is None or flags == [i >= n_prompt for i in range(len(flags))]:
            mask = n_prompt
        else:
            mask = flags
        counts["trained_tokens"] += len(ids) - mask if isinstance(mask, int) else sum(mask)
        kept.append((row["id"], ids, mask))
    return kept, rejects, counts


def labels_of(ids: list[int], mask: int | list[bool]) -> list[int]:
    if isinstance(mask, int):
        return [-100] * mask + ids[mask:]
    return [t if a else -100 for t, a in zip(ids, mask)]


def batched(rows: Iterable[dict], n: int) -> Iterator[list[dict]]:
    it = iter(rows)
    while batch := list(itertools.islice(it, n)):
        yield batch


def record_batch(kept: list[Kept], schema: pa.Schema) -> pa.RecordBatch:
    """Kept rows -> one Arrow record batch. The ids are flattened once; the labels are those ids with
    -100 over each row's masked prefix, set with numpy (a Python list a row costs ~4x more)."""
    lengths = np.fromiter((len(ids) for _, ids, _ in kept), dtype=np.int32, count=len(kept))
    offsets = np.zeros(len(kept) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids for _, ids, _ in kept), dtype=np.int32,
                       count=int(offsets[-1]))
    masked = np.fromiter((m if isinstance(m, int) else 0 for _, _, m in kept), dtype=np.int32, count=len(kept))
    position = np.arange(len(flat), dtype=np.int32) - np.repeat(offsets[:-1], lengths)
    labels = np.where(position < np.repeat(masked, lengths), np.int32(-100), flat)
    for i, (_, ids, mask) in enumerate(kept):
        if not isinstance(mask, int):  # trained tokens not in one run at the end: set one by one
            labels[offsets[i]:offsets[i + 1]] = labels_of(ids, mask)
    return pa.RecordBatch.from_arrays([
        pa.array([id_ for id_, _, _ in kept], type=pa.string()),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
        pa.array(lengths),
    ], schema=schema)


def length_report(lengths: np.ndarray, stats: dict, dropped: dict, rows_in: int) -> dict:
    q = np.percentile(lengths, [50, 90, 99]).tolist() if len(lengths) else [0, 0, 0]
    return {
        "rows_in": rows_in,
        "rows_out": len(lengths),
        "dropped_too_long": dropped.get("too_long", 0),
        "dropped_no_trained_tokens": dropped.get("no_trained_tokens", 0),
        "truncated": stats.get("truncated", 0),
        "tokens_total": int(lengths.sum()),
        "tokens_trained": stats.get("trained_tokens", 0),
        "length_p50": q[0], "length_p90": q[1], "length_p99": q[2],
        "length_max": int(lengths.max()) if len(lengths) else 0,
    }


@dataclass
class Part:
    """What `tokenize_part` made of one block of the prompts file (its rows went to one .arrow shard)."""

    rows_in: int
    lengths: array  # of the kept rows, in order
    rejects: list[dict]
    counts: Counter
    nbytes: int  # of the record batches written
    digest: str  # sha256 of their buffers


@functools.lru_cache(maxsize=2)  # once a process: a worker tokenizes many blocks
def tokenizer_for(base: Path, threads: bool):
    if threads:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    else:  # a worker among one a core: more threads would only take turns
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer, eos_id = load_tokenizer(base)
    return tokenizer, eos_id, layout(tokenizer)


def tokenize_part(input: str, offset: int, size: int, base: Path, params: TokenizeParams, shard: str,
                  threads: bool) -> Part:
    """One task: the prompt rows of one block of the input -> the Arrow stream file `shard`, a batch of
    `tokenize.batch_size` rows at a time. In a worker process (one a core, the tokenizer on one thread:
    the cores never wait on Python) for large inputs; here, with the tokenizer's threads, for small ones."""
    tokenizer, eos_id, lay = tokenizer_for(base, threads)
    rows = (orjson.loads(line) for line in block_lines(read_span(input, offset, size)) if line.strip())
    part = Part(0, array("i"), [], Counter(), 0, "")
    digest = hashlib.sha256()
    with pa.OSFile(shard, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as stream:
        for batch in batched(rows, params.batch_size):
            kept, rejects, counts = tokenize_batch(batch, tokenizer, eos_id, params, lay)
            part.rows_in += len(batch)
            part.rejects += rejects
            part.counts.update(counts)
            if kept:
                record = record_batch(kept, SCHEMA)
                stream.write_batch(record)
                part.nbytes += record.nbytes
                part.lengths.extend(len(ids) for _, ids, _ in kept)
                for column in record.columns:
                    for buffer in column.buffers():
                        if buffer is not None:
                            digest.update(buffer)
    part.digest = digest.hexdigest()
    return part


def write_dataset_files(directory: Path, shards: list[Path], rows: int, nbytes: int, fingerprint: str) -> None:
    """Names the shards and writes dataset_info.json and state.json as `datasets.save_to_disk` does, so
    that `datasets.load_from_disk` reads the directory."""
    import datasets  # here only, after the workers: ~1 s to import
    from datasets.utils.py_utils import asdict

    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        shard.rename(directory / name)
    features = datasets.Features.from_arrow_schema(SCHEMA)
    info = datasets.DatasetInfo(features=features, dataset_size=nbytes, size_in_bytes=nbytes)
    info.splits = datasets.SplitDict()
    info.splits.add(datasets.SplitInfo(name="train", num_bytes=nbytes, num_examples=rows))
    info = asdict(info)
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": "train",
    }
    # indent 2, state's keys sorted, dataset_info's first level sorted: as save_to_disk writes them
    (directory / "state.json").write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    (directory / "dataset_info.json").write_bytes(orjson.dumps({k: info[k] for k in sorted(info)},
                                                               option=orjson.OPT_INDENT_2))


def run(input: Path, output: Path, base: Path, report: Path | None, rejects_path: Path | None,
        params: TokenizeParams) -> dict:
    if not input.exists():
        raise StageError(f"{input}: no such file (run `finetune format` first, or `dvc repro`)")
    load_tokenizer(base)  # a missing tokenizer fails here, before any worker starts
    lengths = array("i")  # 4 bytes a kept row, for the percentiles
    stats, dropped, rows_in, nbytes, shards = Counter(), Counter(), 0, 0, []
    fingerprint = hashlib.sha256()  # of everything written, in order: same input, same bytes, same DVC hash
    with staged(output, rejects_path, report) as (tmp, rejects_tmp, report_tmp), \
            open(rejects_tmp, "wb") if rejects_tmp else contextlib.nullcontext() as rejected:
        tmp.mkdir()
        path = as_file(input, tmp.parent)  # a pipe is read into the temporary folder first
        workers = cpu_count() if path.stat().st_size >= PARALLEL_MIN_BYTES else 1
        tasks = ((str(path), offset, size, base, params, str(tmp / f"shard-{i}.arrow"), workers == 1)
                 for i, (offset, size) in enumerate(block_spans(path, BLOCK)))
        for task, part in map_ordered(tokenize_part, tasks, workers):
            shards.append(Path(task[5]))
            rows_in, nbytes = rows_in + part.rows_in, nbytes + part.nbytes
            lengths.extend(part.lengths)
            stats.update(part.counts)
            fingerprint.update(part.digest.encode())
            for r in part.rejects:
                dropped[r["reason"]] += 1
                if rejected:
                    rejected.write(dumps(r))
        if not shards:  # an empty input: still a loadable, empty dataset
            shards.append(tmp / "shard-0.arrow")
            with pa.OSFile(str(shards[0]), "wb") as sink:
                pa.ipc.new_stream(sink, SCHEMA).close()
        write_dataset_files(tmp, shards, len(lengths), nbytes, fingerprint.hexdigest()[:16])
        summary = length_report(np.frombuffer(lengths, dtype=np.int32), stats, dropped, rows_in)
        if report:
            write_json(report_tmp, summary)
    if not lengths:
        raise StageError(f"{input}: no row left after tokenization; see {rejects_path} and tokenize.max_length")
    return summary
