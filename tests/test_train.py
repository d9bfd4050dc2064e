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


def shipped(tiny_base, **sections):
    """The shipped params on the tiny base, `sections` replacing fields: lora={...}, train={...}."""
    p = load_params(ROOT / "params.yaml")
    changes = {name: dataclasses.replace(getattr(p, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(p, model=dataclasses.replace(p.model, source=str(tiny_base)),
                               wandb=dataclasses.replace(p.wandb, mode="disabled"), **changes)


@pytest.mark.parametrize("sections, what", [({"train": {"method": "full"}}, "train.method=full"),
                                            ({"lora": {"init": "pissa"}}, "lora.init=pissa"),
                                            ({"lora": {"init": "olora"}}, "lora.init=olora")])
def test_auto_quantization_to_4bit_is_refused_for_what_cannot_train_on_it(tiny_base, sections, what):
    """model.quantize=auto is 4-bit on CUDA: params cannot know it, the stage refuses before loading."""
    with pytest.raises(StageError, match=f"^{what} cannot train on the 4-bit base that model.quantize=auto loads "
                                         "here: set model.quantize: none$"):
        train.trainable_model(tiny_base, shipped(tiny_base, **sections), quantized=True)


def test_gaussian_init_draws_a_with_std_one_over_r_and_b_zero(tiny_base):
    model = train.trainable_model(tiny_base, shipped(tiny_base, lora={"init": "gaussian", "r": 16}), quantized=False)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # default: Kaiming-uniform A
    assert float(a.detach().std()) == pytest.approx(1 / 16, rel=0.1) and not b.detach().any()
    assert model.peft_config["default"].init_lora_weights == "gaussian"


def test_an_olora_adapter_is_saved_for_the_unmodified_base(tokenized, tiny_base, tmp_path):
    """OLoRA moves W's QR part into the adapter and trains on the rest; saved as (trained - initial), the
    adapter on the untouched base gives the trained model: at a learning rate of ~0, the base itself
    (saved as trained, it would add the QR part a second time)."""
    import torch
    from peft import PeftModel

    from stages.modeling import load_base_model

    p = shipped(tiny_base, lora={"init": "olora"}, train={"max_steps": 1, "learning_rate": 1e-12, "save_steps": 10})
    train.run(tokenized, None, tiny_base, tmp_path / "adapter", tmp_path / "m.json", tmp_path / "plots",
              tmp_path / "ckpt", [], p)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == 2 * p.lora.r and config["init_lora_weights"] is True
    ids = torch.tensor([[5, 17, 40, 99, 200, 3]])
    base = load_base_model(tiny_base, p.model).eval()
    with torch.no_grad():
        want = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(load_base_model(tiny_base, p.model), tmp_path / "adapter").eval()
        assert float((tuned(input_ids=ids).logits - want).abs().max()) < 1e-3


@pytest.mark.parametrize("init", ["default", "pissa_niter_2", "olora"])
def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_adapter(tokenized, tiny_base, tmp_path,
                                                                                   monkeypatch, init):
    """Killed after its step-3 checkpoint, the same run resumes from it and saves the adapter the
    uninterrupted run saves. For pissa/olora the resumed process must derive the same residual base and
    the same initial adapter (subtracted at the save) as the first one did."""
    from safetensors.torch import load_file

    p = shipped(tiny_base, lora={"init": init}, train={"max_steps": 6, "save_steps": 3, "eval_steps": 0})

    def run(name: str) -> dict:
        return train.run(tokenized, None, tiny_base, tmp_path / name, tmp_path / f"{name}.json",
                         tmp_path / f"{name}-plots", tmp_path / "ckpt", [], p)

    assert run("whole")["resumed_from_step"] == 0
    step_end = train.ThroughputLog.on_step_end

    def killed_at_step_4(self, args, state, control, **kw):
        step_end(self, args, state, control, **kw)
        if state.global_step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.ThroughputLog, "on_step_end", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert not (tmp_path / "resumed").exists() and list((tmp_path / "ckpt").glob("*/checkpoint-3"))
    monkeypatch.undo()
    assert run("resumed")["resumed_from_step"] == 3
    whole = load_file(tmp_path / "whole/adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed/adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    worst = max(float((whole[k] - resumed[k]).abs().max()) for k in whole)
    assert worst < 1e-6, f"resumed adapter differs by {worst}"
    assert max(float(v.abs().max()) for v in whole.values()) > 1e-3  # a trained adapter, not zeros
