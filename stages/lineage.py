"""Lineage: which base, data, rows, params and code produced a model.

`lineage.json` sits beside the adapter (written by train) and the merged model (copied by merge):
  base        source, revision, sha256 of the weights, parameter count
  model       how train loaded the base: quantize (4bit | none) and dtype as resolved from `auto` on
              the training machine, attn_implementation; evaluate and merge load it the same way
  data        each raw data file (a source folder: each of its .jsonl files) with its md5 (the value
              dvc.lock records for a file; a folder's .dir entry lists them), its source name and,
              given the train rows with their sources, how many rows were trained on from it
              (`rows_trained`: copies counted, so a source weighted 2.0 counts each row twice)
  rows        how many rows were trained on and the sha256 of their ids, in order
  params      the full params used, URLs redacted (`params.redact`)
  git         the last commit that changed the code, and whether the code had uncommitted changes
  dvc_experiment, versions of the libraries
No timestamp: an identical retrain must give the same bytes, so DVC skips what depends on the adapter
(the time a run finished is `created` in metrics/train.json). `finetune lineage DIR --verify` recomputes
the data and base hashes on disk and compares them, and the data hashes to dvc.lock; any mismatch is
named and the command exits 1. The paths in the record are relative to the repo root, the folder of
that dvc.lock (`--lock`), so a model far from the repo is verified against it from anywhere.

A GGUF file (export) carries the same record in its metadata (`gguf_metadata`: the JSON under
`finetune.lineage`, and a one-line `finetune.summary`); `read` takes a .gguf file as well as a folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from collections import Counter
from pathlib import Path

import orjson

from stages.errors import StageError
from stages.jsonl import file_md5, weights_hash
from stages.jsonl import sources as split_sources
from stages.params import ModelParams, Params, as_dict, redact

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers", "dvc", "finetune")


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


CODE = ("stages", "configs", "dvc.yaml", "pyproject.toml", "constraints.txt")


def git_state() -> dict:
    """The last commit that changed the code (CODE), and whether the code has uncommitted changes. Not
    HEAD: committing a run's results (dvc.lock, metrics) must not change what a retrain records."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-list", "-1", "HEAD", "--", *CODE)
    return {"commit": commit or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE))}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def row_sources(rows: Path) -> dict[str, str]:
    """id -> source of each row of a file of clean rows (mix's train output)."""
    from stages.jsonl import read_jsonl

    return {r["id"]: r["source"] for r in read_jsonl(rows)}


