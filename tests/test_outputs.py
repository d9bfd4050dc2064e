"""Nothing lost: through the real `finetune` CLI, on temp dirs, a stage never deletes or overwrites what
is not its own output, writes all its outputs or none, and leaves no process behind when killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
RAW = ('{"input": "How do I reset?", "output": "Hold the button."}\n'
       '{"input": "Where is the manual?", "output": "In the box."}\n')


def finetune(*args, cwd: Path, prefix: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "stages.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(p: subprocess.CompletedProcess, *words: str) -> str:
    """The stage failed with one `error:` line holding `words`; returns that line."""
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working folder laid out like the project's, with previous outputs of each kind in place."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    files = {
        "data/raw/train.jsonl": RAW,
        "data/raw/notes.md": "the team's notes\n",
        "data/clean/train.jsonl": '{"id": "old", "messages": []}\n',
        "data/clean/other.txt": "someone else's file\n",
        "data/rejects/train.jsonl": '{"line": 9, "reason": "schema", "detail": "old", "raw": "x"}\n',
        "data/prompts/train.jsonl": '{"id": "old", "prompt": "p", "completion": "c"}\n',
        "metrics/validate_train.json": '{"old": 1}\n',
        "metrics/train.json": '{"train_loss": 1.0}\n',
        "models/adapter/adapter_config.json": "{}\n",
        "models/adapter/lineage.json": "{}\n",
        "models/base/base.json": "{}\n",
        "plots/train/loss.csv": "step,loss\n",
        "plots/train/README.md": "not a plot\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


VALIDATE = ("validate", "--input", "data/raw/train.jsonl")


@pytest.mark.parametrize("args, words", [
    # the cases: each of these deleted a folder or other files
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data"),
     ["--rejects data is a folder", "takes a file"]),
    ((*VALIDATE, "--output", "data/clean", "--rejects", "data/rejects/train.jsonl"),
     ["--output data/clean is a folder"]),
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/rejects/train.jsonl", "--report", "metrics"),
     ["--report metrics is a folder"]),
    (("format", "--input", "data/clean/train.jsonl", "--output", "data/prompts"), ["--output data/prompts is a folder"]),
    # an output that is an input, or another output
    ((*VALIDATE, "--output", "data/raw/train.jsonl", "--rejects", "data/rejects/train.jsonl"),
     ["--output data/raw/train.jsonl is also the input --input"]),
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/clean/train.jsonl"),
     ["--rejects data/clean/train.jsonl is also --output"]),
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/rejects/train.jsonl", "--report",
      "params.yaml"), ["--report params.yaml is also the input --params"]),
    ((*VALIDATE, "--output", "data/clean/../clean/train.jsonl", "--rejects", "./data/clean/train.jsonl"),
     ["is also --output"]),  # the same file, spelled two ways
    (("format", "--input", "data/clean/train.jsonl", "--output", "data/clean/train.jsonl"), ["is also the input"]),
    # a parent that is a file
    ((*VALIDATE, "--output", "data/raw/train.jsonl/clean.jsonl", "--rejects", "data/rejects/train.jsonl"),
     ["--output data/raw/train.jsonl/clean.jsonl", "data/raw/train.jsonl is a file, not a folder"]),
    # a device or a pipe: replacing it would put a regular file in its place (in /dev, as root)
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "/dev/null"),
     ["--rejects /dev/null is a device, pipe or socket"]),
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/rejects/train.jsonl", "--report",
      "/dev/stdout"), ["--report /dev/stdout is a device, pipe or socket"]),
    # an existing file that is not this stage's kind of output
    ((*VALIDATE, "--output", "data/clean/other.txt", "--rejects", "data/rejects/train.jsonl"),
     ["--output data/clean/other.txt exists and is not clean rows", "move it away or choose another path"]),
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/raw/notes.md"),
     ["--rejects data/raw/notes.md exists and is not rejects"]),
    ((*VALIDATE, "--output", "data/prompts/train.jsonl", "--rejects", "data/rejects/train.jsonl"),
     ["--output data/prompts/train.jsonl exists and is not clean rows"]),
    ((*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/rejects/train.jsonl", "--report",
      "data/clean/other.txt"), ["--report data/clean/other.txt exists and is not a metrics file"]),
    (("format", "--input", "data/clean/train.jsonl", "--output", "data/rejects/train.jsonl"),
     ["--output data/rejects/train.jsonl exists and is not prompt rows"]),
])
def test_data_stages_refuse_outputs_that_would_lose_something(project, args, words):
    before = tree(project)
    refused(finetune(*args, cwd=project), *words)
    assert tree(project) == before  # nothing read into an output, nothing written, nothing deleted


@pytest.mark.parametrize("args, words", [
    (("--output", "data/prompts", "--base", "models/base"), ["the input --input data/prompts/train.jsonl is inside "
                                                             "--output data/prompts"]),
    (("--output", "models/base/tok", "--base", "models/base"), ["--output models/base/tok is inside the input --base"]),
    (("--output", "data/tok", "--report", "data/tok/r.json"), ["--report data/tok/r.json is inside --output data/tok"]),
    (("--output", "data/tok", "--report", "metrics/t.json", "--rejects", "metrics/t.json"),
     ["--rejects metrics/t.json is also --report"]),
    (("--output", "metrics/train.json",), ["--output metrics/train.json is a file, where --output takes a folder"]),
    (("--output", "models/adapter",), ["--output models/adapter exists and is not a tokenized dataset"]),
])
def test_tokenize_refuses_outputs_that_would_lose_something(project, args, words):
    before = tree(project)
    refused(finetune("tokenize", "--input", "data/prompts/train.jsonl", *args, cwd=project), *words)
    assert tree(project) == before


@pytest.mark.parametrize("args, words", [
    # train: before any model is loaded (no tokenized data, no real base here)
    (("train", "--output", "models/base"), ["--output models/base is also the input --base"]),
    (("train", "--output", "data/clean"), ["--output data/clean exists and is not a LoRA adapter"]),
    (("train", "--output", "data/tokenized"), ["the input --train data/tokenized/train is inside --output"]),
    (("train", "--metrics", "models/adapter/metrics.json"), ["--metrics models/adapter/metrics.json is inside --output "
                                                             "models/adapter"]),
    (("train", "--plots", "plots/train"), ["--plots plots/train exists and is not plots"]),
    (("train", "--plots", "plots"), ["--plots plots exists and is not plots"]),
    (("train", "--metrics", "metrics"), ["--metrics metrics is a folder"]),
    (("train", "--checkpoints", "models/adapter/ckpt"), ["--checkpoints models/adapter/ckpt is inside --output"]),
    (("train", "--lineage-data", "data/raw/train.jsonl", "--metrics", "data/raw/train.jsonl"),
     ["--metrics data/raw/train.jsonl is also the input --lineage-data"]),
    # evaluate
    (("evaluate", "--samples", "data/prompts/train.jsonl", "--prompts", "data/prompts/train.jsonl"),
     ["--samples data/prompts/train.jsonl is also the input --prompts"]),
    (("evaluate", "--samples", "data/clean/train.jsonl"), ["--samples data/clean/train.jsonl exists and is not eval"]),
    (("evaluate", "--metrics", "models/adapter/m.json"), ["--metrics models/adapter/m.json is inside the input "
                                                          "--adapter"]),
    # merge
    (("merge", "--output", "models/adapter"), ["--output models/adapter is also the input --adapter"]),
    (("merge", "--output", "plots/train"), ["--output plots/train exists and is not a merged model"]),
    (("merge", "--output", "models/base/merged"), ["--output models/base/merged is inside the input --base"]),
    # import-base
    (("import-base", "--output", "models/adapter"), ["--output models/adapter exists and is not a base model"]),
    (("import-base", "--output", "data"), ["--output data exists and is not a base model"]),
    (("import-base", "--output", "metrics/train.json"), ["--output metrics/train.json is a file"]),
])
def test_model_stages_refuse_before_loading_anything(project, args, words):
    before = tree(project)
    refused(finetune(*args, cwd=project), *words)
    assert tree(project) == before


def test_a_stage_replaces_its_own_outputs_and_leaves_no_temporary_folder(project):
    args = (*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/rejects/train.jsonl",
            "--report", "metrics/validate_train.json")
    for _ in range(2):  # the old outputs of the fixture, then its own
        p = finetune(*args, cwd=project)
        assert p.returncode == 0, p.stderr
        assert [orjson.loads(x)["messages"][0]["content"] for x in (project / "data/clean/train.jsonl").open()] == \
               ["How do I reset?", "Where is the manual?"]
        assert (project / "data/rejects/train.jsonl").read_text() == ""
        assert json.loads((project / "metrics/validate_train.json").read_text())["kept"] == 2
    assert (project / "data/clean/other.txt").exists()
    assert not [p for p in project.rglob(".*.tmp*")]
    p = finetune("format", "--input", "data/clean/train.jsonl", "--output", "data/prompts/train.jsonl", cwd=project)
    assert p.returncode == 0, p.stderr
    assert len((project / "data/prompts/train.jsonl").read_text().splitlines()) == 2


# --- read-only and full destinations, commit failures: real mounts in a user + mount namespace ----------

def namespace(script: str) -> tuple:
    """The command prefix that runs the stage after `script` (mounts) in a new user + mount namespace."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -rm (user and mount namespaces) is not available here")
    return ("unshare", "-rm", "sh", "-euc", f'{script}\nexec "$@"', "sh")


