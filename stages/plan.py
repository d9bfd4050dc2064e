"""plan: before a run, what the train stage will take: steps, tokens, peak GPU memory per device, time.

    finetune plan [--train data/tokenized/train] [--base models/base] [--gpu h200|h100-80gb|a100-80gb]
                  [--gpus N] [--params params.yaml]

Reads params.yaml, the base's shape (models/base/config.json once imported; before that model.source's
config.json, or the embedded model's GGUF header) and the token lengths of the tokenized train split
(the `length` column of its Arrow shards). Loads no weights; with --gpu it does not import torch.
Not a pipeline stage: it writes nothing, and refuses (one line naming the params keys to change, and
to what) a configuration whose peak memory does not fit the card, before anything is loaded.

- Steps, as the train stage makes them: micro-batches of `train.batch_tokens` from stages/batching.py
  (the same code TokenBins runs), or of `train.batch_size` rows; sharded over the GPUs as accelerate
  does (ceil(micro-batches / GPUs) a rank); the Trainer's ceil(that / gradient_accumulation_steps)
  steps an epoch and ceil(epochs x that) steps, unless train.max_steps is set.
- Memory per GPU = fixed + tokens of the largest micro-batch x bytes a token. Fixed: the base's weights
  (4-bit NF4 with double quantisation: 0.516 bytes a parameter of the decoder layers' linear weights,
  2 for embeddings, lm_head and norms) and LoRA's float32 weights and gradients plus the optimizer's
  states (4 + 4 + 2 bytes a trainable parameter with an 8-bit AdamW, + 8 with a 32-bit one), divided
  by the GPUs under FSDP. A token: 2 x hidden bytes in each checkpointed layer (its saved input), the
  measured activations (scaled by 8 x hidden + 4 x intermediate) in each other layer, and the logits,
  ~13 bytes a vocabulary entry. The constants are fitted to the 7B runs in MEASURED below.
- Time per micro-batch = t0 + FLOPs executed / (efficiency x the card's bf16 peak): 4N a token plus
  causal attention (the benchmarks' useful FLOPs), half again in recomputed layers; t0 and the
  efficiency are fitted to two of the measured runs, and the other runs check them (tests/test_plan.py).
  Not counted: loading (~6 s at 7B from a local disk) and the first step's compile (varlen: ~2 s;
  flex_attention: ~5 minutes on a fresh machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson

from stages import tokens
from stages.batching import token_bins
from stages.errors import StageError
from stages.params import Params, source_kind

GIB = 2**30

# --- What was measured: every constant the plan uses, with the file it comes from ---------------------
# All on one H200, Mistral-7B shape (random weights), NF4 + double quant, bf16, LoRA r=32 on all linear
# layers + lm_head (85,041,152 trainable), paged_adamw_8bit, varlen attention, expandable segments.
R = "benchmarks/results/"
SPEED_RUN = R + "train_throughput_speed_settings_h200_2026-12-01.json"  # expandable segments, lora.dropout 0
VARLEN_RUN = R + "train_throughput_varlen_h200_2026-12-01.json"  # default allocator, lora.dropout 0.05
# tokens: a step's mean; budget: the token budget, which the largest micro-batch reaches (what memory follows)
MEASURED = {
    "speed": dict(src=SPEED_RUN, variant="ours_8192tokens_varlen_nogc_nodrop", budget=8192, tokens=8039.5,
                  ckpt=0.0, dropout=0.0, s_per_step=0.7021, alloc_gib=55.46, mfu=0.426),
    "half_8k": dict(src=SPEED_RUN, variant="ours_8192tokens_varlen_ck0.5_nodrop", budget=8192, tokens=8038.8,
                    ckpt=0.5, dropout=0.0, s_per_step=0.8418, alloc_gib=32.53, mfu=0.355),
    "half_12k": dict(src=SPEED_RUN, variant="ours_12288tokens_varlen_ck0.5_nodrop", budget=12288, tokens=12141.4,
                     ckpt=0.5, dropout=0.0, s_per_step=1.2161, alloc_gib=46.68, mfu=0.372),
    "memory": dict(src=SPEED_RUN, variant="ours_16384tokens_varlen_nodrop", budget=16384, tokens=15444.9,
                   ckpt=1.0, dropout=0.0, s_per_step=1.7722, alloc_gib=14.47, mfu=0.324),
    # 32 rows a micro-batch: for time only (its largest micro-batch was not recorded)
    "dropout": dict(src=VARLEN_RUN, variant="ours_32rows_varlen_nogc", budget=None, tokens=8025.0,
                    ckpt=0.0, dropout=0.05, s_per_step=0.7742, alloc_gib=84.94, mfu=0.387),
}
PEAK_TFLOPS_RUN = {SPEED_RUN: 770.8, VARLEN_RUN: 768.1}  # each run's bf16 8192^3 matmul
# one sequence (the stage's model, LoRA dropout 0.05, no optimizer step), linear fits:
CKPT_GIB_PER_1K = 0.6293          # all layers checkpointed, 16k-128k tokens (R + seq_memory_h200_2026-11-28.json)
NOGC_DROPOUT_GIB_PER_1K = 8.0054  # none checkpointed, 4k-16k tokens (R + seq_memory_nogc_h200_2026-11-28.json)
HOST_FLOOR_S = 0.666  # a step of 2 x 512 padded tokens, launch-bound (R + train_throughput_h200_2026-11-28.json, A)
SYNC_S = 0.131        # a step's extra time on 2 GPUs, FSDP2 and DDP alike (R + fsdp_scaling_2xh200_2026-11-28.md)
# CPU: the shipped params (SmolLM2-135M, float32, batch 8, LoRA r=16): 142.8 tokens/s steady on the
# 2-core machine that made the committed metrics/train.json (commit 1f545a2); scaled by cores (assumed)
CPU_TOKENS_PER_S, CPU_CORES = 142.8, 2

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit absmax per 64 weights, a float32 per 256 absmax


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    peak_tflops: float | None  # dense bf16 matmul, as measured (None: unknown card, no time estimate)
    note: str


CARDS = {
    "h200": Card("NVIDIA H200", 143771 / 1024, 770.8, "measured here (bf16 8192^3 matmul, 742-806 across runs)"),
    "h100-80gb": Card("NVIDIA H100 80GB", 81559 / 1024, 770.8,
                      "not measured: the H200's figure (same chip, same 989 TFLOP/s dense bf16 on paper)"),
    "a100-80gb": Card("NVIDIA A100 80GB", 81920 / 1024, 770.8 * 312 / 989,
                      "not measured: the H200's figure x 312/989 (the datasheets' dense bf16)"),
}


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder (Llama, Mistral, Qwen2, SmolLM...): what memory and FLOPs depend on."""
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    parameters: int = 0  # 0: computed from the shape

    def module_dims(self) -> dict[str, tuple[int, int]]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def layer_linear(self) -> int:  # the decoder layers' linear weights: what 4-bit quantises
        return self.layers * sum(i * o for i, o in self.module_dims().values())

    @property
    def matmul(self) -> int:  # N in "4N FLOPs a token": the linear layers and lm_head (tied or not)
        return self.layer_linear + self.hidden * self.vocab

    @property
    def total(self) -> int:
        if self.parameters:
            return self.parameters
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layer_linear + embeddings + self.hidden * (2 * self.layers + 1)

    def lora_parameters(self, r: int, targets) -> int:
        dims = self.module_dims()
        names = list(dims) if targets == "all-linear" else list(targets)
        unknown = [n for n in names if n not in dims and n != "lm_head"]
        if unknown:
            raise StageError(f"lora.target_modules={names}: plan knows the Llama-style names "
                             f"{', '.join([*dims, 'lm_head'])}, not {', '.join(unknown)}")
        per_layer = sum(r * sum(dims[n]) for n in names if n in dims)
        return self.layers * per_layer + (r * (self.hidden + self.vocab) if "lm_head" in names else 0)


