"""The train stage's batching: micro-batches by token budget (train.batch_tokens), on the tiny model."""

import dataclasses
import json
from pathlib import Path

import datasets
import pytest

from stages import tokenize as tok
from stages import train
from stages.errors import StageError
from stages.params import load_params

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenized(tiny_base, tmp_path_factory) -> Path:
    """40 rows of 9 to 48 tokens, tokenized by the stage itself."""
    work = tmp_path_factory.mktemp("tokenized")
    prompts = work / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": "### Question: hi " * (1 + i % 9) + "\n ### Answer:",
                                           "completion": " fine" * (1 + i % 5)}) + "\n" for i in range(40)))
    tok.run(prompts, work / "tok", tiny_base, None, None, load_params(ROOT / "params.yaml").tokenize)
    return work / "tok"


def test_token_bins_hold_every_row_once_within_the_budget(tokenized):
    ds = datasets.load_from_disk(str(tokenized))
    lengths = ds["length"]
    bins = train.TokenBins(ds, 400, seed=1, split="train")
    rows = sorted(i for b in bins.bins for i in b)
    assert rows == list(range(len(ds)))  # each row in exactly one micro-batch
    assert all(sum(lengths[i] for i in b) <= 400 for b in bins.bins)
    # greedy: a micro-batch closes only when the next row would not fit
    assert all(sum(lengths[i] for i in b) + lengths[nxt[0]] > 400 for b, nxt in zip(bins.bins, bins.bins[1:]))
    assert len(bins) < len(ds) / 2 and 0.5 < bins.fill <= 1
    assert train.TokenBins(ds, 400, seed=1, split="train").bins == bins.bins  # seeded
    assert train.TokenBins(ds, 400, seed=2, split="train").bins != bins.bins
    item = bins[0]["rows"]
    assert [len(r["input_ids"]) for r in item] == [lengths[i] for i in bins.bins[0]]


def test_a_budget_below_the_longest_row_is_one_clear_error(tokenized):
    ds = datasets.load_from_disk(str(tokenized))
    with pytest.raises(StageError, match=r"train.batch_tokens=8 is smaller than the longest train row"):
        train.TokenBins(ds, 8, seed=1, split="train")


def test_training_by_token_budget_takes_one_step_per_micro_batch(tokenized, tiny_base, tmp_path):
    p = load_params(ROOT / "params.yaml")
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, source=str(tiny_base)),
                            train=dataclasses.replace(p.train, batch_tokens=400, max_steps=-1, epochs=1.0,
                                                      save_steps=100),
                            wandb=dataclasses.replace(p.wandb, mode="disabled"))
    summary = train.run(tokenized, None, tiny_base, tmp_path / "adapter", tmp_path / "m.json", tmp_path / "plots",
                        tmp_path / "ckpt", [], p)
    ds = datasets.load_from_disk(str(tokenized))
    assert summary["steps"] == len(train.TokenBins(ds, 400, p.seed, "train"))
    assert summary["tokens_seen"] == sum(ds["length"])  # every row once, nothing padded
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("fraction, expected", [(1.0, [True, True]), (0.5, [False, True]), (0.0, [False, False])])
def test_checkpoint_fraction_spreads_recomputation_over_the_layers(tiny_base, fraction, expected):
    p = load_params(ROOT / "params.yaml")
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, source=str(tiny_base)),
                            train=dataclasses.replace(p.train, gradient_checkpointing=True,
                                                      checkpoint_fraction=fraction))
    model = train.trainable_model(tiny_base, p, quantized=False)
    from transformers.modeling_layers import GradientCheckpointingLayer

    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags == expected
    assert train.checkpoint_some_layers(model, 0.25) == [False, False]  # 1 of 4 layers: none of 2


def test_an_adapter_with_lm_head_holds_only_the_lora_weights(tokenized, tiny_base, tmp_path):
    from safetensors import safe_open

    p = load_params(ROOT / "params.yaml")
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, source=str(tiny_base)),
                            lora=dataclasses.replace(p.lora, target_modules=["q_proj", "v_proj", "lm_head"]),
                            train=dataclasses.replace(p.train, max_steps=2, save_steps=1),
                            wandb=dataclasses.replace(p.wandb, mode="disabled"))
    train.run(tokenized, None, tiny_base, tmp_path / "adapter", tmp_path / "m.json", tmp_path / "plots",
              tmp_path / "ckpt", [], p)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lm_head.lora_A" in k for k in keys)
    assert all(".lora_" in k for k in keys), [k for k in keys if ".lora_" not in k]  # no copy of the base's layers