OLD_CLEAN = b'{"id": "old", "messages": []}\n'
OLD_REJECTS = b'{"line": 9, "reason": "schema", "detail": "old", "raw": "x"}\n'
OLD_REPORT = b'{"old": 1}\n'
VALIDATE_ALL = (*VALIDATE, "--output", "data/clean/train.jsonl", "--rejects", "data/rejects/train.jsonl",
                "--report", "metrics/validate_train.json")


def old_outputs(project: Path) -> dict:
    return {p: (project / p).read_bytes() for p in ("data/clean/train.jsonl", "data/rejects/train.jsonl",
                                                    "metrics/validate_train.json")}


def test_a_full_destination_for_the_last_output_leaves_all_the_old_outputs(project):
    # metrics/ on a 64 KiB tmpfs, filled up: the report is the last output written. The old code had
    # already replaced clean and rejects by then, and failed with a traceback.
    before = old_outputs(project)
    prefix = namespace("mount -t tmpfs -o size=64k tmpfs metrics\n"
                       "printf '{\"old\": 1}\\n' > metrics/validate_train.json\n"
                       "cat /dev/zero > metrics/filler 2>/dev/null || true")
    line = refused(finetune(*VALIDATE_ALL, cwd=project, prefix=prefix), "metrics/validate_train.json",
                   "No space left on device", "nothing was replaced")
    assert "data/clean" not in line
    assert old_outputs(project) == before  # outside the namespace: the report's old bytes are the fixture's
    assert not [p for p in project.rglob(".*.tmp*")]


