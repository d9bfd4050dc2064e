import functools
import json
import os
import shutil
import threading
import tracemalloc
from pathlib import Path

import orjson
import pytest

from stages import jsonl, validate
from stages.errors import StageError
from stages.params import DataParams as Data
from stages.params import ValidateParams as Validate
from tests.conftest import sh

# every field (params.yaml is the only source of defaults); a test overrides what it is about
DataParams = functools.partial(Data, format="auto", field_map={}, train="data/raw/train.jsonl",
                               eval="data/raw/eval.jsonl", weights={})
ValidateParams = functools.partial(Validate, max_reject_fraction=0.1, max_chars=20000)

ROOT = Path(__file__).resolve().parent.parent
LOOSE = ValidateParams(max_reject_fraction=1.0, max_chars=1000)


def run_lines(tmp_path, data: bytes, data_params=DataParams(), limits=LOOSE):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(data)
    out, rej, rep = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl", tmp_path / "report.json"
    summary = validate.run(raw, out, rej, rep, data_params, limits)
    clean = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    rejects = [orjson.loads(x) for x in rej.read_bytes().splitlines()]
    assert json.loads(rep.read_text()) == summary
    return clean, rejects, summary


HOSTILE = [
    b'{"input": "How do I reset it?", "output": "Hold the rear button 10 s."}',  # 1 ok
    b'{"input": "broken", "output": "x"',                                      # 2 invalid_json
    b'{"input": 3, "output": "x"}',                                              # 3 schema (wrong type)
    b'{"input": NaN, "output": "x"}',                                            # 4 invalid_json (NaN)
    b'{"input": {"nested": "obj"}, "output": "x"}',                              # 5 schema (nested object)
    b'{"input": "", "output": "x"}',                                             # 6 empty_field
    b'{"input": "   \\t ", "output": "x"}',                                      # 7 empty_field (whitespace)
    b'',                                                                          # 8 blank
    b'{"input": "How do I reset it?", "output": "Hold the rear button 10 s."}',  # 9 duplicate
    b'{"input": "Caf\xc3\xa9 \xff\xfe", "output": "x"}',                        # 10 bad_encoding
    b'["a", "b"]',                                                                # 11 not_an_object
    b'   ',                                                                       # 12 blank
    b'{"input": "' + b"x" * 2_000_000 + b'", "output": "y"}',                   # 13 too_long (2 MB row)
    b'{"input": "  How do I reset it?  ", "output": "Hold the rear button 10 s.\\u0000"}',  # 14 duplicate
    b'{"input": "Zo\xc3\xab \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac? \\ud83d\\ude00", "output": "Line1\\nLine2\\tTab"}',  # 15 ok
    b'{"output": "no input"}',                                                    # 16 schema (missing)
    b'null',                                                                      # 17 not_an_object
    b'{"input": "last row, no final newline", "output": "kept", "extra": [1, 2]}',  # 18 ok
]
EXPECTED = {2: "invalid_json", 3: "schema", 4: "invalid_json", 5: "schema", 6: "empty_field", 7: "empty_field",
            9: "duplicate", 10: "bad_encoding", 11: "not_an_object", 13: "too_long", 14: "duplicate",
            16: "schema", 17: "not_an_object"}


def test_hostile_file_every_line_accounted_for(tmp_path):
    data = b"\xef\xbb\xbf" + b"\r\n".join(HOSTILE)  # BOM, CRLF endings, no final newline
    clean, rejects, s = run_lines(tmp_path, data)
    assert s["lines"] == len(HOSTILE) == 18
    assert s["kept"] + s["rejected"] + s["blank"] == s["lines"]
    assert s["blank"] == 2 and s["kept"] == 3
    assert {r["line"]: r["reason"] for r in rejects} == EXPECTED
    assert all(r["detail"] and isinstance(r["raw"], str) for r in rejects)
    # raw keeps the original line; an undecodable one comes back with replacement characters
    by_line = {r["line"]: r for r in rejects}
    assert by_line[2]["raw"] == '{"input": "broken", "output": "x"'
    assert "\ufffd" in by_line[10]["raw"] and "Café" in by_line[10]["raw"]
    assert len(by_line[13]["raw"]) > 2_000_000
    # valid rows come out with their text intact (unicode, newlines and tabs kept)
    texts = [(c["messages"][0]["content"], c["messages"][1]["content"]) for c in clean]
    assert texts == [("How do I reset it?", "Hold the rear button 10 s."),
                     ("Zoë — 日本? 😀", "Line1\nLine2\tTab"),
                     ("last row, no final newline", "kept")]