MISTRAL_7B = Shape("Mistral-7B", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                   vocab=32000, tied=False)
SMOLLM2_135M = Shape("SmolLM2-135M", layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
                     vocab=49152, tied=True)
REF_RECIPE = dict(r=32, targets=[*MISTRAL_7B.module_dims(), "lm_head"], optimizer="paged_adamw_8bit")


# --- The model: memory ------------------------------------------------------------------------------

def optimizer_bytes(optimizer: str) -> float:
    """Optimizer state bytes a trainable parameter (AdamW: two moments)."""
    if "8bit" in optimizer:
        return 2
    if "4bit" in optimizer:
        return 1
    return {"sgd": 0, "adafactor": 1, "adagrad": 4, "lion_32bit": 4, "paged_lion_32bit": 4}.get(optimizer, 8)


def fixed_bytes(shape: Shape, lora_params: int, optimizer: str, quantized: bool, dtype_bytes: int, shards: int) -> float:
    if quantized:
        weights = shape.layer_linear * NF4_BYTES + (shape.total - shape.layer_linear) * 2
    else:
        weights = shape.total * dtype_bytes
    return (weights + lora_params * (4 + 4 + optimizer_bytes(optimizer))) / shards


def checkpointed_layers(layers: int, fraction: float) -> int:
    """How many layers train's checkpoint_some_layers recomputes (the same expression)."""
    return sum(int((i + 1) * fraction) > int(i * fraction) for i in range(layers))


