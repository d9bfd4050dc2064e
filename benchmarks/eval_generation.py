#!/usr/bin/env python3
"""The evaluate stage's generation pass against the loop it replaced, on the same model and prompts, in ONE run.

    python benchmarks/eval_generation.py                          # CPU smoke: the tiny test model, < 1 min
    python benchmarks/eval_generation.py --base models/base --adapter models/adapter \\
        --prompts data/prompts/eval.jsonl --max-rows 64 --max-new-tokens 256 --batch-size 64   # a GPU run

What runs, one variant after the other on one loaded model (4-bit NF4 + PEFT adapter on CUDA, as the
stage loads it; float32 on CPU):
  old  the generation loop as it was (copied below): batches of 8 prompts in input order, always to
       max_new_tokens (or EOS), cut at the next turn afterwards; on the 4-bit weights.
  unmerged  the stage before the adapter was folded in: `dequantize_for_inference` (CUDA: the 4-bit
       weights held de-quantised, unless --keep-4bit), PEFT's LoRA layers on them (disabled for the
       base), then `generate`: length-sorted batches of --batch-size, each ended when all its rows have
       produced EOS or a stop string.
  new  the stage now: as unmerged, but the base generates without PEFT's layers and the tuned model
       with the adapter folded into the de-quantised weights (merge_and_unload).
  static  new with transformers' static KV cache (generate then compiles the decoding step, CUDA).
for the base model (adapter disabled) and the tuned one (--models). Generated tokens are counted the
same way for both: per row up to and including its EOS or the token that completes a stop string
(the old loop computes more: every row of a batch to the batch's end; reported as `token_slots`).
Prints and writes ($OUT or benchmarks/results/) eval_generation.json: per variant and model wall
seconds, generated tokens, tokens/s, peak GPU memory; the new/old tokens/s ratio; the share of rows
whose answers are identical, and the metrics (exact match, token F1, ROUGE-L) of each.
Without --base, a tiny random Llama and tokenizer (tests/conftest.py's) and a random LoRA are built.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stages import evaluate  # noqa: E402

OUT = Path(os.environ.get("OUT") or HERE / "results")


def log(*a):
    print(*a, flush=True)


@torch.no_grad()
def old_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> tuple[list[str], list]:
    """The evaluate stage's loop before issue 12 (kept verbatim but for returning the new ids too)."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out, new_ids = [], []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        out.extend(evaluate.cut_at_stop(t) for t in texts)
        new_ids.extend(ids[:, batch["input_ids"].shape[1]:].tolist())
    return out, new_ids


def useful_tokens(new: list[int], eos: list[int], tokenizer) -> int:
    """Tokens up to and including the first EOS, or the one that completes a stop string."""
    n = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
    for k in range(1, n + 1):
        if any(s in tokenizer.decode(new[max(0, k - evaluate.StopAtTurnEnd.window):k], skip_special_tokens=True)
               for s in evaluate.STOP):
            return k
    return n


