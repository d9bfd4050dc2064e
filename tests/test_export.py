"""export: GGUF files from llama.cpp's converter and quantizer, parity measured in llama.cpp itself, the
Ollama Modelfile, lineage inside, all-or-nothing outputs.

The tiny model of conftest.py has a byte-level BPE tokenizer trained here, which llama.cpp's converter
refuses: it identifies a BPE pre-tokenizer by the hash of the ids it gives for a fixed text, and only
the tokenizers of published models are known. So the model here is a tiny random Llama with the embedded
default's tokenizer (SmolLM2's, which the converter knows as "smollm"), hidden 256 so that q4_k_m's
k-quants (rows of 256 values) are used, not only their fallbacks.
"""

from __future__ import annotations

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

from conftest import ROOT, shipped_with

TYPES = ["f16", "q8_0", "q4_k_m"]
FILE_TYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def raw_rows(n: int) -> list[dict]:
    rows = []
    for line in (ROOT / "data/raw/eval.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
            rows.append({"id": str(len(rows)), "messages": [{"role": "user", "content": row["input"].strip()},
                                                             {"role": "assistant", "content": row["output"].strip()}]})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if len(rows) == n:
            break
    return rows


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A merged-model folder as merge writes it: tiny Llama, SmolLM2's tokenizer and chat template, lineage.json."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages import lineage
    from stages.import_base import embedded_gguf
    from stages.jsonl import write_json

    out = tmp_path_factory.mktemp("merged") / "merged"
    gguf = embedded_gguf("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    record = lineage.build(shipped_with({}), {"source": "tiny", "sha256": "0" * 64, "parameters": 1}, [], ["a", "b"],
                           quantized=False, dtype="float32")
    write_json(out / "lineage.json", {**record, "merge": {"into": "base", "parity_max_abs_diff": 0.0}})
    return out


@pytest.fixture(scope="module")
def prompts(merged, tmp_path_factory) -> Path:
    from stages import format
    from stages.jsonl import write_jsonl

    path = tmp_path_factory.mktemp("prompts") / "eval.jsonl"
    write_jsonl(path, format.format_rows(raw_rows(3), shipped_with({}).template, None))
    return path


def export_params(**changes):
    return shipped_with({"export": {"types": TYPES, "parity_prompts": 3, "parity_tokens": 16, **changes}}).export


@pytest.fixture(scope="module")
def exported(merged, prompts, tmp_path_factory) -> tuple[Path, Path, dict]:
    from stages import export

    out = tmp_path_factory.mktemp("export")
    report = export.run(merged, prompts, out / "gguf", out / "export.json", export_params())
    return out / "gguf", out / "export.json", report


def fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path, "r")
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")
            and name not in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}


def test_each_type_is_a_gguf_file_with_tokenizer_chat_template_and_lineage_inside(exported, merged):
    folder, _, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", *sorted(f"model-{t}.gguf" for t in TYPES),
                                                        "parity.json"]
    assert not list(folder.parent.glob(".*tmp*"))  # no temporary folder left
    lineage = json.loads((merged / "lineage.json").read_text())
    for t in TYPES:
        meta = fields(folder / f"model-{t}.gguf")
        assert meta["general.file_type"] == FILE_TYPE[t], t
        assert json.loads(meta["finetune.lineage"]) == lineage, t  # quantized files inherit it from f16
        assert meta["tokenizer.chat_template"] == (merged / "chat_template.jinja").read_text(), t
        assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.tokens"]) == 49152, t