REF_FIXED = fixed_bytes(MISTRAL_7B, MISTRAL_7B.lora_parameters(32, REF_RECIPE["targets"]), "paged_adamw_8bit",
                        True, 2, 1)
# logits (float32 and bf16, with their gradients): what a checkpointed token holds beyond each layer's input
LOGIT_BYTES = (CKPT_GIB_PER_1K * GIB / 1000 - MISTRAL_7B.layers * 2 * MISTRAL_7B.hidden) / MISTRAL_7B.vocab


def _layer_bytes(token_bytes: float) -> float:
    return (token_bytes - LOGIT_BYTES * MISTRAL_7B.vocab) / MISTRAL_7B.layers


# activations of one uncheckpointed 7B layer, a token: the speed setting's peak at its largest micro-batch
LAYER_BYTES = _layer_bytes((MEASURED["speed"]["alloc_gib"] * GIB - REF_FIXED) / MEASURED["speed"]["budget"])
DROPOUT_MEMORY = _layer_bytes(NOGC_DROPOUT_GIB_PER_1K * GIB / 1000) / LAYER_BYTES  # dropout copies every LoRA input


def token_bytes(shape: Shape, ckpt_layers: int, dropout: float, dtype_bytes: int) -> float:
    scale = (8 * shape.hidden + 4 * shape.intermediate) / (8 * MISTRAL_7B.hidden + 4 * MISTRAL_7B.intermediate)
    layer = LAYER_BYTES * scale * (DROPOUT_MEMORY if dropout > 0 else 1) * dtype_bytes / 2
    return (ckpt_layers * dtype_bytes * shape.hidden + (shape.layers - ckpt_layers) * layer
            + LOGIT_BYTES * shape.vocab)


# --- The model: time ----------------------------------------------------------------------------------

def useful_flops(shape: Shape, tokens: float, pairs: float) -> float:
    """The benchmarks' useful FLOPs (benchmarks/hf_baseline.py useful_flops): 4N a token (forward and the
    input-gradient backward; the 4-bit base has no weight gradients) + causal attention, 6 x d x layers
    a (query, key) pair; `pairs` = sum of L(L+1) over the rows."""
    return 4.0 * shape.matmul * tokens + 6.0 * pairs * shape.heads * shape.head_dim * shape.layers


