"""Data stages at scale: validate -> format -> tokenize on N synthetic rows, against a naive baseline.

    python benchmarks/data_stages.py                  # N = 1,000,000 rows, then 2N for the memory check
    python benchmarks/data_stages.py --rows 100000    # a quicker look
    python benchmarks/data_stages.py --rows 100000 --no-baseline --no-double

What it does, in one run:
  1. writes a synthetic JSONL of N rows (and 2N, whose first N lines are the same): lengths like the
     shipped sample data with a lognormal tail (~1% of rows over tokenize.max_length), 80% qa, 12% alpaca,
     8% chat; ~1% bad lines of every reject kind, ~0.1% blank lines, a BOM and some CRLF endings;
  2. runs the project's own stages (validate, format, tokenize with params.yaml and models/base) on N and
     on 2N rows, each stage in its own child process, timing the stage and sampling the memory of the
     child and its workers;
  3. times the bare tokenizer's batch API on the same texts (encode_batch, and encode_batch_fast which
     skips offsets), for the tokenize ratio;
  4. runs a naive baseline on N rows: datasets.load_dataset("json") + per-row jsonschema (filter) +
     per-row template (map) + map(batched=True) tokenization, each step saved with save_to_disk;
  5. checks that every row is accounted for (kept + rejected + blank = read, each reject reason equal
     to what was planted, and so on through tokenize), prints a table and writes it with the raw numbers
     to benchmarks/results/data_stages_<date>_n<N>.{txt,json}.

Peak RSS: the largest sum of RSS over a stage's process tree (its workers included), sampled every
50 ms; pages a worker shares with its parent count twice, so this errs high. Beside it, the exact peak
(VmHWM) of the stage's main process. Needs models/base (tokenizer.json, base.json): `dvc repro import_base` makes it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models/base"
RESULTS = ROOT / "benchmarks/results"

# --------------------------------------------------------------------------------------------------
# Synthetic data

# Rare words that exercise the unicode paths: accents (one decomposed, so NFC changes it), CJK, emoji.
EXOTIC = ["café", "naïve", "Zoë", "e\u0301tude", "日本語", "😀", "São Paulo", "Ångström", "“quoted”"]
BAD_KINDS = ("invalid_json", "not_an_object", "schema", "empty_field", "duplicate", "too_long", "bad_encoding")
BAD_WEIGHTS = (4, 4, 4, 4, 4, 1, 4)  # too_long rows are 23 kB each: fewer of them
BLANK_RATE, BAD_RATE = 0.001, 0.010


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
    weights = [c for _, c in counts.most_common()] + [3] * len(EXOTIC)
    return words, weights


class Rows:
    """Deterministic synthetic rows. Lengths follow the sample data (questions ~8 words, answers ~25)
    with a lognormal tail; a fifth of the answers run over several lines."""

    def __init__(self, seed: int = 0):
        import numpy as np

        self.rng = random.Random(seed)
        words, weights = vocabulary()
        # One long stream of words drawn by frequency; a text is a slice of it at a random offset.
        p = np.asarray(weights, dtype=np.float64) / sum(weights)
        draw = np.random.default_rng(seed).choice(len(words), size=1 << 22, p=p)
        self.pool = [words[i] for i in draw.tolist()]
        self.good: list[bytes] = []  # a reservoir of earlier good lines, for planted duplicates

    def text(self, median: float, sigma: float, floor: int) -> str:
        n = max(floor, min(2000, int(self.rng.lognormvariate(0, sigma) * median)))
        start = self.rng.randrange(len(self.pool) - n)
        return " ".join(self.pool[start:start + n])

    def answer(self) -> str:
        if self.rng.random() < 0.2:  # a multi-line answer: escapes in the JSON
            return self.text(12, 0.8, 3) + self.rng.choice(["\n", "\n\n", "\n- "]) + self.text(12, 0.8, 3)
        return self.text(24, 0.8, 5)

    def good_row(self) -> dict:
        r = self.rng.random()
        if r < 0.80:
            row = {"input": self.text(8, 0.7, 3), "output": self.answer()}
        elif r < 0.92:
            row = {"instruction": self.text(8, 0.7, 3), "output": self.answer()}
            if r < 0.86:
                row["input"] = self.text(15, 0.8, 3)
        else:
            messages = [{"role": "system", "content": "You are a helpful support agent."}] if r < 0.95 else []
            for _ in range(self.rng.choice((1, 1, 2))):
                messages += [{"role": "user", "content": self.text(8, 0.7, 3)},
                             {"role": "assistant", "content": self.answer()}]
            row = {"messages": messages}
        if self.rng.random() < 0.05:
            row["source"] = "synthetic"  # an extra field: ignored, not fatal
        return row

    def bad_line(self, kind: str) -> bytes:
        rng = self.rng
        if kind == "invalid_json":  # cut short, at a character boundary (else it would be bad_encoding)
            text = orjson.dumps(self.good_row()).decode()
            return text[: rng.randrange(1, len(text) - 1)].encode()
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
            return line if rng.random() < 0.5 else b"  " + line  # the same row, or with stray whitespace
        if kind == "too_long":  # > validate.max_chars = 20000 characters
            return orjson.dumps({"input": self.text(8, 0.5, 3), "output": " ".join(["overflow"] * 2600)})
        line = orjson.dumps({"input": self.text(8, 0.5, 3) + " caf", "output": "x"})
        return line.replace(b" caf", b" caf\xe9")  # latin-1 e-acute: not UTF-8 -> bad_encoding


def generate(n: int, out_n: Path, out_2n: Path | None, loadable: Path | None, seed: int = 0) -> dict:
    """Writes n rows to `out_n` and 2n to `out_2n` (its first n lines are the same), plus, for the
    baseline, the first n lines minus those load_dataset("json") cannot load. Returns what each holds."""
    rows = Rows(seed)
    rng = rows.rng
    planted = {"n": Counter(), "2n": Counter()}
    with contextlib.ExitStack() as stack:
        def open_(path: Path | None):
            return stack.enter_context(open(path, "wb", buffering=1 << 20)) if path else None

        files, f_ld = {"n": open_(out_n), "2n": open_(out_2n)}, open_(loadable)
        for i in range(2 * n if out_2n else n):
            r = rng.random()
            if r < BLANK_RATE:
                kind, line = "blank", rng.choice([b"", b"   "])
            elif r < BLANK_RATE + BAD_RATE and rows.good:
                kind = rng.choices(BAD_KINDS, weights=BAD_WEIGHTS)[0]
                line = rows.bad_line(kind)
            else:
                kind, line = "kept", orjson.dumps(rows.good_row())
                if len(rows.good) < 1000:
                    rows.good.append(line)
                else:
                    rows.good[rng.randrange(1000)] = line
            if f_ld is not None and i < n and kind in ("kept", "empty_field", "duplicate", "too_long", "blank"):
                f_ld.write(line + b"\n")
            if i == 0:
                line = b"\xef\xbb\xbf" + line  # a BOM, as some Windows editors write
            end = b"\r\n" if rng.random() < 0.01 else b"\n"
            for key, f in files.items():
                if f is not None and (key == "2n" or i < n):
                    f.write(line + end)
                    planted[key][kind] += 1
    return {k: dict(v) for k, v in planted.items()}


# --------------------------------------------------------------------------------------------------
# Child processes: one stage each, so that time and memory are the stage's own


def child(spec: dict) -> dict:
    """Runs in a fresh interpreter: the stage named by spec["stage"]; returns its numbers."""
    sys.path.insert(0, str(ROOT))
    from stages.params import load_params

    params = load_params(ROOT / "params.yaml")
    p = {k: Path(v) for k, v in spec["paths"].items()}
    t0 = time.perf_counter()
    if spec["stage"] == "validate":
        from stages import validate
        out = validate.run(p["raw"], p["clean"], p["rejects"], p["report"], params.data, params.validate)
    elif spec["stage"] == "format":
        from stages import format as fmt
        out = {"rows": fmt.run(p["clean"], p["prompts"], params.template, BASE)}
    elif spec["stage"] == "tokenize":
        from stages import tokenize
        out = tokenize.run(p["prompts"], p["tokenized"], BASE, p["report"], p["rejects"], params.tokenize)
    elif spec["stage"] == "bare":
        return bare_tokenizer(p["prompts"], params.tokenize.batch_size)
    else:
        out = BASELINE[spec["stage"]](p, params)
    return {"seconds": time.perf_counter() - t0, "result": out}


def bare_tokenizer(prompts: Path, batch_size: int) -> dict:
    """The tokenizers batch API alone on the texts the tokenize stage sees; only the calls are timed."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode, seconds, rows, tokens, batch = getattr(tokenizer, name), 0.0, 0, 0, []
        with open(prompts, "rb") as f:
            for line in f:
                row = orjson.loads(line)
                batch.append(row["prompt"] + row["completion"])
                if len(batch) == batch_size:
                    t0 = time.perf_counter()
                    encodings = encode(batch)
                    seconds += time.perf_counter() - t0
                    rows, tokens, batch = rows + len(batch), tokens + sum(len(e) for e in encodings), []
                    del encodings
        if batch:
            t0 = time.perf_counter()
            encodings = encode(batch)
            seconds += time.perf_counter() - t0
            rows, tokens = rows + len(batch), tokens + sum(len(e) for e in encodings)
        out[name] = {"seconds": seconds, "rows": rows, "tokens": tokens, "rows_per_s": rows / seconds}
    return {"seconds": out["encode_batch"]["seconds"], "result": out}


