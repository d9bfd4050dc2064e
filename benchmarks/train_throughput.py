#!/usr/bin/env python3
"""Train-stage throughput on one GPU against the plain Hugging Face QLoRA recipe, in ONE run.

    python benchmarks/train_throughput.py                       # Mistral-7B shape, all variants
    python benchmarks/train_throughput.py --layers 2 --steps 8 --skip 2 --ours "16:sdpa"   # smoke

What runs (each in its own process, so peak memory is clean), on the same model and sample stream:
  1. benchmarks/hf_baseline.py: build a Mistral-7B-shaped model with random weights (bf16 safetensors),
     measure the bf16 matmul peak, and re-measure the plain recipe's variants
     A (seed-style: batch 2 padded to 512, sdpa) and B_flat_flex (best plain: batch 8 padding-free,
     flex_attention) — prepare_model_for_kbit_training, LoRA r=32 all-linear + lm_head, NF4, GC.
  2. ours: the pipeline's own code — `import_base` on that model directory, the same samples written
     as a tokenized split, and `stages.train.run` with params from configs/params-mistral7b-gpu.yaml
     (4-bit NF4 + double quant + bf16, LoRA r=32 all-linear + lm_head, paged AdamW 8-bit), once per
     `--ours` entry "ROWS_PER_STEP:ATTENTION[:FLAG...]" (nogc: train.gradient_checkpointing false;
     ck0.5: train.checkpoint_fraction 0.5; nodrop: lora.dropout 0; ROWS
     as "16384t": micro-batches of at most 16,384 tokens, train.batch_tokens).
Prints one table (s/step, real tokens/s, peak GiB, MFU on the 4N basis vs the measured matmul peak,
final loss) and the ratios, and writes $OUT (or benchmarks/results/) train_throughput.json.
Samples: lognormal lengths (median 220, sigma 0.6) clipped to [32, 512], token ids uniform, labels =
inputs (as in hf_baseline.py). Timing: steps after --skip, each step ended by cuda synchronize.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import hf_baseline as hb  # noqa: E402  (the plain recipe: model shape, samples, FLOP accounting)

OUT = Path(os.environ.get("OUT") or HERE / "results")


def log(*a):
    print(*a, flush=True)


def make_tokenizer(model_dir: Path) -> None:
    """The random model has no tokenizer; the train stage needs one (pad id): a 32k word-level vocab."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    if (model_dir / "tokenizer.json").exists():
        return
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, hb.VOCAB)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    tok.save_pretrained(model_dir)


def prepare(work: Path, model_dir: str) -> tuple[Path, Path]:
    """models/base (through import_base) and the tokenized split of the benchmark's samples."""
    import datasets

    from stages import import_base
    from stages.params import ModelParams

    base, data = work / "base", work / "tokenized"
    if not (base / "base.json").exists():
        make_tokenizer(Path(model_dir))
        t0 = time.perf_counter()
        import_base.run(base, ModelParams(source=model_dir, revision=None, quantize="auto", dtype="auto",
                                          attn_implementation="auto", copy_hub_weights=False))
        log(f"[ours] import_base (copy + sha256): {time.perf_counter() - t0:.1f}s")
    if not data.exists():
        _, ids = hb.make_lengths()
        datasets.Dataset.from_dict({"id": [str(i) for i in range(len(ids))], "input_ids": ids, "labels": ids,
                                    "length": [len(x) for x in ids]}).save_to_disk(str(data))
    return base, data


