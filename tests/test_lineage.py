"""Lineage: what train records (no secrets, no timestamp), and evaluate and merge loading the base the
way the adapter was trained, on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, sh
from stages.errors import StageError
from stages.lineage import redact
from conftest import shipped_with

TINY = {"train": {"max_steps": 6, "batch_size": 4, "save_steps": 3, "learning_rate": 0.001},
        "evaluate": {"batch_size": 4, "max_new_tokens": 8, "max_generate_rows": 4}, "wandb": {"mode": "disabled"}}


@pytest.mark.parametrize("url, shown", [
    ("https://user:token@host/path?sig=abc", "https://***@host/path?***"),
    ("s3://AKIAKEY:secret@bucket/ckpt", "s3://***@bucket/ckpt"),
    ("s3://AKIAKEY:se/cr@et@bucket/ckpt", "s3://***@bucket/ckpt"),  # '/' and '@' in the secret
    ("s3://AKIAKEY:ab?cd@bucket", "s3://***@bucket"),
    ("ssh://me@host/srv/ckpt", "ssh://***@host/srv/ckpt"),
    ("gs://bucket/ckpt#token", "gs://bucket/ckpt?***"),
    ("https://host/p?email=a@b.c", "https://host/p?***"),
    ("s3://bucket/ckpt", "s3://bucket/ckpt"),
    ("s3://bucket/run@v2", "s3://bucket/run@v2"),  # an '@' in the path is not userinfo
    ("/mnt/shared/ckpt", "/mnt/shared/ckpt"),
    ("no url: a://b?c in text", "no url: a://b?c in text"),
])
def test_redact_removes_userinfo_and_query(url, shown):
    assert redact(url) == shown
    assert redact({"a": [url], "b": None, "c": 3}) == {"a": [shown], "b": None, "c": 3}


@pytest.fixture(scope="module")
def adapter(tiny_base, tiny_data, tmp_path_factory) -> Path:
    """An adapter trained on CPU with the shipped model params: quantize and dtype auto (none, float32)."""
    from stages import train

    out = tmp_path_factory.mktemp("trained")
    train.run(tiny_data / "tokenized/train", None, tiny_base, out / "adapter", out / "train.json", out / "plots",
              out / "checkpoints", [], shipped_with(TINY))
    return out / "adapter"


def evaluate_with(adapter, tiny_base, tiny_data, tmp_path, **model) -> dict:
    from stages import evaluate

    params = shipped_with({**TINY, "model": model})
    return evaluate.run(adapter, tiny_base, tiny_data / "tokenized/eval", tiny_data / "prompts/eval.jsonl",
                        tmp_path / "eval.json", tmp_path / "samples.jsonl", params)


def test_the_adapter_records_how_train_loaded_the_base_and_no_timestamp(adapter):
    record = json.loads((adapter / "lineage.json").read_text())
    assert record["model"] == {"quantize": "none", "dtype": "float32", "attn_implementation": "auto"}
    assert "created" not in record  # a retrain must give the same bytes; the time is in metrics/train.json
    assert json.loads((adapter.parent / "train.json").read_text())["created"].endswith("Z")
    assert not (adapter / "training_args.bin").exists()  # the Trainer's pickle stays in checkpoints


def test_evaluate_loads_the_base_as_trained_whatever_params_say_now(adapter, tiny_base, tiny_data, tmp_path):
    def figures(metrics: dict) -> dict:  # the timings (seconds, tokens/s) differ from run to run
        return {k: v for k, v in metrics.items() if not k.endswith(("_seconds", "_per_s"))}

    as_trained = figures(evaluate_with(adapter, tiny_base, tiny_data, tmp_path))
    assert figures(evaluate_with(adapter, tiny_base, tiny_data, tmp_path, dtype="bfloat16", quantize="4bit")) == as_trained


def test_merge_refuses_to_dequantize_for_an_adapter_trained_unquantized(adapter, tiny_base, tiny_data, tmp_path):
    from stages import merge

    params = shipped_with({**TINY, "model": {"quantize": "4bit"}, "merge": {"into": "dequantized"}})
    with pytest.raises(StageError, match=r"merge.into=dequantized: .* trained on the unquantized base .*"
                                         r"model.quantize=none.*set merge.into: base"):
        merge.run(adapter, tiny_base, tmp_path / "merged", tiny_data / "prompts/eval.jsonl", params)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("stage", ["evaluate", "merge"])
def test_evaluate_and_merge_refuse_a_base_the_adapter_was_not_trained_on(stage, adapter, tiny_base, tiny_data,
                                                                           tmp_path):
    from stages import evaluate, merge

    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    meta = json.loads((other / "base.json").read_text())
    meta["sha256"] = "0" * 64  # another base model, as `import-base` with another model.source gives
    (other / "base.json").write_text(json.dumps(meta))
    params = shipped_with(TINY)
    with pytest.raises(StageError, match=rf"{other}: base weights sha256 0000000000000000, but {adapter} was "
                                         r"trained on .* sha256 [0-9a-f]{16}; pass that base with --base"):
        if stage == "evaluate":
            evaluate.run(adapter, other, tiny_data / "tokenized/eval", tiny_data / "prompts/eval.jsonl",
                         tmp_path / "eval.json", tmp_path / "samples.jsonl", params)
        else:
            merge.run(adapter, other, tmp_path / "merged", tiny_data / "prompts/eval.jsonl", params)
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "merged").exists()


SECRETS = ("s3cr3t", "t0k3n")


def test_no_credential_from_checkpoint_sync_is_written_anywhere(tiny_base, tiny_data, tmp_path):
    """`finetune train` with W&B offline and checkpoints mirrored to a URL carrying a password (a query
    is refused as a mirror root: tests/test_params.py): lineage.json, the W&B run (config, captured
    console), metrics, plots and the log lines show the URL without it."""
    url = "memory://user:s3cr3t@host/ckpt"
    params = YAML(typ="safe").load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["train"]["checkpoint_sync"] = url
    params["wandb"]["mode"] = "offline"
    with (tmp_path / "params.yaml").open("w") as f:
        YAML().dump(params, f)
    proc = sh(f"finetune train --train {tiny_data}/tokenized/train --base {tiny_base} --output models/adapter "
              "--metrics metrics/train.json --plots plots/train", tmp_path, env={"WANDB_MODE": "offline"})
    written = [f for f in tmp_path.rglob("*") if f.is_file() and f.name != "params.yaml"]
    assert any("wandb" in f.parts for f in written), "a W&B offline run"
    for text, where in [(proc.stdout + proc.stderr, "the output")] + [(f.read_bytes().decode("latin-1"), f)
                                                                     for f in written]:
        for secret in SECRETS:
            assert secret not in text, where
    shown = "memory://***@host/ckpt"
    assert f"mirrored to {shown}/" in proc.stderr
    record = json.loads((tmp_path / "models/adapter/lineage.json").read_text())
    assert record["params"]["train"]["checkpoint_sync"] == shown


def test_the_recorded_commit_is_the_codes_so_committing_results_keeps_it(tmp_path, monkeypatch):
    from stages.lineage import git_state

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/train.py").write_text("x = 1\n")
    sh("git init -q && git config user.name t && git config user.email t@t.invalid && git add -A"
       " && git commit -qm code", tmp_path)
    code = sh("git rev-parse HEAD", tmp_path).stdout.strip()
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    sh("git add -A && git commit -qm 'results of the run'", tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # dvc repro rewrites it mid-run
    assert git_state() == {"commit": code, "dirty": False}
    (tmp_path / "stages/train.py").write_text("x = 2\n")
    assert git_state() == {"commit": code, "dirty": True}


def write_gguf(path: Path, metadata: dict[str, str]) -> None:
    """A real GGUF file: one tiny tensor and these string key/values, as the export stage writes them."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def repo_and_record(tmp_path, monkeypatch, tiny_base) -> tuple[Path, dict]:
    """A repo that ran a real `dvc repro` on data/raw/train.jsonl with the tiny base in models/base, and
    the lineage record of a model trained there (this worktree's commit)."""
    from stages import lineage
    from stages.modeling import read_base_json

    repo = tmp_path / "repo"
    (repo / "data/raw").mkdir(parents=True)
    shutil.copy(ROOT / "data/raw/train.jsonl", repo / "data/raw/train.jsonl")
    shutil.copytree(tiny_base, repo / "models/base")
    (repo / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp data/raw/train.jsonl copy.jsonl\n"
                                   "    deps: [data/raw/train.jsonl]\n    outs: [copy.jsonl]\n")
    sh("dvc init -q --no-scm && dvc repro -q", repo)
    monkeypatch.chdir(ROOT)  # the same data/raw/train.jsonl, and a git commit
    record = lineage.build(shipped_with({}), read_base_json(tiny_base), [Path("data/raw/train.jsonl")],
                           ["id-1", "id-2"], quantized=False, dtype="float32")
    monkeypatch.chdir(tmp_path)
    return repo, record