def test_normalisation_nfc_trim_and_control_characters():
    assert validate.normalise("  e\u0301\x00\x07\r\n ok\t ") == "é\n ok"


def test_ids_are_stable_content_hashes(tmp_path):
    clean1, _, _ = run_lines(tmp_path, b'{"input": "a", "output": "b"}\n')
    clean2, _, _ = run_lines(tmp_path, b'{"output": " b", "input": "a ", "x": 1}\n')
    assert clean1[0]["id"] == clean2[0]["id"] and len(clean1[0]["id"]) == 16


def test_alpaca_chat_and_field_map_shapes(tmp_path):
    data = b"\n".join([
        b'{"instruction": "Summarise", "input": "long text", "output": "short"}',
        b'{"instruction": "Say hi", "output": "hi"}',
        b'{"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "q1"},'
        b' {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},'
        b' {"role": "assistant", "content": "a2"}]}',
        b'{"messages": [{"role": "user", "content": "only a question"}, {"role": "user", "content": "again"}]}',
        b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    ])
    clean, rejects, _ = run_lines(tmp_path, data)
    assert clean[0]["messages"][0]["content"] == "Summarise\n\nlong text"
    assert clean[1]["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert [m["role"] for m in clean[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(4, "no_assistant_turn"), (5, "unknown_role")]
    assert "no assistant turn" in rejects[0]["detail"] and "'messages[0]' has the role 'robot'" in rejects[1]["detail"]

    mapped, _, _ = run_lines(tmp_path, b'{"question": "q", "answer": "a"}\n',
                             DataParams(field_map={"question": "input", "answer": "output"}))
    assert mapped[0]["messages"][1]["content"] == "a"


def test_too_many_rejects_fails_after_writing_both_files(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"input": "a", "output": "b"}\n{bad\n{bad2\n')
    out, rej = tmp_path / "clean.jsonl", tmp_path / "rej.jsonl"
    with pytest.raises(StageError, match=r"max_reject_fraction=0\.5.*rej\.jsonl"):
        validate.run(raw, out, rej, None, DataParams(), ValidateParams(max_reject_fraction=0.5))
    assert len(out.read_text().splitlines()) == 1 and len(rej.read_text().splitlines()) == 2


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="nope.jsonl: no such file"):
        validate.run(tmp_path / "nope.jsonl", tmp_path / "o", tmp_path / "r", None, DataParams(), LOOSE)


def test_failure_mid_stage_leaves_previous_outputs_untouched(tmp_path, monkeypatch):
    raw, out, rej = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl", tmp_path / "rej.jsonl"
    raw.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    out.write_text("previous clean\n")
    rej.write_text("previous rejects\n")
    real = validate.check_row
    calls = {"n": 0}

    def explode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(validate, "check_row", explode)
    with pytest.raises(RuntimeError):
        validate.run(raw, out, rej, None, DataParams(), LOOSE)
    assert out.read_text() == "previous clean\n" and rej.read_text() == "previous rejects\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "raw.jsonl", "rej.jsonl"]


def test_shipped_sample_data_has_a_few_rejects_and_clean_eval(tmp_path):
    _, rejects, s = run_lines(tmp_path, (ROOT / "data/raw/train.jsonl").read_bytes(),
                              limits=ValidateParams())
    assert 0 < s["rejected"] <= 10 and s["kept"] >= 300
    assert {r["reason"] for r in rejects} >= {"invalid_json", "not_an_object", "schema", "empty_field", "duplicate"}
    _, rejects, s = run_lines(tmp_path, (ROOT / "data/raw/eval.jsonl").read_bytes(), limits=ValidateParams())
    assert s["rejected"] == 0 and s["kept"] >= 40


def many_rows(n: int, start: int = 0) -> bytes:
    """n distinct qa rows, with a duplicate and a bad line every 97 and 101 rows."""
    lines = []
    for i in range(start, start + n):
        lines.append(b'{"input": "question %d about the hub", "output": "answer %d: hold the button"}' % (i, i))
        if i % 97 == 0:
            lines.append(b'{"input": "question %d about the hub", "output": "answer 0: hold the button"}' % (i - i % 1000))
        if i % 101 == 0:
            lines.append(b'{"input": "broken %d"' % i)
    return b"\n".join(lines) + b"\n"


def test_workers_and_blocks_give_the_same_files_as_one_process(tmp_path, monkeypatch):
    data = many_rows(3000) + b"\xef\xbb\xbf\n" + b"\r\n".join(HOSTILE) + b"\n" + many_rows(500)
    _, _, s1 = run_lines(tmp_path, data)
    files1 = [(tmp_path / n).read_bytes() for n in ("clean.jsonl", "rejects.jsonl")]
    # many small blocks in two worker processes: duplicates across blocks, rejects in line order
    monkeypatch.setattr(validate, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(validate, "block_spans", functools.partial(jsonl.block_spans, size=4096))
    _, rejects2, s2 = run_lines(tmp_path, data)
    assert s1 == s2 and [(tmp_path / n).read_bytes() for n in ("clean.jsonl", "rejects.jsonl")] == files1
    assert [r["line"] for r in rejects2] == sorted(r["line"] for r in rejects2)
    dups = [r for r in rejects2 if r["reason"] == "duplicate"]
    assert len(dups) > 500 and len({r["line"] // 300 for r in dups}) > 10  # across many blocks
    lines = data.split(b"\n")
    assert all(lines[r["line"] - 1].rstrip(b"\r").decode("utf-8", "replace") == r["raw"] for r in rejects2)
    assert s2["kept"] + s2["rejected"] + s2["blank"] == s2["lines"] == len(lines) - 1


def explode_on(marker: str):
    real = validate.check_row

    def check_row(raw, *a, **k):
        if marker.encode() in raw:
            raise RuntimeError("disk on fire")
        return real(raw, *a, **k)

    return check_row


def test_failure_in_a_worker_leaves_previous_outputs_untouched(tmp_path, monkeypatch):
    raw, out, rej = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl", tmp_path / "rej.jsonl"
    raw.write_bytes(many_rows(3000))
    out.write_text("previous clean\n")
    rej.write_text("previous rejects\n")
    monkeypatch.setattr(validate, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(validate, "block_spans", functools.partial(jsonl.block_spans, size=4096))
    monkeypatch.setattr(validate, "check_row", explode_on("question 2500 "))  # workers are forked: they see it
    with pytest.raises(RuntimeError, match="disk on fire"):
        validate.run(raw, out, rej, None, DataParams(), LOOSE)
    assert out.read_text() == "previous clean\n" and rej.read_text() == "previous rejects\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "raw.jsonl", "rej.jsonl"]


def test_memory_stays_flat_as_the_input_grows(tmp_path, monkeypatch):
    """Streaming: 4x the rows costs no more Python memory than the de-duplication index, 8 bytes a
    row (16 while its runs merge); a set of row hashes would take ~90."""
    monkeypatch.setattr(validate, "block_spans", functools.partial(jsonl.block_spans, size=64 << 10))
    peaks = {}
    for n in (10_000, 40_000):
        raw = tmp_path / f"raw{n}.jsonl"
        raw.write_bytes(many_rows(n))
        tracemalloc.start()
        validate.run(raw, tmp_path / "clean.jsonl", tmp_path / "rej.jsonl", None, DataParams(), LOOSE)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[40_000] - peaks[10_000] < 30_000 * 24 + (256 << 10), peaks


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def test_pathological_values_are_each_a_counted_reject_or_kept(tmp_path, monkeypatch):
    lines = [
        b'{"input": "ok", "output": "fine"}',                                     # 1 ok
        b'{"input": ' + deep(1000) + b', "output": "x"}',                        # 2 schema, explained shortly
        b'{"input": "a", "output": "b", "extra": ' + deep(1023) + b'}',          # 3 ok: extra fields are ignored
        b'{"input": "a", "output": "c", "extra": ' + deep(5000) + b'}',          # 4 too_deep (parser's limit)
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ' + deep(990) + b'}]}',  # 5
        b'{"messages": [{"role": "user", "content": "hi", "x": ' + deep(990) + b'}]}',  # 6 no assistant turn
        b'{"input": "big", "output": "int", "n": 1' + b"0" * 300 + b'}',          # 7 ok (read as a float)
        b'{"input": "inf", "output": "x", "n": 1e400}',                          # 8 invalid_json
        b'{"input": 1' + b"0" * 5000 + b', "output": "x"}',                      # 9 invalid_json
        b'{"input": "long", "output": "' + b"y" * 10_000_000 + b'"}',            # 10 too_long
        b'{"input": "wide", "output": "x", "extra": "' + b"z" * 10_000_000 + b'"}',  # 11 ok
        b'{"input": [' + b"1," * 1_000_000 + b'1], "output": "x"}',              # 12 schema
    ]
    expected = {2: "schema", 4: "too_deep", 5: "schema", 6: "no_assistant_turn", 8: "invalid_json", 9: "invalid_json",
                10: "too_long", 12: "schema"}
    for workers in (False, True):
        if workers:
            monkeypatch.setattr(validate, "PARALLEL_MIN_BYTES", 0)
        clean, rejects, s = run_lines(tmp_path, b"\n".join(lines) + b"\n")
        assert {r["line"]: r["reason"] for r in rejects} == expected
        assert s["kept"] == 4 and s["rejected_too_deep"] == 1 and s["rejected_schema"] == 3
        assert all(len(r["detail"]) < 400 for r in rejects)
        assert [c["messages"][0]["content"] for c in clean] == ["ok", "a", "big", "wide"]


INVISIBLE = ["\u200b", "\ufeff", "\u2060", "\u00ad", "\ufe0f", "\u200b \u200d\u2063", "\u3164", "\u2800", "\u0301",
             "\U000e0041"]


def test_text_of_only_invisible_characters_is_an_empty_field(tmp_path):
    lines = [orjson.dumps({"input": "q", "output": text}) for text in INVISIBLE]
    lines += [orjson.dumps({"instruction": text, "output": "a"}) for text in INVISIBLE[:2]]
    lines += [orjson.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]})
              for text in INVISIBLE[:2]]
    kept = ["\U0001f468\u200d\U0001f469", "e\u0301", "\u200bvisible", "\u00a0x", "\ue000"]  # shows something
    lines += [orjson.dumps({"input": "q", "output": text}) for text in kept]
    clean, rejects, s = run_lines(tmp_path, b"\n".join(lines))
    assert [r["reason"] for r in rejects] == ["empty_field"] * 14 and s["rejected_empty_field"] == 14
    assert "U+200B" in rejects[0]["detail"] and "'output'" in rejects[0]["detail"]
    assert [c["messages"][1]["content"] for c in clean] == ["\U0001f468\u200d\U0001f469", "é", "\u200bvisible",
                                                            "x", "\ue000"]