def cmd_ours(a) -> None:
    """One configuration of our train stage, in this process."""
    import stages.cli  # noqa: F401  (the stage's CUDA allocator setting, as `finetune train` has it)
    import torch

    from stages import train
    from stages.params import as_dict, load_params, parse_params

    rows, attn, *flags = a.config.split(":")
    nogc = "nogc" in flags
    fraction = next((float(f[2:]) for f in flags if f.startswith("ck")), 1.0)  # "ck0.5": checkpoint half the layers
    suffix = "".join(f"_{f}" for f in flags)
    tag = f"{rows}_{attn}{suffix}"
    work = Path(a.work)
    base, data = prepare(work, a.model_dir)
    lengths, _ = hb.make_lengths()
    raw = work / "raw.jsonl"
    raw.write_text("synthetic\n")
    p = as_dict(load_params(ROOT / "configs/params-mistral7b-gpu.yaml"))
    p["model"].update(source=a.model_dir, revision=None, attn_implementation=attn)
    budget = int(rows[:-1]) if rows.endswith("t") else 0  # "16384t": micro-batches of <= 16,384 tokens
    p["train"].update(batch_size=64 if budget else int(rows), batch_tokens=budget, max_steps=a.steps,
                      save_steps=10**6, eval_steps=0, logging_steps=1,
                      warmup_ratio=0.0, accelerate_config="none", gradient_checkpointing=not nogc,
                      checkpoint_fraction=fraction)
    if "nodrop" in flags:  # lora.dropout 0: peft skips the dropout (a copy of every LoRA input)
        p["lora"]["dropout"] = 0.0
    p["wandb"]["mode"] = "disabled"
    params = parse_params(p, "benchmark")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = train.run(data, None, base, work / f"adapter-{tag}", work / f"train-{tag}.json",
                  work / f"plots-{tag}", work / "checkpoints", [raw], params)
    wall = time.perf_counter() - t0
    per_token = hb.useful_flops(lengths.tolist(), a.layers) / float(lengths.sum())  # dataset average
    res = {"variant": f"ours_{rows}{'okens' if budget else 'rows'}_{attn}{suffix}",
           "rows_per_step": None if budget else int(rows), "batch_tokens": budget, "attn": attn,
           "setup_s": m["setup_seconds"], "first_step_s": m["first_steps_seconds"][0],
           "first_steps_s": m["first_steps_seconds"],
           "gradient_checkpointing": not nogc, "checkpoint_fraction": fraction,
           "lora_dropout": p["lora"]["dropout"], "status": "ok",
           "s_per_step": m["step_seconds_steady"], "real_tok_per_s": m["tokens_per_s_steady"],
           "real_tokens_per_step": m["tokens_per_s_steady"] * m["step_seconds_steady"],
           "useful_tflop_per_s": m["tokens_per_s_steady"] * per_token / 1e12,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
           "train_loss": m["train_loss"], "final_loss": m["final_loss"], "steps": m["steps"],
           "timed_steps": m["steady_window"], "train_wall_s": wall}
    hb.write_json(os.path.join(a.part_dir, f"ours_{tag}.json"), res)
    log(f"[ours] {res['variant']}: {res['s_per_step']:.3f} s/step, {res['real_tok_per_s']:.0f} tok/s, "
        f"peak {res['peak_alloc_gib']:.1f} GiB, loss {res['final_loss']:.3f}")


