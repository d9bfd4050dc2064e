"""chat: talk to the tuned model, each question wrapped in the template the model was trained with.

    finetune chat models/merged                      # interactive: /reset clears the history, /exit or EOF quits
    finetune chat models/adapter --base models/base --once "How do I reset the router?"

MODEL is a merged folder (models/merged) or an adapter folder (models/adapter) on the base it was
trained on (`--base`, refused unless its weights' sha256 is the one in the adapter's lineage).
The template is the model's own, from its lineage.json (template.name and system_prompt as trained),
not today's params.yaml; the prompt is rendered by format's code and encoded by tokenize's
(stages/tokens.py), so a question becomes the ids a training row with that question began with, and a
special-token string typed in a question stays text, as in the training data.
History: each question follows the session's earlier turns, rendered as format renders a multi-turn
row (the chat template's turns; for qa and alpaca, the earlier questions and answers in that template);
the oldest turns go when the prompt would be longer than the tokenize.max_length the model trained with.
The answer streams as it is generated: greedy (or sampled with --temperature), at most
--max-new-tokens, ending at EOS or at the template's next turn (evaluate's stop strings and cut): a few
characters are held back until they cannot begin a stop string, so what is shown is the answer.
Loading: on CPU in float32 without quantisation (the embedded 135M model answers in about a second);
on CUDA as trained (an adapter's dtype and 4-bit, a merged model's saved dtype).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TextStreamer

from stages import format as fmt
from stages import lineage, tokens
from stages.errors import StageError
from stages.evaluate import STOP, StopAtTurnEnd, cut_at_stop, eos_ids_of
from stages.params import TemplateParams

log = logging.getLogger("finetune")


# --- prompts (no model) ---------------------------------------------------------------------------


class Conversation:
    """A session's turns, and the prompt ids for the next question as format + tokenize would make them
    for a training row holding those turns and that question."""

    def __init__(self, record: dict, tokenizer_dir: Path):
        # models trained before template.train_on existed trained the last turn only
        self.template = TemplateParams(**{"train_on": "last", **record["params"]["template"]})
        self.max_length = record["params"]["tokenize"]["max_length"]
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer, self.eos_id = tokens.model_tokenizer(tokenizer_dir)
        self.layout = tokens.layout(self.tokenizer)
        self.history: list[dict] = []

    def row(self, question: str) -> dict:
        """The prompt row format makes of the history and the question (its answer left empty)."""
        messages = [*self.history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        base = self.tokenizer_dir if self.template.name == "chat" else None
        return next(fmt.format_rows([{"id": "chat", "messages": messages}], self.template, base))

    def prompt_ids(self, question: str) -> list[int]:
        while True:
            ids = tokens.prompt_ids([self.row(question)], self.tokenizer, self.layout, self.eos_id)[0]
            if len(ids) <= self.max_length or not self.history:
                return ids
            log.info("chat: the prompt is %d tokens > tokenize.max_length=%d; dropping the oldest turn",
                     len(ids), self.max_length)
            self.history = self.history[2:]  # its question and answer

    def add(self, question: str, answer: str) -> None:
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history = []


# --- the model ------------------------------------------------------------------------------------

def resolve(model_dir: Path, base: Path) -> tuple[dict, bool, Path]:
    """(lineage record, is it an adapter, the folder of the tokenizer the model was trained with)."""
    adapter = (model_dir / "adapter_config.json").exists()
    if not adapter and not (model_dir / "config.json").exists():
        what = "not a model folder (no config.json or adapter_config.json)" if model_dir.exists() else "no such folder"
        raise StageError(f"{model_dir}: {what}; pass models/merged, or models/adapter with --base")
    record = lineage.read(model_dir)
    if not adapter:
        return record, False, model_dir
    if not (base / "base.json").exists():
        raise StageError(f"--base {base}: no base model there (no base.json); {model_dir} is an adapter: pass the "
                         f"base it was trained on ({record['base']['source']}, imported by `finetune import-base`) "
                         "with --base, or chat with the merged model (models/merged)")
    lineage.require_base(record, base, model_dir)
    return record, True, base


def load_model(model_dir: Path, base: Path, record: dict, adapter: bool):
    cuda = torch.cuda.is_available()
    if adapter:
        from peft import PeftModel

        from stages.modeling import load_base_model

        # CPU: float32 and no 4-bit (bf16 and bitsandbytes' CPU kernels are many times slower), as merge.into=base
        model = load_base_model(base, lineage.trained_model(record), quantize=None if cuda else False,
                                dtype=None if cuda else torch.float32, inference=True)
        return PeftModel.from_pretrained(model, model_dir).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto" if cuda else torch.float32,
                                                device_map={"": torch.cuda.current_device()} if cuda else None).eval()


def settled(text: str, final: bool = False) -> str:
    """The part of the generated text that is surely the answer: cut_at_stop of it, less (until the end)
    a tail that may begin a stop string. It only grows as the text does: a stop string that the text
    goes on to complete begins inside the held-back tail."""
    if not final:
        hold = max((k for s in STOP for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
    return cut_at_stop(text)


class AnswerStreamer(TextStreamer):
    """generate()'s streamer: writes the settled answer as it grows."""

    def __init__(self, tokenizer, write: Callable[[str], object] | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write, self.text, self.shown = write, "", 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        now = settled(self.text, stream_end)
        if self.write and len(now) > self.shown:
            self.write(now[self.shown:])
        self.shown = max(self.shown, len(now))


class Chat:
    def __init__(self, model_dir: Path, base: Path):
        from stages.modeling import load_tokenizer

        self.record, adapter, tokenizer_dir = resolve(model_dir, base)
        self.conversation = Conversation(self.record, tokenizer_dir)
        self.tokenizer = load_tokenizer(tokenizer_dir)  # transformers': decoding and the stop check
        self.model = load_model(model_dir, base, self.record, adapter)

    @torch.no_grad()
    def answer(self, question: str, write: Callable[[str], object] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0) -> str:
        """The model's answer to the question after the session's turns, written as it grows; then a turn."""
        from transformers import StoppingCriteriaList

        ids = self.conversation.prompt_ids(question)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        stop = StopAtTurnEnd(self.tokenizer, len(ids), eos_ids_of(self.model), 1, device)
        streamer = AnswerStreamer(self.tokenizer, write)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                            stopping_criteria=StoppingCriteriaList([stop]), streamer=streamer, **sampling)
        answer = cut_at_stop(streamer.text)
        self.conversation.add(question, answer)
        return answer


# --- the command ----------------------------------------------------------------------------------

def run(model_dir: Path, base: Path, once: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
        stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    chat = Chat(model_dir, base)
    ask = dict(write=write, max_new_tokens=max_new_tokens, temperature=temperature)
    if once is not None:
        chat.answer(once, **ask)
        write("\n")
        return
    r, t = chat.record, chat.conversation.template
    print(f"chat with {model_dir}: template {t.name}, trained on {r['rows']['count']} rows of "
          f"{', '.join(d['path'] for d in r['data']) or '-'} (commit {(r['git']['commit'] or '-')[:12]}). "
          "/reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    tty = stdin is sys.stdin and stdin.isatty()  # a terminal: a prompt and line editing
    while True:
        try:
            line = input("> ") if tty else (stdin.readline() or None)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:  # EOF
            if tty:
                write("\n")
            return
        question = line.strip()
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            chat.conversation.reset()
            print("(history cleared)", file=sys.stderr)
        elif question:
            try:
                chat.answer(question, **ask)
            except KeyboardInterrupt:  # stops this answer, not the session
                pass
            write("\n")