def _fit_time() -> tuple[float, float]:
    """t0 (s a step at 7B) and efficiency (of the card's peak, on FLOPs executed) from the two runs with
    half the layers checkpointed; the others are checked against them in tests/test_plan.py."""
    (a, b) = MEASURED["half_8k"], MEASURED["half_12k"]
    executed = [m["mfu"] * PEAK_TFLOPS_RUN[m["src"]] * 1e12 * m["s_per_step"] * (1 + 0.5 * m["ckpt"]) for m in (a, b)]
    rate = (executed[1] - executed[0]) / (b["s_per_step"] - a["s_per_step"])
    return a["s_per_step"] - executed[0] / rate, rate / (PEAK_TFLOPS_RUN[a["src"]] * 1e12)


T0_S, EFFICIENCY = _fit_time()


def _dropout_time() -> float:
    m = MEASURED["dropout"]
    executed = m["mfu"] * PEAK_TFLOPS_RUN[m["src"]] * 1e12 * m["s_per_step"]
    return (m["s_per_step"] - T0_S) / (executed / (EFFICIENCY * PEAK_TFLOPS_RUN[m["src"]] * 1e12))


DROPOUT_TIME = _dropout_time()  # not isolated: that run also differed in allocator and batching


def micro_batch_seconds(shape: Shape, card: Card, tokens: float, pairs: float, ckpt_layers: int,
                        dropout: float) -> float:
    depth = shape.layers / MISTRAL_7B.layers  # kernel launches and per-step work scale with the layers
    executed = useful_flops(shape, tokens, pairs) * (1 + 0.5 * ckpt_layers / shape.layers)
    compute = executed / (EFFICIENCY * card.peak_tflops * 1e12) * (DROPOUT_TIME if dropout > 0 else 1)
    return max(T0_S * depth + compute, HOST_FLOOR_S * depth)


# --- The plan -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    card: Card | None  # None: CPU
    gpus: int          # processes (1 on CPU or with accelerate_config none)
    fsdp: bool
    detected: bool


def micro_batches(lengths: np.ndarray, params: Params, bins: list | None, epochs: float) -> dict:
    """Tokens of the micro-batches: mean (what time follows), largest (what memory follows), and the
    sum of L(L+1) a micro-batch (attention). Token budgets are exact (stages/batching.py); batches of
    rows are drawn from seeded shuffles, one an epoch (the Trainer's order differs: its largest may be
    larger; a token budget bounds it)."""
    t = params.train
    pairs = float((lengths.astype(np.float64) * (lengths + 1)).sum())
    if t.batch_tokens:
        sizes = [int(lengths[b].sum()) for b in bins]
        return dict(count=len(sizes), mean=float(np.mean(sizes)), largest=max(sizes), pairs=pairs / len(sizes),
                    fill=float(np.sum(sizes)) / (len(sizes) * t.batch_tokens), exact=True)
    rng, sizes = np.random.default_rng(params.seed), []
    for _ in range(max(math.ceil(epochs), 1)):
        shuffled = lengths[rng.permutation(len(lengths))]
        for i in range(0, len(shuffled), t.batch_size):
            rows = shuffled[i:i + t.batch_size]
            sizes.append(int(rows.sum()) if t.packing else len(rows) * math.ceil(rows.max() / 8) * 8)
    count = math.ceil(len(lengths) / t.batch_size)
    return dict(count=count, mean=float(np.mean(sizes)), largest=max(sizes), pairs=pairs / count,
                fill=float(lengths.sum()) / (count * np.mean(sizes)), exact=False)


def trainer_steps(count: int, params: Params, gpus: int) -> tuple[int, int, int]:
    """(micro-batches a rank an epoch, optimizer steps an epoch, steps): accelerate gives each rank
    ceil(count / gpus) micro-batches; the Trainer takes ceil(that / accumulation) steps an epoch."""
    t = params.train
    per_rank = math.ceil(count / gpus)
    per_epoch = max(math.ceil(per_rank / t.gradient_accumulation_steps), 1)
    return per_rank, per_epoch, t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)


