"""The `finetune` CLI: Typer's CliRunner for the commands, a real subprocess for error output and start-up."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from stages.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_validate_format_tokenize_chain(tmp_path, tiny_base):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"input": "How do I reset?", "output": "Hold the button."}\n{"input": "x"}\n')
    params = ROOT / "params.yaml"
    r = runner.invoke(app, ["validate", "--input", str(raw), "--output", str(tmp_path / "clean.jsonl"),
                            "--rejects", str(tmp_path / "rej.jsonl"), "--report", str(tmp_path / "v.json"),
                            "--params", str(params)])
    assert r.exit_code == 1  # 1 of 2 rows rejected > 10%: the stage fails after writing both files
    assert json.loads((tmp_path / "v.json").read_text())["rejected_schema"] == 1
    r = runner.invoke(app, ["format", "--input", str(tmp_path / "clean.jsonl"), "--output",
                            str(tmp_path / "p.jsonl"), "--params", str(params)])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row["prompt"] == "### Question: How do I reset?\n ### Answer:"
    r = runner.invoke(app, ["tokenize", "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "tok"),
                            "--base", str(tiny_base), "--report", str(tmp_path / "t.json"), "--params", str(params)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "t.json").read_text())["rows_out"] == 1


def finetune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_unknown_params_key_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text("validate:\n  max_reject_fractoin: 0.5\n")
    (tmp_path / "raw.jsonl").write_text('{"input": "a", "output": "b"}\n')
    p = finetune("validate", "--input", "raw.jsonl", "--output", "c.jsonl", "--rejects", "r.jsonl", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert ("params.yaml: unknown key 'validate.max_reject_fractoin' "
            "(did you mean 'validate.max_reject_fraction'?)") in p.stderr


def test_bad_input_path_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # every key: no code defaults
    p = finetune("validate", "--input", "missing.jsonl", "--output", "c.jsonl", "--rejects", "r.jsonl", cwd=tmp_path)
    assert p.returncode == 1 and "missing.jsonl: no such file" in p.stderr and "Traceback" not in p.stderr


def test_data_commands_do_not_import_torch():
    code = ("import sys; from stages import cli, validate, format, tokenize, jsonl, params; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_conversations_and_sharegpt_through_the_cli_train_every_assistant_turn(tmp_path, tiny_base):
    """tests/data/conversations.jsonl (chat and ShareGPT rows of 1 to 5 turns, two bad rows) through
    `finetune validate`, `format` and `tokenize`, as dvc.yaml runs them: every assistant turn is
    labelled, with its end token, and nothing else."""
    import datasets
    from ruamel.yaml import YAML

    from stages.tokens import load_tokenizer

    raw = ROOT / "tests/data/conversations.jsonl"
    yaml = YAML()
    params = yaml.load((ROOT / "params.yaml").read_text())
    assert params["template"]["train_on"] == "all"  # the default under test
    params["validate"]["max_reject_fraction"] = 0.2
    tokenizer, _ = load_tokenizer(tiny_base)
    # what each kept row must train, read from the raw file here: the assistant texts, trailing turns dropped
    answers = []
    for line in raw.read_text().splitlines():
        turns = json.loads(line).get("messages") or json.loads(line)["conversations"]
        roles = [t.get("role", t.get("from")) for t in turns]
        if set(roles) <= {"system", "user", "human", "assistant", "gpt"} and {"assistant", "gpt"} & set(roles):
            answers.append([t.get("content", t.get("value")) for t in turns if t.get("role", t.get("from")) in ("assistant", "gpt")])
    for name, lead in (("chat", ""), ("qa", " ")):
        params["template"]["name"] = name
        with open(tmp_path / "params.yaml", "w") as f:
            yaml.dump(params, f)
        p, out = f"--params {tmp_path}/params.yaml", tmp_path / name
        for cmd in (f"validate --input {raw} --output {out}/clean.jsonl --rejects {out}/rejects.jsonl "
                    f"--report {out}/validate.json",
                    f"format --input {out}/clean.jsonl --output {out}/prompts.jsonl --base {tiny_base}",
                    f"tokenize --input {out}/prompts.jsonl --output {out}/tok --base {tiny_base} "
                    f"--report {out}/tokenize.json --rejects {out}/tokenize_rejects.jsonl"):
            proc = finetune(*cmd.split(), *p.split(), cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
        report = json.loads((out / "validate.json").read_text())
        assert (report["kept"], report["rejected_unknown_role"], report["rejected_no_assistant_turn"]) == (8, 1, 1)
        assert report["trimmed_trailing_turns"] == 1
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        assert [(r["line"], r["reason"]) for r in rejects] == [(9, "unknown_role"), (10, "no_assistant_turn")]
        rows = datasets.load_from_disk(str(out / "tok")).to_list()
        assert len(rows) == 8
        for row, texts in zip(rows, answers):
            runs, run = [], []
            for t, label in zip(row["input_ids"] + [None], row["labels"] + [-100]):
                if label != -100:
                    run.append(t)
                elif run:
                    runs, run = runs + [tokenizer.decode(run, skip_special_tokens=False)], []
            assert runs == [f"{lead}{text}<|im_end|>" for text in texts]
        assert json.loads((out / "tokenize.json").read_text())["tokens_trained"] == \
            sum(label != -100 for r in rows for label in r["labels"])
