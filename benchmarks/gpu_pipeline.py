#!/usr/bin/env python3
"""The whole pipeline on a GPU: every dvc.yaml stage command, in order, on the embedded default.

    python benchmarks/gpu_pipeline.py [--set train.max_steps=100 ...] [--work /tmp/gpu_pipeline]

What `dvc repro` would run, without needing dvc on the GPU machine: the stage commands are read from
dvc.yaml (foreach expanded, `finetune` = `python -m stages.cli`) and run one after another in a copy of
the project's inputs (dvc.yaml, params.yaml, configs/, data/raw) under --work, so the checkout is left
alone. params.yaml is the shipped default (SmolLM2-135M from the embedded GGUF, the sample data) with
`wandb.mode=disabled` and any --set overrides; on CUDA `model.quantize: auto` means 4-bit NF4 + double
quantisation + bf16 compute.

Then, independently of the stages' own code, the adapter is reloaded the plain Hugging Face way
(AutoModelForCausalLM in 4-bit + PeftModel.from_pretrained) and its loss on the tokenized eval split
is compared with the tuned loss the evaluate stage reported.

Prints a table of stage wall times, the training curve's ends, eval base vs tuned and merge parity;
writes gpu_pipeline.json (to $OUT when set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage_commands(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(name, command) for every stage of dvc.yaml in file order (which is dependency order here)."""
    from ruamel.yaml import YAML

    out = []
    for name, stage in YAML(typ="safe").load(dvc_yaml.read_text())["stages"].items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                out.append((f"{name}@{item}", stage["do"]["cmd"].replace("${item}", str(item))))
        else:
            out.append((name, stage["cmd"]))
    return out


def write_params(work: Path, overrides: list[str]) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    p = yaml.load((ROOT / "params.yaml").read_text())
    for item in ["wandb.mode=disabled", *overrides]:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = p
        for k in parents:
            node = node[k]
        node[leaf] = YAML(typ="safe").load(value)
    with (work / "params.yaml").open("w") as f:
        yaml.dump(p, f)


def reload_check(work: Path) -> dict:
    """The adapter loaded by plain transformers + peft (not stages/*): loss on the eval split."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(work / "models/base", quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = PeftModel.from_pretrained(model, work / "models/adapter").eval()
    ds = datasets.load_from_disk(str(work / "data/tokenized/eval"))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ds:
            ids = torch.tensor([row["input_ids"]], device="cuda")
            labels = torch.tensor([row["labels"]], device="cuda")
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return {"reloaded_adapter_eval_loss": total / count, "eval_tokens": count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    ap.add_argument("--work", default="/tmp/gpu_pipeline")
    a = ap.parse_args()
    import torch

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "data/raw", work / "data/raw")
    shutil.copytree(ROOT / "configs", work / "configs")
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    write_params(work, a.set)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    times = {}
    for name, cmd in stage_commands(work / "dvc.yaml"):
        cmd = cmd.replace("finetune ", f"{sys.executable} -m stages.cli ", 1)
        print(f"== {name}: {cmd}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, shell=True, cwd=work, env=env)
        times[name] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            sys.exit(f"{name} failed (exit {proc.returncode})")

    def read(p: str) -> dict:
        return json.loads((work / p).read_text())

    train, ev, parity = read("metrics/train.json"), read("metrics/eval.json"), read("models/merged/parity.json")
    check = reload_check(work)
    check["evaluate_stage_tuned_loss"] = ev["tuned_loss"]
    check["abs_diff"] = abs(check["reloaded_adapter_eval_loss"] - ev["tuned_loss"])
    if "eval_loss_last" in train:  # --set train.eval_steps=N: the training processes' own (maybe sharded) model
        check["train_stage_final_eval_loss"] = train["eval_loss_last"]
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
              "command": " ".join(["python", "benchmarks/gpu_pipeline.py", *sys.argv[1:]]),
              "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
              "stage_seconds": times, "train": train, "eval": ev, "merge_parity": parity, "reload_check": check}
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_pipeline.json").write_text(json.dumps(result, indent=1))

    print(f"\n{'stage':<18} {'seconds':>8}")
    for name, s in times.items():
        print(f"{name:<18} {s:>8.1f}")
    print(f"\ntrain: {train['steps']} steps, 4-bit={train['quantized_4bit']}, loss {train['first_loss']:.3f} -> "
          f"{train['final_loss']:.3f}, {train.get('tokens_per_s_steady', train['tokens_per_s']):.0f} tok/s steady, "
          f"peak {train.get('peak_gpu_allocated_gib', float('nan')):.2f} GiB")
    print(f"{'eval':<14} {'base':>8} {'tuned':>8}")
    for k in ("loss", "perplexity", "token_f1", "rouge_l", "exact_match"):
        print(f"{k:<14} {ev['base_' + k]:>8.3f} {ev['tuned_' + k]:>8.3f}")
    print(f"merge parity: max |dlogit| {parity['max_abs_diff']:.3f}, top-1 agreement {parity['top1_agreement']:.2%}")
    print(f"adapter reloaded by plain transformers+peft: eval loss {check['reloaded_adapter_eval_loss']:.4f} vs "
          f"evaluate stage {ev['tuned_loss']:.4f} (|diff| {check['abs_diff']:.4f})")
    if "train_stage_final_eval_loss" in check:
        print(f"eval loss the train stage measured on its own model at the last step (world size "
              f"{train.get('world_size', 1)}): {check['train_stage_final_eval_loss']:.4f}")


if __name__ == "__main__":
    main()
