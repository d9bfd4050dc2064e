"""End to end through real `dvc repro` on a temporary copy of the project, with a tiny random Llama."""

import json
import os
import re
import shutil
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
               evaluate__batch_size=4,
               export__types=[])  # the tiny BPE tokenizer is not one llama.cpp's converter knows: tests/test_export.py
    sh("git init -q && git config user.name finetune-tests && git config user.email tests@finetune.invalid"
       " && git add -A && git commit -qm init", root)
    proc = sh("dvc repro", root)
    assert "import_base" in STAGES_RUN.findall(proc.stdout)
    sh("git add -A && git commit -qm 'baseline run'", root)
    return root


def restore(root: Path) -> None:
    """Back to the committed baseline: params, lock and metrics from git, outputs from the DVC cache. From
    HEAD, not the index: core.autostage has `dvc repro` stage the dvc.lock it writes."""
    sh("git checkout -q HEAD -- . && dvc checkout -q --force", root)


def test_repro_builds_every_output_and_is_a_noop_the_second_time(project):
    for path in ("models/base/base.json", "models/adapter/adapter_config.json", "models/adapter/lineage.json",
                 "models/merged/config.json", "models/merged/parity.json", "models/merged/README.md",
                 "data/rejects/train.jsonl", "plots/train/loss.csv", "reports/eval_samples.jsonl",
                 "models/gguf/parity.json", "reports/run.html"):
        assert (project / path).exists(), path
    v = json.loads((project / "metrics/validate_train.json").read_text())
    assert v["kept"] + v["rejected"] + v["blank"] == v["lines"] and v["rejected"] > 0
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["steps"] == 6 and train["quantized_4bit"] is False and train["tokens_per_s"] > 0
    assert len(train["first_steps_seconds"]) == 6 and all(s > 0 for s in train["first_steps_seconds"])
    assert train["setup_seconds"] > 0  # loading the model and wrapping it, before step 1
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = project / "models/merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("### Question: How do I reset the hub?\n ### Answer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["max_abs_diff"] <= parity["tolerance"] and parity["top1_agreement"] > 0.9
    card = (merged / "README.md").read_text()
    assert "data/raw/train.jsonl" in card and "sha256" in card


def test_lineage_answers_which_data_made_the_model(project):
    lineage = json.loads((project / "models/merged/lineage.json").read_text())
    lock = YAML(typ="safe").load((project / "dvc.lock").read_text())
    locked = {d["path"]: d["md5"] for d in lock["stages"]["validate@train"]["deps"]}
    trained = json.loads((project / "metrics/tokenize_train.json").read_text())["rows_out"]
    assert lineage["data"] == [{"path": "data/raw/train.jsonl", "md5": locked["data/raw/train.jsonl"],
                                "source": "train.jsonl", "rows_trained": trained}]
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
        assert ran == ["validate@train", "mix", "format@train", "tokenize@train", "train", "evaluate", "merge", "export",
                       "report"]
        sh("finetune lineage models/merged --verify", project)
    finally:
        restore(project)


def test_retraining_with_the_same_data_params_and_seed_gives_the_same_adapter_bytes(project):
    weights = project / "models/adapter/adapter_model.safetensors"
    before, folder = weights.read_bytes(), tree_digest(project / "models/adapter")
    lineage_before = json.loads((project / "models/adapter/lineage.json").read_text())
    try:
        proc = sh("dvc repro --force --single-item train", project)
        assert STAGES_RUN.findall(proc.stdout) == ["train"]
        assert weights.read_bytes() == before  # LoRA's random init is seeded too, not only the data order
        lineage_after = json.loads((project / "models/adapter/lineage.json").read_text())
        assert {k: v for k, v in lineage_after.items() if lineage_before.get(k) != v} == {}
        assert tree_digest(project / "models/adapter") == folder  # the whole folder: lineage.json, config too
        # so evaluate, merge and export are skipped; the report shows this run's train metrics (its times)
        assert STAGES_RUN.findall(sh("dvc repro", project).stdout) == ["report"]
    finally:
        restore(project)


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
    restore(project)


