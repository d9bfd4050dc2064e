"""train: LoRA / QLoRA fine-tune of the base model on the tokenized train split, or a full fine-tune.

    finetune train --train data/tokenized/train --eval data/tokenized/eval --base models/base \
        --output models/adapter --metrics metrics/train.json --plots plots/train \
        --lineage-data data/raw/train.jsonl --lineage-rows data/mixed/train.jsonl
    (dvc.yaml stage `train`; params: seed, model.quantize/dtype/attn_implementation, lora, and the train
    keys that change the adapter; wandb and train's logging/checkpointing keys are read but not listed)

- What is trained: `train.method: lora` an adapter (DoRA, rsLoRA, the `lora.init` and `lora.modules_to_save`
  of params.yaml), models/adapter a peft adapter folder; `train.method: full` every weight of the unquantized
  base, models/adapter then a full model folder (config.json, model.safetensors, tokenizer). lineage.json
  sits in either; evaluate and merge tell them apart by adapter_config.json.
- Hardware (stages/modeling.py): 4-bit NF4 + double quant + bf16 compute on CUDA, float32 on CPU.
  With GPUs and no launcher around it, the command claims `train.gpus` of them (stages/gpus.py: locks
  shared by every experiment on the machine, so `dvc queue start -j K` runs side by side) and re-runs
  itself on them, under `accelerate launch --config_file configs/fsdp.yaml` when there are several
  (FSDP2 shards the 4-bit weights); rank 0 alone writes the adapter, metrics, plots and lineage.
- Batches: `train.packing` concatenates the rows of a micro-batch into one padding-free sequence
  (position_ids restart per row, so attention stays within a row); otherwise rows pad to the longest.
- Resumable: checkpoints go to checkpoints/train/<fingerprint of data+params+base>/ (outside DVC, which
  would delete its outputs before a re-run). A killed run restarted with the same data and params
  resumes from the last checkpoint; the folder is removed once the adapter is written. A checkpoint
  holds the Trainer's training_args.bin (a pickle of its settings, for resuming); models/adapter does not.
- Tracking: Hugging Face Trainer logs (progress bar, loss, lr, tokens/s); `--live dvclive`: the same
  figures every log line in dvclive/ (DVCLive), which `dvc exp show` shows while the experiment runs;
  W&B in `wandb.mode` (offline by default), the run named after the DVC experiment and carrying the lineage.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import torch
from transformers import TrainerCallback

from stages import gpus, lineage
from stages.batching import token_bins
from stages.errors import StageError
from stages.jsonl import die_with_parent, file_md5, write_json
from stages.modeling import read_base_json, under_fsdp
from stages.outputs import staged
from stages.params import MUTATES_BASE, Params, as_dict, load_params

log = logging.getLogger("finetune")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# train keys that change how a run is executed or logged, not the adapter (dvc.yaml leaves them out of
# train's params; tests/test_graph.py checks both lists against the adapter bytes)
OPERATIONAL = ("logging_steps", "save_steps", "save_total_limit", "checkpoint_sync", "gradient_checkpointing",
               "checkpoint_fraction")


def fingerprint(params: Params, train_data: Path, base_meta: dict) -> str:
    """Identifies a training run: same data, params and base -> same checkpoints folder. The OPERATIONAL
    keys are left out, so a run killed and restarted with, say, a new save_steps still resumes."""
    h = hashlib.sha256()
    relevant = {k: v for k, v in as_dict(params).items() if k in ("seed", "model", "lora", "train")}
    for key in OPERATIONAL:
        relevant["train"].pop(key)
    h.update(orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS))
    h.update(base_meta["sha256"].encode())
    for f in sorted(train_data.glob("*.arrow")):
        h.update(file_md5(f).encode())
    return h.hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint that was fully written. The Trainer writes trainer_state.json last, so a
    run killed while saving leaves a folder without it (or with it cut short), which is skipped."""
    steps = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in run_dir.glob("checkpoint-*")
                   if p.name.rsplit("-", 1)[1].isdigit())
    for _, path in reversed(steps):
        try:
            orjson.loads((path / "trainer_state.json").read_bytes())
            return str(path)
        except (OSError, orjson.JSONDecodeError):
            log.info("skipping incomplete checkpoint %s", path)
    return None


