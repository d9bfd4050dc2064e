#!/usr/bin/env python3
"""Why the first generation pass of a process is slower than the second, on one GPU.

    python benchmarks/generation_warmup.py --base /tmp/mistral7b-random --rows 256 --batch-size 128

The evaluate stage's own path (stages.evaluate.generate on the model as the stage loads it for inference:
4-bit NF4 de-quantised to bf16, sdpa_gqa), two passes over the same prompts in one process, per mode,
each mode in a fresh process (the effect is per process):
  dynamic  the stage as it is: DynamicCache, which grows every layer's K and V by torch.cat each step
  prewarm  the same after one allocation of the KV cache's peak size is made and freed (the caching
           allocator then holds the memory the growing cache asks for)
  static   transformers' StaticCache in eager mode (cache_implementation="static", disable_compile):
           the cache is allocated once per batch and written in place
Per pass: seconds, generated tokens, tokens/s and the CUDA allocator's counters over the pass (device
allocations and frees, retries after a failed allocation). Prompts: random token ids, lognormal lengths
(median --median, clipped to [8, 400]) as benchmarks/gpu_pipeline.py's questions. Writes $OUT (or
benchmarks/results/) generation_warmup.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

OUT = Path(os.environ.get("OUT") or HERE / "results")
COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams",
            "segment.all.allocated", "segment.all.freed")


def one_mode(a) -> dict:
    import numpy as np
    import stages.cli  # noqa: F401  (the stage's allocator setting)
    import torch

    from eval_generation import as_base_dir
    from stages import evaluate
    from stages.modeling import load_base_model, load_tokenizer
    from stages.params import load_params

    base = as_base_dir(Path(a.base), Path(tempfile.mkdtemp(prefix="gen_warmup_")))
    params = dataclasses.replace(load_params(ROOT / "configs/params-mistral7b-gpu.yaml").model, source=str(base),
                                 revision=None)
    tokenizer = load_tokenizer(base)
    t0 = time.perf_counter()
    model = evaluate.dequantize_for_inference(load_base_model(base, params, inference=True).eval())
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [rng.integers(6, vocab, int(np.clip(rng.lognormal(np.log(a.median), 0.6), 8, 400))).tolist()
               for _ in range(a.rows)]
    kwargs = {"cache_implementation": "static", "disable_compile": True} if a.mode == "static" else {}
    if a.mode == "prewarm" and torch.cuda.is_available():
        c = model.config
        width = max(map(len, prompts)) + a.max_new_tokens
        heads = c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = 2 * c.num_hidden_layers * a.batch_size * heads * head_dim * width * 2  # K and V, bf16
        block = torch.empty(2 * kv, dtype=torch.uint8, device="cuda")  # x2: torch.cat holds old and new
        del block
    cuda = torch.cuda.is_available()
    stats = torch.cuda.memory_stats if cuda else dict
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    passes = []
    for i in range(a.passes):
        before = stats()
        sync()
        t0 = time.perf_counter()
        answers, tokens = evaluate.generate(model, tokenizer, prompts, a.batch_size, a.max_new_tokens,
                                      desc=f"{a.mode} pass {i + 1}", **kwargs)
        sync()
        seconds = time.perf_counter() - t0
        after = stats()
        passes.append({"pass": i + 1, "seconds": round(seconds, 2), "generated_tokens": tokens,
                       "tokens_per_s": round(tokens / seconds, 1),
                       "answers_sha256": hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16],
                       "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                       **{k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}})
        print(f"[{a.mode}] pass {i + 1}: {seconds:.1f} s, {tokens} tokens, {tokens / seconds:.0f} tok/s, "
              + ", ".join(f"{k} {passes[-1][k]}" for k in COUNTERS), flush=True)
    return {"mode": a.mode, "load_s": round(load_s, 1), "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a transformers model folder (or models/base)")
    ap.add_argument("--modes", default="dynamic,prewarm,static")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in this process
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--median", type=float, default=70)
    ap.add_argument("--passes", type=int, default=2)
    a = ap.parse_args()
    if a.mode:
        print("RESULT " + json.dumps(one_mode(a)), flush=True)
        return
    results = []
    for mode in a.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                              text=True)
        sys.stderr.write(proc.stderr[-3000:])
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        print("\n".join(x for x in proc.stdout.splitlines() if not x.startswith("RESULT ")), flush=True)
        results.append(json.loads(lines[-1][7:]) if lines else {"mode": mode, "error": proc.returncode})
    import torch

    out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
           "rows": a.rows, "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens, "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "generation_warmup.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'mode':<8} {'pass':>4} {'s':>7} {'tok/s':>7} {'dev allocs':>10} {'retries':>7}")
    for r in results:
        for p in r.get("passes", []):
            print(f"{r['mode']:<8} {p['pass']:>4} {p['seconds']:>7.1f} {p['tokens_per_s']:>7.0f} "
                  f"{p['num_device_alloc']:>10} {p['num_alloc_retries']:>7}")


if __name__ == "__main__":
    main()