def test_killed_training_resumes_on_another_machine_from_the_mirrored_checkpoint(project, tmp_path):
    """SIGKILL mid-run, lose the machine's local checkpoints too; a re-run fetches the last checkpoint
    mirrored to train.checkpoint_sync and resumes from it."""
    mirror = tmp_path / "mirror"
    set_params(project, train__max_steps=300, train__save_steps=5, train__eval_steps=0, model__quantize="none",
               train__checkpoint_sync=str(mirror))
    cmd = [sys.executable, "-m", "stages.cli", "train", "--train", "data/tokenized/train", "--base", "models/base",
           "--output", "models/adapter-resume", "--metrics", "metrics/resume.json", "--plots", "plots/resume",
           "--lineage-data", "data/raw/train.jsonl"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    try:
        first = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not [p for p in mirror.glob("*/checkpoint-*") if not p.name.endswith(".partial")]:
            assert first.poll() is None and time.time() < deadline, "no mirrored checkpoint before the run ended"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not (project / "metrics/resume.json").exists()
        shutil.rmtree(project / "checkpoints")  # "another machine": nothing local
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "fetched checkpoint-" in proc.stderr and "resuming from" in proc.stderr
        m = json.loads((project / "metrics/resume.json").read_text())
        assert m["steps"] == 300 and m["resumed_from_step"] >= 5
        assert not list((project / "checkpoints/train").glob("*")), "checkpoints are removed after success"
        assert not list(mirror.glob("*")), "and so is their mirror"
    finally:
        restore(project)


def test_an_incomplete_checkpoint_is_skipped(tmp_path):
    from stages.train import last_complete_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        if complete:
            (ckpt / "trainer_state.json").write_text('{"global_step": %d}' % step)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert last_complete_checkpoint(tmp_path / "none") is None


def tree_digest(path: Path) -> dict:
    """relative path -> md5 of every file under `path` (byte-identity of a model folder)."""
    import hashlib

    return {str(f.relative_to(path)): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def remote(project, tmp_path_factory) -> Path:
    """A default DVC remote, committed to the project's git (each test that pushes asks for it)."""
    path = tmp_path_factory.mktemp("remote")
    sh(f"dvc remote add -f -d localremote {path} && git add .dvc/config && git commit -qm 'add remote'", project)
    return path


def test_push_then_fresh_clone_pull_gives_byte_identical_models(project, remote, tmp_path):
    sh("dvc push", project)
    clone = tmp_path / "clone"
    sh(f"git clone -q {project} {clone}", tmp_path)
    sh("dvc pull", clone)
    for d in ("models/adapter", "models/merged", "models/base"):
        assert tree_digest(clone / d) == tree_digest(project / d), d
    assert "up to date" in sh("dvc status", clone).stdout
    sh("finetune lineage models/merged --verify", clone)


def test_checkout_of_an_older_commit_restores_its_adapter(project, remote, tmp_path):
    sh("dvc push", project)  # commit A's outputs, for the fresh clone below
    a_commit = sh("git rev-parse HEAD", project).stdout.strip()
    a_adapter = tree_digest(project / "models/adapter")
    raw = project / "data/raw/train.jsonl"
    raw.write_text(raw.read_text() + '{"input": "Is the hub waterproof?", "output": "No, keep it indoors and dry."}\n')
    sh("dvc repro && git add -A && git commit -qm 'B: one more row' && dvc push", project)
    assert tree_digest(project / "models/adapter") != a_adapter
    try:
        sh(f"git checkout -q {a_commit} && dvc checkout -q", project)
        assert tree_digest(project / "models/adapter") == a_adapter
        # the same from the remote alone, in a fresh clone with an empty cache
        clone = tmp_path / "clone-a"
        sh(f"git clone -q {project} {clone} && cd {clone} && git checkout -q {a_commit} && dvc pull -q", tmp_path)
        assert tree_digest(clone / "models/adapter") == a_adapter
    finally:  # back to commit A for the tests after this one
        sh(f"git checkout -q - && git reset -q --hard {a_commit} && dvc checkout -q --force", project)


def test_queued_sweep_then_apply_the_best(project):
    sh("dvc exp run --queue -S 'train.learning_rate=0.0001,0.003'", project)
    sh("dvc queue start -j 1", project)
    deadline = time.time() + 600
    while True:
        status = sh("dvc queue status", project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.time() < deadline, status
        time.sleep(3)
    assert "Failed" not in status, sh("dvc queue logs $(dvc queue status | awk '/Failed/{print $1; exit}')",
                                      project, check=False).stdout
    rows = json.loads(sh("dvc exp show --json", project).stdout)
    exps = {}
    for commit in rows:
        for exp in commit.get("experiments") or []:
            run = exp["revs"][0]
            data = run["data"]
            lr = data["params"]["params.yaml"]["data"]["train"]["learning_rate"]
            exps[run["name"]] = (data["metrics"]["metrics/eval.json"]["data"]["tuned_loss"], lr)
    assert sorted(lr for _, lr in exps.values()) == [0.0001, 0.003]
    best = min(exps, key=lambda name: exps[name][0])
    sh(f"dvc exp apply {best}", project)
    params = YAML(typ="safe").load((project / "params.yaml").read_text())
    assert params["train"]["learning_rate"] == exps[best][1]
    assert json.loads((project / "metrics/eval.json").read_text())["tuned_loss"] == exps[best][0]
    restore(project)


def adapter_tensors(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "models/adapter/adapter_model.safetensors")


def test_exp_run_lora_variants_and_full_fine_tune_each_produce_what_they_say(project):
    """One `dvc exp run -S` per variant (2 steps each): DoRA + modules_to_save, PiSSA + rsLoRA (saved as a
    LoRA on the unmodified base), and a full fine-tune; merge's parity holds for each."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.modeling import load_base_model
    from stages.params import load_params

    quick = "-S train.max_steps=2 -S train.eval_steps=0 -S merge.parity_prompts=2"
    adapter, merged = project / "models/adapter", project / "models/merged"

    def exp_run(variant: str) -> list[str]:  # from the baseline's params: -S changes the workspace's file
        sh("git checkout -q HEAD -- params.yaml", project)
        return STAGES_RUN.findall(sh(f"dvc exp run {quick} {variant}", project).stdout)

    def parity() -> dict:
        p = json.loads((merged / "parity.json").read_text())
        assert p["max_abs_diff"] <= p["tolerance"], p
        return p

    try:
        assert exp_run("-S lora.use_dora=true -S 'lora.modules_to_save=[lm_head]' merge") == ["train", "merge"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["use_dora"] is True and config["modules_to_save"] == ["model.embed_tokens"]  # lm_head is tied
        tensors = adapter_tensors(project)
        assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 14  # 7 linear layers x 2 decoder layers
        base = load_base_model(project / "models/base", load_params(project / "params.yaml").model)
        trained = tensors["base_model.model.model.embed_tokens.weight"]
        assert trained.shape == base.model.embed_tokens.weight.shape
        assert not torch.equal(trained.to(base.dtype), base.model.embed_tokens.weight)  # trained, not the frozen copy
        assert parity()["top1_agreement"] > 0.9
        assert AutoModelForCausalLM.from_pretrained(merged).config.tie_word_embeddings  # tied, as the base

        assert exp_run("-S lora.init=pissa_niter_2 -S lora.use_rslora=true merge") == ["train", "merge"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        r, alpha = config["r"], config["lora_alpha"]
        assert config["use_rslora"] is True and config["init_lora_weights"] is True and r == 32  # 2 x lora.r
        # applied to the unmodified base, the saved adapter is the trained model: the PiSSA residual is not needed
        tuned = PeftModel.from_pretrained(load_base_model(project / "models/base",
                                                          load_params(project / "params.yaml").model), adapter)
        layer = tuned.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(alpha / r ** 0.5)  # rsLoRA: alpha / sqrt(r), not alpha / r
        assert torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
        assert parity()["top1_agreement"] > 0.9

        assert exp_run("-S train.method=full -S model.quantize=none") == ["train", "evaluate", "merge", "export", "report"]
        assert not (adapter / "adapter_config.json").exists()
        assert {"config.json", "model.safetensors", "lineage.json", "tokenizer.json"} <= {f.name for f in
                                                                                        adapter.iterdir()}
        assert json.loads((adapter / "lineage.json").read_text())["params"]["train"]["method"] == "full"
        train = json.loads((project / "metrics/train.json").read_text())
        assert train["trainable_parameters"] == base.num_parameters()
        full = AutoModelForCausalLM.from_pretrained(adapter)
        up = full.model.layers[0].mlp.up_proj.weight
        assert not torch.equal(up.to(base.dtype), base.model.layers[0].mlp.up_proj.weight)
        ev = json.loads((project / "metrics/eval.json").read_text())
        assert ev["tuned_loss"] != ev["base_loss"] and ev["rows_generated"] == 4
        parity()
        record = json.loads((merged / "lineage.json").read_text())
        assert record["merge"]["method"] == "full"
        assert "Full fine-tune of the base" in (merged / "README.md").read_text()
        sh("finetune lineage models/merged --verify", project)
    finally:
        restore(project)
