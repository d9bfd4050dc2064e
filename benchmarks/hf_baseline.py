#!/usr/bin/env python3
# The plain Hugging Face QLoRA recipe, kept as first written (not tuned like the train stage): the
# baseline that benchmarks/train_throughput.py re-measures in the same run as our train stage.
"""Plain Hugging Face QLoRA baseline: throughput and peak GPU memory of a
Mistral-7B-shaped model (random weights, no download) fine-tuned with
transformers.Trainer + peft LoRA on a bitsandbytes NF4 base.

Usage on the GPU machine (one process per variant, so peak memory is clean):

    python3 hf_baseline.py all                       # every step
    python3 hf_baseline.py all --variants A,B_pad    # a subset
    python3 hf_baseline.py all --layers 2 --steps 12 --skip 2   # smoke
    python3 hf_baseline.py variant --variant A --steps 32 --profile 31,32   # + torch.profiler
    python3 hf_baseline.py all --cpu --layers 2 --steps 4 --skip 1 --model-dir /tmp/tiny  # CPU API check

Steps run by `all` (each a subprocess; results merged into $OUT/baseline.json
after every step, so a later failure or timeout keeps earlier numbers):
  make_model  build MistralConfig(7B shape) on the GPU in bf16, save_pretrained
              to --model-dir (safetensors), free it.  Skipped if already there.
  aux         bf16 8192^3 matmul peak (median of 10 after warm-up), versions,
              and a packed-sequence isolation test for sdpa / flex_attention.
  variant X   load with from_pretrained(..., quantization_config=BnB NF4),
              prepare_model_for_kbit_training, LoRA r=32 on all linear + lm_head,
              Trainer for --steps steps; time steps skip+1..steps.
Variants:
  A            bs 2, every sample padded to 512, sdpa           ("seed-style")
  B_pad        bs 8, dynamic padding to the longest in batch, sdpa
  B_flat_sdpa  bs 8, DataCollatorWithFlattening (padding-free), sdpa
  B_flat_flex  bs 8, DataCollatorWithFlattening (padding-free), flex_attention
"""
import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("OUT") or os.path.join(HERE, "results", "raw")

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 32000, 4096, 14336, 32, 8
MAX_LEN = 512
N_SAMPLES = 2000
LEN_MEDIAN, LEN_SIGMA, LEN_MIN, LEN_MAX = 220.0, 0.6, 32, 512

VARIANTS = {
    "A": dict(bs=2, seq="pad to 512", collator="fixed", attn="sdpa"),
    "B_pad": dict(bs=8, seq="dynamic pad (longest in batch)", collator="dynamic", attn="sdpa"),
    "B_flat_sdpa": dict(bs=8, seq="padding-free flatten (position_ids)", collator="flatten", attn="sdpa"),
    "B_flat_flex": dict(bs=8, seq="padding-free flatten (position_ids)", collator="flatten", attn="flex_attention"),
}


CPU = False  # set by --cpu (local API smoke test only)


def dev():
    return "cpu" if CPU else "cuda"


def sync():
    import torch
    if not CPU:
        torch.cuda.synchronize()


def mem(kind="alloc"):
    import torch
    if CPU:
        return 0.0
    f = {"alloc": torch.cuda.memory_allocated, "peak_alloc": torch.cuda.max_memory_allocated,
         "peak_reserved": torch.cuda.max_memory_reserved}[kind]
    return f() / 2**30


def free_cache():
    import torch
    gc.collect()
    if not CPU:
        torch.cuda.empty_cache()


def log(*a):
    print(*a, flush=True)


def mistral_config(layers):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32768,
        rope_theta=10000.0, sliding_window=None,
    )


def matmul_params(layers):
    """Matmul weights excluding embeddings, including lm_head (N in 4N)."""
    hd = HIDDEN // HEADS
    per_layer = (HIDDEN * HIDDEN            # q
                 + 2 * HIDDEN * KV_HEADS * hd  # k, v
                 + HIDDEN * HIDDEN          # o
                 + 3 * HIDDEN * INTER)      # gate, up, down
    return layers * per_layer + HIDDEN * VOCAB


def useful_flops(lengths, layers):
    """Useful training FLOPs for sequences of the given real lengths:
    4*N per token (forward 2N + input-gradient backward 2N; base weights frozen,
    recompute not counted) plus causal attention, forward 2*L*(L+1)*d per layer
    (QK^T and PV over the L(L+1)/2 causal pairs) and backward twice that."""
    n = matmul_params(layers)
    tot = 0.0
    for L in lengths:
        tot += 4.0 * n * L + 3 * 2.0 * L * (L + 1) * HIDDEN * layers
    return tot


