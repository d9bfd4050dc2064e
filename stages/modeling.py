"""Loading the base model, shared by train, evaluate and merge; the hardware policy:

- CUDA: compute in bfloat16; `model.quantize: auto|4bit` loads NF4 + double quantisation with
  `bnb_4bit_quant_storage=bfloat16`, so that FSDP can shard the quantised weights. Under FSDP there
  is no `device_map` (accelerate places the shards); under DDP each rank loads onto its own GPU.
- CPU: compute in float32 (bf16 is ~10x slower on CPUs); `auto` means no quantisation there, and
  `4bit` runs bitsandbytes' CPU kernels with float32 compute.
- Attention for packed batches: `model.attn_implementation: varlen` registers `varlen_attention` below
  with transformers' AttentionInterface: torch's own FlashAttention-2 varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`, CUDA only), which needs no compilation, where
  flex_attention compiles a kernel a layer shape on the first step (~5 minutes for a 32-layer 7B on
  a fresh machine). Measured on one H200 (torch 2.11, 16,456 packed tokens, Mistral-7B attention
  shape, fwd+bwd): varlen 2.46 ms, flex 2.95 ms, sdpa with a block-diagonal mask 61.6 ms.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson
import torch

from stages.errors import StageError
from stages.params import ModelParams

log = logging.getLogger("finetune")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_base_json(base: Path) -> dict:
    path = base / "base.json"
    if not path.exists():
        raise StageError(f"{path}: missing; run `finetune import-base` (or `dvc repro import_base`) first")
    return orjson.loads(path.read_bytes())


def weights_location(base: Path) -> tuple[str, str | None]:
    """Where the weights are: models/base itself, or a hub id at a pinned commit (not copied)."""
    meta = read_base_json(base)
    if meta.get("weights") == "hub":
        return meta["source"], meta["revision"]
    return str(base), None


def compute_dtype(params: ModelParams) -> torch.dtype:
    if params.dtype != "auto":
        return DTYPES[params.dtype]
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def use_4bit(params: ModelParams) -> bool:
    if params.quantize == "auto":
        on = torch.cuda.is_available()
        log.info("model.quantize=auto: %s", "4-bit NF4 (CUDA found)" if on else "no quantisation (no CUDA: CPU runs 16/32-bit)")
        return on
    return params.quantize == "4bit"


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def under_fsdp() -> bool:
    """Launched by `accelerate launch` with an FSDP config (it sets this variable for every rank)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, cu_seq_lens_q=None, max_length_q=None, position_ids=None, **kwargs):
    """A transformers attention function over a packed batch (batch 1, rows end to end): causal
    attention within each row, none across rows. The rows' boundaries come from the collator
    (`cu_seq_lens_q`/`max_length_q`, DataCollatorWithFlattening(return_flash_attn_kwargs=True)) or,
    failing that, from the position ids, which restart at 0 at every row."""
    from torch.nn.attention.varlen import varlen_attn

    if query.shape[0] != 1:
        raise StageError("model.attn_implementation=varlen needs packed, unpadded batches (train.packing: true); "
                         "use sdpa for padded batches")
    if cu_seq_lens_q is None:
        starts = torch.nonzero(position_ids.reshape(-1) == 0).reshape(-1)
        total = torch.tensor([position_ids.numel()], device=starts.device)
        cu_seq_lens_q = torch.cat([starts, total]).to(torch.int32)
        max_length_q = int(cu_seq_lens_q.diff().max())
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (heads, tokens, dim) -> (tokens, heads, dim)
    extra = {"window_size": (sliding_window - 1 if sliding_window else -1, 0)}  # (-1, 0): causal
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in _VARLEN_PARAMS:
            extra["enable_gqa"] = True
        else:  # torch < 2.13: one key/value head per query head
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling, **extra)
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), as the model expects


_VARLEN_PARAMS: set = set()


def register_varlen() -> None:
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface

    _VARLEN_PARAMS.update(inspect.signature(varlen_attn).parameters)
    AttentionInterface.register("varlen", varlen_attention)


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' sdpa for decoding steps (one query token), with grouped-query attention done by
    torch (enable_gqa) instead of repeating the K/V heads: under a padding mask transformers' sdpa copies
    the whole KV cache 4x (Mistral's 32 query / 8 KV heads) at every step, 109 ms a step for 128 rows of
    1,330 tokens at 7B vs 5.7 ms (H200, benchmarks/NOTES.md). Longer queries (prefill) take its own path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] > 1 or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register_sdpa_gqa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_gqa", sdpa_mask)


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(base: Path, params: ModelParams, quantize: bool | None = None, dtype: torch.dtype | None = None,
                    inference: bool = False, weights: Path | None = None):
    """The base model for training or evaluation: 4-bit when `quantize`, else in `dtype`; `weights`: a full
    fine-tune's model folder to load instead of the base's weights, the same way. For inference
    flex_attention and varlen become sdpa: they only pay off on packed training batches (and flex's
    compiled kernel fails to lower under no_grad in torch 2.11, benchmarks/results/fsdp_scaling_*.md)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    where, revision = (str(weights), None) if weights else weights_location(base)
    quantize = use_4bit(params) if quantize is None else quantize
    dtype = dtype or compute_dtype(params)
    kwargs: dict = {"dtype": dtype, "revision": revision}
    attn = params.attn_implementation
    if inference and attn in ("auto", "sdpa", "flex_attention", "varlen"):  # unpacked, padded batches
        attn = "sdpa_gqa"
        register_sdpa_gqa()
    if attn == "varlen":
        if not torch.cuda.is_available():
            raise StageError("model.attn_implementation=varlen needs a CUDA GPU (torch's FlashAttention kernel); "
                             "use auto or sdpa on CPU")
        register_varlen()
    if attn != "auto":
        kwargs["attn_implementation"] = attn
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # = the FSDP dtype, so the 4-bit weights shard
        )
    if torch.cuda.is_available() and not distributed():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif torch.cuda.is_available() and not under_fsdp():  # DDP: every rank holds the whole model on its GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif quantize and not torch.cuda.is_available():
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    log.info("loaded %s (%s, %s%s)", where, model.config.model_type, dtype, ", 4-bit NF4" if quantize else "")
    return model