def plan(params: Params, shape: Shape, lengths: np.ndarray, hw: Hardware) -> dict:
    """Steps, tokens, memory and time for `params` on `hw`; no I/O."""
    t = params.train
    if not len(lengths):
        raise StageError("the tokenized train split has no rows: nothing to plan")
    lengths = np.asarray(lengths, dtype=np.int64)
    on_gpu = hw.card is not None
    quantized = params.model.quantize == "4bit" or (params.model.quantize == "auto" and on_gpu)
    dtype_bytes = {"auto": 2 if on_gpu else 4, "bfloat16": 2, "float16": 2, "float32": 4}[params.model.dtype]
    ckpt = checkpointed_layers(shape.layers, t.checkpoint_fraction) if t.gradient_checkpointing else 0
    lora = shape.lora_parameters(params.lora.r, params.lora.target_modules)
    optimizer = "adamw_torch_fused" if hw.fsdp and "8bit" in t.optimizer else t.optimizer  # as train does

    bins = token_bins(lengths, t.batch_tokens, params.seed, "train") if t.batch_tokens else None
    per_rank, per_epoch, steps = trainer_steps(len(bins) if bins else math.ceil(len(lengths) / t.batch_size),
                                               params, hw.gpus)
    mb = micro_batches(lengths, params, bins, steps / per_epoch)
    done = (steps // per_epoch) * per_rank + min((steps % per_epoch) * t.gradient_accumulation_steps, per_rank)
    real_mean = float(lengths.sum()) / mb["count"]  # tokens counted (padding excluded)
    out = dict(
        base=shape.name, parameters=shape.total, layers=shape.layers, hidden=shape.hidden, vocab=shape.vocab,
        quantized=quantized, lora_parameters=lora, rows=len(lengths), tokens_per_epoch=int(lengths.sum()),
        length_max=int(lengths.max()), micro_batches_per_epoch=mb["count"], micro_batch_tokens_mean=real_mean,
        micro_batch_tokens_largest=mb["largest"], fill=mb["fill"], largest_exact=mb["exact"],
        gpus=hw.gpus, steps_per_epoch=per_epoch, steps=steps, epochs=done / per_rank,  # as the Trainer counts
        tokens_per_step=real_mean * t.gradient_accumulation_steps * hw.gpus,
        tokens_total=done * hw.gpus * real_mean, ckpt_layers=ckpt, optimizer=optimizer,
        card=hw.card.name if on_gpu else "CPU", detected=hw.detected,
    )
    # memory (GPU only: a CPU run lives in host memory, not planned)
    if on_gpu:
        fixed = fixed_bytes(shape, lora, optimizer, quantized, dtype_bytes, hw.gpus if hw.fsdp else 1)
        per_token = token_bytes(shape, ckpt, params.lora.dropout, dtype_bytes)
        out.update(fixed_gib=fixed / GIB, gib_per_1k_tokens=per_token * 1000 / GIB,
                   peak_gib=(fixed + per_token * mb["largest"]) / GIB, memory_gib=hw.card.memory_gib,
                   usable_gib=usable(hw.card))
    # time
    if on_gpu and hw.card.peak_tflops:
        micro = micro_batch_seconds(shape, hw.card, mb["mean"], mb["pairs"], ckpt, params.lora.dropout)
        step = micro * t.gradient_accumulation_steps + (SYNC_S * shape.layers / MISTRAL_7B.layers if hw.gpus > 1 else 0)
        out.update(step_seconds=step, seconds=step * steps, tokens_per_s=out["tokens_per_step"] / step,
                   mfu=useful_flops(shape, mb["mean"], mb["pairs"]) * t.gradient_accumulation_steps
                   / (step * hw.card.peak_tflops * 1e12))
    elif not on_gpu:
        import os

        flops = CPU_TOKENS_PER_S * 4.0 * SMOLLM2_135M.matmul * (os.cpu_count() or 1) / CPU_CORES
        step = useful_flops(shape, mb["mean"], mb["pairs"]) * t.gradient_accumulation_steps / flops
        out.update(step_seconds=step, seconds=step * steps, tokens_per_s=out["tokens_per_step"] / step)
    return out


def usable(card: Card) -> float:
    """GiB torch may allocate on the card: the reserved pool runs ~1% above allocated with expandable
    segments (55.93 for 55.46), and the CUDA context takes ~0.5-1 GiB outside it."""
    return (card.memory_gib - 1.0) / 1.02


def refusal(p: dict, params: Params, shape: Shape, lengths: np.ndarray, hw: Hardware) -> str | None:
    """None when the peak fits; else one line naming the keys to change and to what."""
    if "peak_gib" not in p or p["peak_gib"] <= p["usable_gib"]:
        return None
    t, limit = params.train, p["usable_gib"]
    where = f"{hw.card.name}{f' x {hw.gpus}' if hw.gpus > 1 else ''} ({limit:.1f} of {hw.card.memory_gib:.1f} GiB usable)"
    if p["fixed_gib"] >= limit:
        fix = "set model.quantize: 4bit" if not p["quantized"] else "use several GPUs (FSDP shards them) or a larger card"
        return (f"the base's weights and LoRA states alone need {p['fixed_gib']:.1f} GiB a GPU on {where}: {fix}")
    fit_tokens = int((limit - p["fixed_gib"]) * 1000 / p["gib_per_1k_tokens"])
    fixes = []
    if fit_tokens >= p["length_max"]:
        if t.batch_tokens:
            fixes.append(f"train.batch_tokens: {fit_tokens // 256 * 256} or less")
        else:
            rows = max(int(t.batch_size * fit_tokens / p["micro_batch_tokens_largest"]), 1)
            fixes.append(f"train.batch_size: {rows} or less")
            fixes.append(f"train.batch_tokens: {fit_tokens // 256 * 256} (it bounds every micro-batch)")
    recomputes_all = t.gradient_checkpointing and t.checkpoint_fraction == 1
    if not recomputes_all:
        full = replace(params, train=replace(t, gradient_checkpointing=True, checkpoint_fraction=1.0))
        q = plan(full, shape, lengths, hw)
        if q["peak_gib"] <= limit:
            key = "train.checkpoint_fraction: 1.0" if t.gradient_checkpointing else "train.gradient_checkpointing: true"
            fixes.append(f"{key} (~{q['peak_gib']:.1f} GiB)")
    if not fixes:  # not even one longest row, every layer checkpointed
        ck = token_bytes(shape, shape.layers, params.lora.dropout, 2) * 1000 / GIB
        longest = int((limit - p["fixed_gib"]) * 1000 / ck) // 256 * 256
        fixes.append(f"tokenize.max_length: {longest} or less"
                     + ("" if recomputes_all else " with train.gradient_checkpointing: true, checkpoint_fraction: 1.0"))
    return (f"a micro-batch of up to {p['micro_batch_tokens_largest']:,} tokens needs ~{p['peak_gib']:.1f} GiB a GPU "
            f"({p['fixed_gib']:.1f} + {p['gib_per_1k_tokens']:.2f} per 1k tokens), more than {where}: set "
            + "; or ".join(fixes))


# --- Reading: params, base shape, lengths, hardware ---------------------------------------------------

def shape_from_config(cfg: dict, name: str, parameters: int = 0) -> Shape:
    cfg = cfg.get("text_config") or cfg
    try:
        heads = cfg["num_attention_heads"]
        return Shape(name, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                     intermediate=cfg["intermediate_size"], heads=heads,
                     kv_heads=cfg.get("num_key_value_heads") or heads,
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                     tied=bool(cfg.get("tie_word_embeddings", False)), parameters=parameters)
    except KeyError as e:
        raise StageError(f"{name}: config.json has no {e.args[0]}; plan knows Llama-style decoders "
                         "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)") from None


def shape_from_gguf(path: Path) -> Shape:
    """The embedded model's shape from its GGUF header (memory-mapped; no weights read)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    get = lambda key: reader.fields[f"{arch}.{key}"].contents()  # noqa: E731
    heads = get("attention.head_count")
    return Shape(path.name, layers=get("block_count"), hidden=get("embedding_length"),
                 intermediate=get("feed_forward_length"), heads=heads,
                 kv_heads=get("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in reader.fields else heads,
                 head_dim=get("embedding_length") // heads, vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
                 tied=not any(t.name == "output.weight" for t in reader.tensors),
                 parameters=int(sum(int(t.n_elements) for t in reader.tensors)))


def base_shape(base: Path, params: Params) -> Shape:
    """models/base once imported; before that, what import_base will import (its config.json only)."""
    if (base / "config.json").exists():
        meta = orjson.loads((base / "base.json").read_bytes()) if (base / "base.json").exists() else {}
        return shape_from_config(orjson.loads((base / "config.json").read_bytes()), meta.get("source") or str(base),
                                 int(meta.get("parameters") or 0))
    source = params.model.source
    kind = source_kind(source)
    if kind == "embedded":
        from stages.import_base import embedded_gguf

        return replace(shape_from_gguf(embedded_gguf(source)), name=source)
    if kind == "local":
        config = Path(source).expanduser() / "config.json"
        if not config.exists():
            raise StageError(f"model.source={source}: no config.json there (and no {base}/config.json)")
        return shape_from_config(orjson.loads(config.read_bytes()), source)
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(source, "config.json", revision=params.model.revision)
    except Exception as e:  # offline, unknown repo, gated model: one clear line
        raise StageError(f"model.source={source}: cannot read its config.json from the hub ({type(e).__name__}); "
                         f"run `finetune import-base` first, or pass --base a model directory") from None
    return shape_from_config(orjson.loads(Path(config).read_bytes()), source)


def read_lengths(train_data: Path) -> np.ndarray:
    """Token lengths of a tokenized split, in row order (stages/tokens.py: no datasets, no torch)."""
    if not train_data.is_dir():
        raise StageError(f"{train_data}: no tokenized train split (run `finetune tokenize` or `dvc repro tokenize`)")
    return np.asarray(tokens.tokenized_lengths(train_data), dtype=np.int64)


def hardware(params: Params, gpu: str | None, gpus: int | None) -> Hardware:
    """--gpu: that card (no torch import); else what torch sees: its CUDA GPUs, or the CPU."""
    config = params.train.accelerate_config
    if gpu is not None:
        if gpu not in CARDS:
            raise StageError(f"--gpu {gpu}: not a card the plan knows; one of {', '.join(CARDS)}")
        card, count, detected = CARDS[gpu], gpus or 1, False
    else:
        import torch

        if not torch.cuda.is_available():
            return Hardware(None, 1, False, True)
        props = torch.cuda.get_device_properties(0)
        known = [c for key, c in CARDS.items() if key.split("-")[0] in props.name.lower()]
        card = replace(known[0], name=props.name, memory_gib=props.total_memory / GIB) if known else \
            Card(props.name, props.total_memory / GIB, None, "unknown card: pass --gpu for a time estimate")
        count, detected = gpus or torch.cuda.device_count(), True
    if config == "none":
        count = 1
    fsdp = False
    if count > 1:
        path = Path(__file__).resolve().parent.parent / "configs" / "fsdp.yaml" if config == "auto" else Path(config)
        from ruamel.yaml import YAML

        fsdp = (YAML(typ="safe").load(path.read_text()) or {}).get("distributed_type") == "FSDP"
    return Hardware(card, count, fsdp, detected)


def render(p: dict, params: Params, hw: Hardware) -> None:
    from rich.console import Console
    from rich.table import Table

    t = params.train
    gpus = f" x {p['gpus']}" if p["gpus"] > 1 else ""
    how = " (detected)" if p["detected"] else " (--gpu)" if hw.card else ""
    table = Table(title=f"finetune plan: {p['card']}{gpus}{how}",
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("base", f"{p['base']}: {p['parameters'] / 1e9:.2f}B parameters, {p['layers']} layers, hidden "
                  f"{p['hidden']}, vocab {p['vocab']:,}{', 4-bit NF4' if p['quantized'] else ''}")
    table.add_row("LoRA", f"r={params.lora.r}, {p['lora_parameters'] / 1e6:.1f}M trainable parameters")
    table.add_row("data", f"{p['rows']:,} rows, {p['tokens_per_epoch']:,} tokens, longest {p['length_max']:,}")
    batch = (f"<= {t.batch_tokens:,} tokens ({100 * p['fill']:.1f}% filled)" if t.batch_tokens
             else f"{t.batch_size} rows{'' if t.packing else ', padded'}")
    table.add_row("micro-batches", f"{p['micro_batches_per_epoch']:,} an epoch of {batch}; mean "
                  f"{p['micro_batch_tokens_mean']:,.0f} tokens, largest {p['micro_batch_tokens_largest']:,}"
                  f"{'' if p['largest_exact'] else ' (of a seeded shuffle)'}")
    table.add_row("steps", f"{p['steps']:,} ({p['epochs']:.2f} epochs of {p['steps_per_epoch']:,}; "
                  f"gradient accumulation {t.gradient_accumulation_steps}, {p['gpus']} process{'es' if p['gpus'] > 1 else ''})")
    table.add_row("tokens", f"~{p['tokens_per_step']:,.0f} a step, ~{p['tokens_total']:,.0f} in all")
    if "peak_gib" in p:
        ck = f"checkpointing {p['ckpt_layers']} of {p['layers']} layers" if p["ckpt_layers"] else "no checkpointing"
        table.add_row("peak GPU memory", f"{p['peak_gib']:.1f} GiB allocated a GPU ({p['fixed_gib']:.1f} fixed + "
                      f"{p['gib_per_1k_tokens']:.2f} per 1k tokens, {ck}); {p['usable_gib']:.1f} of "
                      f"{p['memory_gib']:.1f} GiB usable: fits")
    else:
        table.add_row("peak GPU memory", "- (CPU: the run uses host memory)")
    if "seconds" in p:
        mfu = f", {100 * p['mfu']:.1f}% MFU" if "mfu" in p else ""
        table.add_row("time", f"{_duration(p['seconds'])} ({p['step_seconds']:.2f} s a step, "
                      f"{p['tokens_per_s']:,.0f} tokens/s{mfu}), plus loading and the first step's compile")
    else:
        table.add_row("time", f"- ({hw.card.note})")
    Console().print(table)
    notes = []
    if hw.card is not None and params.model.attn_implementation not in ("varlen", "flash_attention_2"):
        notes.append(f"model.attn_implementation={params.model.attn_implementation}: the time is varlen's; "
                     "flex_attention compiles ~5 min on a fresh machine, sdpa on packed rows was ~9x slower")
    if hw.card is not None and hw.card.peak_tflops:
        notes.append(f"{hw.card.name}: {hw.card.peak_tflops:.0f} TFLOP/s bf16, {hw.card.note}")
    if hw.card is None:
        notes.append("CPU time: scaled from the shipped run's 142.8 tokens/s on 2 cores (metrics/train.json)")
    notes.append("measured at 7B on one H200: benchmarks/results/ (stages/plan.py MEASURED names the files)")
    for n in notes:
        Console().print(f"  {n}", style="dim", highlight=False)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run(params: Params, train_data: Path, base: Path, gpu: str | None = None, gpus: int | None = None) -> dict:
    shape = base_shape(base, params)
    lengths = read_lengths(train_data)
    hw = hardware(params, gpu, gpus)
    p = plan(params, shape, lengths, hw)
    problem = refusal(p, params, shape, lengths, hw)
    if problem:
        raise StageError(problem)
    render(p, params, hw)
    return p