def make_lengths():
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = rng.lognormal(mean=math.log(LEN_MEDIAN), sigma=LEN_SIGMA, size=N_SAMPLES)
    lengths = np.clip(np.rint(lengths), LEN_MIN, LEN_MAX).astype(np.int64)
    ids = [rng.integers(3, VOCAB, size=int(L)).tolist() for L in lengths]
    return lengths, ids


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- make_model
def cmd_make_model(a):
    import torch
    from transformers import MistralForCausalLM

    cfg = mistral_config(a.layers)
    marker = os.path.join(a.model_dir, "config.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("num_hidden_layers") == a.layers:
                log(f"[make_model] {a.model_dir} already holds a {a.layers}-layer model; skipping")
                write_json(os.path.join(a.part_dir, "make_model.json"), {"skipped": True})
                return
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev()):
        model = MistralForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    sync()
    t1 = time.perf_counter()
    nparam = sum(p.numel() for p in model.parameters())
    log(f"[make_model] init on GPU in bf16: {t1 - t0:.1f}s, {nparam / 1e9:.3f}e9 params, "
        f"dtype {next(model.parameters()).dtype}, mem {mem():.1f} GiB")
    model.save_pretrained(a.model_dir, max_shard_size="5GB")
    t2 = time.perf_counter()
    size = sum(os.path.getsize(os.path.join(a.model_dir, f)) for f in os.listdir(a.model_dir))
    log(f"[make_model] save_pretrained: {t2 - t1:.1f}s, {size / 1e9:.2f} GB in {sorted(os.listdir(a.model_dir))}")
    del model
    free_cache()
    write_json(os.path.join(a.part_dir, "make_model.json"), {
        "params": nparam, "init_s": t1 - t0, "save_s": t2 - t1, "bytes_on_disk": size})