class CheckpointSync(TrainerCallback):
    """Mirrors every finished checkpoint to `train.checkpoint_sync` (any fsspec URL or folder), under the
    run's fingerprint, and fetches the newest one from there when this machine has none: a preempted
    run resumes on another machine. Uploads go to NAME.partial and are renamed when complete, so a
    half-uploaded checkpoint is never taken for a finished one."""

    def __init__(self, url: str, run_id: str, keep: int):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url)
        self.remote, self.keep = f"{root.rstrip('/')}/{run_id}", keep
        self.shown = f"{lineage.redact(url).rstrip('/')}/{run_id}"  # for log lines: no credentials

    def remote_checkpoints(self) -> list[str]:
        if not self.fs.exists(self.remote):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.remote, detail=False)]
        return sorted((n for n in names if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()),
                      key=lambda n: int(n.split("-", 1)[1]))

    def fetch_latest(self, run_dir: Path) -> None:
        remote = self.remote_checkpoints()
        if remote:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{self.remote}/{remote[-1]}", str(run_dir / remote[-1]), recursive=True)
            log.info("fetched %s from %s", remote[-1], self.shown)

    def clear(self) -> None:
        if self.fs.exists(self.remote):
            self.fs.rm(self.remote, recursive=True)

    def on_save(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        partial = f"{self.remote}/{name}.partial"
        self.fs.put(str(Path(args.output_dir) / name), partial, recursive=True)
        self.fs.mv(partial, f"{self.remote}/{name}", recursive=True)
        for old in self.remote_checkpoints()[:-self.keep]:
            self.fs.rm(f"{self.remote}/{old}", recursive=True)
        log.info("checkpoint %s mirrored to %s", name, self.shown)


def relaunch_under_accelerate(config: str, wanted: str | int) -> bool:
    """On a machine with GPUs and not yet under a launcher: claim `train.gpus` of them (stages/gpus.py:
    waits while other experiments hold them) and re-run this command on them, under `accelerate launch`
    when there are several (one process a GPU). The claim is this process's: it ends with it."""
    if "LOCAL_RANK" in os.environ or gpus.CLAIMED in os.environ:
        return False
    held = gpus.claim(1 if config == "none" else wanted)  # none = one process: one GPU
    if held is None:
        return False
    # in a child even for one GPU: CUDA_VISIBLE_DEVICES is read once, when CUDA starts (device_count did)
    cmd = [sys.executable, "-m", "stages.cli", *sys.argv[1:]]
    if len(held.gpus) > 1:
        config_file = CONFIGS / "fsdp.yaml" if config == "auto" else Path(config)
        cmd[1:3] = ["-m", "accelerate.commands.launch", "--config_file", str(config_file), "--num_processes",
                    str(len(held.gpus)), "--main_process_port", str(held.port), "-m", "stages.cli"]
    log.info("GPUs %s: %s", ",".join(held.gpus), " ".join(cmd))
    try:  # the launcher (and through it each rank, see `main`) ends with this process, even killed by SIGKILL
        subprocess.run(cmd, check=True, env={**os.environ, **held.env()},
                       preexec_fn=functools.partial(die_with_parent, os.getpid()))
    finally:
        held.release()
    return True


class ThroughputLog(TrainerCallback):
    """Adds tokens/s to every log line, and times each optimizer step (CUDA synchronised) for the
    steady-state figures in metrics/train.json, the set-up (loading, quantising, wrapping) and the
    first steps (which pay for kernel compilation: flex_attention's takes a minute or more)."""

    def __init__(self):
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]  # then one per step end
        self.t0, self.tokens0 = self.marks[0]

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or "loss" not in logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        logs["tokens_per_s"] = round((seen - self.tokens0) / max(now - self.t0, 1e-9), 1)
        self.t0, self.tokens0 = now, seen

    def summary(self) -> dict:
        """Whole run, and steady state: without the first 10 steps (a quarter of a short run), which pay
        for compilation, allocator growth and the first data loads."""
        (t_first, n_first), (t_last, n_last) = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        skip = min(10, steps // 4)
        t_skip, n_skip = self.marks[skip]
        out = {"tokens_per_s": round((n_last - n_first) / max(t_last - t_first, 1e-9), 1),
               "setup_seconds": round(t_first - self.started, 1),
               "first_steps_seconds": [round(b[0] - a[0], 2) for a, b in zip(self.marks[:10], self.marks[1:11])]}
        if steps > skip:
            out.update(tokens_per_s_steady=round((n_last - n_skip) / max(t_last - t_skip, 1e-9), 1),
                       step_seconds_steady=round((t_last - t_skip) / (steps - skip), 4),
                       steady_window=[skip + 1, steps])
        if torch.cuda.is_available():
            out["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        return out


class LiveProgress(TrainerCallback):
    """The current step, loss, learning rate and tokens/s while training, for `dvc exp show` and the VS Code
    extension: DVCLive rewrites `folder`/metrics.json (the latest values and the step) and appends to
    `folder`/plots/metrics/*.tsv at every log line. dvc.yaml declares both (cache: false), and `dvc exp show`
    reads a running experiment's metrics from its workspace (a queued one's: its temporary copy), so the
    row of a running experiment moves with the training. Rank 0 only (the callback is made there).
    metrics/train.json and plots/train stay what `dvc metrics diff` / `dvc plots diff` compare."""

    KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss")

    def __init__(self, folder: Path):
        from dvclive import Live

        # dvcyaml=False: dvc.yaml declares the folder already (DVCLive would write its own entries into it)
        self.live = Live(dir=str(folder), save_dvc_exp=False, dvcyaml=False)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not any(k in logs for k in self.KEYS):
            return
        self.live.step = state.global_step  # the Trainer's step, also after a resume
        for key in self.KEYS:
            if key in logs:
                self.live.log_metric(key, logs[key])
        self.live.log_metric("tokens_seen", int(state.num_input_tokens_seen), plot=False)
        self.live.next_step()

    def on_train_end(self, args, state, control, **kw):
        self.live.end()


def write_plots(history: list[dict], plots: Path) -> None:
    """Per-step curves for `dvc plots show`: loss.csv (train) and eval_loss.csv, in a new folder `plots`."""
    rows = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    plots.mkdir()
    for name, data, cols in (("loss.csv", rows, ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s")),
                             ("eval_loss.csv", evals, ("step", "eval_loss"))):
        with open(plots / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for h in data:
                w.writerow([h.get(c, "") for c in cols])


class FlattenRows:
    """DataCollatorWithFlattening over rows, or over the rows of TokenBins items (a micro-batch each)."""

    def __init__(self, **kwargs):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(**kwargs)

    def __call__(self, features):
        return self.flatten([r for f in features for r in (f["rows"] if "rows" in f else [f])])


class TokenBins(torch.utils.data.Dataset):
    """Micro-batches by token budget (`train.batch_tokens`) instead of by row count, so that every
    step's memory is bounded and known in advance and GPUs of a multi-GPU run get near-equal work.
    stages/batching.py packs the rows (seeded shuffle, then sequential greedy); the Trainer then
    shuffles the micro-batches every epoch, as it would shuffle rows."""

    def __init__(self, ds, budget: int, seed: int, split: str):
        import numpy as np

        lengths = np.asarray(ds["length"] if "length" in ds.column_names else [len(x) for x in ds["input_ids"]])
        self.bins = token_bins(lengths, budget, seed, split)
        self.ds = ds.select_columns(["input_ids", "labels"])
        self.fill = float(lengths.sum()) / max(len(self.bins) * budget, 1)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict:
        rows = self.ds[self.bins[i]]
        return {"rows": [{"input_ids": x, "labels": y} for x, y in zip(rows["input_ids"], rows["labels"])]}


def setup_wandb(params: Params, record: dict) -> list[str]:
    if params.wandb.mode == "disabled":
        return []
    import wandb

    os.environ["WANDB_MODE"] = params.wandb.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    wandb.init(project=params.wandb.project, entity=params.wandb.entity, mode=params.wandb.mode,
               name=record.get("dvc_experiment") or None, config={"params": record["params"], "lineage": record},
               job_type="train")
    return ["wandb"]


def checkpoint_some_layers(model, fraction: float) -> list[bool]:
    """Selective activation checkpointing: keep recomputation on `fraction` of the decoder layers, spread
    evenly (0.5: every other one), and store the activations of the others. Memory grows by the share
    not checkpointed (7B, no checkpointing: ~10 GiB per 1k tokens a step; all layers: ~1), the recompute
    (a forward of those layers, ~1/3 of their step time) shrinks by the same share."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = int((i + 1) * fraction) > int(i * fraction)
    if fraction < 1:
        log.info("gradient checkpointing on %d of %d layers (train.checkpoint_fraction=%s)",
            sum(layer.gradient_checkpointing for layer in layers), len(layers), fraction)
    return [layer.gradient_checkpointing for layer in layers]


def trainable_model(base: Path, params: Params, quantized: bool):
    """The base model (4-bit when `quantized`) with LoRA adapters, ready for the Trainer; with
    train.method=full, the base itself with every weight trainable (refused on 4-bit weights).
    lora.init pissa/olora move the base's principal part into the adapter: the adapter as initialised is
    kept (model.initial_adapter) so the one saved at the end is its difference, a LoRA on the unmodified base."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from stages.modeling import load_base_model

    lora, full = params.lora, params.train.method == "full"
    if quantized and (full or lora.init.startswith(MUTATES_BASE)):  # model.quantize=auto on CUDA (4bit: params)
        what = "train.method=full" if full else f"lora.init={lora.init}"
        raise StageError(f"{what} cannot train on the 4-bit base that model.quantize={params.model.quantize} loads "
                         "here: set model.quantize: none")
    if under_fsdp() and lora.init.startswith(MUTATES_BASE) and not full:  # peft converts only unsharded state dicts
        raise StageError(f"lora.init={lora.init} is saved by peft from the whole (unsharded) model, which FSDP "
                         "does not hold on one rank: set train.accelerate_config: none (one process) or lora.init: default")
    model = load_base_model(base, params.model, quantize=quantized)
    model.config.use_cache = False
    if params.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        checkpoint_some_layers(model, params.train.checkpoint_fraction)
    set_seed(params.seed)  # the LoRA A matrices are drawn here: the same seed gives the same adapter
    if full:
        log.info("full fine-tune: %s trainable parameters", f"{model.num_parameters():,}")
        return model
    target = lora.target_modules
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, (list, str)) else list(target), task_type="CAUSAL_LM",
        use_dora=lora.use_dora, use_rslora=lora.use_rslora,
        init_lora_weights=True if lora.init == "default" else lora.init,
        modules_to_save=list(lora.modules_to_save) or None,
        # lm_head and embed_tokens are one matrix in a tied model: training one as a module trains both, and
        # the merged model stays tied (without this peft unties them, the merged model a vocabulary x hidden larger)
        ensure_weight_tying=tied and bool(lora.modules_to_save)))
    # With lm_head (or embed_tokens) among the targets, peft's default ("auto") also saves the whole frozen
    # embedding and output layers in every checkpoint and the adapter: ~0.5 GB at 7B, the same bytes as the
    # base's. The Trainer calls save_pretrained without the option, so it is fixed here. (Modules in
    # lora.modules_to_save are saved either way: they are trained.)
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    if lora.init.startswith(MUTATES_BASE):
        model.initial_adapter = tempfile.TemporaryDirectory(prefix="finetune-initial-")  # removed with the model
        model.peft_config["default"].init_lora_weights = True  # how peft reloads it to subtract it: as it is
        model.save_pretrained(Path(model.initial_adapter.name) / "initial")
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d: %s trainable of %s parameters (%.2f%%)", lora.r, f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    return model


def run(train_data: Path, eval_data: Path | None, base: Path, output: Path, metrics: Path, plots: Path,
        checkpoints: Path, lineage_data: list[Path], params: Params, lineage_rows: Path | None = None,
        live: Path | None = None) -> dict:
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer import TRAINING_ARGS_NAME

    from stages.modeling import compute_dtype, load_tokenizer, use_4bit

    throughput = ThroughputLog()
    if not train_data.exists():
        raise StageError(f"{train_data}: no tokenized train split (run `finetune tokenize` or `dvc repro`)")
    t, seed = params.train, params.seed
    base_meta = read_base_json(base)
    train_ds = datasets.load_from_disk(str(train_data))
    eval_ds = datasets.load_from_disk(str(eval_data)) if eval_data and t.eval_steps > 0 else None
    ids = train_ds["id"]
    if not t.batch_tokens:
        keep = ["input_ids", "labels"]
        train_ds = train_ds.select_columns(keep)
        eval_ds = eval_ds.select_columns(keep) if eval_ds is not None else None

    quantized = use_4bit(params.model)
    tokenizer = load_tokenizer(base)
    model = trainable_model(base, params, quantized)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    record = lineage.build(params, base_meta, lineage_data, ids, quantized,
                           str(compute_dtype(params.model)).removeprefix("torch."),
                           lineage.row_sources(lineage_rows) if lineage_rows else None)
    run_id = fingerprint(params, train_data, base_meta)
    run_dir = checkpoints / run_id
    sync = CheckpointSync(t.checkpoint_sync, run_id, max(t.save_total_limit, 1)) if t.checkpoint_sync else None
    resume = last_complete_checkpoint(run_dir)
    if resume:
        log.info("resuming from %s (same data, params and base as the interrupted run)", resume)
    on_cuda = torch.cuda.is_available()
    optimizer = t.optimizer
    if under_fsdp() and "8bit" in optimizer:
        # bitsandbytes' 8-bit optimizers cannot step FSDP2's sharded DTensor parameters; the LoRA
        # parameters are few (85M for 7B at r=32), so full-precision AdamW states cost little.
        log.info("FSDP: train.optimizer=%s does not support sharded parameters; using adamw_torch_fused", optimizer)
        optimizer = "adamw_torch_fused"
    args = TrainingArguments(
        output_dir=str(run_dir),
        seed=seed, data_seed=seed,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, optim=optimizer, max_grad_norm=t.max_grad_norm,
        # with a token budget, a dataset item is a whole micro-batch of rows (TokenBins)
        per_device_train_batch_size=1 if t.batch_tokens else t.batch_size,
        per_device_eval_batch_size=1 if t.batch_tokens else t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps, num_train_epochs=t.epochs,
        logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=t.eval_steps or None,
        bf16=on_cuda and params.model.dtype in ("auto", "bfloat16"),
        use_cpu=not on_cuda,
        report_to=setup_wandb(params, record) if _is_main() else [],
        run_name=record.get("dvc_experiment"),
        include_num_input_tokens_seen="all" if t.packing else "non_padding",
        remove_unused_columns=False,
        dataloader_pin_memory=on_cuda,
        save_only_model=False,
    )
    if t.packing:
        # varlen attention reads the rows' boundaries (cu_seq_lens) from the batch, not from position ids
        collator = FlattenRows(return_flash_attn_kwargs=params.model.attn_implementation == "varlen")
        if t.batch_tokens:
            train_ds = TokenBins(train_ds, t.batch_tokens, seed, "train")
            eval_ds = TokenBins(eval_ds, t.batch_tokens, seed, "eval") if eval_ds is not None else None
            log.info("train.batch_tokens=%d: %d micro-batches of <= %d tokens (%.1f%% filled on average)",
                     t.batch_tokens, len(train_ds), t.batch_tokens, 100 * train_ds.fill)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, callbacks=[throughput] + ([sync] if sync else [])
                      + ([LiveProgress(live)] if live and _is_main() else []))  # after throughput: tokens/s
    if under_fsdp() and on_cuda and trainer.accelerator.state.fsdp_plugin.fsdp_version == 2:
        # accelerate's FSDP2 default casts the model's outputs (so the loss) to bf16 and reduces the LoRA
        # gradients in bf16: compute in bf16, but reduce in float32 and leave the float32 loss alone.
        from torch.distributed.fsdp import MixedPrecisionPolicy

        trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    result = trainer.train(resume_from_checkpoint=resume)
    if not _is_main():
        trainer.save_model(str(output))  # takes part in FSDP's gather of the full state dict; writes nothing
        return {}
    for config in getattr(model, "peft_config", {}).values():  # all-linear: a set, saved in this process's hash order
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "train_loss": round(result.training_loss, 6),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        **throughput.summary(),
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "trainable_parameters": trainable,
        "quantized_4bit": quantized,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # not in lineage.json: see stages/lineage.py
    }
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        summary["eval_loss_last"] = evals[-1]
    with staged(output, metrics, plots) as (adapter_tmp, metrics_tmp, plots_tmp):  # all three or none
        initial = getattr(model, "initial_adapter", None)
        if initial:  # pissa/olora: saved as (trained - initial), a rank-2r LoRA on the unmodified base
            model.save_pretrained = functools.partial(
                model.save_pretrained, path_initial_model_for_weight_conversion=f"{initial.name}/initial")
        trainer.save_model(str(adapter_tmp))  # full: config.json + model.safetensors
        if params.train.method == "full":
            tokenizer.save_pretrained(adapter_tmp)  # a model folder that loads on its own
        (adapter_tmp / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # training_args.bin, a pickle: checkpoints only
        write_json(adapter_tmp / "lineage.json", record)
        write_json(metrics_tmp, summary)
        write_plots(history, plots_tmp)
    shutil.rmtree(run_dir, ignore_errors=True)
    if sync:
        sync.clear()
    _finish_wandb(params)
    log.info("train: %d steps, loss %s -> %s, adapter in %s", summary["steps"], summary["first_loss"],
             summary["final_loss"], output)
    return summary


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _finish_wandb(params: Params) -> None:
    if params.wandb.mode != "disabled":
        import wandb

        if wandb.run is not None:
            wandb.finish()


def main(train_data, eval_data, base, output, metrics, plots, checkpoints, lineage_data, params_path,
         lineage_rows=None, live: Path | None = None) -> None:
    if "LOCAL_RANK" in os.environ:  # a rank started by the launcher (in a session of its own): ends with it
        die_with_parent(os.getppid())
    params = load_params(params_path)
    if params.train.checkpoint_sync and "LOCAL_RANK" not in os.environ:  # once, before any worker starts
        run_id = fingerprint(params, train_data, read_base_json(base))
        if not last_complete_checkpoint(checkpoints / run_id):
            CheckpointSync(params.train.checkpoint_sync, run_id, 1).fetch_latest(checkpoints / run_id)
    if relaunch_under_accelerate(params.train.accelerate_config, params.train.gpus):
        return
    run(train_data, eval_data, base, output, metrics, plots, checkpoints, list(lineage_data), params, lineage_rows,
        live)
