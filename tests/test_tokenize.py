import json

import datasets
import pytest

from stages import tokenize as tok
from stages.errors import StageError
from stages.params import TokenizeParams


def tokenize(tiny_base, rows, **kw):
    tokenizer, eos = tok.load_tokenizer(tiny_base)
    rejects, stats = [], {}
    out = list(tok.tokenize_rows(rows, tokenizer, eos, TokenizeParams(**kw), rejects, stats))
    return out, rejects, stats, tokenizer, eos


def test_prompt_masked_answer_trained_and_eos_appended(tiny_base):
    rows = [{"id": "a", "prompt": "### Question: How do I reset the hub?\n ### Answer:",
             "completion": " Hold the rear button for 10 seconds."}]
    [out], rejects, stats, tokenizer, eos = tokenize(tiny_base, rows)
    assert not rejects and out["input_ids"][-1] == eos and out["labels"][-1] == eos
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
    assert tokenizer.decode(trained[:-1]) == " Hold the rear button for 10 seconds."
    masked = out["input_ids"][:out["labels"].index(trained[0])]
    assert tokenizer.decode(masked) == rows[0]["prompt"]
    assert out["input_ids"] == tokenizer.encode(rows[0]["prompt"] + rows[0]["completion"]).ids + [eos]
    assert stats["trained_tokens"] == len(trained)


def test_train_on_prompt_labels_everything(tiny_base):
    [out], *_ = tokenize(tiny_base, [{"id": "a", "prompt": "Q: hi\n A:", "completion": " yes"}], train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_truncate_cuts_the_prompt_from_the_left_and_keeps_the_answer(tiny_base):
    long_prompt = "### Question: " + "please help me with the hub " * 30 + "\n ### Answer:"
    rows = [{"id": "a", "prompt": long_prompt, "completion": " Reset it."}]
    [full], *_ = tokenize(tiny_base, rows, max_length=1000)
    [cut], rejects, stats, tokenizer, eos = tokenize(tiny_base, rows, max_length=40)
    assert len(cut["input_ids"]) == 40 and stats["truncated"] == 1 and not rejects
    assert cut["input_ids"] == full["input_ids"][-40:] and cut["labels"] == full["labels"][-40:]
    assert tokenizer.decode([t for t in cut["labels"] if t != -100][:-1]) == " Reset it."


def test_drop_policy_and_unfittable_answers_are_rejected_with_reasons(tiny_base):
    rows = [{"id": "long", "prompt": "Q: " + "word " * 100, "completion": " a"},
            {"id": "answer", "prompt": "Q:", "completion": " word" * 100},
            {"id": "ok", "prompt": "Q:", "completion": " fine"}]
    out, rejects, *_ = tokenize(tiny_base, rows, max_length=32, overlength="drop")
    assert [o["id"] for o in out] == ["ok"] and [r["id"] for r in rejects] == ["long", "answer"]
    out, rejects, *_ = tokenize(tiny_base, rows, max_length=32, overlength="truncate")
    assert [o["id"] for o in out] == ["long", "ok"]
    assert rejects[0]["id"] == "answer" and "never cut" in rejects[0]["detail"]


def test_run_writes_dataset_report_and_rejects(tiny_base, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": str(i), "prompt": "Q: hi " * (i + 1), "completion": " A."})
                                 for i in range(20)) + "\n")
    out, report, rejects = tmp_path / "tok", tmp_path / "rep.json", tmp_path / "rej.jsonl"
    s = tok.run(prompts, out, tiny_base, report, rejects, TokenizeParams(max_length=24, overlength="drop"))
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == s["rows_out"] and s["rows_out"] + s["dropped_too_long"] == s["rows_in"] == 20
    assert s["dropped_too_long"] == len(rejects.read_text().splitlines()) > 0
    assert s["length_max"] <= 24 and s["length_p50"] <= s["length_p90"] <= s["length_p99"] <= s["length_max"]
    assert json.loads(report.read_text()) == s
    assert ds.features["input_ids"].feature.dtype == "int32"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="import-base"):
        tok.load_tokenizer(tmp_path)
