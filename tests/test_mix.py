"""Several sources per split (validate), their weights and the train/eval leakage check (mix), lineage
per source, and through real DVC: a new source re-runs only what depends on the train split."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import orjson
import pytest

from conftest import copy_project, sh, shipped_with
from stages import lineage, mix, validate
from stages.errors import StageError

P = shipped_with({})


def qa(q: str, a: str) -> bytes:
    return orjson.dumps({"input": q, "output": a})


# three sources: docs.jsonl has broken lines; faq.jsonl repeats a row of docs.jsonl (a duplicate there)
SOURCES = {
    "docs.jsonl": [qa(f"How do I configure option {i} of the hub?", f"Open Settings and set option {i}.")
                   for i in range(10)],
    "faq.jsonl": [qa(f"Is feature {i} free?", f"Yes, feature {i} is included.") for i in range(6)]
                 + [qa("How do I configure option 3 of the hub?", "Open Settings and set option 3.")],
    "support.jsonl": [qa(f"Ticket {i}: my hub shows code E{i}", f"Code E{i} means restart the hub.")
                      for i in range(8)],
}
BROKEN = {3: b'{"input": "half a row', 6: b"", 9: b'["not", "an object"]'}  # docs.jsonl line -> its text


def write_sources(folder: Path) -> dict[str, list[bytes]]:
    folder.mkdir(parents=True)
    files = {}
    for name, rows in SOURCES.items():
        lines = list(rows)
        if name == "docs.jsonl":
            for n, text in BROKEN.items():
                lines.insert(n - 1, text)
        (folder / name).write_bytes(b"\n".join(lines) + b"\n")
        files[name] = lines
    return files


def run_validate(tmp_path: Path, input: Path) -> tuple[list, list, dict]:
    out, rej, rep = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl", tmp_path / "report.json"
    summary = validate.run(input, out, rej, rep, P.data, shipped_with({"validate": {"max_reject_fraction": 0.5}}).validate)
    read = lambda p: [orjson.loads(x) for x in p.read_bytes().splitlines()]  # noqa: E731
    return read(out), read(rej), summary


def test_a_folder_of_sources_accounts_for_every_line_by_file_and_line(tmp_path):
    files = write_sources(tmp_path / "train")
    clean, rejects, summary = run_validate(tmp_path, tmp_path / "train")
    seen = Counter((r["source"], r["line"]) for r in clean + rejects)
    blank = {("docs.jsonl", 6)}
    every = {(name, n) for name, lines in files.items() for n in range(1, len(lines) + 1)}
    assert set(seen) | blank == every and not set(seen) & blank and max(seen.values()) == 1
    assert {(r["source"], r["line"]): r["reason"] for r in rejects} == {
        ("docs.jsonl", 3): "invalid_json", ("docs.jsonl", 9): "not_an_object", ("faq.jsonl", 7): "duplicate"}
    # a clean row is the line it says it is
    for row in clean:
        raw = json.loads(files[row["source"]][row["line"] - 1])
        assert row["messages"][0]["content"] == raw["input"]
    assert summary["sources"]["docs.jsonl"] == {**summary["sources"]["docs.jsonl"], "lines": 13, "blank": 1,
                                                "kept": 10, "rejected": 2}
    assert summary["sources"]["faq.jsonl"]["rejected_duplicate"] == 1
    assert sum(s["lines"] for s in summary["sources"].values()) == summary["lines"] == 13 + 7 + 8


def test_a_single_file_is_its_own_source_and_a_stray_file_in_a_folder_is_refused(tmp_path):
    (tmp_path / "one.jsonl").write_bytes(SOURCES["faq.jsonl"][0] + b"\n")
    clean, _, summary = run_validate(tmp_path, tmp_path / "one.jsonl")
    assert clean[0]["source"] == "one.jsonl" and clean[0]["line"] == 1 and list(summary["sources"]) == ["one.jsonl"]
    folder = tmp_path / "split"
    write_sources(folder)
    (folder / "notes.txt").write_text("todo")
    with pytest.raises(StageError, match=r"notes.txt: not a .jsonl file, in the source folder .*split"):
        run_validate(tmp_path, folder)


def rows(source: str, n: int) -> list[dict]:
    return [{"id": f"{source}-{i}", "messages": [{"role": "user", "content": f"question {source} {i}"},
                                                 {"role": "assistant", "content": "a"}], "source": source}
            for i in range(n)]


def test_weights_up_and_down_sample_each_source_from_the_seed():
    train = rows("support.jsonl", 10) + rows("docs.jsonl", 10) + rows("faq.jsonl", 10)
    weights = {"support.jsonl": 2.0, "docs.jsonl": 0.5, "faq.jsonl": 1.5}
    out, stats = mix.weigh(train, weights, seed=42)
    per = Counter(r["source"] for r in out)
    assert per == {"support.jsonl": 20, "docs.jsonl": 5, "faq.jsonl": 15}
    assert {s: v["rows_out"] for s, v in stats.items()} == per
    times = Counter(r["id"] for r in out)
    assert all(times[f"support.jsonl-{i}"] == 2 for i in range(10))  # 2.0: each row twice
    assert {times[f"faq.jsonl-{i}"] for i in range(10)} == {1, 2}    # 1.5: all, and a half of them again
    assert mix.weigh(train, weights, seed=42)[0] == out                # the same draw from the same seed
    assert mix.weigh(train, weights, seed=7)[0] != out
    assert mix.weigh(train, {}, seed=42)[0] == train                   # no weights: every row once
    with pytest.raises(StageError, match=r"data.weights names 'typo.jsonl'.*sources with rows: docs.jsonl, faq"):
        mix.weigh(train, {"typo.jsonl": 2.0}, seed=42)


# planted leaks: 2 exact after normalisation (case, spaces, punctuation), 2 near (a word or two changed),
# and eval rows of their own
TRAIN = [
    ("How do I reset the Lumo Hub to factory settings?", "Hold the rear button for ten seconds until the ring "
     "flashes white, then release it and wait two minutes."),
    ("What is the warranty period?", "The hub carries a two year limited warranty from the date of purchase."),
    ("Can I use the hub without internet access?", "Yes. Local routines, schedules and Zigbee devices keep "
     "working without internet; remote access and voice assistants need it."),
    ("Which app controls the hub?", "Use the free Lumo app for iOS and Android to set up and control the hub "
     "and every device paired with it."),
    *[(f"Does bulb model {i} pair with the hub?", f"Yes, bulb model {i} pairs over Zigbee in under a minute.")
      for i in range(20)],
]
EVAL = [
    ("how do i RESET the lumo hub to factory settings", "Hold the rear button for 10 seconds."),   # exact
    ("  What is the   warranty period ??", "Two years."),                                          # exact
    ("Can I use the hub without internet?", "Yes. Local routines, schedules and Zigbee devices keep "
     "working without internet; remote access and voice assistants need it."),                   # near
    ("Which app controls my hub?", "Use the free Lumo app for iOS and Android to set up and control the "
     "hub and every device paired with it."),                                                    # near
    ("How do I change the ring brightness?", "Open Settings > Hub > Ring and move the slider."),
    ("Does the hub support Thread?", "Yes, the hub is a Thread border router."),
    ("Where is the serial number printed?", "On the label under the hub, next to the QR code."),
]


def as_rows(pairs, source):
    return [{"id": f"{source}{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "source": f"{source}.jsonl", "line": i + 1} for i, (q, a) in enumerate(pairs)]


def run_mix(tmp_path, **leakage):
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in as_rows(TRAIN, "t")))
    eval_.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in as_rows(EVAL, "e")))
    p = shipped_with({"leakage": leakage})
    out = tmp_path / "out"
    summary = mix.run(train, eval_, out / "train.jsonl", out / "eval.jsonl", out / "mix.json", out / "leakage.jsonl",
                      p.data, p.leakage, p.seed)
    report = [orjson.loads(x) for x in (out / "leakage.jsonl").read_bytes().splitlines()]
    return summary, report, [orjson.loads(x) for x in (out / "eval.jsonl").read_bytes().splitlines()]


def test_planted_exact_and_near_leaks_are_counted_exactly_and_reported(tmp_path):
    summary, report, kept = run_mix(tmp_path, action="report")
    assert summary["leakage"] | {} == {**summary["leakage"], "exact": 2, "near": 2, "leaked": 4, "dropped": 0}
    assert summary["leakage"]["rate"] == round(4 / 7, 6)
    assert [(r["eval_id"], r["kind"], r["train_id"]) for r in report] == [
        ("e0", "exact", "t0"), ("e1", "exact", "t1"), ("e2", "near", "t2"), ("e3", "near", "t3")]
    assert all(r["jaccard"] >= 0.5 for r in report if r["kind"] == "near")
    assert report[2]["eval_source"] == "e.jsonl" and report[2]["eval_line"] == 3 and report[2]["train_line"] == 3
    assert len(kept) == 7  # report keeps every row
    assert json.loads((tmp_path / "out/mix.json").read_text()) == summary


def test_drop_removes_exactly_the_leaked_eval_rows(tmp_path):
    summary, report, kept = run_mix(tmp_path, action="drop")
    assert [r["id"] for r in kept] == ["e4", "e5", "e6"]
    assert summary["eval"] == {"rows_in": 7, "rows_out": 3} and summary["leakage"]["dropped"] == 4
    assert all(r["dropped"] for r in report)


def test_fail_stops_with_one_line_past_max_fraction_and_passes_under_it(tmp_path):
    with pytest.raises(StageError) as e:
        run_mix(tmp_path, action="fail", max_fraction=0.5)
    assert "\n" not in str(e.value)
    assert re.search(r"eval.jsonl: 4 of 7 eval rows leak from train \(57.1% > leakage.max_fraction=0.5; "
                     r"2 exact, 2 near.*leakage.jsonl", str(e.value))
    assert (tmp_path / "out/leakage.jsonl").exists()  # the report to act on is written
    summary, _, _ = run_mix(tmp_path, action="fail", max_fraction=0.6)
    assert summary["leakage"]["leaked"] == 4


def test_lineage_names_every_source_with_its_md5_and_rows_trained(tmp_path):
    folder = tmp_path / "train"
    write_sources(folder)
    clean, _, _ = run_validate(tmp_path, folder)
    weighted, _ = mix.weigh(clean, {"support.jsonl": 2.0, "faq.jsonl": 0.5}, seed=42)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in weighted))
    record = lineage.build(P, {}, [folder], [r["id"] for r in weighted], False, "float32", lineage.row_sources(mixed))
    assert [(d["source"], d["rows_trained"]) for d in record["data"]] == [
        ("docs.jsonl", 10), ("faq.jsonl", 3), ("support.jsonl", 16)]  # faq: 6 kept (1 duplicate), half of them
    assert all(d["md5"] == lineage.file_md5(folder / d["source"]) for d in record["data"])
    assert record["rows"]["count"] == 29
    assert "16 rows trained" in lineage.describe({**record, "base": {"source": "x", "sha256": "0" * 64,
                                                                     "parameters": 1}})


STAGES_RUN = re.compile(r"Running stage '([^']+)'")


def test_a_new_source_reruns_the_train_validate_and_what_follows_through_dvc(tmp_path):
    root = copy_project(tmp_path / "project")
    folder = root / "data/raw/train"
    (root / "data/raw/train.jsonl").unlink()
    write_sources(folder)
    params = (root / "params.yaml").read_text()
    params = params.replace("  train: data/raw/train.jsonl", "  train: data/raw/train")
    params = params.replace("  weights: {}", "  weights: {support.jsonl: 2.0}")
    params = params.replace("  max_reject_fraction: 0.1 ", "  max_reject_fraction: 0.2 ")  # 3 of 27 here
    (root / "params.yaml").write_text(params)
    sh("git init -q && git config user.name t && git config user.email t@t.invalid && git add -A"
       " && git commit -qm init && dvc repro -q mix", root)
    m = json.loads((root / "metrics/mix.json").read_text())
    assert m["train"]["sources"]["support.jsonl"] == {"rows": 8, "weight": 2.0, "rows_out": 16}
    sh("git add -A && git commit -qm run", root)
    before = lineage.lock_md5s(root / "dvc.lock")
    (folder / "extra.jsonl").write_bytes(qa("A fourth source?", "Yes.") + b"\n")
    ran = STAGES_RUN.findall(sh("dvc repro mix", root).stdout)
    assert ran == ["validate@train", "mix"]  # not validate@eval
    v = json.loads((root / "metrics/validate_train.json").read_text())
    assert v["sources"]["extra.jsonl"]["kept"] == 1 and len(v["sources"]) == 4
    after = lineage.lock_md5s(root / "dvc.lock")
    # what follows on the train side sees new rows; the eval side's input to format is the same bytes
    assert after["data/mixed/train.jsonl"] != before["data/mixed/train.jsonl"]
    assert after["data/mixed/eval.jsonl"] == before["data/mixed/eval.jsonl"]
