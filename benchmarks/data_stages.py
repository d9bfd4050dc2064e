"""GEN DRAFT"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent

# Rare words that exercise the unicode paths: accents (one decomposed, so NFC changes it), CJK, emoji.
EXOTIC = ["café", "naïve", "Zoë", "e\u0301tude", "日本語", "😀", "São Paulo", "Ångström"]
BAD_KINDS = ("invalid_json", "not_an_object", "schema", "empty_field", "duplicate", "too_long", "bad_encoding")


def vocabulary() -> tuple[list[str], list[int]]:
    """Words of the shipped sample data with their counts (a real Zipf-like mix), plus a few exotic ones."""
    counts: Counter = Counter()
    for split in ("train", "eval"):
        for line in (ROOT / "data/raw" / f"{split}.jsonl").read_bytes().splitlines():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(row, dict):
                counts.update(w for v in row.values() if isinstance(v, str) for w in v.split())
    words = [w for w, _ in counts.most_common()] + EXOTIC
    weights = [c for _, c in counts.most_common()] + [2] * len(EXOTIC)
    return words, weights


class Rows:
    """Deterministic synthetic rows. Lengths follow the sample data (questions ~7 words, answers ~23) with a
    lognormal tail, so ~1% of rows pass tokenize.max_length=256 and exercise truncation."""

    def __init__(self, seed: int = 0):
        import numpy as np

        self.rng = random.Random(seed)
        words, weights = vocabulary()
        # One long stream of words drawn by frequency; a text is a slice of it at a random offset.
        # 4M words: slices collide (same offset and length in question and answer) with odds ~1e-6 per run.
        p = np.asarray(weights, dtype=np.float64) / sum(weights)
        draw = np.random.default_rng(seed).choice(len(words), size=1 << 22, p=p)
        self.pool = [words[i] for i in draw.tolist()]
        self.good: list[bytes] = []  # a reservoir of earlier good rows, for planted duplicates

    def text(self, median: float, sigma: float, floor: int) -> str:
        n = max(floor, min(2000, int(self.rng.lognormvariate(0, sigma) * median)))
        start = self.rng.randrange(len(self.pool) - n)
        return " ".join(self.pool[start:start + n])

    def good_row(self) -> dict:
        r = self.rng.random()
        q, a = self.text(8, 0.7, 3), self.text(24, 0.8, 5)
        if r < 0.80:
            row = {"input": q, "output": a}
        elif r < 0.92:
            row = {"instruction": q, "output": a}
            if r < 0.86:
                row["input"] = self.text(15, 0.8, 3)
        else:
            messages = [{"role": "system", "content": "You are a helpful support agent."}] if r < 0.95 else []
            for _ in range(self.rng.choice((1, 1, 2))):
                messages += [{"role": "user", "content": self.text(8, 0.7, 3)},
                             {"role": "assistant", "content": self.text(20, 0.8, 5)}]
            row = {"messages": messages}
        if self.rng.random() < 0.05:
            row["source"] = "synthetic"  # an extra field: ignored, not fatal
        return row

    def bad_line(self, kind: str) -> bytes:
        rng = self.rng
        if kind == "invalid_json":
            line = orjson.dumps(self.good_row())
            return line[: rng.randrange(1, len(line) - 1)]
        if kind == "not_an_object":
            return rng.choice([b"null", b"42", b'"just a string"', b'["a", "b"]'])
        if kind == "schema":
            return rng.choice([
                orjson.dumps({"input": rng.randrange(100), "output": self.text(5, 0.5, 1)}),
                orjson.dumps({"output": self.text(5, 0.5, 1)}),
                orjson.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
                orjson.dumps({"input": {"nested": "object"}, "output": "x"}),
            ])
        if kind == "empty_field":
            return orjson.dumps({"input": rng.choice(["", "   ", "\t\u0007"]), "output": self.text(10, 0.5, 1)})
        if kind == "duplicate":
            line = rng.choice(self.good)
            return line if rng.random() < 0.5 else b"  " + line  # same row, or with stray whitespace
        if kind == "too_long":  # > validate.max_chars = 20000 characters
            return orjson.dumps({"input": self.text(8, 0.5, 3), "output": " ".join(["overflow"] * 2600)})
        line = orjson.dumps({"input": self.text(8, 0.5, 3) + " caf", "output": "x"})
        return line.replace(b" caf", b" caf\xe9")  # latin-1 e-acute: not UTF-8 -> bad_encoding


def generate(n: int, out_n: Path, out_2n: Path | None, loadable: Path | None, seed: int = 0) -> dict:
    """Writes n rows to `out_n` and 2n rows to `out_2n` (the first n are the same lines), plus, for the baseline,
    the first n rows minus those `load_dataset("json")` cannot load. Returns what was planted in each."""
    rows = Rows(seed)
    rng = rows.rng
    kind_weights = [4, 4, 4, 4, 4, 1, 4]  # too_long rows are 23 kB each: fewer of them
    planted = {"n": Counter(), "2n": Counter()}
    total = 2 * n if out_2n else n
    f_n = open(out_n, "wb", buffering=1 << 20)
    f_2n = open(out_2n, "wb", buffering=1 << 20) if out_2n else None
    f_ld = open(loadable, "wb", buffering=1 << 20) if loadable else None
    try:
        for i in range(total):
            r = rng.random()
            if r < 0.001:
                kind, line = "blank", rng.choice([b"", b"   "])
            elif r < 0.011 and rows.good:
                kind = rng.choices(BAD_KINDS, weights=kind_weights)[0]
                line = rows.bad_line(kind)
            else:
                kind, line = "kept", orjson.dumps(rows.good_row())
                if len(rows.good) < 1000:
                    rows.good.append(line)
                else:
                    rows.good[rng.randrange(1000)] = line
            if i == 0:
                line = b"\xef\xbb\xbf" + line  # a BOM, as editors on Windows write it
            end = b"\r\n" if rng.random() < 0.01 else b"\n"
            for key, f in (("n", f_n), ("2n", f_2n)):
                if f is not None and (key == "2n" or i < n):
                    f.write(line + end)
                    planted[key][kind] += 1
            if f_ld is not None and i < n and kind in ("kept", "empty_field", "duplicate", "too_long", "blank"):
                f_ld.write(line.removeprefix(b"\xef\xbb\xbf") + b"\n")
    finally:
        for f in (f_n, f_2n, f_ld):
            if f is not None:
                f.close()
    return {k: dict(v) for k, v in planted.items()}


if __name__ == "__main__":
    import sys, time
    n = int(sys.argv[1])
    t = time.perf_counter()
    print(generate(n, Path(f"/tmp/scratch/raw_{n}.jsonl"), Path(f"/tmp/scratch/raw_{2*n}.jsonl"), Path(f"/tmp/scratch/ld_{n}.jsonl")))
    print(time.perf_counter() - t)
