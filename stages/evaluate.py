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
lineage.json, not from today's params.yaml), and only on the base it was trained on (else one line).
The base's figures come from those weights alone; then the adapter is attached to the same weights for
the tuned loss (unmerged: the arithmetic train used) and folded into them for the tuned answers (the
16/32-bit weights merge writes and users serve: no LoRA layers to run at each decoding step; 4-bit
weights keep the adapter unmerged). A full fine-tune (train.method=full: models/adapter is a model
folder) is compared with the base the same way, the two models loaded one after the other.
Speed without changing a figure: both passes take rows length-sorted (loss: `evaluate.batch_size` x 256
padded tokens a batch; generation: `evaluate.batch_size` prompts) and put results back in input order;
a generation batch ends once every row has produced EOS or a stop string (the cut answer cannot change
after it); on CUDA the 4-bit weights are held de-quantised under the adapter when the GPU has room.
The prompts are the ids the tokenize stage gives them (stages/tokens.py: a special-token string in
the data stays text; only the template's are control tokens), left-padded here.
A progress bar shows rows/s; eval.json also records per model the loss pass's and the generation
pass's seconds, the generated tokens (per row up to its EOS or stop) and tokens/s.
metrics/eval.json has flat keys (base_loss, tuned_loss, ...) so `dvc exp show` and
`dvc metrics diff` read well; reports/eval_samples.jsonl has prompt, reference, base and tuned answers.
"""

from __future__ import annotations

import logging
import math
import string
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import StoppingCriteria

from stages import lineage, tokens
from stages.errors import StageError
from stages.jsonl import read_jsonl, write_json, write_jsonl
from stages.outputs import staged
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
# Both passes sort rows by length (longest first, so a batch that does not fit fails at once) and put
# the results back in input order: padding stays small and batches can be large. Per row the
# arithmetic is the same as unsorted batches (right/left padding is masked), so the figures are too.

LOSS_TOKENS_PER_ROW = 256  # a loss batch holds evaluate.batch_size x 256 padded tokens (64 x 256 = 16k, a 7B train step)


def length_batches(lengths: list[int], max_rows: int | None, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices, longest first, cut into batches of <= max_rows rows and <= max_tokens padded tokens."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        cur = batches[-1] if batches else None
        if cur is None or (max_rows and len(cur) >= max_rows) or \
                (max_tokens and (len(cur) + 1) * lengths[cur[0]] > max_tokens):
            batches.append([i])
        else:
            cur.append(i)
    return batches


@torch.no_grad()
def completion_loss(model, dataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens."""
    device = next(model.parameters()).device
    input_ids, all_labels = list(dataset["input_ids"]), list(dataset["labels"])
    total, count = 0.0, 0
    for idx in length_batches([len(x) for x in input_ids], None, batch_size * LOSS_TOKENS_PER_ROW):
        width = len(input_ids[idx[0]])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, j in enumerate(idx):
            x, y = input_ids[j], all_labels[j]
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


class StopAtTurnEnd(StoppingCriteria):
    """A stopping criterion for generate(): a row is done once its generated text holds a STOP string
    (cut_at_stop would cut there, so later tokens cannot change the answer) or its last token is one of
    `eos_ids` (generate stops there too). Counts each row's generated tokens up to that point. Only the
    last few tokens are decoded each step: every token of a stop string carries >= 1 of its characters."""

    window = max(map(len, STOP)) + 2

    def __init__(self, tokenizer, prompt_width: int, eos_ids: list[int], rows: int, device):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        self.lengths += ~self.done
        done = self.done | torch.isin(input_ids[:, -1], self.eos)
        open_rows = (~done).nonzero().flatten().tolist()
        if open_rows:
            start = max(self.prompt_width, input_ids.shape[1] - self.window)
            tails = self.tokenizer.batch_decode(input_ids[open_rows, start:], skip_special_tokens=True)
            for row, text in zip(open_rows, tails):
                if any(s in text for s in STOP):
                    done[row] = True
        self.done = done
        return done.clone()


def eos_ids_of(model) -> list[int]:
    """The EOS ids generate() itself stops at (the model's generation config)."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def left_padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id rows -> input_ids and attention_mask, padded on the left (generation appends on the right)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def kv_cache(model, device: torch.device) -> dict:
    """generate()'s KV cache: on a GPU one allocated per batch and written in place (transformers'
    StaticCache, eager, not compiled), instead of the DynamicCache that grows every layer's K and V by
    torch.cat at each step: at 7B on an H200 2,571 vs 1,175 tokens/s on a process's first pass, 3,112 vs
    2,879 on its second (benchmarks/results/generation_warmup_h200_2026-12-01.json). Only for model
    classes that transformers marks as working with a static cache (_can_compile_fullgraph: Llama,
    Mistral, Qwen2, Gemma, ...). On CPU the dynamic cache: no faster there (70 vs 70 tokens/s)."""
    static = device.type == "cuda" and getattr(model, "_can_compile_fullgraph", False)
    return {"cache_implementation": "static", "disable_compile": True} if static else {}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             desc: str = "generate", **generate_kwargs) -> tuple[list[str], int]:
    """Greedy answers (cut at the next turn) to the prompts (token ids: `tokens.prompt_ids`) in input
    order, and the number of tokens generated: per row up to its EOS or stop string, at most
    max_new_tokens. A batch ends when all its rows have."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    generated = 0
    eos_ids = eos_ids_of(model)
    generate_kwargs = {**kv_cache(model, device), **generate_kwargs}
    with tqdm(total=len(prompts), desc=desc, unit="rows", dynamic_ncols=True) as bar:
        for idx in length_batches([len(x) for x in prompts], batch_size):
            batch = left_padded([prompts[i] for i in idx], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            width = batch["input_ids"].shape[1]
            stop = StopAtTurnEnd(tokenizer, width, eos_ids, len(idx), device)
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([stop]),
                                 **generate_kwargs)
            texts = tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                out[i] = cut_at_stop(text)
            generated += int(stop.lengths.sum())
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{generated / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    return out, generated


def dequantize_for_inference(model):
    """In place: 4-bit weights -> the same values in the compute dtype, when the GPU has room for twice
    their size (weights + KV cache and activations). For more than one token bitsandbytes de-quantises
    each weight at every call (dequantize_4bit, then a 16-bit matmul), so holding them de-quantised gives
    the same products without that work at every decoding step. Returns the model (the same object)."""
    if getattr(model, "hf_quantizer", None) is None or not torch.cuda.is_available():
        return model
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    dtype = layers[0].compute_dtype or torch.bfloat16
    need = sum(m.in_features * m.out_features for m in layers) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * need:
        log.info("evaluate: keeping 4-bit weights (de-quantised they need %.1f GiB x 2, %.1f GiB free)",
                 need / 2**30, free / 2**30)
        return model
    log.info("evaluate: de-quantising the 4-bit weights for generation (%.1f GiB in %s)", need / 2**30, dtype)
    return model.dequantize(dtype=dtype)


def score(preds: list[str], refs: list[str]) -> dict:
    n = max(len(refs), 1)
    return {
        "exact_match": round(sum(map(exact_match, preds, refs)) / n, 4),
        "token_f1": round(sum(map(token_f1, preds, refs)) / n, 4),
        "rouge_l": round(sum(map(rouge_l, preds, refs)) / n, 4),
    }


def models(adapter: Path, base: Path, record: dict):
    """("base", model) then ("tuned", model): one set of weights, alone then under the adapter; for a full
    fine-tune (a model folder, no adapter_config.json) the base, then the tuned model, one at a time."""
    from peft import PeftModel

    from stages.modeling import load_base_model

    trained = lineage.trained_model(record)
    if not (adapter / "adapter_config.json").exists():
        for name, weights in (("base", None), ("tuned", adapter)):
            yield name, load_base_model(base, trained, inference=True, weights=weights).eval()
        return
    model = dequantize_for_inference(load_base_model(base, trained, inference=True).eval())
    yield "base", model  # the weights alone, then with the adapter (unmerged: as train ran it)
    yield "tuned", PeftModel.from_pretrained(model, adapter).eval()


def run(adapter: Path, base: Path, tokenized: Path, prompts_path: Path, metrics: Path, samples: Path,
        params: Params) -> dict:
    import datasets
    from peft import PeftModel

    from stages.modeling import load_tokenizer

    for p in (adapter, tokenized, prompts_path):
        if not p.exists():
            raise StageError(f"{p}: missing (run the upstream stages: `dvc repro`)")
    record = lineage.read(adapter)
    lineage.require_base(record, base, adapter)
    torch.manual_seed(params.seed)
    e = params.evaluate
    tokenizer = load_tokenizer(base)
    eval_ds = datasets.load_from_disk(str(tokenized))
    rows = list(read_jsonl(prompts_path))
    if e.max_generate_rows:
        rows = rows[:e.max_generate_rows]
    ids_tokenizer, eos_id = tokens.load_tokenizer(base)  # tokenize's own encoding: the ids train saw
    prompts = tokens.prompt_ids(rows, ids_tokenizer, tokens.layout(ids_tokenizer), eos_id)
    refs = [r["completion"].strip() for r in rows]

    results, answers, timings = {}, {}, {}
    for name, model in models(adapter, base, record):
        t0 = time.perf_counter()
        loss = completion_loss(model, eval_ds, e.batch_size, tokenizer.pad_token_id)
        if isinstance(model, PeftModel) and getattr(model.get_base_model(), "hf_quantizer", None) is None:
            model = model.merge_and_unload()  # folded into the 16/32-bit weights: no LoRA layers to run per token
        t1 = time.perf_counter()
        answers[name], n_tokens = generate(model, tokenizer, prompts, e.batch_size, e.max_new_tokens,
                                           desc=f"generate {name}")
        t2 = time.perf_counter()
        del model
        results[f"{name}_loss"] = round(loss, 6)
        results[f"{name}_perplexity"] = round(math.exp(min(loss, 50)), 4)
        results.update({f"{name}_{k}": v for k, v in score(answers[name], refs).items()})
        timings.update({f"{name}_loss_seconds": round(t1 - t0, 3), f"{name}_generate_seconds": round(t2 - t1, 3),
                        f"{name}_generated_tokens": n_tokens,
                        f"{name}_generated_tokens_per_s": round(n_tokens / max(t2 - t1, 1e-9), 2)})
        log.info("evaluate %s: loss %.4f, ppl %.2f, token F1 %.3f, ROUGE-L %.3f; loss pass %.1f s, generated "
                 "%d tokens in %.1f s = %.1f tokens/s", name, loss, results[f"{name}_perplexity"],
                 results[f"{name}_token_f1"], results[f"{name}_rouge_l"], t1 - t0, n_tokens, t2 - t1,
                 timings[f"{name}_generated_tokens_per_s"])
    results["rows_loss"], results["rows_generated"] = len(eval_ds), len(rows)
    results.update(timings)
    with staged(metrics, samples) as (metrics_tmp, samples_tmp):  # both or neither
        write_json(metrics_tmp, results)
        write_jsonl(samples_tmp, ({"id": r["id"], "prompt": r["prompt"], "reference": ref, "base": b, "tuned": t}
                                  for r, ref, b, t in zip(rows, refs, answers["base"], answers["tuned"])))
    print(table(results))
    return results


def table(results: dict) -> str:
    keys = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l")
    lines = [f"{'metric':<12} {'base':>10} {'tuned':>10}"]
    lines += [f"{k:<12} {results[f'base_{k}']:>10.4f} {results[f'tuned_{k}']:>10.4f}" for k in keys]
    return "\n".join(lines)
