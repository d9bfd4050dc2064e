#!/usr/bin/env python3
"""How many tokens a training step holds on one GPU: peak memory against packed tokens per step.

    python benchmarks/seq_memory.py [--layers 32] [--tokens 16384,32768,65536,98304,131072]
    python benchmarks/seq_memory.py --attn sdpa --tokens 2048,4096,8192 --repeat 3 [--no-checkpointing]

The model as the train stage builds it (stages.train.trainable_model: the Mistral-7B-shaped random model
in 4-bit NF4 + double quant + bf16, LoRA r=32/alpha=64 on all linear layers + lm_head, gradient
checkpointing, flex_attention; params from configs/params-mistral7b-gpu.yaml), then for each size one
forward + backward (under bf16 autocast, as the Trainer runs it) on ONE sequence of that many tokens
(the worst case: a single row of that length; packed rows of the same total cost the same). Records
peak allocated and reserved GiB and the step time; stops at the first out-of-memory.
Optimizer states are left out: 85M LoRA parameters in paged 8-bit AdamW add ~0.2 GiB.
--repeat N runs each size N times and reports the fastest (the first pays kernel selection), with its
useful TFLOP/s (4N per token + causal attention, as benchmarks/hf_baseline.py counts them) and MFU against
a bf16 8192^3 matmul measured in the same run; --no-checkpointing measures what recomputation costs.
Writes seq_memory.json to $OUT (or benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", default="16384,32768,65536,98304,131072")
    ap.add_argument("--attn", default="flex_attention", help="sdpa skips flex_attention's compile (same O(n) memory)")
    ap.add_argument("--model-dir", default="/tmp/mistral7b-random")
    ap.add_argument("--work", default="/tmp/train_throughput")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest is reported")
    ap.add_argument("--no-checkpointing", action="store_true", help="train.gradient_checkpointing: false")
    a = ap.parse_args()
    import subprocess

    import torch

    import hf_baseline as hb
    from stages.params import as_dict, load_params, parse_params
    from stages.train import trainable_model
    from train_throughput import prepare

    subprocess.run([sys.executable, str(HERE / "hf_baseline.py"), "make_model", "--layers", str(a.layers),
                    "--model-dir", a.model_dir, "--part-dir", "/tmp/seq_memory_parts"], check=True)
    base, _ = prepare(Path(a.work), a.model_dir)
    p = as_dict(load_params(ROOT / "configs/params-mistral7b-gpu.yaml"))
    p["model"].update(source=a.model_dir, revision=None, attn_implementation=a.attn)
    p["train"]["gradient_checkpointing"] = not a.no_checkpointing
    params = parse_params(p, "seq_memory")
    model = trainable_model(base, params, quantized=True)
    model.train()
    after_load = torch.cuda.memory_allocated() / 2**30
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        x @ x
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        x @ x
    torch.cuda.synchronize()
    peak = 2 * 8192**3 * 20 / (time.perf_counter() - t0) / 1e12
    del x
    print(f"bf16 8192^3 matmul: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for n in (int(x) for x in a.tokens.split(",")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(3, 32000, (1, n), device="cuda")
        try:
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids, position_ids=torch.arange(n, device="cuda")[None]).loss
                loss.backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                loss = None
            tflops = hb.useful_flops([n], a.layers) / min(times) / 1e12
            row = {"tokens": n, "status": "ok", "seconds": round(min(times), 3), "all_seconds": [round(t, 3) for t in times],
                   "useful_tflop_per_s": round(tflops, 1), "mfu": round(tflops / peak, 4),
                   "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        except torch.OutOfMemoryError:
            row = {"tokens": n, "status": "out of memory"}
        model.zero_grad(set_to_none=True)
        loss = None
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["status"] != "ok":
            break
    ok = [r for r in rows if r["status"] == "ok"]
    fit = {}
    if len(ok) >= 2:  # peak is linear in tokens (checkpointed activations, flex attention keeps no scores)
        (n1, m1), (n2, m2) = (ok[0]["tokens"], ok[0]["peak_allocated_gib"]), (ok[-1]["tokens"], ok[-1]["peak_allocated_gib"])
        slope = (m2 - m1) / (n2 - n1)
        fit = {"gib_per_1k_tokens": round(slope * 1000, 4), "fixed_gib": round(m1 - slope * n1, 2),
               "tokens_in_80gb_est": int((80 * 0.93 - (m1 - slope * n1)) / slope)}  # 7% headroom for the allocator
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "layers": a.layers, "attn": a.attn,
              "gradient_checkpointing": not a.no_checkpointing, "matmul_peak_tflops": round(peak, 1),
              "command": " ".join(["python", "benchmarks/seq_memory.py", *sys.argv[1:]]),
              "allocated_after_load_gib": round(after_load, 2), "rows": rows, "linear_fit": fit}
    out = Path(os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "seq_memory.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'tokens':>8} {'peak alloc GiB':>14} {'reserved GiB':>12} {'s':>7} {'tok/s':>7} {'MFU':>6}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['tokens']:>8} {r['peak_allocated_gib']:>14.2f} {r['peak_reserved_gib']:>12.2f} {r['seconds']:>7.3f} "
                  f"{r['tokens'] / r['seconds']:>7.0f} {r['mfu']:>6.1%}")
        else:
            print(f"{r['tokens']:>8} {r['status']}")
    print(f"after load: {after_load:.2f} GiB; fit: {json.dumps(fit)}")


if __name__ == "__main__":
    main()