# The naive baseline: what a first script with `datasets` looks like. It does less than the stages
# (no de-duplication, no NFC, no control characters, no rejects file, no line numbers) and cannot read
# the raw file at all (load_dataset("json") stops at the first bad line), so it gets only the lines
# it can load.


def baseline_validate(p: dict, params) -> dict:
    import datasets
    import jsonschema

    from stages.validate import SCHEMAS

    datasets.disable_progress_bars()
    try:  # the real raw file first: does the naive path survive bad lines?
        datasets.load_dataset("json", data_files=str(p["raw"]), split="train", cache_dir=str(p["cache"] / "dirty"))
        dirty = "loaded"
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        dirty = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(p["loadable"]), split="train", cache_dir=str(p["cache"]))
    loaded, rows_in = time.perf_counter() - t0, len(ds)
    validators = {name: jsonschema.Draft202012Validator(schema) for name, schema in SCHEMAS.items()}

    def ok(row: dict) -> bool:
        row = {k: v for k, v in row.items() if v is not None}
        shape = "chat" if "messages" in row else "alpaca" if "instruction" in row else "qa"
        if not validators[shape].is_valid(row):
            return False
        texts = [m["content"] for m in row["messages"]] if shape == "chat" else \
            [row.get("instruction") or row.get("input"), row["output"]]
        return all(t.strip() for t in texts)

    ds = ds.filter(ok)
    ds.save_to_disk(str(p["clean"]))
    return {"dirty_file": dirty, "rows_in": rows_in, "rows_out": len(ds), "load_seconds": loaded}


