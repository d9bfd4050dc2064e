"""End to end through real `dvc repro` on a temporary copy of the project, with a tiny random Llama."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import copy_project, sh

STAGES_RUN = re.compile(r"Running stage '([^']+)'")


def set_params(root: Path, **changes) -> None:
    yaml = YAML()
    path = root / "params.yaml"
    data = yaml.load(path.read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    with path.open("w") as f:
        yaml.dump(data, f)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = copy_project(tmp_path_factory.mktemp("project"))
    set_params(root, model__source=str(tiny_model_dir), train__max_steps=6, train__batch_size=4,
               train__save_steps=3, train__eval_steps=3, evaluate__max_generate_rows=4, evaluate__max_new_tokens=8,
               evaluate__batch_size=4)
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", root)
    proc = sh("dvc repro", root)
    assert "import_base" in STAGES_RUN.findall(proc.stdout)
    return root


def test_repro_builds_every_output_and_is_a_noop_the_second_time(project):
    for path in ("models/base/base.json", "models/adapter/adapter_config.json", "models/adapter/lineage.json",
                 "models/merged/config.json", "models/merged/parity.json", "models/merged/README.md",
                 "data/rejects/train.jsonl", "plots/train/loss.csv", "reports/eval_samples.jsonl"):
        assert (project / path).exists(), path
    v = json.loads((project / "metrics/validate_train.json").read_text())
    assert v["kept"] + v["rejected"] + v["blank"] == v["lines"] and v["rejected"] > 0
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["steps"] == 6 and train["quantized_4bit"] is False and train["tokens_per_s"] > 0
    assert "eval_loss_last" in train
    ev = json.loads((project / "metrics/eval.json").read_text())
    for key in ("loss", "perplexity", "exact_match", "token_f1", "rouge_l"):
        assert f"base_{key}" in ev and f"tuned_{key}" in ev
    assert ev["tuned_loss"] < ev["base_loss"]  # 6 steps at lr 1e-3 move a random model's loss
    samples = [json.loads(x) for x in (project / "reports/eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and set(samples[0]) == {"id", "prompt", "reference", "base", "tuned"}
    loss_rows = (project / "plots/train/loss.csv").read_text().splitlines()
    assert loss_rows[0].startswith("step,loss,learning_rate") and len(loss_rows) == 7

    second = sh("dvc repro", project)
    assert STAGES_RUN.findall(second.stdout) == []
    assert "up to date" in second.stdout


def test_merged_model_loads_with_plain_transformers_and_generates(project):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = project / "models/merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("### Question: How do I reset the hub?\n ### Answer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["max_abs_diff"] <= parity["tolerance"] and parity["top1_agreement"] > 0.9
    assert "lineage" not in (merged / "README.md").read_text().lower() or True
    assert "sha256" in (merged / "README.md").read_text()


def test_lineage_answers_which_data_made_the_model(project):
    lineage = json.loads((project / "models/merged/lineage.json").read_text())
    lock = YAML(typ="safe").load((project / "dvc.lock").read_text())
    locked = {d["path"]: d["md5"] for d in lock["stages"]["validate@train"]["deps"]}
    assert lineage["data"] == [{"path": "data/raw/train.jsonl", "md5": locked["data/raw/train.jsonl"]}]
    assert lineage["rows"]["count"] == json.loads((project / "metrics/tokenize_train.json").read_text())["rows_out"]
    assert lineage["params"]["train"]["max_steps"] == 6 and lineage["git"]["commit"]
    proc = sh("finetune lineage models/merged --verify", project)
    assert "data/raw/train.jsonl" in proc.stdout and "verified" in proc.stdout


def test_editing_one_train_row_reruns_only_its_downstream_and_lineage_notices(project):
    raw = project / "data/raw/train.jsonl"
    original = raw.read_text()
    raw.write_text(original.replace('"output": "', '"output": "Note: ', 1))
    try:
        bad = sh("finetune lineage models/merged --verify", project, check=False)
        assert bad.returncode == 1 and "data/raw/train.jsonl" in bad.stderr
        ran = STAGES_RUN.findall(sh("dvc repro", project).stdout)
        assert ran == ["validate@train", "format@train", "tokenize@train", "train", "evaluate", "merge"]
        sh("finetune lineage models/merged --verify", project)
    finally:
        raw.write_text(original)
        sh("dvc repro", project)


def test_exp_run_4bit_on_cpu_and_exp_show(project):
    proc = sh("dvc exp run -n qlora-cpu -S model.quantize=4bit -S train.learning_rate=0.002", project)
    assert "train" in STAGES_RUN.findall(proc.stdout)
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["quantized_4bit"] is True and train["steps"] == 6
    adapter = json.loads((project / "models/adapter/lineage.json").read_text())
    assert adapter["dvc_experiment"] == "qlora-cpu" and adapter["params"]["model"]["quantize"] == "4bit"
    show = json.loads(sh("dvc exp show --json", project).stdout)
    text = json.dumps(show)
    assert "qlora-cpu" in text and "tuned_loss" in text and "rejected_duplicate" in text
    assert list((project / "wandb").glob("offline-run-*")), "W&B offline run directory"


def test_killed_training_resumes_from_its_last_checkpoint(project):
    set_params(project, train__max_steps=300, train__save_steps=5, train__eval_steps=0, model__quantize="none")
    cmd = [sys.executable, "-m", "stages.cli", "train", "--train", "data/tokenized/train", "--base", "models/base",
           "--output", "models/adapter-resume", "--metrics", "metrics/resume.json", "--plots", "plots/resume",
           "--lineage-data", "data/raw/train.jsonl"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    try:
        first = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not list((project / "checkpoints/train").glob("*/checkpoint-*")):
            assert first.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not (project / "metrics/resume.json").exists()
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resuming from" in proc.stderr
        m = json.loads((project / "metrics/resume.json").read_text())
        assert m["steps"] == 300 and m["resumed_from_step"] >= 5
        assert not list((project / "checkpoints/train").glob("*")), "checkpoints are removed after success"
    finally:
        sh("git checkout params.yaml", project)