def tiny_model(work: Path) -> tuple[Path, Path]:
    """models/base from the tests' tiny Llama (import_base, base.json included)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_model, build_tokenizer  # noqa: E402
    from transformers import AutoTokenizer

    from stages import import_base
    from stages.params import load_params

    src = work / "tiny"
    src.mkdir()
    build_tokenizer(src)
    build_model(src, len(AutoTokenizer.from_pretrained(src)))
    import_base.run(work / "base", dataclasses.replace(load_params(ROOT / "params.yaml").model, source=str(src)))
    return work / "base", src


def as_base_dir(model_dir: Path, work: Path) -> Path:
    """A model directory as models/base: itself when it has base.json, else links to its files + base.json."""
    if (model_dir / "base.json").exists():
        return model_dir
    base = work / "base"
    base.mkdir()
    for f in model_dir.iterdir():
        (base / f.name).symlink_to(f.resolve())
    (base / "base.json").write_text(json.dumps({"source": str(model_dir), "weights": "local"}))
    return base


def random_adapter(model, out: Path, r: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(out)
    return out


def read_prompts(path: Path, rows: int) -> tuple[list[str], list[str | None]]:
    """Prompt rows ({"prompt", "completion"}, as data/prompts/*.jsonl) or raw qa rows ({"input", "output"},
    rendered with the qa template); cycled when --max-rows asks for more than the file holds."""
    from stages.format import render_qa

    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    prompts, refs = [], []
    for r in lines:
        if "prompt" in r:
            prompts.append(r["prompt"]), refs.append(r.get("completion", "").strip() or None)
        else:
            prompts.append(render_qa([{"role": "user", "content": r["input"]}], None)[0])
            refs.append(r.get("output"))
    n = rows or len(prompts)
    return [prompts[i % len(prompts)] for i in range(n)], [refs[i % len(refs)] for i in range(n)]


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return result, seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="models/base or any transformers model dir (default: the tiny model)")
    ap.add_argument("--adapter", type=Path, help="a PEFT adapter dir (default: a random LoRA, --lora-r)")
    ap.add_argument("--prompts", type=Path, default=ROOT / "data/raw/eval.jsonl")
    ap.add_argument("--max-rows", type=int, default=0, help="prompts to generate for (0 = the file's)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="the new loop's batch (the old one's is 8)")
    ap.add_argument("--old-batch-size", type=int, default=8)
    ap.add_argument("--models", default="base,tuned", help="base, tuned or both")
    ap.add_argument("--variants", default="old,new", help="old, unmerged, new, static (in this order)")
    ap.add_argument("--old-rows", type=int, default=0, help="rows for the old loop (0 = all): it is slow at 7B")
    ap.add_argument("--keep-4bit", action="store_true", help="new: generate on the 4-bit weights too")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from peft import PeftModel

    from stages.modeling import load_base_model, load_tokenizer
    from stages.params import load_params

    work = Path(tempfile.mkdtemp(prefix="eval_generation_"))
    base = as_base_dir(args.base, work) if args.base else tiny_model(work)[0]
    # the shipped model params (quantize auto: 4-bit NF4 on CUDA, as the stage loads it), this base
    params = dataclasses.replace(load_params(ROOT / "params.yaml").model, source=str(base), attn_implementation="sdpa")
    tokenizer = load_tokenizer(base)
    adapter = args.adapter or random_adapter(load_base_model(base, params), work / "adapter", args.lora_r, 0)
    model = PeftModel.from_pretrained(load_base_model(base, params, inference=True), adapter).eval()
    prompts, refs = read_prompts(args.prompts, args.max_rows)
    prompt_ids = tokenizer(prompts)["input_ids"]  # as the old loop encodes them: the same ids for both
    eos = evaluate.eos_ids_of(model)
    names = args.models.split(",")
    log(f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, device "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, base {base}")

    runs: dict = {}
    answers: dict = {}
    old_n = args.old_rows or len(prompts)
    plain = merged = None  # new/static: the base without PEFT's layers, and base + adapter folded
    for variant in args.variants.split(","):
        if variant in ("unmerged", "new", "static") and not args.keep_4bit and "dequantize_seconds" not in runs:
            (_, seconds, _) = timed(lambda: evaluate.dequantize_for_inference(model.get_base_model()))
            runs["dequantize_seconds"] = round(seconds, 3)
        for name in names:
            n = old_n if variant == "old" else len(prompts)
            if variant in ("old", "unmerged"):  # one model under PEFT, the adapter disabled for the base
                target, ctx = model, model.disable_adapter() if name == "base" else contextlib.nullcontext()
            else:  # the stage's way: the base alone, the adapter folded in (into a copy) for the tuned model
                if plain is None:
                    plain = model.unload()
                    merged = PeftModel.from_pretrained(copy.deepcopy(plain), adapter).eval().merge_and_unload()
                target, ctx = plain if name == "base" else merged, contextlib.nullcontext()
            with ctx:
                if variant == "old":
                    (texts, new_ids), seconds, peak = timed(lambda: old_generate(
                        target, tokenizer, prompts[:n], args.old_batch_size, args.max_new_tokens))
                    tokens = sum(useful_tokens(x, eos, tokenizer) for x in new_ids)
                    slots = sum(len(x) for x in new_ids)
                else:
                    kwargs = {"cache_implementation": "static"} if variant == "static" else {}
                    (texts, tokens), seconds, peak = timed(lambda: evaluate.generate(
                        target, tokenizer, prompt_ids, args.batch_size, args.max_new_tokens, f"{variant} {name}",
                        **kwargs))
                    slots = None
            answers[(variant, name)] = texts
            scored = evaluate.score(texts, refs[:n]) if all(refs) else {}
            runs[f"{variant}_{name}"] = {"rows": n, "seconds": round(seconds, 3), "generated_tokens": tokens,
                                         "tokens_per_s": round(tokens / seconds, 2), "token_slots": slots,
                                         "peak_gpu_gib": peak and round(peak, 2), **scored}
            log(f"{variant:>8} {name:<6} {n:5d} rows {seconds:8.2f} s  {tokens:7d} tokens  {tokens / seconds:9.1f} tokens/s"
                + (f"  peak {peak:.2f} GiB" if peak else "") + (f"  token F1 {scored['token_f1']}" if scored else ""))
            ((args.out or OUT / "eval_generation.json").with_suffix(".partial.json")).write_text(json.dumps(runs, indent=1) + "\n")
    for name in names:
        for variant in ("unmerged", "new", "static"):
            if ("old", name) in answers and (variant, name) in answers:
                old, new = answers[("old", name)], answers[(variant, name)]
                runs[f"ratio_{variant}_{name}"] = round(runs[f"{variant}_{name}"]["tokens_per_s"]
                                                        / runs[f"old_{name}"]["tokens_per_s"], 2)
                runs[f"identical_{variant}_{name}"] = round(sum(a == b for a, b in zip(old, new)) / len(old), 4)
                log(f"{name}: {variant}/old tokens/s {runs[f'ratio_{variant}_{name}']}x, identical answers "
                    f"(first {len(old)} rows) {runs[f'identical_{variant}_{name}']:.1%}")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": len(prompts),
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "old_batch_size": args.old_batch_size, "dequantized": not args.keep_4bit and torch.cuda.is_available(),
              **runs}
    out = args.out or OUT / "eval_generation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