def baseline_format(p: dict, params) -> dict:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(str(p["clean"]))

    def render(row: dict) -> dict:
        if row.get("messages"):
            turns = row["messages"]
            last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
            question = "\n".join(m["content"] for m in turns[:last] if m["role"] != "system")
            answer = turns[last]["content"]
        else:
            question = row.get("instruction") or row["input"]
            if row.get("instruction") and row.get("input"):
                question += "\n\n" + row["input"]
            answer = row["output"]
        return {"prompt": f"### Question: {question.strip()}\n ### Answer:", "completion": " " + answer.strip()}

    ds = ds.map(render, remove_columns=ds.column_names)
    ds.save_to_disk(str(p["prompts"]))
    return {"rows": len(ds)}


def baseline_tokenize(p: dict, params) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    eos, max_length = tokenizer.eos_token_id, params.tokenize.max_length
    ds = datasets.load_from_disk(str(p["prompts"]))

    def tokenize(batch: dict) -> dict:
        full = tokenizer([a + b for a, b in zip(batch["prompt"], batch["completion"])])["input_ids"]
        prompt_lengths = [len(x) for x in tokenizer(batch["prompt"])["input_ids"]]
        out = {"input_ids": [], "labels": [], "length": []}
        for ids, n in zip(full, prompt_lengths):
            ids = (ids + [eos])[-max_length:]
            n = max(0, n - (len(ids) - max_length)) if len(ids) >= max_length else n
            out["input_ids"].append(ids)
            out["labels"].append([-100] * n + ids[n:])
            out["length"].append(len(ids))
        return out

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    ds.save_to_disk(str(p["tokenized"]))
    return {"rows": len(ds), "tokens": None}


