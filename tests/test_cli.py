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