def test_a_gguf_copied_far_from_the_repo_says_which_data_made_it(repo_and_record, tmp_path):
    from stages import lineage
    from stages.jsonl import write_json

    repo, record = repo_and_record
    metadata = lineage.gguf_metadata(record)
    assert json.loads(metadata["finetune.lineage"]) == record
    write_gguf(tmp_path / "model-q4_k_m.gguf", metadata)
    far = tmp_path / "far"
    far.mkdir()
    shutil.copy(tmp_path / "model-q4_k_m.gguf", far / "copy.gguf")
    assert lineage.read(far / "copy.gguf") == record

    shown = sh("finetune lineage copy.gguf", far).stdout
    (tmp_path / "merged").mkdir()
    write_json(tmp_path / "merged/lineage.json", record)  # as train and merge write it
    assert shown == sh(f"finetune lineage {tmp_path / 'merged'}", far).stdout  # as for the model folder
    for fact in (record["base"]["sha256"][:16], record["data"][0]["md5"], record["rows"]["ids_sha256"][:16],
                 lineage.params_sha256(record)[:16], record["git"]["commit"]):
        assert fact and fact in shown and fact in metadata["finetune.summary"]

    verified = sh(f"finetune lineage copy.gguf --verify --lock {repo / 'dvc.lock'}", far)
    assert "verified" in verified.stdout
    missing = sh("finetune lineage copy.gguf --verify", far, check=False)  # no dvc.lock here
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("error: dvc.lock: missing;") and "--lock" in missing.stderr
    with open(repo / "data/raw/train.jsonl", "a") as f:
        f.write('{"input": "one more", "output": "row"}\n')
    assert lineage.verify(record, repo / "dvc.lock") == [
        f"{repo}/data/raw/train.jsonl: md5 {lineage.file_md5(repo / 'data/raw/train.jsonl')} on disk, the model "
        f"was trained on md5 {record['data'][0]['md5']}"]


def test_a_gguf_without_lineage_is_one_line(tmp_path):
    write_gguf(tmp_path / "other.gguf", {"general.name": "someone else's model"})
    (tmp_path / "notes.txt").write_text("not a model\n")
    for name, message in [("other.gguf", "has no finetune.lineage metadata"),
                          ("notes.txt", "not a model folder or a GGUF file"),
                          ("typo.gguf", "typo.gguf: no such file or folder")]:
        proc = sh(f"finetune lineage {name}", tmp_path, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