BASELINE = {"baseline_validate": baseline_validate, "baseline_format": baseline_format,
            "baseline_tokenize": baseline_tokenize}


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak RSS of one process since it started its program (ru_maxrss would also count the RSS of the
    parent it was forked from: the benchmark's own, here)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all processes, all cores), and time stolen from it."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def run_child(spec: dict, workdir: Path) -> dict:
    """Runs `child(spec)` in a new interpreter; adds process wall time, memory peaks, and how much of
    the machine other work took meanwhile (busy CPU time not ours, in cores: 0 = a quiet machine)."""
    import psutil

    result_path = workdir / f"result-{spec['stage']}-{spec['tag']}.json"
    spec = {**spec, "result": str(result_path)}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_DATASETS_CACHE": str(workdir / "hf-cache"),
           "HF_HUB_OFFLINE": "1"}
    log = workdir / f"log-{spec['stage']}-{spec['tag']}.txt"
    busy0, own0 = busy_cpu_seconds(), time.process_time()
    t0 = time.perf_counter()
    with open(log, "wb") as log_file:  # a file, not a pipe: a chatty child must not block on a full pipe
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    peak = {"tree_rss": 0}
    stop = threading.Event()

    def sample() -> None:  # the whole tree: workers of validate and format count too
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                total = 0
            peak["tree_rss"] = max(peak["tree_rss"], total)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # usage: the child's CPU time, its workers' included
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ours = usage.ru_utime + usage.ru_stime + time.process_time() - own0
    others = max(0.0, busy_cpu_seconds() - busy0 - ours) / wall
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{spec['stage']} ({spec['tag']}) failed ({proc.returncode}):\n{tail}")
    out = json.loads(result_path.read_text())
    out.update(process_seconds=wall, peak_tree_rss_mb=peak["tree_rss"] / 2**20, cpu_seconds=ours,
               other_load_cores=others)
    return out


# --------------------------------------------------------------------------------------------------
# The run


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    versions = {}
    for lib in ("orjson", "jsonschema", "numpy", "pyarrow", "tokenizers", "datasets",
                "transformers", "psutil"):
        try:
            versions[lib] = md.version(lib)
        except md.PackageNotFoundError:
            versions[lib] = None
    git = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, text=True, check=False)
    commit = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = git(["git", "status", "--porcelain", "stages", "benchmarks/data_stages.py"]).stdout.strip()
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_mb": mem, "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "git_commit": commit + ("+uncommitted changes" if dirty else "")}


