"""`finetune`: one subcommand per pipeline stage (dvc.yaml calls these), plus `lineage` and `chat`.

The only module that knows Typer. Stage modules are imported inside each command, so
`finetune validate` starts without loading torch. Each command declares what it reads and what it
writes (each output with its kind) and `stages.outputs.check` refuses, before anything is read or
written, an output that would lose something.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

# Before torch is imported (it may read this when it loads): micro-batches differ in shape from step to
# step, and without expandable segments the caching allocator reserved 139 GiB for 85 allocated (7B,
# 32 rows ~8k tokens, no checkpointing); with them 8k-token micro-batches took 56 for 55
# (benchmarks/results/train_throughput_*_h200_2026-12-01.json).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible QLoRA fine-tuning as a DVC pipeline. Stages: validate, mix, format, tokenize, "
                       "import-base, train, evaluate, merge, export, report; audit with `lineage`, talk to the model "
                       "with `chat`, estimate a run with `plan`.")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read")


def _params(path: Path):
    from stages.params import load_params

    return load_params(path)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def validate(
    input: Path = typer.Option(..., help="raw JSONL"),
    output: Path = typer.Option(..., help="clean rows (JSONL)"),
    rejects: Path = typer.Option(..., help="rejected lines with reasons (JSONL)"),
    report: Optional[Path] = typer.Option(None, help="counts per reason (JSON)"),
    params: Path = PARAMS,
) -> None:
    """Check, normalise and de-duplicate raw rows; every line ends in clean or rejects."""
    from stages.outputs import CLEAN, METRICS, REJECTS, check

    p = _params(params)
    check({"--input": input, "--params": params},
           {"--output": (output, CLEAN), "--rejects": (rejects, REJECTS), "--report": (report, METRICS)})
    from stages import validate as stage

    stage.run(input, output, rejects, report, p.data, p.validate)


@app.command()
def mix(
    train: Path = typer.Option(Path("data/clean/train.jsonl"), help="clean train rows"),
    eval: Path = typer.Option(Path("data/clean/eval.jsonl"), help="clean eval rows"),
    train_out: Path = typer.Option(Path("data/mixed/train.jsonl"), help="train rows, sources weighted"),
    eval_out: Path = typer.Option(Path("data/mixed/eval.jsonl"), help="eval rows (leaked ones dropped with drop)"),
    metrics: Path = typer.Option(Path("metrics/mix.json"), help="rows per source, leak counts (JSON)"),
    report: Path = typer.Option(Path("reports/leakage.jsonl"), help="each leaked eval row and its train match"),
    params: Path = PARAMS,
) -> None:
    """Weight the train sources (data.weights); check train/eval leakage (leakage.*)."""
    from stages.outputs import CLEAN, LEAKAGE, METRICS, check

    p = _params(params)
    check({"--train": train, "--eval": eval, "--params": params},
          {"--train-out": (train_out, CLEAN), "--eval-out": (eval_out, CLEAN), "--metrics": (metrics, METRICS),
           "--report": (report, LEAKAGE)})
    from stages import mix as stage

    stage.run(train, eval, train_out, eval_out, metrics, report, p.data, p.leakage, p.seed)


@app.command("format")
def format_(
    input: Path = typer.Option(..., help="clean rows"),
    output: Path = typer.Option(..., help="prompt/completion rows"),
    base: Optional[Path] = typer.Option(None, help="base model dir (its chat template, for template.name=chat)"),
    params: Path = PARAMS,
) -> None:
    """Render clean rows to prompt/completion pairs with the template from params."""
    from stages.outputs import PROMPTS, check

    p = _params(params)
    check({"--input": input, "--base": base, "--params": params}, {"--output": (output, PROMPTS)})
    from stages import format as stage

    n = stage.run(input, output, p.template, base)
    typer.echo(f"format {input}: {n} rows -> {output}", err=True)


@app.command()
def tokenize(
    input: Path = typer.Option(..., help="prompt/completion rows"),
    output: Path = typer.Option(..., help="tokenized dataset directory"),
    base: Path = typer.Option(Path("models/base"), help="base model dir (tokenizer.json, base.json)"),
    report: Optional[Path] = typer.Option(None, help="length distribution and counts (JSON)"),
    rejects: Optional[Path] = typer.Option(None, help="rows dropped, with reasons (JSONL)"),
    params: Path = PARAMS,
) -> None:
    """Tokenize with the base tokenizer; mask the prompt; apply the over-length policy."""
    from stages.outputs import METRICS, REJECTS, TOKENIZED, check

    p = _params(params)
    check({"--input": input, "--base": base, "--params": params},
           {"--output": (output, TOKENIZED), "--report": (report, METRICS), "--rejects": (rejects, REJECTS)})
    from stages import tokenize as stage

    s = stage.run(input, output, base, report, rejects, p.tokenize)
    typer.echo(f"tokenize {input}: {s['rows_out']}/{s['rows_in']} rows, {s['tokens_trained']} trained tokens, "
               f"p50/p99/max length {s['length_p50']:.0f}/{s['length_p99']:.0f}/{s['length_max']}", err=True)


@app.command("import-base")
def import_base(
    output: Path = typer.Option(Path("models/base"), help="where the base model goes"),
    params: Path = PARAMS,
) -> None:
    """Resolve model.source to a pinned local base model with a content hash."""
    from stages.outputs import BASE, check

    p = _params(params)
    source = Path(p.model.source).expanduser()
    check({"model.source": source if source.exists() else None, "--params": params},
          {"--output": (output, BASE)})
    from stages import import_base as stage

    meta = stage.run(output, p.model)
    typer.echo(f"import-base {meta['source']}: {meta['parameters']:,} parameters, sha256 {meta['sha256'][:12]}",
               err=True)


@app.command()
def train(
    train_data: Path = typer.Option(Path("data/tokenized/train"), "--train", help="tokenized train split"),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="tokenized eval split (eval every N steps)"),
    base: Path = typer.Option(Path("models/base")),
    output: Path = typer.Option(Path("models/adapter"), help="LoRA adapter (PEFT format)"),
    metrics: Path = typer.Option(Path("metrics/train.json")),
    plots: Path = typer.Option(Path("plots/train"), help="per-step loss / learning-rate curves"),
    checkpoints: Path = typer.Option(Path("checkpoints/train"), help="resumable checkpoints (outside DVC)"),
    lineage_data: List[Path] = typer.Option([], "--lineage-data", help="raw data files or source folders recorded in lineage"),
    lineage_rows: Optional[Path] = typer.Option(None, "--lineage-rows", help="the train rows with their source (mix's output): rows trained per source, in lineage"),
    params: Path = PARAMS,
    live: Optional[Path] = typer.Option(None, help="DVCLive folder: step, loss, tokens/s while training"),
) -> None:
    """QLoRA/LoRA fine-tune; several GPUs go through `accelerate launch` with an FSDP config."""
    from stages.outputs import ADAPTER, CHECKPOINTS, LIVE, METRICS, PLOTS, check

    _params(params)
    check({"--train": train_data, "--eval": eval_data, "--base": base, "--lineage-data": lineage_data,
           "--lineage-rows": lineage_rows, "--params": params},
           {"--output": (output, ADAPTER), "--metrics": (metrics, METRICS), "--plots": (plots, PLOTS),
            "--checkpoints": (checkpoints, CHECKPOINTS), "--live": (live, LIVE)})
    from stages import train as stage

    stage.main(train_data, eval_data, base, output, metrics, plots, checkpoints, lineage_data, params, lineage_rows,
               live)


@app.command()
def evaluate(
    adapter: Path = typer.Option(Path("models/adapter")),
    base: Path = typer.Option(Path("models/base")),
    tokenized: Path = typer.Option(Path("data/tokenized/eval"), help="tokenized eval split (loss)"),
    prompts: Path = typer.Option(Path("data/prompts/eval.jsonl"), help="eval prompts (generation)"),
    metrics: Path = typer.Option(Path("metrics/eval.json")),
    samples: Path = typer.Option(Path("reports/eval_samples.jsonl")),
    params: Path = PARAMS,
) -> None:
    """Loss, perplexity and generation metrics for the base and the tuned model, side by side."""
    from stages.outputs import METRICS, SAMPLES, check

    p = _params(params)
    check({"--adapter": adapter, "--base": base, "--tokenized": tokenized, "--prompts": prompts,
           "--params": params}, {"--metrics": (metrics, METRICS), "--samples": (samples, SAMPLES)})
    from stages import evaluate as stage

    stage.run(adapter, base, tokenized, prompts, metrics, samples, p)


@app.command()
def merge(
    adapter: Path = typer.Option(Path("models/adapter")),
    base: Path = typer.Option(Path("models/base")),
    output: Path = typer.Option(Path("models/merged")),
    prompts: Path = typer.Option(Path("data/prompts/eval.jsonl"), help="prompts for the parity check"),
    params: Path = PARAMS,
) -> None:
    """Merge the adapter into the 16-bit base; check logits parity; write a model card."""
    from stages.outputs import MERGED, check

    p = _params(params)
    check({"--adapter": adapter, "--base": base, "--prompts": prompts, "--params": params},
           {"--output": (output, MERGED), "--output (kept on a failed parity check)":
            (output.with_name(output.name + ".failed"), MERGED)})
    from stages import merge as stage

    stage.run(adapter, base, output, prompts, p)


@app.command()
def export(
    merged: Path = typer.Option(Path("models/merged")),
    prompts: Path = typer.Option(Path("data/prompts/eval.jsonl"), help="eval prompts for the parity check"),
    output: Path = typer.Option(Path("models/gguf"), help="GGUF files, parity.json, Modelfile"),
    metrics: Optional[Path] = typer.Option(None, help="the parity figures (JSON, for dvc metrics)"),
    params: Path = PARAMS,
) -> None:
    """GGUF files for llama.cpp/Ollama (llama.cpp's converter and quantizer); parity measured in llama.cpp."""
    from stages.outputs import GGUF, METRICS, check

    p = _params(params)
    check({"--merged": merged, "--prompts": prompts, "--params": params},
          {"--output": (output, GGUF), "--output (kept on a failed parity check)":
           (output.with_name(output.name + ".failed"), GGUF), "--metrics": (metrics, METRICS)})
    from stages import export as stage

    report = stage.run(merged, prompts, output, metrics, p.export)
    for t, f in report["types"].items():
        typer.echo(f"export {output}/{f['file']}: agreement {f['agreement']:.2%}, answer perplexity "
                   f"{f['ppl_change']:+.2%} vs {merged} (llama.cpp)", err=True)


@app.command()
def plan(
    train_data: Path = typer.Option(Path("data/tokenized/train"), "--train", help="tokenized train split"),
    base: Path = typer.Option(Path("models/base"), help="base model dir (else model.source's config is read)"),
    gpu: Optional[str] = typer.Option(None, help="plan for this card, not the detected one: h200, h100-80gb, a100-80gb"),
    gpus: Optional[int] = typer.Option(None, min=1, help="GPUs to plan for (default: those detected, or 1 with --gpu)"),
    params: Path = PARAMS,
) -> None:
    """Before training: steps, tokens, peak GPU memory and time for these params; exit 1 if it cannot fit."""
    p = _params(params)
    from stages import plan as stage

    stage.run(p, train_data, base, gpu, gpus)


@app.command()
def lineage(
    model_dir: Path = typer.Argument(..., help="models/adapter, models/merged or an exported .gguf file"),
    verify: bool = typer.Option(False, "--verify", help="check data, base and dvc.lock on disk; exit 1 on mismatch"),
    lock: Path = typer.Option(Path("dvc.lock"), help="dvc.lock of the repo that made the model (its data and "
                                                      "models/base are found beside it)"),
) -> None:
    """Which base, data, rows, params and commit produced this model (a folder or a GGUF file)."""
    from stages import lineage as lin

    record = lin.read(model_dir)
    typer.echo(lin.describe(record))
    if verify:
        problems = lin.verify(record, lock)
        for p in problems:
            typer.echo(f"MISMATCH {p}", err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo("verified: data, base and dvc.lock match this model's lineage")


@app.command()
def chat(
    model: Path = typer.Argument(..., help="models/merged, or models/adapter (with --base)"),
    base: Path = typer.Option(Path("models/base"), help="the base an adapter was trained on (not read for a merged "
                                                        "model)"),
    once: Optional[str] = typer.Option(None, "--once", help="answer this one question, print it and exit"),
    max_new_tokens: int = typer.Option(256, min=1, help="the longest answer, in tokens"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy (as evaluate); above 0 samples"),
) -> None:
    """Talk to the tuned model in the template it was trained with (from its lineage); streams answers."""
    from stages import chat as command

    command.run(model, base, once, max_new_tokens, temperature)


@app.command()
def report(
    validate: List[Path] = typer.Option([Path("metrics/validate_train.json"), Path("metrics/validate_eval.json")],
                                        help="validate's report, one per split"),
    tokenize: List[Path] = typer.Option([Path("metrics/tokenize_train.json"), Path("metrics/tokenize_eval.json")],
                                        help="tokenize's report, one per split, in the order of --validate"),
    tokenized: List[Path] = typer.Option([Path("data/tokenized/train"), Path("data/tokenized/eval")],
                                         help="tokenized split (its `length` column; its name labels the split)"),
    loss: Path = typer.Option(Path("plots/train/loss.csv")),
    eval_loss: Path = typer.Option(Path("plots/train/eval_loss.csv")),
    train_metrics: Path = typer.Option(Path("metrics/train.json")),
    eval_metrics: Path = typer.Option(Path("metrics/eval.json")),
    samples: Path = typer.Option(Path("reports/eval_samples.jsonl")),
    merge_parity: Path = typer.Option(Path("models/merged/parity.json")),
    lineage: Path = typer.Option(Path("models/merged/lineage.json")),
    export_parity: Optional[Path] = typer.Option(None, help="the export's parity.json; without it the page says "
                                                           "'not exported'"),
    output: Path = typer.Option(Path("reports/run.html")),
    screenshot: Optional[Path] = typer.Option(None, help="also open the page in headless Chromium and save it "
                                                        "as this PNG (fails on any console error)"),
) -> None:
    """One self-contained HTML page for the run: data, training, base vs tuned, parity, lineage."""
    from stages.outputs import REPORT, SCREENSHOT, check

    check({"--validate": validate, "--tokenize": tokenize, "--tokenized": tokenized, "--loss": loss,
           "--eval-loss": eval_loss, "--train-metrics": train_metrics, "--eval-metrics": eval_metrics,
           "--samples": samples, "--merge-parity": merge_parity, "--lineage": lineage,
           "--export-parity": export_parity},
          {"--output": (output, REPORT), "--screenshot": (screenshot, SCREENSHOT)})
    from stages import report as stage

    seen = stage.run(validate, tokenize, tokenized, loss, eval_loss, train_metrics, eval_metrics, samples,
                     merge_parity, lineage, export_parity, output, screenshot)
    typer.echo(f"report: {output}" + (f", screenshot {screenshot} (no console errors)" if seen else ""), err=True)


def main() -> None:
    from stages.errors import StageError
    from stages.params import ParamsError

    try:
        app()
    except (StageError, ParamsError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
