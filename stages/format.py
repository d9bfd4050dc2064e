"""format: clean rows -> {"id", "prompt", "completion"} with the chosen prompt template.

    finetune format --input data/clean/train.jsonl --output data/prompts/train.jsonl --base models/base
    (dvc.yaml stage `format@train`; params: template)

Templates (`template.name`):
  qa      the seed's  "### Question: {input}\n ### Answer: {output}"  (prompt ends at "Answer:")
  alpaca  "### Instruction:\n{input}\n\n### Response:\n{output}" under alpaca's preamble
  chat    the base tokenizer's own chat template (read from --base; only this template needs it)
The prompt and the completion stay apart so that `tokenize` masks the prompt exactly. A multi-turn
row's completion is its LAST assistant turn, the earlier turns its prompt (evaluate and merge use that
prompt); `template.train_on` says which assistant turns are trained:
  all   every one (TRL's assistant_only_loss, axolotl's roles_to_train: [assistant]): the prompt row
        lists the earlier assistant turns' character spans in the prompt, in the key `train_spans`
        (absent for a row with one assistant turn). chat: a turn's text and the end-of-turn token(s)
        its template renders after it (`a1<|im_end|>`, not the newline after), found by rendering each
        prefix of the conversation, which must be a prefix of the next (a template that re-renders
        earlier turns, e.g. dropping their reasoning, is refused: use `last`); qa, alpaca: the text
        of the turn (` a1` after `### Answer:`), which has no end token: tokenize puts EOS after it.
  last  the final one only; earlier turns are context (no `train_spans`).
A chat template that raises on a row (validate keeps only the turn order every template renders, but
a template may refuse more, e.g. a system turn) stops the stage with one line naming the row's id.

Special tokens come from the template only, never from data (an answer holding the text
`<|im_end|><|im_start|>system` stays that text). A prompt row says which special-token strings in
prompt + completion are the template's, in the key `specials`:
  absent        none: every character is text (qa, alpaca: those templates add no special token)
  "all"         all of them (chat, when no data text holds a special-token string of the tokenizer)
  [[start, end], ...]  these character spans only (chat, when a data text holds one): found by
                rendering the row with each such string in the data replaced by a placeholder
The input may be a pipe (`--input /dev/stdin`): it is read once into the stage's temporary folder first.

Streaming: the input is cut into blocks of whole lines (~4 MB); for large inputs one worker process a
core formats blocks into part files, which are appended to the output in input order. Memory stays at
a few blocks; the output appears, by rename, only when complete.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson

from stages.errors import StageError
from stages.jsonl import (
    as_file,
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


def joined(parts: list[list[tuple[str, bool]]], sep: str, end: str) -> tuple[str, list[list[int]]]:
    """Parts of pieces (text, trained) -> (the parts joined by `sep`, then `end`; the trained pieces'
    character spans)."""
    text, spans, at = [], [], 0
    for i, part in enumerate(parts):
        for piece, trained in ([(sep, False)] if i else []) + part:
            if trained:
                spans.append([at, at + len(piece)])
            text.append(piece)
            at += len(piece)
    return "".join(text) + end, spans


def render_qa(context: list[dict], system: str | None) -> tuple[str, list[list[int]]]:
    """(the prompt, the character spans of its assistant turns)."""
    parts = [[(system, False)]] if system else []
    for m in context:
        if m["role"] == "system":
            parts.append([(m["content"], False)])
        elif m["role"] == "user":
            parts.append([(f"### Question: {m['content']}\n", False)])
        elif parts:
            parts[-1] += [(" ### Answer:", False), (f" {m['content']}", True)]
        else:  # a conversation that opens with the assistant
            parts.append([(" ### Answer:", False), (f" {m['content']}", True)])
    return joined(parts, "\n", " ### Answer:")


def render_alpaca(context: list[dict], system: str | None) -> tuple[str, list[list[int]]]:
    """(the prompt, the character spans of its assistant turns)."""
    parts = [[(system or ALPACA_PREAMBLE, False)]]
    for m in context:
        if m["role"] == "user":
            parts.append([(f"### Instruction:\n{m['content']}", False)])
        elif m["role"] == "assistant":
            parts.append([("### Response:\n", False), (m["content"], True)])
        else:
            parts[0] = [(m["content"], False)]
    return joined(parts, "\n\n", "\n\n### Response:\n")


@functools.lru_cache(maxsize=4)  # once a process: a worker formats many blocks with it
def chat_renderer(base: Path) -> tuple[Callable[[list[dict], str], dict], Callable[[list[dict], str], list]]:
    """(render, turn_spans) with the base's chat template: render(context, answer) -> {"prompt",
    "completion", "specials"}; turn_spans(context, prompt) -> the assistant turns' spans in the prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.chat_template:
        raise StageError(f"{base}: the tokenizer has no chat template; set template.name to qa or alpaca")
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
                      | set(tokenizer.all_special_tokens), key=len, reverse=True)  # longest first, as matched
    special = re.compile("|".join(map(re.escape, specials)) or r"(?!)")
    index = {s: i for i, s in enumerate(specials)}
    # a placeholder for a special-token string in data: NUL cannot be in a clean text (validate removes it)
    token = re.compile("\x00([0-9]+)\x00|" + special.pattern)

    def hide(text: str) -> str:
        return special.sub(lambda m: f"\x00{index[m.group()]}\x00", text)

    def apply(context: list[dict], answer: str) -> tuple[str, str]:
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise StageError(f"{base}: the chat template does not render the prompt as a prefix of the "
                             "conversation; use template.name qa or alpaca for this model")
        return prompt, full[len(prompt):].rstrip()

    def render(context: list[dict], answer: str) -> dict:
        prompt, completion = apply(context, answer)
        if not any(special.search(text) for text in [answer] + [m["content"] for m in context]):
            return {"prompt": prompt, "completion": completion, "specials": "all"}
        hidden = apply([{**m, "content": hide(m["content"])} for m in context], hide(answer))
        text, spans, at, n = [], [], 0, 0  # the row rendered again, its placeholders put back
        for m in token.finditer(hidden[0] + hidden[1]):
            text.append(m.string[at:m.start()])
            n, at = n + m.start() - at, m.end()
            if m.group(1) is None:  # the template's own
                spans.append([n, n + len(m.group())])
            text.append(m.group() if m.group(1) is None else specials[int(m.group(1))])
            n += len(text[-1])
        text.append(m.string[at:])
        if "".join(text) != prompt + completion:
            raise StageError(f"{base}: the chat template changes the texts it renders, so the special-token "
                             "strings in this row's data cannot be told from its own: remove them from the row")
        return {"prompt": prompt, "completion": completion, "specials": spans}

    def turn_spans(context: list[dict], prompt: str) -> list[list[int]]:
        spans = []
        for i, m in enumerate(context):
            if m["role"] == "assistant":
                before = tokenizer.apply_chat_template(context[:i], tokenize=False, add_generation_prompt=True)
                upto = tokenizer.apply_chat_template(context[:i + 1], tokenize=False).rstrip()
                if not (upto.startswith(before) and prompt.startswith(upto)):
                    raise StageError(f"{base}: the chat template renders an earlier assistant turn otherwise "
                                     "than as a prefix of the conversation, so its span cannot be found; set "
                                     "template.train_on to last (or template.name to qa or alpaca)")
                spans.append([len(before), len(upto)])
        return spans

    return render, turn_spans


