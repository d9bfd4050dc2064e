#!/usr/bin/env python3
"""Warm-up of packed flex_attention training: how many seconds the first steps cost, by padding policy.

    python benchmarks/flex_warmup.py [--layers 2] [--rows 64] [--steps 30]

A Mistral-7B-shaped model cut to --layers layers (random bf16 weights, hidden 4096), trained on packed
micro-batches of --rows rows (lengths from hf_baseline.make_lengths: lognormal, median 220 tokens), one
flat sequence per step with position_ids restarting per row (what the train stage's packing collator
gives). Each policy runs in a fresh process (a cold compile cache), TORCHINDUCTOR_FORCE_DISABLE_CACHES=1:
  - raw:      the packed length as it comes (a new length every step);
  - pad1024:  padded up to a multiple of 1024 tokens (the padding is a separate sequence, labels -100);
  - pad4096:  padded up to a multiple of 4096 tokens.
Prints per policy: the seconds of steps 1-5, 6-10 and the last 10, the number of dynamo recompiles,
and the padding overhead (padded tokens / real tokens).
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
sys.path.insert(0, str(HERE))


def one(policy: str, layers: int, rows: int, steps: int) -> dict:
    import torch
    import torch._dynamo.utils
    from transformers import MistralForCausalLM

    import hf_baseline as hb

    torch.manual_seed(0)
    cfg = hb.mistral_config(layers)
    cfg._attn_implementation = "flex_attention"
    model = MistralForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, ids = hb.make_lengths()
    mult = {"raw": 1, "pad1024": 1024, "pad4096": 4096}[policy]
    times, real, padded = [], 0, 0
    for step in range(steps):
        batch = ids[step * rows:(step + 1) * rows]
        flat = [t for x in batch for t in x]
        pos = [p for x in batch for p in range(len(x))]
        labels = list(flat)
        n = len(flat)
        extra = (-n) % mult
        flat += [0] * extra
        pos += list(range(extra))
        labels += [-100] * extra
        real, padded = real + n, padded + n + extra
        t = torch.tensor([flat], device="cuda")
        p = torch.tensor([pos], device="cuda")
        y = torch.tensor([labels], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=t, position_ids=p, labels=y).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"[{policy}] step {step + 1}: {n + extra} tokens, {times[-1]:.2f}s", flush=True)
    c = torch._dynamo.utils.counters
    return {"policy": policy, "steps_1_5_s": sum(times[:5]), "steps_6_10_s": sum(times[5:10]),
            "last10_s": sum(times[-10:]), "total_s": sum(times), "padding_overhead": padded / real - 1,
            "recompiles": sum(c["recompiles"].values()) if "recompiles" in c else None,
            "frames_compiled": c["stats"].get("unique_graphs")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--policy", help="run one policy in this process (internal)")
    ap.add_argument("--policies", default="raw,pad1024,pad4096")
    a = ap.parse_args()
    if a.policy:
        print("RESULT " + json.dumps(one(a.policy, a.layers, a.rows, a.steps)), flush=True)
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    results = []
    for policy in a.policies.split(","):
        out = subprocess.run([sys.executable, __file__, "--policy", policy, "--layers", str(a.layers),
                              "--rows", str(a.rows), "--steps", str(a.steps)], env=env, capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            continue
        results.append(json.loads(lines[0][7:]))
    print(f"{'policy':<8} {'steps 1-5 s':>11} {'6-10 s':>7} {'last 10 s':>9} {'total s':>8} {'padding':>8} {'recompiles':>10}")
    for r in results:
        print(f"{r['policy']:<8} {r['steps_1_5_s']:>11.1f} {r['steps_6_10_s']:>7.1f} {r['last10_s']:>9.2f} "
              f"{r['total_s']:>8.1f} {r['padding_overhead']:>8.1%} {r['recompiles']!s:>10}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "flex_warmup.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
