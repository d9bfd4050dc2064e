#!/usr/bin/env python3
"""Correctness of `model.attn_implementation: varlen` (stages/modeling.py) on a CUDA GPU.

    python benchmarks/varlen_check.py            # writes $OUT (or benchmarks/results/) varlen_check.json

A 2-layer model of Mistral-7B's attention shape (32 query heads, 8 key/value heads, head_dim 128), in
bf16. A packed batch of 8 rows (lengths 17..300), as the train stage feeds it (DataCollatorWithFlattening
with the flash kwargs, and once with position ids only), run through varlen; the reference is each row
alone through sdpa (no packing). Compared: logits of every row, the loss, and the gradient of one
weight. With a sliding window shorter than the rows, the same against sdpa with that window.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    from transformers import DataCollatorWithFlattening, MistralConfig, MistralForCausalLM

    from stages.modeling import register_varlen

    register_varlen()
    torch.manual_seed(0)
    lengths = [17, 300, 64, 129, 33, 250, 5, 200]
    rows = [torch.randint(3, 32000, (n,)).tolist() for n in lengths]
    result = {"lengths": lengths, "torch": torch.__version__}
    for window in (None, 48):
        cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=8, sliding_window=window)
        torch.manual_seed(0)
        model = MistralForCausalLM(cfg).to("cuda", torch.bfloat16)
        weight = model.model.layers[0].self_attn.q_proj.weight

        def run(impl: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            model.config._attn_implementation = impl
            model.zero_grad()
            out = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}, use_cache=False)
            out.loss.backward()
            return out.logits.detach().float(), out.loss.detach().float(), weight.grad.detach().float().clone()

        flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": r} for r in rows])
        plain = DataCollatorWithFlattening()([{"input_ids": r} for r in rows])
        t0 = time.perf_counter()
        logits_v, loss_v, grad_v = run("varlen", flat)
        first_call_s = time.perf_counter() - t0
        logits_p, loss_p, grad_p = run("varlen", plain)  # boundaries from position ids
        # reference: each row alone through sdpa, losses summed over the same labelled tokens
        ref_logits, n_tokens, loss_sum, grad_sum = [], 0, 0.0, 0
        for r in rows:
            model.config._attn_implementation = "sdpa"
            model.zero_grad()
            ids = torch.tensor([r], device="cuda")
            out = model(input_ids=ids, labels=ids, use_cache=False)
            n = len(r) - 1
            (out.loss * n).backward()
            ref_logits.append(out.logits.detach().float()[0])
            loss_sum += out.loss.item() * n
            n_tokens += n
            grad_sum = grad_sum + weight.grad.detach().float()
        ref = torch.cat(ref_logits)[None]
        scale = ref.abs().max().item()
        key = f"window_{window}" if window else "causal"
        result[key] = {
            "max_abs_logit_diff_vs_sdpa_per_row": (logits_v - ref).abs().max().item(),
            "logit_scale": scale,
            "max_abs_logit_diff_position_ids_vs_collator_kwargs": (logits_p - logits_v).abs().max().item(),
            "loss_varlen": loss_v.item(), "loss_sdpa_per_row": loss_sum / n_tokens,
            "grad_rel_diff": ((grad_v - grad_sum / n_tokens).norm() / (grad_sum / n_tokens).norm()).item(),
            "first_call_s": first_call_s,
        }
        print(key, json.dumps(result[key]), flush=True)
        del model
        torch.cuda.empty_cache()
    r = result["causal"]
    result["ok"] = bool(r["max_abs_logit_diff_vs_sdpa_per_row"] < 0.05 * r["logit_scale"]
                        and abs(r["loss_varlen"] - r["loss_sdpa_per_row"]) < 2e-2 and r["grad_rel_diff"] < 5e-2
                        and result["window_48"]["grad_rel_diff"] < 5e-2)
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "varlen_check.json").write_text(json.dumps(result, indent=1))
    print("varlen matches sdpa per row:", result["ok"])


if __name__ == "__main__":
    main()