def format_rows(rows: Iterable[dict], template: TemplateParams, base: Path | None) -> Iterator[dict]:
    if template.name == "chat":
        if base is None:
            raise StageError("template.name=chat needs --base (the base model directory with its tokenizer)")
        chat, turn_spans = chat_renderer(base)
    for row in rows:
        context, answer = split_last_turn(row["messages"])
        if template.name == "chat":
            if template.system_prompt and not any(m["role"] == "system" for m in context):
                context = [{"role": "system", "content": template.system_prompt}] + context
            try:
                rendered = chat(context, answer)
                if template.train_on == "all" and any(m["role"] == "assistant" for m in context):
                    rendered["train_spans"] = turn_spans(context, rendered["prompt"])
            except StageError as e:
                raise StageError(f"row {row['id']}: {e}") from None
            except Exception as e:  # what the template raises (jinja2's raise_exception) or breaks on
                raise StageError(
                    f"row {row['id']}: the chat template of {base} refuses it "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); fix or drop the row in the raw "
                    "data, unset template.system_prompt if the template refuses system turns, or set "
                    "template.name to qa or alpaca") from None
            yield {"id": row["id"], **rendered}
            continue
        if template.name == "alpaca":
            (prompt, spans), completion = render_alpaca(context, template.system_prompt), answer
        else:
            (prompt, spans), completion = render_qa(context, template.system_prompt), " " + answer
        out = {"id": row["id"], "prompt": prompt, "completion": completion}
        if spans and template.train_on == "all":
            out["train_spans"] = spans
        yield out


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
    total = 0
    with atomic_path(output) as tmp, open(tmp, "wb", buffering=1 << 20) as out:
        path = as_file(input, tmp.parent)  # a pipe is read into the temporary folder first
        workers = cpu_count() if path.stat().st_size >= PARALLEL_MIN_BYTES else 1
        tasks = ((str(path), offset, size, template, base, str(tmp.parent / f"part-{offset}"))
                 for offset, size in block_spans(path))
        for task, n in map_ordered(format_part, tasks, workers):
            with open(task[-1], "rb") as part:
                out.write(part.read())
            os.unlink(task[-1])
            total += n
    return total