# --------------------------------------------------------------------------- aux
def cmd_aux(a):
    import torch
    import transformers
    import peft
    import accelerate

    res = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
           "gpu": "cpu" if CPU else torch.cuda.get_device_name(0),
           "gpu_mem_gib": 0 if CPU else torch.cuda.get_device_properties(0).total_memory / 2**30}
    try:
        import bitsandbytes
        res["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001
        res["bitsandbytes"] = f"import failed: {e!r}"
    try:
        res["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        res["nvidia_smi"] = repr(e)
    log("[aux] versions:", json.dumps(res))

    # bf16 matmul peak: 8192^3, random data, median of 10 after warm-up
    n = 8192 if not CPU else 256
    g = torch.Generator(device=dev()).manual_seed(0)
    x = torch.randn(n, n, device=dev(), dtype=torch.bfloat16, generator=g)
    y = torch.randn(n, n, device=dev(), dtype=torch.bfloat16, generator=g)
    for _ in range(5):
        z = torch.matmul(x, y)
    sync()
    times = []
    for _ in range(10):
        if CPU:
            t = time.perf_counter()
            z = torch.matmul(x, y)
            times.append(time.perf_counter() - t)
            continue
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        z = torch.matmul(x, y)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    med = statistics.median(times)
    res["matmul_8192_bf16_s"] = times
    res["matmul_peak_tflops"] = 2 * n**3 / med / 1e12
    log(f"[aux] bf16 8192^3 matmul: median {med * 1e3:.3f} ms -> {res['matmul_peak_tflops']:.1f} TFLOP/s "
        f"(min {2 * n**3 / min(times) / 1e12:.1f}, max-time {2 * n**3 / max(times) / 1e12:.1f})")
    del x, y, z
    free_cache()

    # Does attention isolate packed sequences given only position_ids (what
    # DataCollatorWithFlattening passes)?  Tiny fp32 Mistral, compare the second
    # sequence's logits packed vs alone; 'no position_ids' shows the leak size.
    from transformers import MistralConfig, MistralForCausalLM

    iso = {}
    for impl in ([] if a.skip_iso else ["sdpa", "flex_attention", "eager"]):
        try:
            cfg = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
            torch.manual_seed(0)
            with torch.device(dev()):
                m = MistralForCausalLM._from_config(cfg, attn_implementation=impl, dtype=torch.float32).eval()
            sa = torch.randint(0, 1000, (37,), device=dev())
            sb = torch.randint(0, 1000, (53,), device=dev())
            packed = torch.cat([sa, sb])[None]
            pos = torch.cat([torch.arange(37), torch.arange(53)]).to(dev())[None]
            with torch.no_grad():
                # use_cache=False as in training (with a cache the packed check is skipped)
                lb = m(sb[None], use_cache=False).logits[0]
                lp = m(packed, position_ids=pos, use_cache=False).logits[0, 37:]
                ln = m(packed, use_cache=False).logits[0, 37:]
            scale = lb.abs().max().item()
            err = (lp - lb).abs().max().item() / scale
            leak = (ln - lb).abs().max().item() / scale
            iso[impl] = {"rel_err_packed_vs_alone": err, "rel_err_without_position_ids": leak,
                         "isolates": bool(err < 1e-4 and leak > 1e-2)}
        except Exception as e:  # noqa: BLE001
            iso[impl] = {"error": repr(e)[:500]}
        log(f"[aux] packed-sequence isolation {impl}: {iso[impl]}")
    res["packed_isolation_tiny_fp32"] = iso
    write_json(os.path.join(a.part_dir, "aux.json"), res)


# --------------------------------------------------------------------------- variant
def pad_collator(max_len=None, pad_id=0):
    import torch

    def collate(features):
        lens = [len(f["input_ids"]) for f in features]
        T = max_len if max_len is not None else max(lens)
        ids = torch.full((len(features), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(features), T), dtype=torch.long)
        for i, f in enumerate(features):
            L = len(f["input_ids"])
            ids[i, :L] = torch.tensor(f["input_ids"], dtype=torch.long)
            att[i, :L] = 1
        labels = ids.masked_fill(att == 0, -100)
        return {"input_ids": ids, "attention_mask": att, "labels": labels}

    return collate


def cmd_variant(a):
    import torch
    import transformers
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    v = VARIANTS[a.variant]
    res = {"variant": a.variant, "batch": v["bs"], "seq_policy": v["seq"], "attn": v["attn"],
           "steps": a.steps, "timed_steps": a.steps - a.skip, "layers": a.layers}
    part = os.path.join(a.part_dir, f"variant_{a.variant}.json")
    res["status"] = "started"
    write_json(part, res)
    torch.manual_seed(0)

    lengths, ids = make_lengths()
    res["data_mean_len"] = float(lengths.mean())
    res["data_median_len"] = float(statistics.median(lengths.tolist()))
    log(f"[{a.variant}] data: {len(ids)} samples, mean length {lengths.mean():.1f}, median "
        f"{res['data_median_len']:.0f}, min {lengths.min()}, max {lengths.max()}, "
        f"clipped at {LEN_MAX}: {(lengths == LEN_MAX).sum()}")

    # ---- load as users do
    t0 = time.perf_counter()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": "cpu" if CPU else 0}, attn_implementation=v["attn"])
    sync()
    res["load_s"] = time.perf_counter() - t0
    res["mem_after_load_gib"] = mem()
    log(f"[{a.variant}] from_pretrained 4-bit: {res['load_s']:.1f}s, allocated {res['mem_after_load_gib']:.2f} GiB, "
        f"attn {model.config._attn_implementation}")

    model = prepare_model_for_kbit_training(model)
    lcfg = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "lm_head"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res["trainable_params"] = trainable
    res["mem_after_peft_gib"] = mem()
    log(f"[{a.variant}] LoRA trainable params {trainable / 1e6:.1f}M, allocated {res['mem_after_peft_gib']:.2f} GiB")

    if v["collator"] == "fixed":
        collator = pad_collator(MAX_LEN)
    elif v["collator"] == "dynamic":
        collator = pad_collator(None)
    else:
        from transformers import DataCollatorWithFlattening
        collator = DataCollatorWithFlattening()

    # Packed-sequence check on the real 4-bit model: second sequence alone vs packed.
    if v["collator"] == "flatten":
        try:
            model.eval()
            sa = torch.tensor(ids[0], device=dev())
            sb = torch.tensor(ids[1], device=dev())
            batch = collator([{"input_ids": ids[0]}, {"input_ids": ids[1]}])
            with torch.no_grad(), torch.autocast(dev(), dtype=torch.bfloat16):
                lb = model(input_ids=sb[None], use_cache=False).logits[0].float()
                lp = model(input_ids=batch["input_ids"].to(dev()), position_ids=batch["position_ids"].to(dev()),
                           use_cache=False).logits[0, len(sa):].float()
                ln = model(input_ids=batch["input_ids"].to(dev()), use_cache=False).logits[0, len(sa):].float()
            scale = lb.abs().max().item()
            res["real_model_isolation"] = {
                "rel_err_packed_vs_alone": (lp - lb).abs().max().item() / scale,
                "rel_err_without_position_ids": (ln - lb).abs().max().item() / scale,
                "lens": [len(ids[0]), len(ids[1])]}
            log(f"[{a.variant}] real-model packed isolation: {res['real_model_isolation']}")
            del lb, lp, ln
        except Exception as e:  # noqa: BLE001
            res["real_model_isolation"] = {"error": repr(e)[:500]}
            log(f"[{a.variant}] real-model isolation check failed: {e!r}")
        model.train()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i]}

    stats = []  # per optimizer step (grad accum 1): (padded tokens, [real lengths])

    class StatTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            x = inputs["input_ids"]
            if "attention_mask" in inputs:
                lens = inputs["attention_mask"].sum(1).tolist()
            elif "position_ids" in inputs:
                p = inputs["position_ids"][0]
                starts = (p == 0).nonzero().flatten().tolist() + [p.numel()]
                lens = [starts[i + 1] - starts[i] for i in range(len(starts) - 1)]
            else:
                lens = [x.shape[1]] * x.shape[0]
            stats.append((x.numel(), lens))
            return super().training_step(model, inputs, num_items_in_batch)

    step_t = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            step_t[state.global_step] = time.perf_counter()

    callbacks = [Timer()]
    prof_res = {}
    if a.profile:
        # Profile steps p0..p1 (torch.profiler, CPU+CUDA); the timed window then ends at p0-1.
        p0, p1 = (int(x) for x in a.profile.split(","))
        from torch.profiler import ProfilerActivity, profile

        class Prof(TrainerCallback):
            prof = None

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 == p0:
                    sync()
                    self.t = time.perf_counter()
                    self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == p1 and self.prof is not None:
                    sync()
                    wall = time.perf_counter() - self.t
                    self.prof.__exit__(None, None, None)
                    ka = self.prof.key_averages()
                    dt_attr = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") \
                        else "self_cuda_time_total"
                    kern = [e for e in ka if getattr(e, dt_attr) > 0 and
                            str(getattr(e, "device_type", "")).endswith("CUDA")]
                    nsteps = p1 - p0 + 1
                    gpu_us = sum(getattr(e, dt_attr) for e in kern)
                    cats = {}
                    for e in kern:
                        n = e.key.lower()
                        c = ("bnb_dequant" if "dequant" in n else
                             "bnb_optimizer" if ("optimizer" in n or "8bit" in n or "blockwise" in n) else
                             "attention" if any(k in n for k in ("fmha", "flash", "attention", "flex",
                                                                 "triton_tem")) else
                             "gemm" if any(k in n for k in ("gemm", "xmma", "nvjet", "cutlass", "sm90",
                                                            "cublas", "matmul")) else
                             "copy/cast" if any(k in n for k in ("copy", "cast", "convert")) else
                             "elementwise/reduce/other")
                        cats[c] = cats.get(c, 0) + getattr(e, dt_attr)
                    prof_res.update({
                        "steps": [p0, p1], "wall_per_step_s_profiled": wall / nsteps,
                        "gpu_kernel_time_per_step_s": gpu_us / 1e6 / nsteps,
                        "kernels_per_step": sum(e.count for e in kern) / nsteps,
                        "gpu_time_by_category_s_per_step": {k: v / 1e6 / nsteps for k, v in
                                                            sorted(cats.items(), key=lambda kv: -kv[1])},
                        "top_kernels": [(e.key[:90], e.count // nsteps, getattr(e, dt_attr) / 1e6 / nsteps)
                                        for e in sorted(kern, key=lambda e: -getattr(e, dt_attr))[:25]],
                    })
                    with open(os.path.join(OUT, f"prof_{a.variant}.txt"), "w") as f:
                        f.write(json.dumps(prof_res, indent=1) + "\n\n")
                        f.write(ka.table(sort_by=dt_attr, row_limit=40, max_name_column_width=90))
                    log(f"[{a.variant}] profile: {json.dumps({k: v for k, v in prof_res.items() if k != 'top_kernels'})}")
                    for k in prof_res["top_kernels"][:12]:
                        log(f"[{a.variant}]   {k[2] * 1e3:8.2f} ms/step  x{k[1]:<6} {k[0]}")

        callbacks.append(Prof())

    targs = TrainingArguments(
        output_dir=f"/tmp/hf_baseline_{a.variant}", per_device_train_batch_size=v["bs"],
        gradient_accumulation_steps=1, bf16=True, optim="adamw_torch" if CPU else "paged_adamw_8bit",
        learning_rate=2.5e-5, use_cpu=CPU,
        gradient_checkpointing=True, max_steps=a.steps, report_to="none", logging_strategy="no",
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=42)
    trainer = StatTrainer(model=model, args=targs, train_dataset=DS(), data_collator=collator,
                          callbacks=callbacks)
    free_cache()
    if not CPU:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    sync()
    res["train_wall_s"] = time.perf_counter() - t0
    res["train_loss"] = out.training_loss
    res["peak_alloc_gib"] = mem("peak_alloc")
    res["peak_reserved_gib"] = mem("peak_reserved")

    assert len(stats) == a.steps, (len(stats), a.steps)
    s0, s1 = a.skip, a.steps
    if a.profile:
        s1 = int(a.profile.split(",")[0]) - 1
        res["profile"] = prof_res
    res["timed_window"] = [s0 + 1, s1]
    dt = step_t[s1] - step_t[s0]
    per_step = [step_t[i] - step_t[i - 1] for i in range(s0 + 1, s1 + 1)]
    win = stats[s0:s1]  # steps s0+1..s1
    real = sum(sum(l) for _, l in win)
    padded = sum(p for p, _ in win)
    lens_all = [L for _, l in win for L in l]
    uf = useful_flops(lens_all, a.layers)
    res.update({
        "s_per_step": dt / (s1 - s0), "s_per_step_median": statistics.median(per_step),
        "s_per_step_min": min(per_step), "s_per_step_max": max(per_step),
        "first_steps_s": [step_t[i] - (step_t[i - 1] if i > 1 else t0) for i in range(1, min(s0, 10) + 1)],
        "real_tokens_timed": real, "padded_tokens_timed": padded,
        "real_tok_per_s": real / dt, "padded_tok_per_s": padded / dt,
        "real_tokens_per_step": real / (s1 - s0), "padded_tokens_per_step": padded / (s1 - s0),
        "useful_tflop_per_s": uf / dt / 1e12, "N_matmul_params": matmul_params(a.layers),
        "status": "ok", "transformers": transformers.__version__,
    })
    log(f"[{a.variant}] {res['s_per_step']:.3f} s/step, real {res['real_tok_per_s']:.0f} tok/s, "
        f"padded {res['padded_tok_per_s']:.0f} tok/s, useful {res['useful_tflop_per_s']:.1f} TFLOP/s, "
        f"peak alloc {res['peak_alloc_gib']:.2f} GiB, reserved {res['peak_reserved_gib']:.2f} GiB, "
        f"loss {res['train_loss']:.3f}")
    write_json(part, res)


# --------------------------------------------------------------------------- summary / driver
def summarize(a):
    parts = {}
    for f in sorted(os.listdir(a.part_dir)) if os.path.isdir(a.part_dir) else []:
        if f.endswith(".json"):
            with open(os.path.join(a.part_dir, f)) as fh:
                parts[f[:-5]] = json.load(fh)
    aux = parts.get("aux", {})
    peak = aux.get("matmul_peak_tflops")
    rows = []
    for name in VARIANTS:
        r = parts.get(f"variant_{name}")
        if not r:
            continue
        if r.get("status") == "ok" and peak:
            r["mfu"] = r["useful_tflop_per_s"] / peak
        rows.append(r)
    summary = {
        "what": "plain HF QLoRA (transformers Trainer + peft LoRA r=32 all-linear+lm_head, bnb NF4 double-quant, "
                "paged_adamw_8bit, bf16, gradient checkpointing), Mistral-7B-shaped random model",
        "layers": a.layers, "steps": a.steps, "timed_steps": f"{a.skip + 1}..{a.steps}",
        "data": {"n": N_SAMPLES, "dist": f"lognormal(median {LEN_MEDIAN}, sigma {LEN_SIGMA}) clipped "
                 f"[{LEN_MIN},{LEN_MAX}], numpy default_rng(0)"},
        "mfu_definition": "useful FLOPs / s / measured bf16 matmul peak; useful FLOPs per real token = 4*N "
                          "(N = matmul weights excl. embeddings incl. lm_head) + causal attention fwd+bwd "
                          "6*L*(L+1)*d*layers per sequence; LoRA, recompute and padding not counted",
        "matmul_peak_tflops": peak, "env": {k: v for k, v in aux.items() if not k.startswith("matmul_8192")},
        "make_model": parts.get("make_model"), "variants": rows,
    }
    write_json(os.path.join(OUT, "baseline.json"), summary)
    hdr = (f"{'variant':<12} {'batch':>5} {'seq policy, attention':<52} {'s/step':>7} {'real tok/s':>10} {'pad tok/s':>10} "
           f"{'alloc GiB':>9} {'resv GiB':>8} {'MFU':>6}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['variant']:<12} {r['batch']:>5} {r['seq_policy'] + ', ' + r['attn']:<52} "
                         f"FAILED: {str(r.get('error', r.get('status')))[:80]}")
            continue
        lines.append(
            f"{r['variant']:<12} {r['batch']:>5} {(r['seq_policy'] + ', ' + r['attn'])[:52]:<52} "
            f"{r['s_per_step']:>7.3f} {r['real_tok_per_s']:>10.0f} {r['padded_tok_per_s']:>10.0f} "
            f"{r['peak_alloc_gib']:>9.2f} {r['peak_reserved_gib']:>8.2f} "
            f"{(r.get('mfu') or float('nan')) * 100:>5.1f}%")
    log("\n".join(lines))
    log(f"bf16 8192^3 matmul peak: {peak} TFLOP/s; gpu: {aux.get('gpu')}; layers={a.layers}")
    return summary


def cmd_all(a):
    os.makedirs(a.part_dir, exist_ok=True)
    common = (["--cpu"] if a.cpu else []) + (["--skip-iso"] if a.skip_iso else []) + ["--layers", str(a.layers), "--steps", str(a.steps), "--skip", str(a.skip),
              "--model-dir", a.model_dir, "--part-dir", a.part_dir]
    jobs = [["make_model"], ["aux"]] + [["variant", "--variant", v] for v in a.variants.split(",") if v]
    deadline = time.time() + a.budget_s
    for j in jobs:
        if j[0] in a.skip_steps.split(","):
            continue
        left = deadline - time.time()
        if left < 30:
            log(f"[all] out of budget before {j}; stopping")
            break
        t0 = time.time()
        log(f"[all] === {' '.join(j)} (budget left {left:.0f}s)")
        try:
            rc = subprocess.run([sys.executable, os.path.abspath(__file__)] + j + common, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log(f"[all] === {' '.join(j)} rc={rc} in {time.time() - t0:.1f}s")
        if j[0] == "variant" and rc != 0:
            p = os.path.join(a.part_dir, f"variant_{j[2]}.json")
            r = {}
            if os.path.exists(p):
                with open(p) as f:
                    r = json.load(f)
            r.update({"variant": j[2], "batch": VARIANTS[j[2]]["bs"], "seq_policy": VARIANTS[j[2]]["seq"],
                      "attn": VARIANTS[j[2]]["attn"], "status": "failed", "error": f"rc={rc}"})
            write_json(p, r)
        if j[0] == "make_model" and rc != 0:
            log("[all] make_model failed; stopping")
            break
        summarize(a)
    summarize(a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["all", "make_model", "aux", "variant", "summary"])
    ap.add_argument("--variant", choices=list(VARIANTS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--skip-steps", default="", help="comma list of make_model,aux to skip in `all`")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--model-dir", default="/tmp/mistral7b-random")
    ap.add_argument("--profile", default="", help="p0,p1: torch.profiler over steps p0..p1 (variant only)")
    ap.add_argument("--skip-iso", action="store_true", help="aux: skip the tiny packed-isolation test")
    ap.add_argument("--cpu", action="store_true", help="local API smoke test on CPU (tiny --layers)")
    ap.add_argument("--part-dir", default="/tmp/hf_baseline_parts")
    a = ap.parse_args()
    global CPU, VOCAB, HIDDEN, INTER, HEADS, KV_HEADS
    CPU = a.cpu
    if CPU:  # tiny shape: the CPU smoke test checks the plumbing, not speed
        VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 1000, 128, 256, 4, 2
    {"all": cmd_all, "make_model": cmd_make_model, "aux": cmd_aux, "variant": cmd_variant,
     "summary": summarize}[a.cmd](a)


if __name__ == "__main__":
    main()