def chat(roles, tag=""):
    return orjson.dumps({"messages": [{"role": r, "content": f"{r} {i}{tag}"} for i, r in enumerate(roles)]})


TURNS = [
    (("user", "assistant"), None),
    (("system", "user", "assistant", "user", "assistant"), None),
    (("user", "assistant", "user"), "trimmed"),
    (("system", "user", "assistant", "user"), "trimmed"),
    (("assistant", "user", "assistant"), "turn_order"),
    (("system", "assistant", "user", "assistant"), "turn_order"),
    (("user", "system", "assistant"), "turn_order"),
    (("system", "system", "user", "assistant"), "turn_order"),
    (("user", "user", "assistant"), "turn_order"),
    (("user", "assistant", "assistant"), "turn_order"),
]
# what Llama 2's, Mistral's and Gemma's templates check: roles alternate from a user turn
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system = '' %}{% endif %}"
    "{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ system if loop.first else '' }}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)


def strict_base(tiny_base, tmp_path):
    base = tmp_path / "strict-base"
    shutil.copytree(tiny_base, base)
    (base / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return base


def test_chat_turn_order_fates_and_every_kept_row_formats_under_every_template(tmp_path, tiny_base):
    from stages import format as fmt
    from stages.params import TemplateParams

    clean, rejects, s = run_lines(tmp_path, b"\n".join(chat(roles, n) for n, (roles, _) in enumerate(TURNS)))
    fates = {i + 1: fate for i, (_, fate) in enumerate(TURNS)}
    assert {r["line"]: r["reason"] for r in rejects} == {n: f for n, f in fates.items() if f == "turn_order"}
    assert s["trimmed_trailing_turns"] == 2 and s["rejected_turn_order"] == 6 and s["kept"] == 4
    assert [[m["role"] for m in c["messages"]][-1] for c in clean] == ["assistant"] * 4
    assert "messages[0]" in rejects[0]["detail"] and "user turn first" in rejects[0]["detail"]
    strict = strict_base(tiny_base, tmp_path)
    for name, base in (("qa", None), ("alpaca", None), ("chat", tiny_base), ("chat", strict)):
        assert len(list(fmt.format_rows(clean, TemplateParams(name=name, system_prompt=None, train_on="all"), base))) == 4
    # each rejected order is one that a strict template refuses
    refused = [{"id": "x", "messages": [{"role": r, "content": "t"} for r in roles]}
               for roles, fate in TURNS if fate == "turn_order" and roles[-1] == "assistant"]
    for row in refused[:4]:
        with pytest.raises(StageError, match=r"row x: the chat template .* refuses it .*alternate"):
            list(fmt.format_rows([row], TemplateParams(name="chat", system_prompt=None, train_on="all"), strict))


def test_cr_only_line_endings_are_a_stated_reject(tmp_path):
    rows = [b'{"input": "q%d", "output": "a%d"}' % (i, i) for i in range(3)]
    clean, rejects, s = run_lines(tmp_path, b'{"input": "lf", "output": "ok"}\n' + b"\r".join(rows) + b"\r\n")
    assert [r["reason"] for r in rejects] == ["cr_line_breaks"] and s["rejected_cr_line_breaks"] == 1
    assert "3 rows" in rejects[0]["detail"] and "convert CR to LF" in rejects[0]["detail"]
    assert len(clean) == 1  # CRLF endings stay fine
    with pytest.raises(StageError, match=r"raw.jsonl: no usable row .*cr_line_breaks=1.*convert CR to LF.*rejects.jsonl"):
        run_lines(tmp_path, b"\r".join(rows) + b"\r")


@pytest.mark.parametrize("data", [b"", b"\n  \n\r\n", b'{"bad\n[1]\n{"input": "", "output": "x"}\n'],
                         ids=["empty", "blank", "all rejected"])
def test_no_usable_row_fails_at_validate_naming_input_and_rejects(tmp_path, data):
    with pytest.raises(StageError, match=r"raw.jsonl: no usable row \(\d+ lines.*see .*rejects.jsonl") as e:
        run_lines(tmp_path, data)
    assert "\n" not in str(e.value)
    assert len((tmp_path / "rejects.jsonl").read_bytes().splitlines()) == (3 if b"bad" in data else 0)


def test_piped_input_is_read_as_a_file(tmp_path):
    data = many_rows(500) + b"\r\n".join(HOSTILE) + b"\n"
    _, _, direct = run_lines(tmp_path, data)
    files = [(tmp_path / n).read_bytes() for n in ("clean.jsonl", "rejects.jsonl")]
    (tmp_path / "pipe").mkdir()
    fifo = tmp_path / "pipe/raw.jsonl"  # the source's name, in each row, is the file's: the same here
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True)
    writer.start()
    piped = validate.run(fifo, tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl", None, DataParams(), LOOSE)
    writer.join(10)
    assert piped == direct and [(tmp_path / n).read_bytes() for n in ("clean.jsonl", "rejects.jsonl")] == files
    # through the CLI, from stdin and from a process substitution
    for command in (f"cat {tmp_path}/raw.jsonl | finetune validate --input /dev/stdin",
                    f"bash -c 'finetune validate --input <(cat {tmp_path}/raw.jsonl)"):
        quote = "'" if command.startswith("bash") else ""
        proc = sh(f"{command} --output {tmp_path}/cli.jsonl --rejects {tmp_path}/cli-rej.jsonl "
                  f"--params {ROOT}/params.yaml{quote}", tmp_path, check=False)
        def unnamed(rows: bytes) -> list:  # a pipe's source is named after it (stdin, 63...)
            return [{**orjson.loads(x), "source": None} for x in rows.splitlines()]

        assert unnamed((tmp_path / "cli.jsonl").read_bytes()) == unnamed(files[0]), proc.stderr
        assert f"kept {direct['kept']}" in proc.stderr


def sharegpt(*turns, key=("from", "value"), **extra):
    return orjson.dumps({"conversations": [{key[0]: r, key[1]: t} for r, t in turns], **extra})


def test_sharegpt_rows_and_their_variants_become_chat_rows(tmp_path):
    want = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    lines = [
        sharegpt(("system", "Be brief"), ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")),
        sharegpt(("user", " q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2\n"), system="Be brief"),
        sharegpt(("system", "Be brief"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"),
                 key=("role", "content"), id=7),
        sharegpt(("human", "single"), ("gpt", "turn"), ("human", "unanswered"), system=" "),  # blank system: none
        b'{"messages": [{"role": "user", "content": "a chat row"}, {"role": "assistant", "content": "as before"}]}',
    ]
    clean, rejects, s = run_lines(tmp_path, b"\n".join(lines))
    assert [r["reason"] for r in rejects] == ["duplicate", "duplicate"]  # the same conversation, normalised
    assert clean[0]["messages"] == want and [r["line"] for r in rejects] == [2, 3]
    assert clean[1]["messages"] == [{"role": "user", "content": "single"}, {"role": "assistant", "content": "turn"}]
    assert s["trimmed_trailing_turns"] == 1 and clean[2]["messages"][0]["content"] == "a chat row"
    # data.format forces the shape; data.field_map renames the top-level fields
    forced, rejects, _ = run_lines(tmp_path, b"\n".join(lines[:1] + lines[4:]), DataParams(format="sharegpt"))
    assert forced[0]["messages"] == want and [r["reason"] for r in rejects] == ["schema"]
    assert "'row'" in rejects[0]["detail"] and "conversations" in rejects[0]["detail"]
    mapped, _, _ = run_lines(tmp_path, orjson.dumps({"dialog": orjson.loads(lines[0])["conversations"]}),
                             DataParams(field_map={"dialog": "conversations"}))
    assert mapped[0]["messages"] == want and mapped[0]["id"] == clean[0]["id"]


SHAREGPT_REJECTS = [
    (sharegpt(("human", "q"), ("bing", "a")), "unknown_role", "'conversations[1]' has the role 'bing'; accepted: "),
    (sharegpt(("human", "q"), ("tool", "a"), key=("role", "content")), "unknown_role", "'tool'"),
    (sharegpt(("human", "q"), ("human", "again")), "no_assistant_turn", "no assistant turn among its 2 turn(s)"),
    (sharegpt(("system", "s")), "no_assistant_turn", "no assistant turn"),
    (sharegpt(("human", "q"), ("gpt", " \u200b ")), "empty_field", "'conversations[1].value'"),
    (sharegpt(("human", "q"), ("gpt", "a"), system="\u200b"), None, None),  # an invisible system: none
    (sharegpt(("human", "q"), ("gpt", "a"), ("gpt", "b")), "turn_order", "conversations[2] is a second assistant"),
    (sharegpt(("system", "s"), ("human", "q"), ("gpt", "a"), system="t"), "turn_order",
     "conversations[0] is a system turn besides the row's 'system' field"),
    (sharegpt(("gpt", "hello"), ("human", "q"), ("gpt", "a")), "turn_order", "conversations[0] is an assistant turn"),
    (b'{"conversations": []}', "schema", "conversations"),
    (b'{"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}', "schema", "value"),
    (b'{"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}', "schema", "conversations/0/value"),
    (b'{"conversations": ["human: q", "gpt: a"]}', "schema", "is not of type 'object'"),
    (b'{"conversations": [{"speaker": "human", "text": "q"}]}', "schema", "role"),
    (sharegpt(("human", "q"), ("gpt", "a2"), system=3), "schema", "system"),
]


def test_sharegpt_rejects_name_the_turn_and_the_fix(tmp_path):
    clean, rejects, s = run_lines(tmp_path, b"\n".join(line for line, _, _ in SHAREGPT_REJECTS))
    expected = {n: (reason, detail) for n, (_, reason, detail) in enumerate(SHAREGPT_REJECTS, 1) if reason}
    assert {r["line"]: r["reason"] for r in rejects} == {n: reason for n, (reason, _) in expected.items()}
    for r in rejects:
        assert expected[r["line"]][1] in r["detail"], r
    assert clean[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert s["rejected_unknown_role"] == 2 and s["rejected_no_assistant_turn"] == 2
    assert "human, user" in rejects[0]["detail"] and "rename it" in rejects[0]["detail"]


def test_every_reject_reason_is_documented_and_counted():
    report = validate.Counts().report()
    for reason in validate.REASONS:
        assert f"`{reason}`" in validate.__doc__ and report[f"rejected_{reason}"] == 0
