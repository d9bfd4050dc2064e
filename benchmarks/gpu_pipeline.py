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

At 7B (`--mistral7b`): a Mistral-7B-shaped model with random weights (benchmarks/hf_baseline.py
make_model, bf16 safetensors, a word-level tokenizer over its 32k ids) is the local `model.source`,
params come from configs/params-mistral7b-gpu.yaml (wandb disabled), and the data are generated Q&A
rows of realistic token lengths (question median ~60, answer ~180 tokens, lognormal), --train-rows and
--eval-rows of them, written as data/raw/*.jsonl so validate -> format -> tokenize run as usual:

    python benchmarks/gpu_pipeline.py --mistral7b --train-rows 2000 --eval-rows 200

Every stage is watched from outside (peak host RSS of its process tree, peak GPU memory in use from
NVML, sampled every 0.2 s); the table adds train's set-up / first step / steady step, tokens/s and MFU
(4N + attention per real token over a bf16 matmul peak measured in the same run, as in
train_throughput.py), evaluate's loss and generation passes with generated tokens/s, and merge's parity.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage_commands(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(name, command) for every stage of dvc.yaml in file order (which is dependency order here), with
    DVC's templating resolved as `dvc repro` would: foreach over a list (${item}) or a mapping (${key},
    ${item}), and ${a.b} from the params.yaml beside dvc.yaml."""

    from ruamel.yaml import YAML

    params = YAML(typ="safe").load((dvc_yaml.parent / "params.yaml").read_text())

    def resolve(text, local: dict):
        def value(m: re.Match):
            name = m.group(1)
            if name in local:
                return local[name]
            node = params
            for k in name.split("."):
                node = node[k]
            return node

        whole = re.fullmatch(r"\$\{([\w.]+)\}", text.strip())
        if whole:  # a lone reference keeps its type (a foreach over ${data.train}'s value)
            return value(whole)
        return re.sub(r"\$\{([\w.]+)\}", lambda m: str(value(m)), text)

    out = []
    for name, stage in YAML(typ="safe").load(dvc_yaml.read_text())["stages"].items():
        if "foreach" not in stage:
            out.append((name, resolve(stage["cmd"], {})))
            continue
        items = stage["foreach"]
        pairs = ([(k, resolve(v, {}) if isinstance(v, str) else v) for k, v in items.items()]
                 if isinstance(items, dict) else [(None, v) for v in items])
        for key, item in pairs:
            local = {"item": item} if key is None else {"key": key, "item": item}
            out.append((f"{name}@{key if key is not None else item}", resolve(stage["do"]["cmd"], local)))
    return out


def has_dvclive() -> bool:
    """DVCLive installed (not the project's own dvclive/ results folder, a namespace package on sys.path)."""
    spec = importlib.util.find_spec("dvclive")
    return spec is not None and spec.origin not in (None, "namespace")


def write_params(work: Path, overrides: list[str], source: Path = ROOT / "params.yaml") -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    p = yaml.load(source.read_text())
    for item in ["wandb.mode=disabled", *overrides]:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = p
        for k in parents:
            node = node[k]
        node[leaf] = YAML(typ="safe").load(value)
    with (work / "params.yaml").open("w") as f:
        yaml.dump(p, f)


class Watch:
    """Peak host RSS of a process tree and peak GPU memory in use (NVML, all processes), sampled."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.proc, self.rss, self.gpu, self.done = psutil.Process(pid), 0, 0, False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001  (no NVML: host memory only)
            self.nvml = None
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        import psutil

        while not self.done:
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.rss = max(self.rss, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            if self.nvml:
                nv, handle = self.nvml
                self.gpu = max(self.gpu, nv.nvmlDeviceGetMemoryInfo(handle).used)
            time.sleep(0.2)

    def stop(self) -> dict:
        self.done = True
        self.thread.join()
        return {"peak_host_gib": round(self.rss / 2**30, 2), "peak_gpu_used_gib": round(self.gpu / 2**30, 2)}


def make_7b(work: Path, model_dir: Path, layers: int, train_rows: int, eval_rows: int) -> None:
    """The random Mistral-7B-shaped model (once per machine) with a word-level tokenizer, and the Q&A rows."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks/hf_baseline.py"), "make_model", "--layers",
                        str(layers), "--model-dir", str(model_dir), "--part-dir", str(work / "parts")], check=True)
    if not (model_dir / "tokenizer.json").exists():
        words = ["###", "Question:", "Answer:"]
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
        vocab.update({f"w{i}": i for i in range(3 + len(words), 32000)})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="</s>").save_pretrained(model_dir)
    rng = np.random.default_rng(0)

    def text(median: float, low: int, high: int) -> str:
        n = int(np.clip(rng.lognormal(np.log(median), 0.6), low, high))
        return " ".join(f"w{i}" for i in rng.integers(6, 32000, n))

    for split, n in (("train", train_rows), ("eval", eval_rows)):
        with open(work / "data/raw" / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input": text(60, 8, 400), "output": text(180, 8, 1200)}) + "\n")


def matmul_peak() -> float:
    """bf16 TFLOP/s of an 8192^3 matmul, the best of 10 (the MFU denominator, as in hf_baseline.py)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(13):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del a
    torch.cuda.empty_cache()
    return 2 * 8192**3 / best / 1e12


def mfu(work: Path, tokens_per_s: float, peak: float) -> float:
    """Useful FLOPs a second (4N per real token + causal attention, hf_baseline.useful_flops) / peak."""
    import datasets

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hf_baseline as hb

    config = json.loads((work / "models/base/config.json").read_text())
    lengths = datasets.load_from_disk(str(work / "data/tokenized/train"))["length"]
    per_token = hb.useful_flops(lengths, config["num_hidden_layers"]) / sum(lengths)
    return tokens_per_s * per_token / 1e12 / peak


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
    ap.add_argument("--mistral7b", action="store_true", help="the 7B run: random Mistral-7B shape, GPU params")
    ap.add_argument("--layers", type=int, default=32, help="(--mistral7b) decoder layers")
    ap.add_argument("--model-dir", default="/tmp/mistral7b-random", help="(--mistral7b) where the model is built")
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--no-reload-check", action="store_true")
    a = ap.parse_args()
    import torch

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "configs", work / "configs")
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    peak = matmul_peak() if torch.cuda.is_available() else None
    if a.mistral7b:
        (work / "data/raw").mkdir()
        make_7b(work, Path(a.model_dir), a.layers, a.train_rows, a.eval_rows)
        write_params(work, [f"model.source={a.model_dir}", "model.revision=null", *a.set],
                     ROOT / "configs/params-mistral7b-gpu.yaml")
    else:
        shutil.copytree(ROOT / "data/raw", work / "data/raw")
        write_params(work, a.set)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    times, memory, notes = {}, {}, []
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ("gpu_pipeline_7b.partial.json" if a.mistral7b else "gpu_pipeline.partial.json")
    for name, cmd in stage_commands(work / "dvc.yaml"):
        cmd = cmd.replace("finetune ", f"{sys.executable} -m stages.cli ", 1)
        if " --live " in cmd and not has_dvclive():  # the GPU image lacks DVCLive (and DVC)
            cmd = re.sub(r" --live \S+", "", cmd)
            notes.append(f"{name}: run without --live (no dvclive here): the live metrics file is not written")
        print(f"== {name}: {cmd}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, shell=True, cwd=work, env=env)
        watch = Watch(proc.pid)
        proc.wait()
        times[name], memory[name] = round(time.perf_counter() - t0, 1), watch.stop()
        partial.write_text(json.dumps({"stage_seconds": times, "stage_memory": memory}, indent=1))  # a cut run keeps these
        print(f"== {name}: {times[name]} s, peak host {memory[name]['peak_host_gib']:.2f} GiB, peak GPU "
              f"{memory[name]['peak_gpu_used_gib']:.2f} GiB", flush=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed (exit {proc.returncode}); stage times so far in {partial}")

    def read(p: str) -> dict:
        return json.loads((work / p).read_text())

    train, ev, parity = read("metrics/train.json"), read("metrics/eval.json"), read("models/merged/parity.json")
    check = {} if a.no_reload_check else reload_check(work)
    if check:
        check["evaluate_stage_tuned_loss"] = ev["tuned_loss"]
        check["abs_diff"] = abs(check["reloaded_adapter_eval_loss"] - ev["tuned_loss"])
    steady = train.get("tokens_per_s_steady", train["tokens_per_s"])
    train_split = {"setup_s": train["setup_seconds"], "first_step_s": train["first_steps_seconds"][0],
                   "steady_step_s": train.get("step_seconds_steady"), "tokens_per_s_steady": steady,
                   "matmul_peak_tflops": peak, "mfu": mfu(work, steady, peak) if peak else None}
    if "eval_loss_last" in train:  # --set train.eval_steps=N: the training processes' own (maybe sharded) model
        check["train_stage_final_eval_loss"] = train["eval_loss_last"]
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
              "command": " ".join(["python", "benchmarks/gpu_pipeline.py", *sys.argv[1:]]),
              "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
              "stage_seconds": times, "stage_memory": memory, "train_split": train_split, "train": train,
              "eval": ev, "merge_parity": parity, "reload_check": check, "notes": notes,
              "data_rows": {"train": a.train_rows, "eval": a.eval_rows} if a.mistral7b else "shipped sample"}
    partial.unlink()
    (out / ("gpu_pipeline_7b.json" if a.mistral7b else "gpu_pipeline.json")).write_text(json.dumps(result, indent=1))

    total = sum(times.values())
    print(f"\n{'stage':<18} {'seconds':>8} {'share':>6} {'peak host GiB':>13} {'peak GPU GiB':>12}")
    for name, s in times.items():
        print(f"{name:<18} {s:>8.1f} {s / total:>6.1%} {memory[name]['peak_host_gib']:>13.2f} "
              f"{memory[name]['peak_gpu_used_gib']:>12.2f}")
    print(f"{'total':<18} {total:>8.1f}")
    print(f"train split: set-up {train_split['setup_s']} s, first step {train_split['first_step_s']} s, steady "
          f"{train_split['steady_step_s']} s/step, {steady:.0f} tok/s, MFU "
          f"{(train_split['mfu'] or float('nan')):.1%} (matmul peak {peak or float('nan'):.0f} TFLOP/s)")
    for m in ("base", "tuned"):
        if f"{m}_generate_seconds" in ev:
            print(f"evaluate {m}: loss pass {ev[f'{m}_loss_seconds']:.1f} s, generation {ev[f'{m}_generate_seconds']:.1f} s, "
                  f"{ev[f'{m}_generated_tokens']} tokens, {ev[f'{m}_generated_tokens_per_s']:.0f} tok/s")
    print(f"evaluate / train wall time: {times['evaluate'] / times['train']:.1%}")
    print(f"\ntrain: {train['steps']} steps, 4-bit={train['quantized_4bit']}, loss {train['first_loss']:.3f} -> "
          f"{train['final_loss']:.3f}, {train.get('tokens_per_s_steady', train['tokens_per_s']):.0f} tok/s steady, "
          f"peak {train.get('peak_gpu_allocated_gib', float('nan')):.2f} GiB")
    print(f"{'eval':<14} {'base':>8} {'tuned':>8}")
    for k in ("loss", "perplexity", "token_f1", "rouge_l", "exact_match"):
        print(f"{k:<14} {ev['base_' + k]:>8.3f} {ev['tuned_' + k]:>8.3f}")
    print(f"merge parity: max |dlogit| {parity['max_abs_diff']:.3f}, top-1 agreement {parity['top1_agreement']:.2%}")
    if "reloaded_adapter_eval_loss" in check:
        print(f"adapter reloaded by plain transformers+peft: eval loss {check['reloaded_adapter_eval_loss']:.4f} vs "
              f"evaluate stage {ev['tuned_loss']:.4f} (|diff| {check['abs_diff']:.4f})")
    if check and "train_stage_final_eval_loss" in check:
        print(f"eval loss the train stage measured on its own model at the last step (world size "
              f"{train.get('world_size', 1)}): {check['train_stage_final_eval_loss']:.4f}")


if __name__ == "__main__":
    main()
