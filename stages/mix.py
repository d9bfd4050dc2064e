"""mix: the rows each split uses: the train sources weighted, the eval split checked for train leakage.

    finetune mix --train data/clean/train.jsonl --eval data/clean/eval.jsonl \
        --train-out data/mixed/train.jsonl --eval-out data/mixed/eval.jsonl \
        --metrics metrics/mix.json --report reports/leakage.jsonl
    (dvc.yaml stage `mix`, between validate and format; params: seed, data.weights, leakage)

Inputs: clean rows `{"id", "messages", "source"}` of both splits (validate's output).
Outputs: the same rows, for format: train with each source weighted, eval without the leaked rows when
`leakage.action` is drop; `metrics/mix.json` (rows per source in and out, leak counts and rate) and
`reports/leakage.jsonl` (one line per leaked eval row, with the train row it matches).

Weights (`data.weights`, by source file name, missing = 1.0): a weight k + f (k whole, 0 <= f < 1) gives
every row of the source k copies and round(f x rows) of them, drawn from Random("SEED/SOURCE"), one
more: 2.0 = each row twice, 0.5 = a seeded half, 1.5 = all + a seeded half. The same seed and rows give
the same draw on any machine. A weight naming no train source is an error naming it.

Leakage: an eval row leaks when a train row has
- exact: the same question text (its user turns) once normalised: NFKC, case-folded, punctuation and
  symbols as spaces, whitespace collapsed;
- near: a Jaccard similarity >= `leakage.threshold` between the sets of word 3-grams of the two rows'
  normalised texts (user and assistant turns; system prompts, often shared by every row, left out).
  Candidates come from datasketch's MinHash LSH (128 permutations, tuned to favour recall), and each
  candidate's Jaccard is then computed exactly on the shingle sets, so the reported figure is exact.
It is measured against every clean train row (all sources, before weighting). The check is lexical: it
finds copies and light edits, not paraphrases in other words (the shipped eval set, written as
paraphrases of train, shows both: README). action report keeps every row; drop removes the leaked eval
rows from the eval output; fail stops the stage (outputs written, as validate writes its rejects) when
more than `leakage.max_fraction` of the eval rows leak.
"""

from __future__ import annotations

import random
import sys
import unicodedata
from collections import Counter
from pathlib import Path

from stages.errors import StageError
from stages.jsonl import dumps, read_jsonl, write_json
from stages.outputs import staged
from stages.params import DataParams, LeakageParams

SHINGLE = 3  # words a shingle
NUM_PERM = 128  # MinHash permutations: Jaccard estimates within ~0.09 (1 / sqrt(128)), only to find candidates
BATCH = 4096  # rows hashed at a time (MinHash.bulk shares one set of permutations)


# --- weights ------------------------------------------------------------------------------------------

def copies(n: int, weight: float, seed: int, source: str) -> list[int]:
    """How many times each of a source's `n` rows is used, for `weight` (see the module docstring)."""
    whole, frac = int(weight), weight - int(weight)
    out = [whole] * n
    for i in random.Random(f"{seed}/{source}").sample(range(n), round(frac * n)):
        out[i] += 1
    return out


def weigh(rows: list[dict], weights: dict, seed: int) -> tuple[list[dict], dict]:
    """The train rows with their sources weighted (each row's copies kept together, in input order: train
    shuffles), and per source {"rows", "weight", "rows_out"}."""
    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_source.setdefault(row["source"], []).append(i)
    unknown = sorted(set(weights) - set(by_source))
    if unknown:
        raise StageError(f"params.yaml: data.weights names {unknown[0]!r}, which is no source of the train split "
                         f"(its sources with rows: {', '.join(sorted(by_source))}): fix or remove the name")
    times = [0] * len(rows)
    stats = {}
    for source, index in by_source.items():
        w = float(weights.get(source, 1.0))
        for i, c in zip(index, copies(len(index), w, seed, source)):
            times[i] = c
        stats[source] = {"rows": len(index), "weight": w, "rows_out": sum(times[i] for i in index)}
    return [row for row, c in zip(rows, times) for _ in range(c)], stats


# --- leakage ------------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Case, punctuation and whitespace out of the way: NFKC, case-folded, P* and S* as spaces, collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text).split())


def question(row: dict) -> str:
    return normalise("\n".join(m["content"] for m in row["messages"] if m["role"] == "user"))