def test_a_full_destination_for_a_tokenized_dataset_leaves_all_the_old_outputs(project, tiny_base):
    (project / "data/prompts/train.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "prompt": "### Question: hello there\n ### Answer:",
                            "completion": " hold the button " * 20}) + "\n" for i in range(400)))
    (project / "data/tokenized").mkdir()
    args = ("tokenize", "--input", "data/prompts/train.jsonl", "--output", "data/tokenized/train", "--base", tiny_base,
            "--report", "metrics/validate_train.json", "--rejects", "data/rejects/train.jsonl")
    assert finetune(*args, cwd=project).returncode == 0  # a first dataset, then a second one on a full disk
    before = tree(project)
    prefix = namespace("mount -t tmpfs -o size=128k tmpfs data/tokenized\n"
                       "cat /dev/zero > data/tokenized/filler 2>/dev/null || true")
    refused(finetune(*args, cwd=project, prefix=prefix), "cannot write data/tokenized/train", "nothing was replaced")
    assert tree(project) == before


def test_a_read_only_destination_is_one_line_and_nothing_changes(project):
    before = old_outputs(project)
    prefix = namespace("mount --bind metrics metrics\nmount -o remount,bind,ro metrics")
    refused(finetune(*VALIDATE_ALL, cwd=project, prefix=prefix),
            "--report metrics/validate_train.json: cannot write in metrics (read-only file system")
    assert old_outputs(project) == before


def test_a_failing_commit_puts_back_the_outputs_already_moved(project):
    # The report is a mount point (its own file bound onto itself): renaming it fails (EBUSY) after clean
    # and rejects were moved into place; they must be moved back.
    before = old_outputs(project)
    prefix = namespace("mount --bind metrics/validate_train.json metrics/validate_train.json")
    refused(finetune(*VALIDATE_ALL, cwd=project, prefix=prefix),
            "cannot move the new output into place at metrics/validate_train.json", "nothing was replaced")
    assert old_outputs(project) == before
    assert not [p for p in project.rglob(".*.tmp*")]


# --- SIGKILL ----------------------------------------------------------------------------------------

def big_rows(stage: str, n: int):
    """Rows for `stage`'s input, ~380 bytes each."""
    for i in range(n):
        q, a = f"question {i} " + "x" * 200, f"answer {i} " + "y" * 100
        if stage == "validate":
            yield {"input": q, "output": a}
        elif stage == "format":
            yield {"id": f"{i:016x}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        else:
            yield {"id": f"{i:016x}", "prompt": f"### Question: {q}\n ### Answer:", "completion": " " + a}


@pytest.mark.parametrize("stage", ["validate", "format", "tokenize"])
def test_a_killed_stage_leaves_no_worker_and_the_next_run_clears_its_temporary_folders(tmp_path, stage, request):
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    with open(tmp_path / "big.jsonl", "wb") as f:  # ~45 MB: over the 16 MB from which workers are used
        f.writelines(orjson.dumps(row) + b"\n" for row in big_rows(stage, 120_000))
    args = ["-m", "stages.cli", stage, "--input", "big.jsonl", "--output", "out"]
    args += {"validate": ["--rejects", "r.jsonl"], "format": [],
             "tokenize": ["--base", str(request.getfixturevalue("tiny_base")), "--rejects", "r.jsonl"]}[stage]
    process = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=ENV, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
            workers = psutil.Process(process.pid).children()
            time.sleep(0.01)
        assert len(workers) >= 2, "the stage started no workers"
        process.kill()
        process.wait()
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"workers left running after SIGKILL of the stage: {alive}"
    finally:
        for w in workers:
            if w.is_running():
                os.kill(w.pid, signal.SIGKILL)
    assert [p.name for p in tmp_path.glob(".*.tmp*")]  # what the killed run left (hidden, not outputs)
    with open(tmp_path / "big.jsonl", "wb") as f:
        f.writelines(orjson.dumps(row) + b"\n" for row in big_rows(stage, 3))
    p = subprocess.run([sys.executable, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.jsonl", "out", "params.yaml"]
                                                                + (["r.jsonl"] if stage != "format" else []))
