#!/usr/bin/env python3
"""FSDP + QLoRA through the train stage: 1 GPU vs all GPUs of one host, and the adapter check.

    python benchmarks/fsdp_scaling.py [--layers 32] [--rows 64] [--steps 16] [--ddp]
    python benchmarks/fsdp_scaling.py --runs 1gpu; python benchmarks/fsdp_scaling.py --runs fsdp,ddp --ddp

1. Builds the Mistral-7B-shaped random model and its models/base + tokenized samples exactly as
   benchmarks/train_throughput.py does (import_base, same sample stream).
2. Runs `python -m stages.cli train` (the command dvc.yaml runs) twice with the same params
   (configs/params-mistral7b-gpu.yaml, `--rows` rows per GPU per step):
   - on one GPU (CUDA_VISIBLE_DEVICES=0; one process, no launcher),
   - on every GPU: the stage sees several GPUs and re-launches itself under
     `accelerate launch --config_file configs/fsdp.yaml` (FSDP2, NF4 weights stored as bf16 and sharded);
   - with --ddp, on every GPU again with `train.accelerate_config: configs/ddp.yaml` (plain data
     parallel: each GPU holds the whole 4-bit model, which a 7B does easily).
3. Loads the FSDP adapter in a single process (PeftModel.from_pretrained on the 4-bit base) and checks
   it is complete (every LoRA tensor of the config present, B matrices moved from zero) and changes the
   model's loss on held-out samples.
Prints: GPUs, steady tokens/s (global), s/step, peak allocated GiB per GPU, final loss, the speed-up.
Writes $OUT (or benchmarks/results/) fsdp_scaling.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

import hf_baseline as hb  # noqa: E402
from train_throughput import OUT, log, prepare  # noqa: E402


def write_params(work: Path, model_dir: str, rows: int, steps: int, attn: str, launch: str = "auto",
                 name: str = "params.yaml") -> Path:
    from ruamel.yaml import YAML

    yaml = YAML()
    p = yaml.load((ROOT / "configs/params-mistral7b-gpu.yaml").read_text())
    p["model"].update(source=model_dir, revision=None, attn_implementation=attn)
    p["train"].update(batch_size=rows, max_steps=steps, save_steps=10**6, eval_steps=0, warmup_ratio=0.0,
                      accelerate_config=launch)
    p["wandb"]["mode"] = "disabled"
    path = work / name
    with path.open("w") as f:
        yaml.dump(p, f)
    return path


def train(work: Path, params: Path, name: str, gpus: str | None, timeout: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    (work / "raw.jsonl").write_text("synthetic\n")
    cmd = [sys.executable, "-m", "stages.cli", "train", "--train", str(work / "tokenized"), "--base", str(work / "base"),
           "--output", str(work / f"adapter-{name}"), "--metrics", str(work / f"train-{name}.json"),
           "--plots", str(work / f"plots-{name}"), "--checkpoints", str(work / f"ckpt-{name}"),
           "--lineage-data", str(work / "raw.jsonl"), "--params", str(params)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
    log(f"[{name}] rc={proc.returncode} in {time.perf_counter() - t0:.0f}s")
    if proc.returncode != 0:
        log(proc.stdout[-3000:], proc.stderr[-6000:])
        return {"name": name, "status": f"rc={proc.returncode}"}
    m = json.loads((work / f"train-{name}.json").read_text())
    return {"name": name, "status": "ok", **m}


def check_adapter(work: Path, name: str) -> dict:
    """The adapter written by rank 0, loaded in one process: complete, trained, and it changes the loss."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from stages.modeling import load_base_model
    from stages.params import load_params

    adapter = work / f"adapter-{name}"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    params = load_params(work / "params.yaml")
    # inference: sdpa (flex_attention's inductor lowering fails under no_grad in torch 2.11)
    model = load_base_model(work / "base", dataclasses.replace(params.model, attn_implementation="sdpa"))
    model = PeftModel.from_pretrained(model, adapter).eval()
    _, ids = hb.make_lengths()
    losses = {}
    for label in ("base", "adapter"):
        total = 0.0
        with torch.no_grad(), (model.disable_adapter() if label == "base" else contextlib.nullcontext()):
            for x in ids[-8:]:
                t = torch.tensor([x], device="cuda")
                total += model(input_ids=t, labels=t).loss.item()
        losses[label] = total / 8
    return {"tensors": len(tensors), "lora_B_tensors": len(lora_b), "target_modules": config["target_modules"],
            "lora_B_nonzero": sum(int(v.abs().sum() > 0) for v in lora_b.values()),
            "heldout_loss_base": losses["base"], "heldout_loss_adapter": losses["adapter"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=64, help="rows per GPU per step (packed)")
    ap.add_argument("--ddp", action="store_true", help="also run plain DDP (configs/ddp.yaml) on every GPU")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--attn", default="flex_attention")
    ap.add_argument("--model-dir", default="/tmp/mistral7b-random")
    ap.add_argument("--work", default="/tmp/fsdp_scaling")
    ap.add_argument("--timeout", type=float, default=560, help="seconds per training run (a cold machine spends "
                    "~5 min compiling flex_attention in the first run; later runs hit the on-disk cache)")
    ap.add_argument("--runs", default="all", help="which runs to make now: all, or some of 1gpu,fsdp,ddp; "
                    "the others are read from --work, so a long benchmark can be split over calls")
    a = ap.parse_args()
    import torch

    n_gpus = torch.cuda.device_count()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    names = ["1gpu", f"{n_gpus}gpu"] + ([f"{n_gpus}gpu-ddp"] if a.ddp else [])
    keys = dict(zip(names, ["1gpu", "fsdp", "ddp"]))
    todo = {n for n in names if a.runs == "all" or keys[n] in a.runs.split(",")}
    if todo:
        subprocess.run([sys.executable, str(HERE / "hf_baseline.py"), "make_model", "--layers", str(a.layers),
                        "--model-dir", a.model_dir, "--part-dir", str(work / "parts")], check=True)
        prepare(work, a.model_dir)
    params = {names[0]: write_params(work, a.model_dir, a.rows, a.steps, a.attn),
              names[1]: work / "params.yaml"}
    if a.ddp:
        params[names[2]] = write_params(work, a.model_dir, a.rows, a.steps, a.attn, str(ROOT / "configs/ddp.yaml"),
                                        "params-ddp.yaml")
    runs = []
    for name in names:
        if name in todo:
            runs.append(train(work, params[name], name, "0" if name == "1gpu" else None, a.timeout))
        elif (work / f"train-{name}.json").exists():  # measured by an earlier call on this machine
            runs.append({"name": name, "status": "ok", **json.loads((work / f"train-{name}.json").read_text())})
        else:
            runs.append({"name": name, "status": "not run"})
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "gpus": n_gpus,
              "gpu": torch.cuda.get_device_name(0), "layers": a.layers, "rows_per_gpu": a.rows, "steps": a.steps,
              "attn": a.attn, "runs": runs}
    if runs[0]["status"] == "ok":
        for r in runs[1:]:
            if r["status"] == "ok":
                r["speedup_vs_1gpu"] = r["tokens_per_s_steady"] / runs[0]["tokens_per_s_steady"]
    if runs[0]["status"] == runs[1]["status"] == "ok":
        result["speedup"] = runs[1]["speedup_vs_1gpu"]
        result["adapter_check"] = check_adapter(work, runs[1]["name"])
    OUT.mkdir(parents=True, exist_ok=True)
    hb.write_json(str(OUT / "fsdp_scaling.json"), result)
    log(f"{'run':<10} {'tok/s steady':>12} {'x 1 GPU':>7} {'s/step':>7} {'peak GiB/GPU':>12} {'final loss':>10}")
    for r in runs:
        if r["status"] == "ok":
            log(f"{r['name']:<10} {r['tokens_per_s_steady']:>12.0f} {r.get('speedup_vs_1gpu', 1.0):>7.2f} "
                f"{r['step_seconds_steady']:>7.3f} {r.get('peak_gpu_allocated_gib', float('nan')):>12.2f} "
                f"{r['final_loss']:>10.3f}")
        else:
            log(f"{r['name']:<10} FAILED {r['status']}")
    log(json.dumps({k: result.get(k) for k in ("speedup", "adapter_check")}, indent=1))


if __name__ == "__main__":
    main()