def build(params: Params, base_meta: dict, data_paths: list[Path], ids: list[str], quantized: bool,
          dtype: str, sources: dict[str, str] | None = None) -> dict:
    """The record train writes; `quantized` and `dtype` are how it loaded the base (auto resolved);
    `sources`: id -> source name of the train rows, to count the rows trained from each data file."""
    trained = Counter(sources.get(i) for i in ids) if sources is not None else None
    data = []
    # a folder stands for its sources, as validate reads them
    for p in (f for path in data_paths for _, f in split_sources(path)):
        entry = {"path": str(p), "md5": file_md5(p), "source": p.name}
        if trained is not None:
            entry["rows_trained"] = trained.get(p.name, 0)
        data.append(entry)
    return {
        "base": {k: base_meta.get(k) for k in ("source", "revision", "sha256", "parameters")},
        "model": {"quantize": "4bit" if quantized else "none", "dtype": dtype,
                  "attn_implementation": params.model.attn_implementation},
        "data": data,
        "rows": {"count": len(ids), "ids_sha256": ids_hash(ids)},
        "params": redact(as_dict(params)),
        "git": git_state(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
        "versions": versions(),
    }


def trained_model(record: dict) -> ModelParams:
    """model params as the adapter was trained: evaluate and merge load the base this way, whatever
    params.yaml says today (a record from before `model` was recorded falls back to its params)."""
    return ModelParams(**{**record["params"]["model"], **record.get("model", {})})


def require_base(record: dict, base: Path, adapter: Path) -> None:
    """Refuse a base other than the one the adapter was trained on (its weights' sha256)."""
    meta_path = base / "base.json"
    got = orjson.loads(meta_path.read_bytes()).get("sha256") if meta_path.exists() else None
    want = record["base"]
    if got != want["sha256"]:
        raise StageError(f"{base}: base weights sha256 {(got or 'missing')[:16]}, but {adapter} was trained on "
                         f"{want['source']} sha256 {want['sha256'][:16]}; pass that base with --base, or retrain "
                         "(`dvc repro train`)")


GGUF_KEY = "finetune.lineage"


def params_sha256(record: dict) -> str:
    """The sha256 of the params the model was trained with (key order does not count)."""
    return hashlib.sha256(orjson.dumps(record["params"], option=orjson.OPT_SORT_KEYS)).hexdigest()


def gguf_metadata(record: dict) -> dict[str, str]:
    """The string key/values an exported GGUF carries: the whole record as JSON, and a one-line summary."""
    b, r, g = record["base"], record["rows"], record["git"]
    summary = (f"fine-tuned from {b['source']} (sha256 {b['sha256'][:16]}) on {r['count']} rows "
               f"(ids sha256 {r['ids_sha256'][:16]}) of " + ", ".join(f"{d['path']} md5 {d['md5']}" for d in record["data"])
               + f"; params sha256 {params_sha256(record)[:16]}; code commit {g['commit'] or '-'}"
               + (" (uncommitted changes)" if g["dirty"] else ""))
    return {GGUF_KEY: orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode(), "finetune.summary": summary}


def read_gguf(path: Path) -> dict:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get(GGUF_KEY)
    except (ValueError, IndexError) as e:  # bad magic or version, a file cut short
        raise StageError(f"{path}: not a readable GGUF file ({e})") from None
    if field is None:
        raise StageError(f"{path}: this GGUF file has no {GGUF_KEY} metadata (it was not written by "
                         "`finetune export`); its lineage is unknown")
    return orjson.loads(field.contents())


def read(path: Path) -> dict:
    """The lineage record of a model folder (its lineage.json) or of an exported .gguf file."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return read_gguf(path)
        raise StageError(f"{path}: not a model folder or a GGUF file; pass models/adapter, models/merged or "
                         "a .gguf file made by `finetune export`")
    if not path.exists():
        raise StageError(f"{path}: no such file or folder; pass models/adapter, models/merged or a .gguf file "
                         "made by `finetune export`")
    lineage_path = path / "lineage.json"
    if not lineage_path.exists():
        raise StageError(f"{lineage_path}: no lineage record (models/adapter and models/merged carry one; "
                         "was this directory made by `finetune train`/`merge`?)")
    return orjson.loads(lineage_path.read_bytes())


def describe(record: dict) -> str:
    b, r, g = record["base"], record["rows"], record["git"]
    lines = [
        f"base      {b['source']}" + (f" @ {b['revision']}" if b.get("revision") else "")
        + f"  sha256 {b['sha256'][:16]}  {b['parameters']:,} parameters",
        *[f"data      {d['path']}  md5 {d['md5']}" + (f"  {d['rows_trained']} rows trained" if "rows_trained" in d
                                                    else "") for d in record["data"]],
        f"rows      {r['count']} trained rows, ids sha256 {r['ids_sha256'][:16]}",
        f"code      commit {g['commit'] or '(not a git repo)'}" + ("  (uncommitted changes)" if g["dirty"] else ""),
        f"exp       {record.get('dvc_experiment') or '(plain dvc repro / direct run)'}",
        f"params    sha256 {params_sha256(record)[:16]}  " + ", ".join(f"{k}={v}" for k, v in flat(record["params"]).items()
                                 if k.split(".")[0] in ("seed", "lora", "train") or k == "model.source"),
        "versions  " + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v),
    ]
    if "merge" in record:
        lines.append(f"merge     into {record['merge']['into']}, parity max |dlogit| "
                     f"{record['merge']['parity_max_abs_diff']:.3g}")
    return "\n".join(lines)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def lock_md5s(lock: Path) -> dict[str, str]:
    """path -> md5 for every dependency and output recorded in dvc.lock."""
    from ruamel.yaml import YAML

    data = YAML(typ="safe", pure=True).load(lock.read_text()) or {}
    out = {}
    for stage in (data.get("stages") or {}).values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            if "md5" in entry:
                out[entry["path"]] = entry["md5"]
    return out


def verify(record: dict, lock: Path, base_dir: Path | None = None) -> list[str]:
    """What differs between the record and the repo of `lock` (its data, its models/base, the lock)."""
    if not lock.is_file():
        raise StageError(f"{lock}: missing; --verify compares the lineage with the repo that made the model: "
                         "run it in that repo's root or pass --lock REPO/dvc.lock")
    root = lock.parent
    base_dir = root / "models/base" if base_dir is None else base_dir
    problems = []
    locked = lock_md5s(lock)
    for d in record["data"]:
        path = root / d["path"]
        if not path.exists():
            problems.append(f"{path}: missing (trained on md5 {d['md5']})")
            continue
        now = file_md5(path)
        if now != d["md5"]:
            problems.append(f"{path}: md5 {now} on disk, the model was trained on md5 {d['md5']}")
        if d["path"] in locked and locked[d["path"]] != d["md5"]:
            problems.append(f"{lock}: records md5 {locked[d['path']]} for {path}, the model was trained on {d['md5']}")
    meta_path = base_dir / "base.json"
    if not meta_path.exists():
        problems.append(f"{meta_path}: missing (base {record['base']['source']} not imported here)")
    else:
        meta = orjson.loads(meta_path.read_bytes())
        if meta.get("weights") != "hub":
            meta["sha256"], _ = weights_hash(sorted(base_dir.glob("*.safetensors")))
        if meta["sha256"] != record["base"]["sha256"]:
            problems.append(f"{base_dir}: weights sha256 {meta['sha256'][:16]} on disk, the model was trained on "
                            f"{record['base']['sha256'][:16]}")
    return problems
