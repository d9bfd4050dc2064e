"""Shared fixtures: a tiny real tokenizer and a tiny randomly initialised Llama, built here (no hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE of ~600 tokens trained on the sample data, saved like any HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for split in ("train", "eval"):
        for line in (ROOT / "data/raw" / f"{split}.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
                texts += [str(row.get("input", "")), str(row.get("output", ""))]
            except (ValueError, AttributeError):
                pass
    texts += ["### Question:", "### Answer:", "### Instruction:", "### Response:"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A transformers model directory: tiny Llama (2 layers, hidden 64) + tiny tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(out)
    build_model(out, len(AutoTokenizer.from_pretrained(out)))
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir, tmp_path_factory) -> Path:
    """models/base as import_base makes it from the tiny model (base.json included)."""
    from stages import import_base
    from stages.params import ModelParams

    out = tmp_path_factory.mktemp("base") / "base"
    import_base.run(out, ModelParams(source=str(tiny_model_dir), revision=None, quantize="auto", dtype="auto",
                                 attn_implementation="auto", copy_hub_weights=False))
    return out


def copy_project(dest: Path) -> Path:
    """The project's tracked files (code, dvc.yaml, params, data) in a fresh git + DVC repo: no results of
    the project's own run (dvc.lock, metrics, plots, reports, dvclive)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("tests/", "benchmarks/", "metrics/", "plots/", "reports/", "dvclive/")) or f == "dvc.lock":
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


def sh(cmd: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                               **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tiny_base, tmp_path_factory) -> Path:
    """What the data stages make of the shipped raw data for the tiny base, with the shipped params:
    {clean,prompts}/{train,eval}.jsonl and tokenized/{train,eval}."""
    from stages import format, tokenize, validate
    from stages.params import load_params

    p = load_params(ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("data")
    for split in ("train", "eval"):
        validate.run(ROOT / "data/raw" / f"{split}.jsonl", out / "clean" / f"{split}.jsonl",
                     out / "rejects" / f"{split}.jsonl", None, p.data, p.validate)
        format.run(out / "clean" / f"{split}.jsonl", out / "prompts" / f"{split}.jsonl", p.template, tiny_base)
        tokenize.run(out / "prompts" / f"{split}.jsonl", out / "tokenized" / split, tiny_base, None, None, p.tokenize)
    return out


def shipped_with(changes: dict):
    """The project's params.yaml (every key: there are no code defaults) with `changes` merged in, parsed."""
    from ruamel.yaml import YAML

    from stages.params import parse_params

    def merge(into: dict, changes: dict) -> dict:
        for k, v in changes.items():
            into[k] = merge(dict(into.get(k) or {}), v) if isinstance(v, dict) and isinstance(into.get(k), dict) \
                else v
        return into

    return parse_params(merge(YAML(typ="safe").load((ROOT / "params.yaml").read_text()), changes), "params.yaml")


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base) -> Path:
    """A LoRA adapter on the tiny model with random A and B (so tuned answers differ from base), and the
    lineage.json train writes beside it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from stages import lineage
    from stages.jsonl import write_json
    from stages.modeling import load_base_model, read_base_json

    params = shipped_with({})
    torch.manual_seed(1)
    model = get_peft_model(load_base_model(tiny_base, params.model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    write_json(out / "lineage.json", lineage.build(params, read_base_json(tiny_base), [], [], quantized=False,
                                                   dtype="float32"))
    return out
