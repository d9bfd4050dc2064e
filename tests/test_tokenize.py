import functools
import json
import random
from pathlib import Path

import datasets
import pytest

from stages import tokenize as tok
from stages.errors import StageError
from stages.params import TokenizeParams as Tokenize

# every field (params.yaml is the only source of defaults); a test overrides what it is about
TokenizeParams = functools.partial(Tokenize, max_length=512, overlength="truncate", train_on_prompt=False,
                                   batch_size=1000)

ROOT = Path(__file__).resolve().parent.parent


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


def test_chat_completion_already_ended_gets_no_second_eos(tiny_base):
    rows = [{"id": "c", "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
             "completion": "Hello there.<|im_end|>\n"}]
    [out], rejects, _, tokenizer, eos = tokenize(tiny_base, rows)
    assert not rejects and out["input_ids"].count(eos) == 2  # the user turn's and the answer's, nothing appended
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "Hello there.<|im_end|>\n"


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


def reference_rows(rows, tokenizer, eos_id, params):
    """The rule as first written: every token's offsets and special flag copied into Python. The stage's
    shortcut (one char_to_token a row) must give exactly this."""
    out, rejects, stats = [], [], {"truncated": 0, "trained_tokens": 0}
    for row in rows:
        enc = tokenizer.encode(row["prompt"] + row["completion"])
        ids, offsets, special = enc.ids, enc.offsets, enc.special_tokens_mask
        cut = len(row["prompt"])
        in_answer = [s == 0 and start >= cut for (start, _), s in zip(offsets, special)]
        if ids and ids[-1] == eos_id and special[-1]:
            in_answer[-1] = True
        elif not row["completion"].rstrip().endswith(tokenizer.id_to_token(eos_id)):
            ids, in_answer = ids + [eos_id], in_answer + [True]
        n_prompt = in_answer.index(True) if True in in_answer else len(ids)
        reason = None
        if len(ids) > params.max_length:
            excess = len(ids) - params.max_length
            keep_head = 1 if special and special[0] else 0
            if params.overlength == "drop":
                reason = f"{len(ids)} tokens > tokenize.max_length={params.max_length} (overlength=drop)"
            elif n_prompt - keep_head < excess:
                reason = (f"the completion alone needs {len(ids) - n_prompt + keep_head} tokens > "
                          f"tokenize.max_length={params.max_length}; it is never cut")
            else:
                del ids[keep_head:keep_head + excess], in_answer[keep_head:keep_head + excess]
                stats["truncated"] += 1
        labels = [t if (a or params.train_on_prompt) else -100 for t, a in zip(ids, in_answer)]
        if reason is None and not any(in_answer):
            reason = "no trained tokens"
        if reason:
            rejects.append({"id": row["id"], "reason": "too_long" if "max_length" in reason
                            else "no_trained_tokens", "detail": reason})
            continue
        stats["trained_tokens"] += sum(1 for label in labels if label != -100)
        out.append({"id": row["id"], "input_ids": ids, "labels": labels, "length": len(ids)})
    return out, rejects, stats


SEAM_ENDS = ["### Answer:", "Answer: ", "\n", "\n\n", "é", "😀", "<|im_end|>", "<|im_start|>assistant\n", "x", ": "]
SEAM_STARTS = [" Hold it.", "Hold", "\nNext", "\n\n", "😀 smile", ":) ok", "<|im_end|>", " ", "é", "  two spaces"]


def seam_rows(n=400, seed=0):
    rng = random.Random(seed)
    words = ["hub", "reset", "the", "button", "firmware", "Zoë", "日本", "3.4.2", "Wi-Fi", "?"]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(words, k=rng.randrange(0, 40))) + rng.choice(SEAM_ENDS)
        completion = rng.choice(SEAM_STARTS) + " ".join(rng.choices(words, k=rng.randrange(0, 30)))
        rows.append({"id": str(i), "prompt": prompt, "completion": completion})
    return rows


def with_post_processor(tiny_base, kind):
    from tokenizers import processors

    tokenizer, eos = tok.load_tokenizer(tiny_base)
    bos = "<|im_start|>"
    if kind == "bos":  # Llama 3 style: BOS before the text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    elif kind == "bos_eos":  # BOS and EOS around the text: the stage falls back to the token-by-token rule
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A <|im_end|>", special_tokens=[(bos, tokenizer.token_to_id(bos)), ("<|im_end|>", eos)])
    elif kind == "trimmed":  # GPT-2 style: offsets trimmed of their leading space
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return tokenizer, eos


@pytest.mark.parametrize("kind", ["plain", "bos", "bos_eos", "trimmed"])
@pytest.mark.parametrize("params", [TokenizeParams(max_length=512, batch_size=64),
                                    TokenizeParams(max_length=24, overlength="truncate", batch_size=7),
                                    TokenizeParams(max_length=24, overlength="drop"),
                                    TokenizeParams(max_length=30, train_on_prompt=True)], ids=str)
def test_the_seam_shortcut_gives_exactly_the_token_by_token_rule(tiny_base, kind, params):
    tokenizer, eos = with_post_processor(tiny_base, kind)
    rows = seam_rows()
    rejects, stats = [], {}
    out = list(tok.tokenize_rows(rows, tokenizer, eos, params, rejects, stats))
    assert (out, rejects, stats) == reference_rows(rows, tokenizer, eos, params)
    assert out and (params.max_length > 100 or stats["truncated"] or rejects)


