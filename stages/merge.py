"""merge: fold the LoRA adapter into the 16-bit base and save a plain transformers model (a full fine-tune:
save it again, in merge.dtype, with the same parity check, lineage and model card).

    finetune merge --adapter models/adapter --base models/base --output models/merged \
        --prompts data/prompts/eval.jsonl
    (dvc.yaml stage `merge`; params: merge)

`merge.into`:
  base         the 16-bit base weights (the usual choice; what users load)
  dequantized  the NF4 weights the adapter trained against, dequantised (closest to the trained model);
               refused for an adapter trained on the unquantized base
The base is loaded as train loaded it (attn_implementation, quantization: the adapter's lineage.json,
not today's params.yaml), and only the base the adapter was trained on is accepted (else one line).
The merge runs in float32 (on the GPU when there is one: a 7B model is 29 GB there, and its parity forwards
take seconds instead of minutes on CPU) and the result is saved in `merge.dtype` (auto = the base's storage dtype).
Parity: the saved model is reloaded, and its logits on `merge.parity_prompts` eval rows (prompt +
completion, as the tokenize stage encodes them: stages/tokens.py) are compared with the unmerged
reference (the same base + adapter); the max |difference| and top-1 agreement are
written to parity.json and the stage fails past `merge.parity_tolerance`. The output folder is replaced
atomically, so running the stage twice is harmless. A model card README.md carries the lineage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from stages import lineage, tokens
from stages.errors import StageError
from stages.jsonl import atomic_path, read_jsonl, write_json
from stages.params import Params

log = logging.getLogger("finetune")


@torch.no_grad()
def logits_for(model, prompts: list[list[int]]) -> torch.Tensor:
    """The logits at every position of each prompt (token ids), one row at a time, concatenated (on CPU)."""
    device = next(model.parameters()).device
    return torch.cat([model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts])


def base_for_merge(base: Path, adapter: Path, record: dict, into: str):
    from stages.modeling import load_base_model

    trained = lineage.trained_model(record)
    if into == "base":
        return load_base_model(base, trained, quantize=False, dtype=torch.float32, inference=True)  # on the GPU if any
    if trained.quantize != "4bit":
        raise StageError(f"merge.into=dequantized: {adapter} was trained on the unquantized base (its lineage.json "
                         f"has model.quantize={trained.quantize}), so there are no NF4 weights to dequantize; "
                         "set merge.into: base")
    model = load_base_model(base, trained, quantize=True, dtype=torch.float32, inference=True)
    return model.dequantize().to(torch.float32)


def model_card(record: dict, parity: dict) -> str:
    b = record["base"]
    data = "\n".join(f"| `{d['path']}` | `{d['md5']}` |" for d in record["data"])
    what = ("Full fine-tune of the base" if record["merge"].get("method") == "full" else
            f"LoRA adapter merged into the base ({record['merge']['into']})")
    return f"""---
base_model: {b['source']}
library_name: transformers
tags: [finetune, lora, qlora, dvc]
---
# Fine-tuned {b['source']}

{what} by the `finetune` DVC pipeline.

| what | value |
|---|---|
| base | `{b['source']}` sha256 `{b['sha256'][:16]}` ({b['parameters']:,} parameters) |
| trained rows | {record['rows']['count']} (ids sha256 `{record['rows']['ids_sha256'][:16]}`) |
| code | commit `{record['git']['commit']}`{' (uncommitted changes)' if record['git']['dirty'] else ''} |
| experiment | {record.get('dvc_experiment') or '-'} |
| parity (max abs logit diff vs base+adapter) | {parity['max_abs_diff']:.4g} (top-1 agreement {parity['top1_agreement']:.2%}) |

| data file | md5 |
|---|---|
{data}

Load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`; `finetune lineage <this folder> --verify`
checks the data and base on disk against this record.
"""


def run(adapter: Path, base: Path, output: Path, prompts_path: Path, params: Params) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.modeling import DTYPES, load_base_model, load_tokenizer, read_base_json

    full = not (adapter / "adapter_config.json").exists()
    if full and not (adapter / "config.json").exists():
        raise StageError(f"{adapter}: neither adapter_config.json (an adapter) nor config.json (a full fine-tune) "
                         "(run `finetune train` or `dvc repro train`)")
    m = params.merge
    if full and m.into != "base":
        raise StageError(f"merge.into={m.into}: {adapter} is a full fine-tune (train.method=full), with no adapter "
                         "and no NF4 weights; set merge.into: base")
    record = lineage.read(adapter)
    lineage.require_base(record, base, adapter)
    tokenizer = load_tokenizer(base)
    rows = list(read_jsonl(prompts_path))[:m.parity_prompts]
    if not rows:
        raise StageError(f"{prompts_path}: no prompts for the parity check")
    ids_tokenizer, eos_id = tokens.load_tokenizer(base)  # the training rows' ids: data text stays text
    prompts = tokens.prompt_ids(rows, ids_tokenizer, tokens.layout(ids_tokenizer), eos_id, completion=True)

    if full:  # the trained model itself, saved again in merge.dtype: a copy when the dtypes agree
        merged = load_base_model(base, lineage.trained_model(record), quantize=False, dtype=torch.float32,
                                 inference=True, weights=adapter).eval()
        reference = logits_for(merged, prompts)
    else:
        merged = PeftModel.from_pretrained(base_for_merge(base, adapter, record, m.into), adapter).eval()
        reference = logits_for(merged, prompts)
        merged = merged.merge_and_unload()
    storage = read_base_json(base).get("dtype") or str(merged.config.dtype or "bfloat16").replace("torch.", "")
    dtype = DTYPES.get(storage, torch.bfloat16) if m.dtype == "auto" else DTYPES[m.dtype]
    with atomic_path(output) as tmp:
        merged.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, device_map=device_map).eval()
        got = logits_for(reloaded, prompts)
        parity = {
            "max_abs_diff": float((got - reference).abs().max()),
            "mean_abs_diff": float((got - reference).abs().mean()),
            "top1_agreement": float((got.argmax(-1) == reference.argmax(-1)).float().mean()),
            "prompts": len(prompts), "tokens": int(reference.shape[0]),
            "saved_dtype": str(dtype).replace("torch.", ""), "tolerance": m.parity_tolerance,
        }
        record["merge"] = {"into": m.into, "method": "full" if full else "lora",
                           "parity_max_abs_diff": parity["max_abs_diff"], "saved_dtype": parity["saved_dtype"]}
        write_json(tmp / "parity.json", parity)
        write_json(tmp / "lineage.json", record)
        (tmp / "README.md").write_text(model_card(record, parity))
        log.info("merge: parity max |dlogit| %.4g, mean %.3g, top-1 agreement %.2f%% (%s)", parity["max_abs_diff"],
                 parity["mean_abs_diff"], 100 * parity["top1_agreement"], parity["saved_dtype"])
        if parity["max_abs_diff"] > m.parity_tolerance:
            kept = output.with_name(output.name + ".failed")
            with atomic_path(kept) as kept_tmp:
                shutil.copytree(tmp, kept_tmp)
            raise StageError(f"{output}: merged logits differ from base+adapter by {parity['max_abs_diff']:.4g} > "
                             f"merge.parity_tolerance={m.parity_tolerance}; the merged model is kept in {kept} "
                             "for inspection (try merge.dtype=float32)")
    return parity
