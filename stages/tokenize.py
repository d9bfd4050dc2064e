"""tokenize: prompts -> token ids + labels (a `datasets` dataset on disk), with a length report.

    finetune tokenize --input data/prompts/train.jsonl --output data/tokenized/train \
        --base models/base --report metrics/tokenize_train.json --rejects data/rejects/tokenize_train.jsonl
    (dvc.yaml stage `tokenize@train`; params: tokenize)

Each row is tokenized as prompt + completion in one pass (the tokenizer sees the real text, so no
artefact at the seam), and the character offsets split the tokens: labels are -100 on the prompt
(unless `tokenize.train_on_prompt`), the completion's ids otherwise, and EOS is appended as a trained
token. Over `tokenize.max_length` tokens: `drop` rejects the row; `truncate` cuts the prompt from the
LEFT (the newest context and the whole answer stay). A completion that does not fit even without a
prompt is rejected, never cut. Rejected rows go to --rejects with a reason and are counted.

Uses the `tokenizers` library directly (its batch API runs on all cores); no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import orjson

from stages.errors import StageError
from stages.jsonl import atomic_path, atomic_writer, dumps, read_jsonl, write_json
from stages.params import TokenizeParams

FEATURES = {"id": "string", "input_ids": "int32", "labels": "int32", "length": "int32"}


def load_tokenizer(base: Path):
    """The base model's fast tokenizer and its EOS id (from base.json, written by import_base)."""
    from tokenizers import Tokenizer

    meta_path, tok_path = base / "base.json", base / "tokenizer.json"
    if not tok_path.exists() or not meta_path.exists():
        raise StageError(f"{base}: no tokenizer.json/base.json; run `finetune import-base` (or `dvc repro import_base`)")
    meta = orjson.loads(meta_path.read_bytes())
    return Tokenizer.from_file(str(tok_path)), meta["eos_token_id"]


def tokenize_rows(rows: Iterable[dict], tokenizer, eos_id: int, params: TokenizeParams,
                  rejects: list[dict], stats: dict) -> Iterator[dict]:
    """Prompt rows -> {"id", "input_ids", "labels", "length"}; rows that cannot be kept go to `rejects`,
    counts of truncated rows and trained tokens accumulate in `stats`."""
    batch: list[dict] = []

    def flush() -> Iterator[dict]:
        texts = [r["prompt"] + r["completion"] for r in batch]
        for row, enc in zip(batch, tokenizer.encode_batch(texts)):
            ids, offsets, special = enc.ids, enc.offsets, enc.special_tokens_mask
            cut = len(row["prompt"])
            in_answer = [s == 0 and start >= cut for (start, _), s in zip(offsets, special)]
            if ids and ids[-1] == eos_id and special[-1]:  # the post-processor already ended it
                in_answer[-1] = True
            else:
                ids, in_answer = ids + [eos_id], in_answer + [True]
            n_prompt = in_answer.index(True) if True in in_answer else len(ids)
            reason = None
            if len(ids) > params.max_length:
                excess = len(ids) - params.max_length
                keep_head = 1 if special and special[0] else 0  # keep BOS
                if params.overlength == "drop":
                    reason = f"{len(ids)} tokens > tokenize.max_length={params.max_length} (overlength=drop)"
                elif n_prompt - keep_head < excess:
                    reason = (f"the completion alone needs {len(ids) - n_prompt + keep_head} tokens > "
                              f"tokenize.max_length={params.max_length}; it is never cut")
                else:
                    del ids[keep_head:keep_head + excess], in_answer[keep_head:keep_head + excess]
                    stats["truncated"] += 1
            labels = [t if (a or params.train_on_prompt) else -100 for t, a in zip(ids, in_answer)]
            if reason is None and not any(a for a in in_answer):
                reason = "no trained tokens"
            if reason:
                rejects.append({"id": row["id"], "reason": "too_long" if "max_length" in reason
                                else "no_trained_tokens", "detail": reason})
                continue
            stats["trained_tokens"] += sum(1 for label in labels if label != -100)
            yield {"id": row["id"], "input_ids": ids, "labels": labels, "length": len(ids)}
        batch.clear()

    stats.setdefault("truncated", 0)
    stats.setdefault("trained_tokens", 0)
    for row in rows:
        batch.append(row)
        if len(batch) >= params.batch_size:
            yield from flush()
    if batch:
        yield from flush()


def length_report(lengths: np.ndarray, stats: dict, rejects: list[dict], rows_in: int) -> dict:
    q = np.percentile(lengths, [50, 90, 99]).tolist() if len(lengths) else [0, 0, 0]
    return {
        "rows_in": rows_in,
        "rows_out": int(len(lengths)),
        "dropped_too_long": sum(r["reason"] == "too_long" for r in rejects),
        "dropped_no_trained_tokens": sum(r["reason"] == "no_trained_tokens" for r in rejects),
        "truncated": stats["truncated"],
        "tokens_total": int(lengths.sum()),
        "tokens_trained": stats["trained_tokens"],
        "length_p50": q[0], "length_p90": q[1], "length_p99": q[2],
        "length_max": int(lengths.max()) if len(lengths) else 0,
    }


def run(input: Path, output: Path, base: Path, report: Path | None, rejects_path: Path | None,
        params: TokenizeParams) -> dict:
    import datasets

    if not input.exists():
        raise StageError(f"{input}: no such file (run `finetune format` first, or `dvc repro`)")
    tokenizer, eos_id = load_tokenizer(base)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    features = datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    })
    rejects: list[dict] = []
    lengths: list[int] = []
    counter = {"rows_in": 0}
    stats: dict = {}

    def rows():
        for row in read_jsonl(input):
            counter["rows_in"] += 1
            yield row

    def gen():
        for out in tokenize_rows(rows(), tokenizer, eos_id, params, rejects, stats):
            lengths.append(out["length"])
            yield out

    with atomic_path(output) as tmp:
        cache = tmp.parent / "cache"
        ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(cache), keep_in_memory=False)
        ds.save_to_disk(str(tmp))
        del ds
    if rejects_path:
        with atomic_writer(rejects_path) as f:
            for r in rejects:
                f.write(dumps(r))
    summary = length_report(np.asarray(lengths, dtype=np.int64), stats, rejects, counter["rows_in"])
    if report:
        write_json(report, summary)
    if not lengths:
        raise StageError(f"{input}: no row left after tokenization; see {rejects_path} and tokenize.max_length")
    return summary