@pytest.mark.skipif(not (ROOT / "models/base/tokenizer.json").exists(), reason="no models/base (dvc repro import_base)")
def test_the_seam_shortcut_on_the_project_base_tokenizer():
    tokenizer, eos = tok.load_tokenizer(ROOT / "models/base")
    rows = seam_rows(1000, seed=1)
    for params in (TokenizeParams(max_length=512), TokenizeParams(max_length=20)):
        rejects, stats = [], {}
        out = list(tok.tokenize_rows(rows, tokenizer, eos, params, rejects, stats))
        assert (out, rejects, stats) == reference_rows(rows, tokenizer, eos, params)


def prompts_file(path, n):
    path.write_text("".join(json.dumps({"id": str(i), "prompt": "Q: hi " * (i % 9 + 1), "completion": " A."}) + "\n"
                            for i in range(n)))


def tree(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_run_is_deterministic_and_shards_load_as_one_dataset(tiny_base, tmp_path, monkeypatch):
    prompts_file(tmp_path / "p.jsonl", 3000)
    params = TokenizeParams(max_length=24, overlength="drop", batch_size=100)
    s1 = tok.run(tmp_path / "p.jsonl", tmp_path / "a", tiny_base, None, None, params)
    tok.run(tmp_path / "p.jsonl", tmp_path / "b", tiny_base, None, None, params)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")  # same input, same bytes: DVC sees no change
    monkeypatch.setattr(tok, "BLOCK", 10_000)  # many blocks, one shard each, in two worker processes
    monkeypatch.setattr(tok, "PARALLEL_MIN_BYTES", 0)
    s3 = tok.run(tmp_path / "p.jsonl", tmp_path / "c", tiny_base, None, None, params)
    assert s1 == s3 and len([n for n in tree(tmp_path / "c") if n.endswith(".arrow")]) > 3
    a, c = datasets.load_from_disk(str(tmp_path / "a")), datasets.load_from_disk(str(tmp_path / "c"))
    assert len(a) == s1["rows_out"] > 0 and a.to_dict() == c.to_dict()
    assert a.features == c.features and a.features["labels"].feature.dtype == "int32"
    assert a.features["length"].dtype == "int32" and a.features["id"].dtype == "string"


def test_run_writes_batches_as_it_reads(tiny_base, tmp_path, monkeypatch):
    prompts_file(tmp_path / "p.jsonl", 1000)
    seen, real = [], tok.tokenize_batch

    def tokenize_batch(*a, **k):  # before each batch: how much of the shard is on disk already
        shards = list(tmp_path.glob(".tok.*/tok/shard-0.arrow"))
        seen.append(shards[0].stat().st_size if shards else 0)
        return real(*a, **k)

    monkeypatch.setattr(tok, "tokenize_batch", tokenize_batch)
    tok.run(tmp_path / "p.jsonl", tmp_path / "tok", tiny_base, None, None, TokenizeParams(batch_size=100))
    assert len(seen) == 10 and seen == sorted(seen) and seen[1] < seen[5] < seen[9]


def test_failure_mid_stage_leaves_previous_outputs_untouched(tiny_base, tmp_path, monkeypatch):
    prompts_file(tmp_path / "p.jsonl", 1000)
    out, report, rejects = tmp_path / "tok", tmp_path / "rep.json", tmp_path / "rej.jsonl"
    tok.run(tmp_path / "p.jsonl", out, tiny_base, report, rejects, TokenizeParams(max_length=24, batch_size=100))
    before = tree(out), report.read_bytes(), rejects.read_bytes()
    real, calls = tok.tokenize_batch, {"n": 0}

    def explode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(tok, "tokenize_batch", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tok.run(tmp_path / "p.jsonl", out, tiny_base, report, rejects, TokenizeParams(max_length=10, batch_size=100))
    assert (tree(out), report.read_bytes(), rejects.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "rej.jsonl", "rep.json", "tok"]


def test_tokenize_rows_reads_one_batch_at_a_time(tiny_base):
    tokenizer, eos = tok.load_tokenizer(tiny_base)

    def rows():
        for i in range(10):
            yield {"id": str(i), "prompt": "Q:", "completion": " yes"}
        raise AssertionError("read past the first batch")

    out = tok.tokenize_rows(rows(), tokenizer, eos, TokenizeParams(batch_size=10), [], {})
    assert next(out)["id"] == "0"


def test_no_row_left_is_a_clear_error_after_the_report(tiny_base, tmp_path):
    prompts_file(tmp_path / "p.jsonl", 20)
    report = tmp_path / "rep.json"
    with pytest.raises(StageError, match="no row left"):
        tok.run(tmp_path / "p.jsonl", tmp_path / "tok", tiny_base, report, tmp_path / "rej.jsonl",
                TokenizeParams(max_length=2, overlength="drop"))
    assert json.loads(report.read_text())["dropped_too_long"] == 20
    assert len(datasets.load_from_disk(str(tmp_path / "tok"))) == 0


def test_the_spelled_out_schema_is_the_one_datasets_makes():
    features = datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    })
    assert tok.SCHEMA.equals(features.arrow_schema, check_metadata=True)
    assert datasets.Features.from_arrow_schema(tok.SCHEMA) == features
