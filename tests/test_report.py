"""The run report: built from a small synthetic run, opened in headless Chromium as a person would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app
from stages.errors import StageError

runner = CliRunner()
SCRIPT = "<script>window.__pwned = 1</script>"
IMG = '<img src=x onerror="window.__pwned = 2">'
BREAKOUT = "</div></td></tr></table><h1 id=injected>injected</h1>"


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.fixture
def run_files(tmp_path) -> list[str]:
    """The inputs of `finetune report`, shaped like a real run's (the shipped sample's figures), small;
    user text with HTML in it in the eval questions, the answers and the params."""
    import datasets

    m = tmp_path / "run"
    args = []
    for split, lines, kept, reasons in (("train", 40, 35, {"duplicate": 2, "schema": 3}), ("eval", 12, 12, {})):
        reasons_all = {f"rejected_{r}": reasons.get(r, 0) for r in ("duplicate", "schema", "invalid_json", "too_long")}
        args += ["--validate", write(m / f"metrics/validate_{split}.json", {
            "lines": lines, "blank": lines - kept - sum(reasons.values()), "kept": kept,
            "rejected": sum(reasons.values()), "reject_fraction": sum(reasons.values()) / lines, **reasons_all,
            "trimmed_trailing_turns": 0})]
        lengths = [20 + (7 * i) % 31 for i in range(kept - 1)]
        args += ["--tokenize", write(m / f"metrics/tokenize_{split}.json", {
            "rows_in": kept, "rows_out": kept - 1, "dropped_too_long": 1, "dropped_no_trained_tokens": 0,
            "truncated": 2, "tokens_total": sum(lengths), "tokens_trained": sum(lengths) // 2, "length_p50": 35.0,
            "length_p90": 47.0, "length_p99": 50.0, "length_max": max(lengths)})]
        ds = datasets.Dataset.from_dict({"id": [f"r{i}" for i in range(len(lengths))],
                                         "input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths],
                                         "length": lengths})
        ds.save_to_disk(str(m / "data/tokenized" / split))
        args += ["--tokenized", str(m / "data/tokenized" / split)]
    loss = "step,loss,learning_rate,grad_norm,tokens_per_s\n" + "".join(
        f"{s},{4.4 - s * 0.045},{0.001 * min(1, s / 3) * (1 - s / 51)},1.0,\n" for s in range(1, 51))
    args += ["--loss", write(m / "plots/train/loss.csv", loss),
             "--eval-loss", write(m / "plots/train/eval_loss.csv", "step,eval_loss\n25,2.9\n50,2.4\n"),
             "--train-metrics", write(m / "metrics/train.json", {
                 "created": "2026-12-01T12:17:27Z", "steps": 50, "epochs": 1.28, "first_loss": 4.448, "final_loss": 2.191,
                 "tokens_seen": 20089, "tokens_per_s_steady": 142.8, "trainable_parameters": 4884480, "world_size": 1,
                 "quantized_4bit": False}),
             "--eval-metrics", write(m / "metrics/eval.json", {
                 "base_loss": 3.607433, "tuned_loss": 1.943725, "base_perplexity": 36.8713, "tuned_perplexity": 6.9847,
                 "base_token_f1": 0.1438, "tuned_token_f1": 0.2759, "base_rouge_l": 0.1247, "tuned_rouge_l": 0.2231,
                 "base_exact_match": 0.0, "tuned_exact_match": 0.0, "rows_loss": 25, "rows_generated": 25,
                 "base_generated_tokens_per_s": 46.67, "tuned_generated_tokens_per_s": 36.68})]
    samples = [{"id": f"{i:016x}", "prompt": f"### Question: question {i}?\n ### Answer:", "reference": f"reference {i}",
                "base": f"base answer {i}", "tuned": f"tuned answer {i}"} for i in range(25)]
    samples[2].update(prompt=f"### Question: {SCRIPT} is this shown?\n ### Answer:", tuned=IMG, reference=BREAKOUT)
    args += ["--samples", write(m / "reports/eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples)),
             "--merge-parity", write(m / "models/merged/parity.json", {
                 "max_abs_diff": 0.2188, "mean_abs_diff": 0.0235, "prompts": 4, "saved_dtype": "bfloat16",
                 "tokens": 225, "tolerance": 0.5, "top1_agreement": 0.995555}),
             "--lineage", write(m / "models/merged/lineage.json", {
                 "base": {"source": "embedded:smollm2-135m-instruct", "revision": None, "sha256": "cc" * 32,
                          "parameters": 134515008},
                 "data": [{"path": "data/raw/train.jsonl", "md5": "66e73477216876e05be64282b4df317e"}],
                 "rows": {"count": 35, "ids_sha256": "df" * 32}, "git": {"commit": "f9f8f34b" * 5, "dirty": False},
                 "dvc_experiment": None, "merge": {"into": "base", "parity_max_abs_diff": 0.2188, "saved_dtype": "bfloat16"},
                 "params": {"seed": 42, "template": {"name": "qa", "system_prompt": "<b>be nice</b>"},
                            "tokenize": {"max_length": 256}, "lora": {"r": 16}, "train": {"learning_rate": 0.001}},
                 "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}})]
    return [str(a) for a in args]


def report(args: list[str], *extra: str):
    result = runner.invoke(app, ["report", *args, *extra])
    return result


def test_the_page_shows_the_run_in_chromium_without_errors_and_user_text_as_text(run_files, tmp_path):
    from PIL import Image

    from stages.report import browse

    page, png = tmp_path / "out/run.html", tmp_path / "out/run.png"
    result = report(run_files, "--output", str(page), "--screenshot", str(png))
    assert result.exit_code == 0, result.output or result.exception
    seen = browse(page, expressions={
        "rows": "document.querySelectorAll('#samples tbody tr').length",
        "text": "document.body.innerText",  # what shows
        "all_text": "document.querySelector('main').textContent",  # also the closed <details>
        "pwned": "window.__pwned === undefined ? null : window.__pwned",
        "elements": "document.querySelectorAll('script, img, #injected').length",
        "plots": "[...document.querySelectorAll('svg.plot')].map(s => s.getBoundingClientRect().width)"})
    assert seen["problems"] == []
    assert seen["requests"] == [page.resolve().as_uri()]  # nothing fetched: self-contained
    assert seen["rows"] == 20  # the first 20 of 25 questions
    text = seen["text"]
    assert "question 0?" in text and "question 19?" in text and "question 20?" not in text
    for figure in ("3.607", "1.944", "36.87", "6.985", "0.2759", "99.6%", "0.2188"):  # base vs tuned, merge parity
        assert figure in text
    assert "Not exported" in text
    assert "rejected: duplicate" in text and "rejected: schema" in text and "f9f8f34b" in text
    # User text is shown as text: no script ran, no element came from it (the page has none of its own).
    assert seen["pwned"] is None and seen["elements"] == 0
    assert SCRIPT in text and IMG in text and BREAKOUT in text and "<b>be nice</b>" in seen["all_text"]
    assert seen["width"] <= 1366 and len(seen["plots"]) == 3 and all(w > 300 for w in seen["plots"])
    # The screenshot a person would see: the whole page, 1366 px wide, with plots and tables on it.
    image = Image.open(png).convert("RGB")
    assert image.width == 1366 and image.height > 900
    colours = image.getcolors(maxcolors=1 << 20)
    background = max(colours)[0]
    assert len(colours) > 200  # text, plots, tables: not a blank or single-colour page
    assert 1 - background / (image.width * image.height) > 0.3


def test_the_browser_check_sees_console_errors_exceptions_and_requests(tmp_path):
    """Guards the test above: a page with a console error, an uncaught exception and a remote image
    is reported as such."""
    from stages.report import browse

    page = write(tmp_path / "bad.html", '<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                                        '<script>console.error("boom"); notAFunction();</script></body></html>')
    seen = browse(page)
    assert any("boom" in p for p in seen["problems"])
    assert any("notAFunction" in p for p in seen["problems"])
    assert "http://127.0.0.1:9/x.png" in seen["requests"]


def test_export_parity_is_shown_when_given_and_the_page_depends_on_its_inputs_only(run_files, tmp_path):
    export = write(tmp_path / "gguf/parity.json", {
        "files": {"f16": {"agreement": 0.9912, "ppl_ratio": 1.0004, "passed": True},
                  "q4_k_m": {"agreement": 0.8125, "ppl_ratio": 1.0712, "passed": True}},
        "prompts": 52, "llama_cpp": "<i>0.3.36</i>"})
    first, second = tmp_path / "a/run.html", tmp_path / "b/run.html"
    for out in (first, second):
        assert report(run_files, "--export-parity", str(export), "--output", str(out)).exit_code == 0
    page = first.read_text()
    assert first.read_bytes() == second.read_bytes()  # no clock, fixed SVG ids
    assert "Not exported" not in page and "q4_k_m" in page and "0.8125" in page and "1.071" in page
    assert "&lt;i&gt;0.3.36&lt;/i&gt;" in page and "<i>0.3.36" not in page
    assert page.count("<svg") == 3 and not re.search(r'(src|href)="(?!#)', page)  # links within the page only


def test_bad_inputs_stop_with_one_line_naming_the_file_and_nothing_is_replaced(run_files, tmp_path):
    page = tmp_path / "run.html"
    args = list(run_files)
    eval_json = Path(args[args.index("--eval-metrics") + 1])
    eval_json.write_text("{not json")
    result = report(args, "--output", str(page))
    assert isinstance(result.exception, StageError) and str(eval_json) in str(result.exception)
    assert "\n" not in str(result.exception) and not page.exists()
    eval_json.unlink()
    assert f"{eval_json}: missing" in str(report(args, "--output", str(page)).exception)
    second = args.index("--validate", 1)
    uneven = args[:second] + args[second + 2:]  # one --validate, two of the rest
    assert "one of each per split" in str(report(uneven, "--output", str(page)).exception)
    other = write(tmp_path / "notes.html", "<html>my notes</html>")
    result = report(run_files, "--output", str(other))
    assert "is not a run report" in str(result.exception) and other.read_text() == "<html>my notes</html>"