def shingles(row: dict) -> set[str]:
    """Word 3-grams of the row's normalised user and assistant texts (a shorter text: itself, whole)."""
    words = normalise("\n".join(m["content"] for m in row["messages"] if m["role"] != "system")).split()
    return {" ".join(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def minhashes(sets: list[set[str]]):
    from datasketch import MinHash

    for start in range(0, len(sets), BATCH):
        yield from MinHash.bulk([[s.encode() for s in x] for x in sets[start:start + BATCH]], num_perm=NUM_PERM)


def leaks(train: list[dict], eval_rows: list[dict], threshold: float) -> list[dict]:
    """One record per leaked eval row, in eval order: its best train match, exact first (see docstring)."""
    from datasketch import MinHashLSH

    exact: dict[str, int] = {}
    for i, row in enumerate(train):
        exact.setdefault(question(row), i)
    # recall first: a missed leak costs more than a candidate checked exactly and let go
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=(0.2, 0.8))
    train_sets = [shingles(r) for r in train]
    for i, m in enumerate(minhashes(train_sets)):
        lsh.insert(i, m, check_duplication=False)
    eval_sets = [shingles(r) for r in eval_rows]
    out = []
    for row, mine, m in zip(eval_rows, eval_sets, minhashes(eval_sets)):
        match = exact.get(question(row))
        kind = "exact"
        if match is None:
            scored = [(jaccard(mine, train_sets[i]), -i) for i in lsh.query(m)]
            best = max(scored, default=(0.0, 0))
            if best[0] < threshold:
                continue
            match, kind = -best[1], "near"
        t = train[match]
        out.append({"eval_id": row["id"], "eval_source": row.get("source"), "eval_line": row.get("line"),
                    "kind": kind, "jaccard": round(jaccard(mine, train_sets[match]), 4), "train_id": t["id"],
                    "train_source": t.get("source"), "train_line": t.get("line"), "eval_question": user_text(row), "train_question": user_text(t)})
    return out


def user_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")


# --- the stage ----------------------------------------------------------------------------------------

def run(train: Path, eval: Path, train_out: Path, eval_out: Path, metrics: Path, report: Path,
        data: DataParams, leakage: LeakageParams, seed: int) -> dict:
    for path in (train, eval):
        if not path.exists():
            raise StageError(f"{path}: no such file (run `finetune validate` first, or `dvc repro`)")
    train_rows, eval_rows = list(read_jsonl(train)), list(read_jsonl(eval))
    weighted, sources = weigh(train_rows, data.weights, seed)
    found = leaks(train_rows, eval_rows, leakage.threshold)
    drop = {f["eval_id"] for f in found} if leakage.action == "drop" else set()
    kept = [r for r in eval_rows if r["id"] not in drop]
    kinds = Counter(f["kind"] for f in found)
    rate = len(found) / max(1, len(eval_rows))
    summary = {
        "train": {"rows_in": len(train_rows), "rows_out": len(weighted), "sources": sources},
        "eval": {"rows_in": len(eval_rows), "rows_out": len(kept)},
        "leakage": {"exact": kinds["exact"], "near": kinds["near"], "leaked": len(found), "rate": round(rate, 6),
                    "dropped": len(eval_rows) - len(kept), "action": leakage.action, "threshold": leakage.threshold},
    }
    with staged(train_out, eval_out, metrics, report) as (train_tmp, eval_tmp, metrics_tmp, report_tmp):
        for path, rows in ((train_tmp, weighted), (eval_tmp, kept), (report_tmp, found)):
            with open(path, "wb") as f:
                f.writelines(dumps({**r, "dropped": r["eval_id"] in drop} if path is report_tmp else r) for r in rows)
        write_json(metrics_tmp, summary)
    each = ", ".join(f"{s} x{v['weight']:g}: {v['rows']} -> {v['rows_out']}" for s, v in sources.items())
    print(f"mix: train {len(train_rows)} -> {len(weighted)} rows ({each}); eval {len(eval_rows)} rows, "
          f"{len(found)} leak from train ({kinds['exact']} exact, {kinds['near']} near at Jaccard >= "
          f"{leakage.threshold}), {len(eval_rows) - len(kept)} dropped; see {report}", file=sys.stderr)
    if leakage.action == "fail" and rate > leakage.max_fraction:
        raise StageError(f"{eval}: {len(found)} of {len(eval_rows)} eval rows leak from train ({rate:.1%} > "
                         f"leakage.max_fraction={leakage.max_fraction}; {kinds['exact']} exact, {kinds['near']} "
                         f"near at Jaccard >= {leakage.threshold}); see {report} for each pair: remove them from "
                         "a source, or set leakage.action to drop")
    if not kept:
        raise StageError(f"{eval}: every eval row leaks from train and leakage.action=drop removed them all; "
                         f"see {report}: give the eval split rows of its own")
    return summary
