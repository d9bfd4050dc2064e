"""format: clean rows -> {"id", "prompt", "completion"} with the chosen prompt template.

    finetune format --input data/clean/train.jsonl --output data/prompts/train.jsonl --base models/base
    (dvc.yaml stage `format@train`; params: template)

Templates (`template.name`):
  qa      the seed's  "### Question: {input}\n ### Answer: {output}"  (prompt ends at "Answer:")
  alpaca  "### Instruction:\n{input}\n\n### Response:\n{output}" under alpaca's preamble
  chat    the base tokenizer's own chat template (read from --base; only this template needs it)
The prompt and the completion stay apart so that `tokenize` masks the prompt exactly. Multi-turn rows
train on the LAST assistant turn; earlier turns become context in the prompt.

Streaming: the input is cut into blocks of whole lines (~4 MB); for large inputs one worker process a
core formats blocks into part files, which are appended to the output in input order. Memory stays at
a few blocks; the output appears, by rename, only when complete.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson

from stages.errors import StageError
from stages.jsonl import (
    atomic_path,
    block_lines,
    block_spans,
    cpu_count,
    dumps,
    gc_paused,
    map_ordered,
    read_span,
)
from stages.params import TemplateParams

PARALLEL_MIN_BYTES = 16 << 20  # inputs from 16 MB (~50k rows) use a worker per core; smaller ones run here

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def split_last_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """(context up to the last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def render_qa(context: list[dict], system: str | None) -> str:
    parts = [system] if system else []
    for m in context:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f"### Question: {m['content']}\n")
        elif parts:
            parts[-1] += f" ### Answer: {m['content']}"
        else:  # a conversation that opens with the assistant
            parts.append(f" ### Answer: {m['content']}")
    return "\n".join(parts) + " ### Answer:"


def render_alpaca(context: list[dict], system: str | None) -> str:
    parts = [system or ALPACA_PREAMBLE]
    for m in context:
        if m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}")
        elif m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}")
        else:
            parts[0] = m["content"]
    return "\n\n".join(parts) + "\n\n### Response:\n"


@functools.lru_cache(maxsize=4)  # once a process: a worker formats many blocks with it
def chat_renderer(base: Path) -> Callable[[list[dict], str], tuple[str, str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.chat_template:
        raise StageError(f"{base}: the tokenizer has no chat template; set template.name to qa or alpaca")

    def render(context: list[dict], answer: str) -> tuple[str, str]:
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise StageError(f"{base}: the chat template does not render the prompt as a prefix of the "
                             "conversation; use template.name qa or alpaca for this model")
        return prompt, full[len(prompt):].rstrip()

    return render


def format_rows(rows: Iterable[dict], template: TemplateParams, base: Path | None) -> Iterator[dict]:
    if template.name == "chat":
        if base is None:
            raise StageError("template.name=chat needs --base (the base model directory with its tokenizer)")
        chat = chat_renderer(base)
    for row in rows:
        context, answer = split_last_turn(row["messages"])
        if template.name == "chat":
            if template.system_prompt and not any(m["role"] == "system" for m in context):
                context = [{"role": "system", "content": template.system_prompt}] + context
            prompt, completion = chat(context, answer)
        elif template.name == "alpaca":
            prompt, completion = render_alpaca(context, template.system_prompt), answer
        else:
            prompt, completion = render_qa(context, template.system_prompt), " " + answer
        yield {"id": row["id"], "prompt": prompt, "completion": completion}


def format_block(block: bytes, template: TemplateParams, base: Path | None) -> tuple[bytes, int]:
    """A block of clean JSONL lines -> (the prompt JSONL lines, how many)."""
    with gc_paused():
        rows = (orjson.loads(line) for line in block_lines(block) if line.strip())
        out = [dumps(row) for row in format_rows(rows, template, base)]
    return b"".join(out), len(out)


def format_part(input: str, offset: int, size: int, template: TemplateParams, base: Path | None, part: str) -> int:
    """One task, in a worker process for large files: format a block of the input into the file `part`."""
    lines, n = format_block(read_span(input, offset, size), template, base)
    with open(part, "wb") as f:
        f.write(lines)
    return n


def run(input: Path, output: Path, template: TemplateParams, base: Path | None) -> int:
    if not input.exists():
        raise StageError(f"{input}: no such file (run `finetune validate` first, or `dvc repro`)")
    if template.name == "chat":
        if base is None:
            raise StageError("template.name=chat needs --base (the base model directory with its tokenizer)")
        chat_renderer(base)  # fails here, before any worker starts, if the template is unusable
    workers = cpu_count() if input.stat().st_size >= PARALLEL_MIN_BYTES else 1
    total = 0
    with atomic_path(output) as tmp, open(tmp, "wb", buffering=1 << 20) as out:
        tasks = ((str(input), offset, size, template, base, str(tmp.parent / f"part-{offset}"))
                 for offset, size in block_spans(input))
        for task, n in map_ordered(format_part, tasks, workers):
            with open(task[-1], "rb") as part:
                out.write(part.read())
            os.unlink(task[-1])
            total += n
    return total