def test_parity_figures_are_measured_in_llama_cpp_and_listed_as_metrics(exported, merged, prompts):
    """The free-running answers parity.json records are what llama.cpp answers when it loads the file
    itself (here llama-cpp-python's Llama, none of this project's code), fed the ids tokenize would feed."""
    import itertools

    import llama_cpp
    from tokenizers import Tokenizer

    from stages import tokens
    from stages.jsonl import read_jsonl

    folder, metrics, report = exported
    assert json.loads((folder / "parity.json").read_text()) == json.loads(json.dumps(report))
    rows = list(read_jsonl(prompts))
    tokenizer = Tokenizer.from_file(str(merged / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(json.loads((merged / "tokenizer_config.json").read_text())["eos_token"])
    ids = tokens.prompt_ids(rows, tokenizer, tokens.layout(tokenizer), eos_id)
    assert report["prompts"] == [r["id"] for r in rows] and report["measured_in"].startswith("llama.cpp")
    for t in TYPES:
        figures = report["types"][t]
        llm = llama_cpp.Llama(str(folder / f"model-{t}.gguf"), n_ctx=256, verbose=False)
        for p, answer in zip(ids, figures["free_running"]["answers"]):
            got = list(itertools.islice(llm.generate(p, temp=0.0, top_k=1), 16))
            assert got[:len(answer["gguf_ids"])] == answer["gguf_ids"], t
            llm.reset()
        llm.close()
        assert 0 <= figures["agreement"] <= 1 and figures["failed"] is None, t
    f16, q4 = report["types"]["f16"], report["types"]["q4_k_m"]
    assert abs(f16["ppl_change"]) < 0.01 and f16["agreement"] >= 0.9  # the same weights, llama.cpp's arithmetic
    assert q4["answer_perplexity"] != f16["answer_perplexity"] and q4["bytes"] < f16["bytes"] / 2
    shown = json.loads(metrics.read_text())
    assert {t: shown[t]["agreement"] for t in TYPES} == {t: report["types"][t]["agreement"] for t in TYPES}


# --- the Ollama Modelfile ------------------------------------------------------------------------------

def go_render(template: str, values: dict) -> str:
    """Go text/template, the subset the Modelfile uses: {{ .Name }}, {{ if .Name }}, {{ if eq .Name "x" }},
    {{ else if ... }}, {{ else }}, {{ end }} and {{ range .Messages }} (each message's .Role, .Content)."""
    tokens = re.split(r"(\{\{ .*? \}\})", template)

    def test(cond: str, scope: dict) -> bool:
        m = re.fullmatch(r'eq \.(\w+) "(.*)"', cond)
        return scope.get(m.group(1)) == m.group(2) if m else bool(scope.get(cond.lstrip(".")))

    def block(i: int, scope: dict, stop=("end",)) -> tuple[str, int, str]:
        """Rendered text from token i up to one of `stop` (not rendered), the index of that token, the action."""
        out = ""
        while i < len(tokens):
            t = tokens[i]
            action = t[3:-3] if t.startswith("{{ ") else None
            if action is None:
                out, i = out + t, i + 1
            elif action == "end" or action == "else" or action.startswith("else if "):
                assert action.split(" ")[0] in stop or action in stop, action
                return out, i, action
            elif action.startswith("range ."):
                start = i + 1
                for item in scope.get(action[7:]) or [{}]:
                    text, i, _ = block(start, {**scope, **item})
                    out += text if scope.get(action[7:]) else ""
                i += 1
            elif action.startswith("if "):
                taken, cond = False, action[3:]
                while True:
                    text, i, how = block(i + 1, scope, ("end", "else"))
                    if not taken and (cond is None or test(cond, scope)):
                        out, taken = out + text, True
                    if how == "end":
                        break
                    cond = how[8:] if how.startswith("else if ") else None
                i += 1
            else:
                out, i = out + (scope.get(action.lstrip(".")) or ""), i + 1
        return out, i, ""

    return block(0, values)[0]


def modelfile_parts(text: str) -> tuple[str, str | None, list[str], str]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.M)]
    return template, system and system.group(1), stops, re.search(r"^FROM (.*)$", text, re.M).group(1)


def test_go_render_follows_go_templates_on_the_constructs_the_modelfile_uses():
    t = '{{ if .System }}S={{ .System }};{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}' \
        '{{ else if eq .Role "assistant" }}A:{{ .Content }}{{ else }}?{{ end }}|{{ end }}end'
    msgs = [{"Role": "user", "Content": "q"}, {"Role": "assistant", "Content": "a"}, {"Role": "tool", "Content": "x"}]
    assert go_render(t, {"System": "s", "Messages": msgs}) == "S=s;U:q|A:a|?|end"
    assert go_render(t, {"Messages": []}) == "end"


