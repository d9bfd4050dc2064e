"""evaluate: the base model and base + adapter, side by side, on the eval split.

    finetune evaluate --adapter models/adapter --base models/base --tokenized data/tokenized/eval \
        --prompts data/prompts/eval.jsonl --metrics metrics/eval.json --samples reports/eval_samples.jsonl
    (dvc.yaml stage `evaluate`; params: seed, evaluate)

- loss / perplexity: mean cross-entropy over the trained (completion) tokens of the tokenized eval
  split, token-weighted, exactly the quantity the train stage minimises.
- generation: greedy decoding of up to `evaluate.max_new_tokens` for each eval prompt
  (`evaluate.max_generate_rows`, 0 = all), cut at the template's next turn ("\n###"); against the
  reference answer: exact match (case/punctuation-insensitive), token F1 (SQuAD-style) and ROUGE-L F1.
One model is loaded, the way train loaded it (quantize, dtype, attn_implementation from the adapter's
lineage.json, not from today's params.yaml), and only on the base it was trained on (else one line);
the base model's figures come from the same weights with the adapter disabled.
metrics/eval.json has flat keys (base_loss, tuned_loss, ...) so `dvc exp show` and
`dvc metrics diff` read well; reports/eval_samples.jsonl has prompt, reference, base and tuned answers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import string
from collections import Counter
from pathlib import Path

import torch

from stages import lineage
from stages.errors import StageError
from stages.jsonl import read_jsonl, write_json, write_jsonl
from stages.params import Params

log = logging.getLogger("finetune")
STOP = ("\n###", "### Question:", "### Instruction:")


# --- metrics (pure) -------------------------------------------------------------------------------

def normalise_answer(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return text.split()


def exact_match(pred: str, ref: str) -> float:
    return float(normalise_answer(pred) == normalise_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalise_answer(pred), normalise_answer(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: longest common subsequence of the normalised tokens."""
    p, r = normalise_answer(pred), normalise_answer(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def cut_at_stop(text: str) -> str:
    for stop in STOP:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text.strip()


# --- model passes ---------------------------------------------------------------------------------

@torch.no_grad()
def completion_loss(model, dataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        width = max(len(x) for x in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        out.extend(cut_at_stop(t) for t in texts)
    return out


def score(preds: list[str], refs: list[str]) -> dict:
    n = max(len(refs), 1)
    return {
        "exact_match": round(sum(map(exact_match, preds, refs)) / n, 4),
        "token_f1": round(sum(map(token_f1, preds, refs)) / n, 4),
        "rouge_l": round(sum(map(rouge_l, preds, refs)) / n, 4),
    }


def run(adapter: Path, base: Path, tokenized: Path, prompts_path: Path, metrics: Path, samples: Path,
        params: Params) -> dict:
    import datasets
    from peft import PeftModel

    from stages.modeling import load_base_model, load_tokenizer

    for p in (adapter, tokenized, prompts_path):
        if not p.exists():
            raise StageError(f"{p}: missing (run the upstream stages: `dvc repro`)")
    record = lineage.read(adapter)
    lineage.require_base(record, base, adapter)
    torch.manual_seed(params.seed)
    e = params.evaluate
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_base_model(base, lineage.trained_model(record), inference=True),
                                      adapter).eval()
    eval_ds = datasets.load_from_disk(str(tokenized))
    rows = list(read_jsonl(prompts_path))
    if e.max_generate_rows:
        rows = rows[:e.max_generate_rows]
    prompts, refs = [r["prompt"] for r in rows], [r["completion"].strip() for r in rows]

    results, answers = {}, {}
    for name in ("base", "tuned"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            loss = completion_loss(model, eval_ds, e.batch_size, tokenizer.pad_token_id)
            answers[name] = generate(model, tokenizer, prompts, e.batch_size, e.max_new_tokens)
        results[f"{name}_loss"] = round(loss, 6)
        results[f"{name}_perplexity"] = round(math.exp(min(loss, 50)), 4)
        results.update({f"{name}_{k}": v for k, v in score(answers[name], refs).items()})
        log.info("evaluate %s: loss %.4f, ppl %.2f, token F1 %.3f, ROUGE-L %.3f", name, loss,
                 results[f"{name}_perplexity"], results[f"{name}_token_f1"], results[f"{name}_rouge_l"])
    results["rows_loss"], results["rows_generated"] = len(eval_ds), len(rows)
    write_json(metrics, results)
    write_jsonl(samples, ({"id": r["id"], "prompt": r["prompt"], "reference": ref, "base": b, "tuned": t}
                          for r, ref, b, t in zip(rows, refs, answers["base"], answers["tuned"])))
    print(table(results))
    return results


def table(results: dict) -> str:
    keys = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l")
    lines = [f"{'metric':<12} {'base':>10} {'tuned':>10}"]
    lines += [f"{k:<12} {results[f'base_{k}']:>10.4f} {results[f'tuned_{k}']:>10.4f}" for k in keys]
    return "\n".join(lines)