def busy() -> list[str]:
    """Other heavy work on the machine now (another test suite, a training run): timings get noisy."""
    out = subprocess.run(["pgrep", "-af", "pytest|finetune train|dvc repro"], capture_output=True, text=True,
                         check=False).stdout
    return [line for line in out.splitlines() if str(os.getpid()) not in line and "pgrep" not in line]


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_stages(raw: Path, tag: str, work: Path) -> dict:
    d = work / tag
    d.mkdir()
    paths = {"raw": raw, "clean": d / "clean.jsonl", "rejects": d / "rejects.jsonl", "report": d / "validate.json"}
    out = {"validate": run_child({"stage": "validate", "tag": tag, "paths": {k: str(v) for k, v in paths.items()}}, work)}
    paths = {"clean": d / "clean.jsonl", "prompts": d / "prompts.jsonl"}
    out["format"] = run_child({"stage": "format", "tag": tag, "paths": {k: str(v) for k, v in paths.items()}}, work)
    paths = {"prompts": d / "prompts.jsonl", "tokenized": d / "tokenized", "report": d / "tokenize.json",
             "rejects": d / "tokenize_rejects.jsonl"}
    out["tokenize"] = run_child({"stage": "tokenize", "tag": tag, "paths": {k: str(v) for k, v in paths.items()}}, work)
    out["files"] = {"clean": count_lines(d / "clean.jsonl"), "rejects": count_lines(d / "rejects.jsonl"),
                    "prompts": count_lines(d / "prompts.jsonl"),
                    "tokenize_rejects": count_lines(d / "tokenize_rejects.jsonl")}
    import datasets

    ds = datasets.load_from_disk(str(d / "tokenized"))
    out["files"]["tokenized"] = len(ds)
    out["files"]["tokenized_features"] = {k: str(v) for k, v in ds.features.items()}
    return out


def accounting(run: dict, planted: dict, n_lines: int) -> list[tuple[str, bool, str]]:
    """(check, passed, figures): every line ends in exactly one place, through all three stages."""
    v, t = run["validate"]["result"], run["tokenize"]["result"]
    f = run["files"]
    planted_rejects = {k: planted.get(k, 0) for k in BAD_KINDS}
    reported = {k: v[f"rejected_{k}"] for k in BAD_KINDS}
    dtypes = f["tokenized_features"]
    return [
        ("validate read every line", v["lines"] == n_lines, f"{v['lines']:,} of {n_lines:,}"),
        ("kept + rejected + blank = read", v["kept"] + v["rejected"] + v["blank"] == v["lines"],
         f"{v['kept']:,} + {v['rejected']:,} + {v['blank']:,} = {v['kept'] + v['rejected'] + v['blank']:,}"),
        ("each reject reason = what was planted", reported == planted_rejects,
         ", ".join(f"{k} {reported[k]}/{planted_rejects[k]}" for k in BAD_KINDS)),
        ("blank = planted, kept = planted", v["blank"] == planted.get("blank", 0) and v["kept"] == planted.get("kept", 0),
         f"blank {v['blank']}/{planted.get('blank', 0)}, kept {v['kept']:,}/{planted.get('kept', 0):,}"),
        ("files: clean = kept, rejects = rejected", f["clean"] == v["kept"] and f["rejects"] == v["rejected"],
         f"{f['clean']:,} clean lines, {f['rejects']:,} reject lines"),
        ("format: prompts = kept", run["format"]["result"]["rows"] == v["kept"] == f["prompts"],
         f"{f['prompts']:,} prompt lines"),
        ("tokenize: kept + dropped = read = prompts",
         t["rows_out"] + t["dropped_too_long"] + t["dropped_no_trained_tokens"] == t["rows_in"] == f["prompts"]
         and f["tokenize_rejects"] == t["dropped_too_long"] + t["dropped_no_trained_tokens"],
         f"{t['rows_out']:,} + {t['dropped_too_long'] + t['dropped_no_trained_tokens']:,} = {t['rows_in']:,}"),
        ("load_from_disk: rows and dtypes", f["tokenized"] == t["rows_out"] and dtypes == {
            "id": "Value('string')", "input_ids": "List(Value('int32'))", "labels": "List(Value('int32'))",
            "length": "Value('int32')"}, f"{f['tokenized']:,} rows, input_ids/labels int32 lists"),
    ]