def cmd_all(a) -> None:
    os.makedirs(a.part_dir, exist_ok=True)
    common = ["--layers", str(a.layers), "--steps", str(a.steps), "--skip", str(a.skip),
              "--model-dir", a.model_dir, "--part-dir", a.part_dir]
    env = {**os.environ, "OUT": a.part_dir}
    t0 = time.time()
    subprocess.run([sys.executable, str(HERE / "hf_baseline.py"), "all", "--variants", a.baseline,
                    "--budget-s", str(a.budget_s), "--skip-iso", *common], env=env, check=False)
    for config in a.ours.split(","):
        left = a.budget_s - (time.time() - t0)
        if left < 60:
            log(f"[all] out of budget before ours {config}")
            break
        try:
            rc = subprocess.run([sys.executable, __file__, "ours", "--config", config, "--work", a.work, *common],
                                env=env, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log(f"[all] ours {config} rc={rc}")
    summarize(a)


def summarize(a) -> None:
    parts = {f.stem: json.loads(f.read_text()) for f in Path(a.part_dir).glob("*.json")}
    base = parts.get("baseline", {})
    aux = parts.get("aux", {})
    peak = aux.get("matmul_peak_tflops")
    rows = [parts[f"variant_{v}"] for v in a.baseline.split(",") if f"variant_{v}" in parts]
    rows += [parts[k] for k in sorted(parts) if k.startswith("ours_")]
    for r in rows:
        if r.get("status") == "ok" and peak:
            r["mfu"] = r["useful_tflop_per_s"] / peak
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    seed, plain = ok.get("A"), ok.get("B_flat_flex")
    best = max((r for r in ok.values() if r["variant"].startswith("ours")), key=lambda r: r["real_tok_per_s"],
               default=None)
    ratios = {}
    if best and seed:
        ratios["ours_vs_seed_style"] = best["real_tok_per_s"] / seed["real_tok_per_s"]
    if best and plain:
        ratios["ours_vs_best_plain"] = best["real_tok_per_s"] / plain["real_tok_per_s"]
        ratios["gib_per_1k_tokens_per_step"] = {
            r["variant"]: r["peak_alloc_gib"] / (r["real_tokens_per_step"] / 1000) for r in (best, plain)}
    summary = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "gpu": aux.get("gpu"),
               "nvidia_smi": aux.get("nvidia_smi"), "versions": {k: aux.get(k) for k in
                                                                ("torch", "transformers", "peft", "bitsandbytes",
                                                                 "accelerate", "cuda")},
               "layers": a.layers, "steps": a.steps, "skip": a.skip, "matmul_peak_tflops": peak,
               "mfu_definition": "useful FLOPs (4N per real token + causal attention) / s / measured bf16 "
                                 "matmul peak; recompute, LoRA and padding not counted",
               "variants": rows, "ratios": ratios, "baseline_summary_lines": base.get("what")}
    OUT.mkdir(parents=True, exist_ok=True)
    hb.write_json(str(OUT / "train_throughput.json"), summary)
    hdr = (f"{'variant':<30} {'s/step':>7} {'real tok/s':>10} {'tok/step':>8} {'alloc GiB':>9} {'resv GiB':>8} "
           f"{'MFU':>6} {'loss':>7} {'1st step s':>10}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r.get('variant'):<30} FAILED {r.get('error', r.get('status'))}")
            continue
        loss = r.get("final_loss", r.get("train_loss"))
        lines.append(f"{r['variant']:<30} {r['s_per_step']:>7.3f} {r['real_tok_per_s']:>10.0f} "
                     f"{r['real_tokens_per_step']:>8.0f} {r['peak_alloc_gib']:>9.2f} {r['peak_reserved_gib']:>8.2f} "
                     f"{(r.get('mfu') or float('nan')) * 100:>5.1f}% {loss:>7.3f} {r.get('first_step_s') or float('nan'):>10.1f}")
    log("\n".join(lines))
    log(f"GPU {aux.get('gpu')}, bf16 matmul peak {peak} TFLOP/s, layers {a.layers}; ratios {json.dumps(ratios)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs="?", default="all", choices=["all", "ours", "summary"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--baseline", default="A,B_flat_flex", help="hf_baseline.py variants to re-measure")
    ap.add_argument("--ours", default="64:flex_attention,32:flex_attention",
                    help="our configs, ROWS_PER_STEP:ATTENTION[:nogc], comma-separated")
    ap.add_argument("--config", help="(ours) one ROWS:ATTENTION[:nogc]")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--model-dir", default="/tmp/mistral7b-random")
    ap.add_argument("--work", default="/tmp/train_throughput")
    ap.add_argument("--part-dir", default="/tmp/train_throughput_parts")
    a = ap.parse_args()
    {"all": cmd_all, "ours": cmd_ours, "summary": summarize}[a.cmd](a)


if __name__ == "__main__":
    main()