@pytest.mark.parametrize("name", ["qa", "alpaca"])
@pytest.mark.parametrize("system", [None, "Answer in one sentence."])
def test_the_modelfile_template_renders_a_conversation_as_format_does(merged, name, system):
    """Ollama passes the whole conversation (.Messages) to a TEMPLATE that ranges over it: the history is
    rendered as format renders a multi-turn row, the last question open for the answer."""
    from stages import export, format
    from stages.params import TemplateParams

    turns = [("user", "How do I reset it?"), ("assistant", "Hold the button."), ("user", "And then?")]
    row = {"id": "c", "messages": [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": "x"}]}
    template = TemplateParams(name=name, system_prompt=system, train_on="last")
    want = next(format.format_rows([row], template, merged))["prompt"]
    record = {"params": {"template": {"name": name, "system_prompt": system}}}
    go, shown_system, _, _ = modelfile_parts(export.modelfile(merged, record, ["f16"]))
    messages = ([{"Role": "system", "Content": system}] if system else []) + [{"Role": r, "Content": c} for r, c in turns]
    assert go_render(go, {"System": shown_system, "Messages": messages}) == want


@pytest.mark.parametrize("name", ["qa", "alpaca", "chat"])
@pytest.mark.parametrize("system", [None, "Answer in one sentence."])
def test_the_modelfile_template_renders_a_question_as_format_does(merged, name, system):
    from stages import export, format
    from stages.params import TemplateParams

    row = raw_rows(1)[0]
    template = TemplateParams(name=name, system_prompt=system, train_on="all")
    want = next(format.format_rows([row], template, merged))["prompt"]
    record = {"params": {"template": {"name": name, "system_prompt": system}}}
    go, shown_system, stops, source = modelfile_parts(export.modelfile(merged, record, ["f16", "q4_k_m"]))
    assert source == "./model-q4_k_m.gguf" and shown_system == system
    question = row["messages"][0]["content"]
    values = {"System": shown_system, "Prompt": question, "Messages": [{"Role": "user", "Content": question}]}
    assert go_render(go, values) == want
    assert "<|im_end|>" in stops  # the EOS token's text


# --- failures -----------------------------------------------------------------------------------------

def write_params(path: Path, **export) -> Path:
    yaml = YAML()
    data = yaml.load((ROOT / "params.yaml").read_text())
    data["export"].update(export)
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


def finetune_export(merged: Path, prompts: Path, output: Path, params: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "finetune"), "export", "--merged", str(merged),
                             "--prompts", str(prompts), "--output", str(output), "--params", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_tolerance_breach_fails_in_one_line_keeps_the_report_and_replaces_nothing(merged, prompts, tmp_path):
    output = tmp_path / "gguf"
    output.mkdir()
    (output / "parity.json").write_text('{"types": {}}')  # a previous export's
    params = write_params(tmp_path / "params.yaml", types=["q4_k_m"], parity_prompts=2, parity_tokens=8,
                          max_ppl_change_q4_k_m=0.0)  # any change of perplexity is past it
    proc = finetune_export(merged, prompts, output, params)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: \S+model-q4_k_m\.gguf: answer perplexity [+-][0-9.]+% vs the merged model, past "
                        r"export\.max_ppl_change_q4_k_m=0\.0; nothing was replaced, .* in \S+gguf\.failed for "
                        r"inspection", line), line
    assert sorted(p.name for p in output.iterdir()) == ["parity.json"] and \
        (output / "parity.json").read_text() == '{"types": {}}'
    kept = json.loads((tmp_path / "gguf.failed/parity.json").read_text())
    assert kept["types"]["q4_k_m"]["failed"] and (tmp_path / "gguf.failed/model-q4_k_m.gguf").is_file()


def test_an_interrupted_export_leaves_no_partial_file_and_no_process(merged, prompts, tmp_path):
    output = tmp_path / "gguf"
    params = write_params(tmp_path / "params.yaml", types=["f16"])
    proc = finetune_export(merged, prompts, output, params, start_new_session=True)
    deadline, converters = time.time() + 120, set()
    while not list(tmp_path.glob(".gguf.tmp*/**/*.gguf")) and time.time() < deadline:  # a GGUF file being written
        converters |= set(subprocess.run(["pgrep", "-f", f"convert_hf_to_gguf.py {merged}"], capture_output=True,
                                         text=True).stdout.split())
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert converters, "the converter was never seen running"
    time.sleep(0.5)
    alive = [pid for pid in converters if Path(f"/proc/{pid}").exists()
             and "convert_hf" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert not alive, "the converter outlived the stage"
    assert not output.exists() and not list(tmp_path.glob("*.gguf"))