def table(report: dict) -> str:
    n = report["rows"]
    runs, base, bare = report["runs"], report.get("baseline"), report["bare_tokenizer"]
    lines = [
        (f"finetune data stages: validate -> format -> tokenize, {n:,} rows"
         + (f" (and {2 * n:,} for the memory check)" if "2N" in runs else "")),
        (f"date {report['date']}  machine: {report['machine']['cpu_model']}, {report['machine']['cpus_usable']} cpus, "
         f"{report['machine']['memory_mb'] / 1024:.0f} GiB, Python {report['machine']['python']}"),
        f"command: {report['command']}",
        f"load: {report['load']}",
        "",
        (f"{'stage':<10} {'rows':>11} {'rows/s':>10} {'stage s':>8} {'process s':>9} {'peak RSS MB':>11} "
         f"{'main proc':>10} {'others':>7}"),
    ]
    for tag in runs:
        for stage in ("validate", "format", "tokenize"):
            r = runs[tag][stage]
            rows = r["rows_in"]
            lines.append(f"{stage + ' ' + tag:<10} {rows:>11,} {rows / r['seconds']:>10,.0f} {r['seconds']:>8.1f} "
                         f"{r['process_seconds']:>9.1f} {r['peak_tree_rss_mb']:>11.0f} {r['vm_hwm_mb']:>10.0f} "
                         f"{r['other_load_cores']:>7.2f}")
        total = sum(runs[tag][s]["process_seconds"] for s in ("validate", "format", "tokenize"))
        peak = max(runs[tag][s]["peak_tree_rss_mb"] for s in ("validate", "format", "tokenize"))
        lines.append(f"{'total ' + tag:<10} {runs[tag]['validate']['rows_in']:>11,} "
                     f"{runs[tag]['validate']['rows_in'] / total:>10,.0f} {'':>8} {total:>9.1f} {peak:>11.0f}")
        lines.append("")
    lines.append("peak RSS: the largest sum over the stage's process tree (workers included, shared pages counted "
                 "twice); main proc: its main process alone (VmHWM); others: cores busy with other work meanwhile")
    lines.append("")
    eb, ef = bare["encode_batch"], bare["encode_batch_fast"]
    lines.append(f"bare tokenizer on the same {eb['rows']:,} texts ({eb['tokens'] / eb['rows']:.0f} tokens a row): "
                 f"encode_batch {eb['rows_per_s']:,.0f} rows/s ({eb['tokens'] / eb['seconds']:,.0f} tokens/s), "
                 f"encode_batch_fast (no offsets) {ef['rows_per_s']:,.0f} rows/s")
    lines.append(f"  (the tokenizer's calls alone take {eb['seconds']:.0f} s of wall time on these rows: a floor under "
                 "the total)")
    if base:
        lines += ["", f"naive baseline (N): load_dataset('json') on the raw file: {base['dirty_file']}",
                  f"  so it ran on the {base['loaded_rows']:,} rows it can load (rows/s per those rows):"]
        for stage in ("validate", "format", "tokenize"):
            r = base[stage]
            lines.append(f"{stage + ' naive':<10} {r['rows_in']:>11,} {r['rows_in'] / r['seconds']:>10,.0f} "
                         f"{r['seconds']:>8.1f} {r['process_seconds']:>9.1f} {r['peak_tree_rss_mb']:>11.0f} "
                         f"{r['vm_hwm_mb']:>10.0f} {r['other_load_cores']:>7.2f}")
        total = sum(base[s]["process_seconds"] for s in ("validate", "format", "tokenize"))
        lines.append(f"{'total naive':<10} {base['loaded_rows']:>11,} {base['loaded_rows'] / total:>10,.0f} "
                     f"{'':>8} {total:>9.1f}")
    lines += ["", "ratios:"]
    for k, v in report["ratios"].items():
        lines.append(f"  {k:<58} {v:.2f}")
    lines += ["", "goals:"]
    for name, ok, figures in report["goals"]:
        lines.append(f"  [{'met' if ok else 'NOT met'}] {name}: {figures}")
    for tag, checks in report["accounting"].items():
        lines += ["", f"accounting ({tag}):"]
        for name, ok, figures in checks:
            lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}: {figures}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="N (default 1,000,000)")
    ap.add_argument("--no-double", action="store_true", help="skip the 2N run (the memory check)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive datasets baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir; ~1 GB per 1M rows)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        out = child(spec)
        out["vm_hwm_mb"] = vm_hwm_mb()
        Path(spec["result"]).write_text(json.dumps(out))
        return 0
    if not (BASE / "tokenizer.json").exists() or not (BASE / "base.json").exists():
        raise SystemExit(f"{BASE}: no tokenizer.json/base.json; the benchmark tokenizes with the project's base model. "
                         "Make it first: `dvc repro import_base` (or `finetune import-base`).")
    n = args.rows
    started = dt.datetime.now().astimezone()
    command = "python benchmarks/data_stages.py" + "".join(f" {a}" for a in sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.workdir))
    report = {"date": started.isoformat(timespec="seconds"), "command": command, "rows": n, "machine": machine(),
              "busy_at_start": busy(), "loadavg_at_start": os.getloadavg()}
    try:
        print(f"generating {n:,}{'' if args.no_double else f' and {2 * n:,}'} rows in {work} ...", file=sys.stderr)
        t0 = time.perf_counter()
        raw_n, raw_2n, loadable = work / "raw_n.jsonl", work / "raw_2n.jsonl", work / "loadable_n.jsonl"
        planted = generate(n, raw_n, None if args.no_double else raw_2n, None if args.no_baseline else loadable,
                           args.seed)
        report["generate_seconds"] = time.perf_counter() - t0
        report["planted"] = planted
        report["runs"], report["accounting"] = {}, {}
        for tag, raw, size in (("N", raw_n, n), ("2N", raw_2n, 2 * n))[: 1 if args.no_double else 2]:
            print(f"stages on {size:,} rows ...", file=sys.stderr)
            run = run_stages(raw, tag, work)
            run["validate"]["rows_in"] = run["validate"]["result"]["lines"]
            run["format"]["rows_in"] = run["validate"]["result"]["kept"]
            run["tokenize"]["rows_in"] = run["tokenize"]["result"]["rows_in"]
            report["runs"][tag] = run
            report["accounting"][tag] = accounting(run, planted["n" if tag == "N" else "2n"], size)
        print("bare tokenizer ...", file=sys.stderr)
        bare = run_child({"stage": "bare", "tag": "N", "paths": {"prompts": str(work / "N" / "prompts.jsonl")}}, work)
        report["bare_tokenizer"] = {**bare["result"], "other_load_cores": bare["other_load_cores"]}
        if not args.no_baseline:
            print("naive baseline ...", file=sys.stderr)
            d = work / "naive"
            paths = {"raw": raw_n, "loadable": loadable, "cache": d / "cache", "clean": d / "clean",
                     "prompts": d / "prompts", "tokenized": d / "tokenized"}
            paths = {k: str(v) for k, v in paths.items()}
            base = {}
            for stage in ("validate", "format", "tokenize"):
                base[stage] = run_child({"stage": f"baseline_{stage}", "tag": "N", "paths": paths}, work)
            base["dirty_file"] = base["validate"]["result"]["dirty_file"]
            base["loaded_rows"] = base["validate"]["result"]["rows_in"]
            base["validate"]["rows_in"] = base["loaded_rows"]
            base["format"]["rows_in"] = base["validate"]["result"]["rows_out"]
            base["tokenize"]["rows_in"] = base["format"]["result"]["rows"]
            report["baseline"] = base
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    runs, bare = report["runs"], report["bare_tokenizer"]
    rN = runs["N"]
    total_n = sum(rN[s]["process_seconds"] for s in ("validate", "format", "tokenize"))
    rate = {s: rN[s]["rows_in"] / rN[s]["seconds"] for s in ("validate", "format", "tokenize")}
    peak_n = max(rN[s]["peak_tree_rss_mb"] for s in ("validate", "format", "tokenize"))
    ratios = {
        "bare encode_batch rows/s / tokenize stage rows/s": bare["encode_batch"]["rows_per_s"] / rate["tokenize"],
        "bare encode_batch_fast rows/s / tokenize stage rows/s": bare["encode_batch_fast"]["rows_per_s"] / rate["tokenize"],
    }
    goals = [
        ("validate -> format -> tokenize on N rows <= 60 s wall", total_n <= 60, f"{total_n:.1f} s"),
        ("validate >= 200,000 rows/s", rate["validate"] >= 200_000, f"{rate['validate']:,.0f} rows/s"),
        ("tokenize within 1.5x of the bare tokenizer's batch speed (encode_batch)",
         ratios["bare encode_batch rows/s / tokenize stage rows/s"] <= 1.5,
         (f"{ratios['bare encode_batch rows/s / tokenize stage rows/s']:.2f}x "
          f"({ratios['bare encode_batch_fast rows/s / tokenize stage rows/s']:.2f}x of encode_batch_fast)")),
        ("peak RSS <= 1 GB (largest stage, whole process tree)", peak_n <= 1024, f"{peak_n:.0f} MB"),
    ]
    if "2N" in runs:
        r2 = runs["2N"]
        peak_2n = max(r2[s]["peak_tree_rss_mb"] for s in ("validate", "format", "tokenize"))
        ratios["peak RSS 2N / N (largest stage)"] = peak_2n / peak_n
        for s in ("validate", "format", "tokenize"):
            ratios[f"peak RSS 2N / N ({s})"] = r2[s]["peak_tree_rss_mb"] / rN[s]["peak_tree_rss_mb"]
        goals.append(("peak RSS within 10% between N and 2N rows", peak_2n <= 1.10 * peak_n,
                      f"{peak_n:.0f} MB -> {peak_2n:.0f} MB ({peak_2n / peak_n - 1:+.1%}); per stage "
                      + ", ".join(f"{s} {ratios[f'peak RSS 2N / N ({s})'] - 1:+.1%}" for s in ("validate", "format", "tokenize"))))
    if "baseline" in report:
        b = report["baseline"]
        total_b = sum(b[s]["process_seconds"] for s in ("validate", "format", "tokenize"))
        ratios["naive baseline wall (its rows) / stages wall (N rows)"] = total_b / total_n
        for s in ("validate", "format", "tokenize"):
            ratios[f"{s} rows/s: stages / naive"] = rate[s] / (b[s]["rows_in"] / b[s]["seconds"])
    goals.append(("every row accounted for", all(ok for checks in report["accounting"].values() for _, ok, _ in checks),
                  ", ".join(f"{tag}: {sum(ok for _, ok, _ in checks)}/{len(checks)} checks" for tag, checks in report["accounting"].items())))
    report["ratios"], report["goals"] = ratios, goals
    report["busy_at_end"], report["loadavg_at_end"] = busy(), os.getloadavg()
    others = sorted(set(report["busy_at_start"] + report["busy_at_end"]))
    children = [r for run in runs.values() for r in (run["validate"], run["format"], run["tokenize"])]
    children += [report["baseline"][s] for s in ("validate", "format", "tokenize")] if "baseline" in report else []
    worst = max([r["other_load_cores"] for r in children] + [bare["other_load_cores"]])
    report["load"] = (f"other work took up to {worst:.2f} cores during a step (0 = a quiet machine); "
                      f"loadavg {report['loadavg_at_start'][0]:.2f} at start, {report['loadavg_at_end'][0]:.2f} at end"
                      + ("; UNDER LOAD" if worst > 0.25 or others else "")
                      + (f"; other work seen: {'; '.join(o[:80] for o in others)}" if others else ""))
    text = table(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"data_stages_{started:%Y-%m-%d}_n{n}"
    stem.with_suffix(".txt").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {stem}.txt and .json", file=sys.stderr)
    return 0 if goals[-1][1] else 1


if __name__ == "__main__":
    sys.exit(main())
