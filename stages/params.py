"""Typed, frozen view of params.yaml, loaded strictly.

Every stage reads its settings through `load_params(path)`. An unknown key (a typo in a hand edit or
in `dvc exp run -S +key=...`) or a value of the wrong type stops the stage with one line naming the
key and the file, and the closest valid key when there is one. params.yaml is read as YAML 1.2 (like
DVC), so `1e-4` is a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


class ParamsError(ValueError):
    """params.yaml does not fit the schema below."""


@dataclass(frozen=True)
class ModelParams:
    source: str = "embedded:smollm2-135m-instruct"
    revision: Optional[str] = None
    quantize: Literal["auto", "4bit", "none"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "varlen"] = "auto"
    copy_hub_weights: bool = False


@dataclass(frozen=True)
class DataParams:
    format: Literal["auto", "qa", "alpaca", "chat"] = "auto"
    field_map: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TemplateParams:
    name: Literal["qa", "alpaca", "chat"] = "qa"
    system_prompt: Optional[str] = None


@dataclass(frozen=True)
class ValidateParams:
    max_reject_fraction: float = 0.1
    max_chars: int = 20000


@dataclass(frozen=True)
class TokenizeParams:
    max_length: int = 512
    overlength: Literal["drop", "truncate"] = "truncate"
    train_on_prompt: bool = False
    batch_size: int = 1000


@dataclass(frozen=True)
class LoraParams:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"


@dataclass(frozen=True)
class TrainParams:
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 4
    batch_tokens: int = 0
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    epochs: float = 1.0
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = 1.0
    packing: bool = True
    eval_steps: int = 0
    logging_steps: int = 1
    save_steps: int = 10
    save_total_limit: int = 2
    checkpoint_sync: Optional[str] = None
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    accelerate_config: str = "auto"


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 8
    max_new_tokens: int = 64
    max_generate_rows: int = 0


@dataclass(frozen=True)
class MergeParams:
    into: Literal["base", "dequantized"] = "base"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    parity_prompts: int = 4
    parity_tolerance: float = 0.5


@dataclass(frozen=True)
class WandbParams:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "finetune"
    entity: Optional[str] = None


@dataclass(frozen=True)
class Params:
    seed: int = 42
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    template: TemplateParams = field(default_factory=TemplateParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    tokenize: TokenizeParams = field(default_factory=TokenizeParams)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    merge: MergeParams = field(default_factory=MergeParams)
    wandb: WandbParams = field(default_factory=WandbParams)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an int is a fine float (`lr: 1`), a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _build(cls: type, raw: Any, prefix: str, path: Path) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: '{prefix or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ParamsError(f"{path}: unknown key '{full}'{hint}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", path)
            continue
        if not _type_ok(value, tp):
            raise ParamsError(f"{path}: '{full}' must be {_describe(tp)}, got {value!r}")
        kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def parse_params(raw: dict, path: Path | str = "params.yaml") -> Params:
    return _build(Params, raw or {}, "", Path(path))


def load_params(path: Path | str = "params.yaml") -> Params:
    from ruamel.yaml import YAML

    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)")
    with path.open(encoding="utf-8") as f:
        raw = YAML(typ="safe", pure=True).load(f)
    return parse_params(raw, path)


def as_dict(params: Params) -> dict:
    return dataclasses.asdict(params)
