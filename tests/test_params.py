"""params.yaml is checked whole: the file, every key (present, known, typed, in its domain), the rules
across keys; each problem is one line. Through load_params/parse_params and through the real CLI."""

import copy
import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from stages import params as P
from stages.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = YAML(typ="safe").load((ROOT / "params.yaml").read_text())


def changed(key: str, value, raw: dict | None = None) -> dict:
    """The shipped params with one key set (or deleted, for value=DELETE)."""
    raw = copy.deepcopy(raw or SHIPPED)
    *sections, name = key.split(".")
    node = raw
    for s in sections:
        node = node[s]
    if value is DELETE:
        del node[name]
    else:
        node[name] = value
    return raw


DELETE = object()


def all_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(P.Params):
        if dataclasses.is_dataclass(f.type):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.type)]
        else:
            keys.append(f.name)
    return keys


def write(tmp_path: Path, raw) -> Path:
    f = tmp_path / "params.yaml"
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False  # one key a line, so that tests can edit the text
    with f.open("w") as out:
        yaml.dump(raw, out)
    return f


# --- the shipped files ------------------------------------------------------------------------------

def test_project_params_load_with_every_section():
    p = load_params(ROOT / "params.yaml")
    assert p.model.source == "embedded:smollm2-135m-instruct"
    assert p.template.name == "qa"
    assert isinstance(p.train.learning_rate, float)


def test_shipped_gpu_params_file_fits_the_schema():
    p = load_params(ROOT / "configs/params-mistral7b-gpu.yaml")
    assert p.model.source == "mistralai/Mistral-7B-v0.1" and p.lora.r == 32 and "lm_head" in p.lora.target_modules
    assert p.model.revision and p.train.optimizer == "paged_adamw_8bit" and p.train.max_steps == -1


def test_checking_the_shipped_files_imports_neither_torch_nor_transformers():
    code = ("import sys; from stages.params import load_params; load_params('params.yaml'); "
            "load_params('configs/params-mistral7b-gpu.yaml'); print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_params_are_frozen():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.max_steps = 3  # type: ignore[misc]


# --- defaults: params.yaml is the only source ---------------------------------------------------------

def test_the_dataclasses_carry_no_defaults():
    sections = [P.Params] + [f.type for f in dataclasses.fields(P.Params) if dataclasses.is_dataclass(f.type)]
    with_default = [f"{cls.__name__}.{f.name}" for cls in sections for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == []


@pytest.mark.parametrize("key", ["train.learning_rate", "tokenize.max_length", "train.max_steps", "seed", "evaluate"])
def test_a_missing_key_is_an_error_not_a_code_default(key):
    with pytest.raises(ParamsError) as e:
        parse_params(changed(key, DELETE), "p.yaml")
    msg = str(e.value)
    assert msg.startswith("p.yaml: missing key(s) ") and f"'{key}'" in msg and "\n" not in msg


def test_a_partial_file_names_every_missing_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 1\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert "'model'" in msg and "'train.batch_size'" in msg and "'train.learning_rate'" not in msg


# --- unknown keys and types ---------------------------------------------------------------------------

def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  learnig_rate: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert str(f) in msg and "'train.learnig_rate'" in msg and "did you mean 'train.learning_rate'" in msg


def test_unknown_top_level_section(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ParamsError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_params(f)


@pytest.mark.parametrize("key, value", [
    ("train.max_steps", "ten"), ("train.max_steps", 1.5), ("train.packing", "yes"), ("train.packing", 1),
    ("model.quantize", "8bit"), ("lora.r", True), ("seed", None), ("train.learning_rate", True),
    ("model", [1]), ("train.lr_scheduler", 1),
])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ParamsError, match=f"'{key}' must be"):
        parse_params(changed(key, value), "p.yaml")


def test_yaml_1_2_scientific_notation_is_a_float_and_ints_are_fine_floats(tmp_path):
    raw = changed("train.warmup_ratio", 0)
    f = write(tmp_path, raw)
    f.write_text(f.read_text().replace("learning_rate: 0.001", "learning_rate: 1e-4"))
    p = load_params(f)
    assert p.train.learning_rate == pytest.approx(1e-4) and p.train.warmup_ratio == 0.0
    assert type(p.train.warmup_ratio) is float


# --- domains: at least one value out of its domain for every key --------------------------------------

OUT_OF_DOMAIN = [
    ("seed", -1), ("seed", 2**32), ("seed", 1.0),
    ("model.source", ""), ("model.source", "not-a-dir-nor-hub-id"), ("model.source", "embedded:nope"),
    ("model.revision", ""), ("model.quantize", "8bit"), ("model.dtype", "fp8"), ("model.attn_implementation", "flash"),
    ("model.copy_hub_weights", "no"),
    ("data.format", "csv"), ("data.field_map", {"q": "question"}), ("data.field_map", {"": "input"}),
    ("data.field_map", {"q": 1}), ("data.field_map", {"q": ["input"]}), ("data.field_map", ["input"]),
    ("template.name", "llama"), ("template.system_prompt", ""), ("template.system_prompt", 3), ("template.train_on", "first"),
    ("validate.max_reject_fraction", -0.1), ("validate.max_reject_fraction", 1.5),
    ("validate.max_reject_fraction", float("nan")), ("validate.max_chars", 0),
    ("tokenize.max_length", 1), ("tokenize.overlength", "cut"), ("tokenize.train_on_prompt", "false"),
    ("tokenize.batch_size", 0),
    ("lora.r", 0), ("lora.alpha", 0), ("lora.alpha", -32), ("lora.dropout", 1.0), ("lora.dropout", -0.1),
    ("lora.target_modules", []), ("lora.target_modules", ""), ("lora.target_modules", ["q_proj", 1]),
    ("lora.target_modules", {"q_proj": 1}), ("lora.use_dora", "yes"), ("lora.use_rslora", 1),
    ("lora.init", "loftq"), ("lora.init", "pissa_niter_"), ("lora.init", "pissa_niter_-1"), ("lora.init", True),
    ("lora.modules_to_save", "lm_head"), ("lora.modules_to_save", [""]), ("lora.modules_to_save", None),
    ("train.learning_rate", 0), ("train.learning_rate", -1e-4), ("train.learning_rate", float("inf")),
    ("train.lr_scheduler", "cosinus"), ("train.lr_scheduler", "cosine_with_min_lr"),
    ("train.warmup_ratio", 3), ("train.warmup_ratio", 1.0), ("train.warmup_ratio", -0.1),
    ("train.weight_decay", -0.01), ("train.batch_size", 0), ("train.gradient_accumulation_steps", 0),
    ("train.batch_tokens", -1), ("train.checkpoint_fraction", 1.5), ("train.checkpoint_fraction", -0.1),
    ("train.max_steps", 0), ("train.max_steps", -2), ("train.epochs", 0), ("train.epochs", -1.0),
    ("train.gradient_checkpointing", None), ("train.packing", "true"), ("train.eval_steps", -1),
    ("train.logging_steps", 0), ("train.save_steps", 0), ("train.save_total_limit", 0),
    ("train.checkpoint_sync", ""), ("train.checkpoint_sync", "nosuch://bucket/runs"),
    ("train.checkpoint_sync", "memory://ckpt?region=eu"), ("train.checkpoint_sync", "file:///tmp/ckpt#frag"),
    ("train.optimizer", "adamw"), ("train.optimizer", "galore_adamw"), ("train.max_grad_norm", -1.0),
    ("train.accelerate_config", "no-such-config.yaml"), ("train.accelerate_config", ""),
    ("train.method", "qlora"),
    ("train.gpus", 0), ("train.gpus", "some"), ("train.gpus", True), ("train.gpus", 1.5),
    ("evaluate.batch_size", -1), ("evaluate.batch_size", 0), ("evaluate.max_new_tokens", 0),
    ("evaluate.max_generate_rows", -1),
    ("merge.into", "lora"), ("merge.dtype", "int8"), ("merge.parity_prompts", -1), ("merge.parity_prompts", 0),
    ("merge.parity_tolerance", 0), ("merge.parity_tolerance", -0.5),
    ("export.types", ["q4_0"]), ("export.types", ["f16", "f16"]), ("export.types", "f16"),
    ("export.parity_prompts", 0), ("export.parity_tokens", 0), ("export.min_agreement_16bit", 1.5),
    ("export.max_ppl_change_q8_0", -0.01), ("export.max_ppl_change_q4_k_m", "10%"),
    ("wandb.mode", "on"), ("wandb.project", "team/finetune"), ("wandb.project", ""), ("wandb.project", "x" * 129),
    ("wandb.entity", ""),
    ("data.train", ""), ("data.train", "/abs/train.jsonl"), ("data.eval", "../outside.jsonl"),
    ("data.weights", {"a.jsonl": 0}), ("data.weights", {"a.jsonl": -1.0}), ("data.weights", {"a.jsonl": "2"}),
    ("data.weights", {"a.jsonl": True}), ("leakage.action", "warn"), ("leakage.threshold", 0.0),
    ("leakage.threshold", 1.5), ("leakage.max_fraction", -0.1),
]


def test_the_table_covers_every_key():
    assert sorted(set(all_keys()) - {k for k, _ in OUT_OF_DOMAIN}) == []


@pytest.mark.parametrize("key, value", OUT_OF_DOMAIN, ids=[f"{k}={v!r}"[:60] for k, v in OUT_OF_DOMAIN])
def test_out_of_domain_value_is_one_line_naming_key_value_and_domain(key, value):
    with pytest.raises(ParamsError) as e:
        parse_params(changed(key, value), "p.yaml")
    msg = str(e.value)
    shown = repr(P.redact(value))  # a URL's credentials and query are not echoed
    assert msg.startswith(f"p.yaml: '{key}' must be ") and f"got {shown}" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("changes, message", [
    ({"train.batch_tokens": 100}, r"'train.batch_tokens' = 100 is below tokenize.max_length = 256"),
    ({"train.batch_tokens": 4096, "train.packing": False}, r"'train.batch_tokens' needs train.packing: true"),
    ({"model.attn_implementation": "varlen", "train.packing": False}, r"'varlen' needs train.packing: true"),
])
def test_batching_keys_that_disagree_are_one_line(changes, message):
    raw = None
    for key, value in changes.items():
        raw = changed(key, value, raw)
    with pytest.raises(ParamsError, match=message):
        parse_params(raw, "p.yaml")


@pytest.mark.parametrize("changes, message", [
    ({"train.method": "full", "model.quantize": "4bit"},
     r"'train.method' = 'full' trains every weight, and 4-bit weights cannot be trained: set model.quantize: none"),
    ({"lora.init": "pissa", "model.quantize": "4bit"}, r"'lora.init' = 'pissa' .* 4-bit .* set model.quantize: none"),
    ({"lora.init": "pissa_niter_4", "model.quantize": "4bit"}, r"'lora.init' = 'pissa_niter_4' .* 4-bit"),
    ({"lora.init": "olora", "model.quantize": "4bit"}, r"'lora.init' = 'olora' .* OLoRA re-quantizes"),
    ({"lora.init": "pissa", "lora.use_dora": True}, r"'lora.init' = 'pissa' .* DoRA's magnitudes: set lora.use_dora"),
    ({"lora.init": "olora", "lora.modules_to_save": ["lm_head"]},
     r"modules_to_save's weights: set lora.modules_to_save: \[\]"),
])
def test_lora_variants_peft_cannot_train_or_save_exactly_are_one_line(changes, message):
    raw = None
    for key, value in changes.items():
        raw = changed(key, value, raw)
    with pytest.raises(ParamsError, match=message) as e:
        parse_params(raw, "p.yaml")
    assert "\n" not in str(e.value)


def test_lora_variants_that_do_fit_are_accepted():
    for changes in ({"lora.use_dora": True, "model.quantize": "4bit", "lora.modules_to_save": ["lm_head"]},
                    {"lora.init": "pissa", "lora.use_rslora": True}, {"lora.init": "gaussian", "model.quantize": "4bit"},
                    {"train.method": "full", "lora.init": "pissa", "model.quantize": "none"}):
        raw = None
        for key, value in changes.items():
            raw = changed(key, value, raw)
        assert parse_params(raw) is not None, changes


def test_excluded_library_names_say_why():
    with pytest.raises(ParamsError, match=r"got 'warmup_stable_decay' \(it needs lr_scheduler_kwargs"):
        parse_params(changed("train.lr_scheduler", "warmup_stable_decay"), "p.yaml")
    with pytest.raises(ParamsError, match=r"got 'apollo_adamw' \(it needs optim_target_modules"):
        parse_params(changed("train.optimizer", "apollo_adamw"), "p.yaml")


def finetune_validate(tmp_path: Path, params_file: Path) -> subprocess.CompletedProcess:
    (tmp_path / "raw.jsonl").write_text('{"input": "a", "output": "b"}\n')
    return subprocess.run([sys.executable, "-m", "stages.cli", "validate", "--input", "raw.jsonl", "--output",
                           "clean.jsonl", "--rejects", "rejects.jsonl", "--params", str(params_file)],
                          cwd=tmp_path, capture_output=True, text=True)


# the cases, then one for each other section (every key's own case runs through parse_params above)
THROUGH_CLI = [("evaluate.batch_size", -1), ("train.epochs", 0), ("lora.alpha", 0), ("train.warmup_ratio", 3),
               ("evaluate.max_generate_rows", -1), ("merge.parity_prompts", -1), ("train.batch_size", 0),
               ("lora.r", 0), ("train.gradient_accumulation_steps", 0), ("train.lr_scheduler", "cosinus"),
               ("train.optimizer", "adamw"), ("seed", -1), ("model.source", ""), ("data.field_map", {"q": "question"}),
               ("template.name", "llama"), ("validate.max_reject_fraction", 1.5), ("tokenize.max_length", 1),
               ("wandb.mode", "on"), ("leakage.action", "warn"), ("export.types", ["q4_0"])]


def test_the_cli_cases_cover_every_section():
    assert {k.split(".")[0] for k, _ in THROUGH_CLI} == {f.name for f in dataclasses.fields(P.Params)}


@pytest.mark.parametrize("key, value", THROUGH_CLI, ids=[f"{k}={v!r}" for k, v in THROUGH_CLI])
def test_cli_refuses_an_out_of_domain_value_in_one_line_before_writing_anything(tmp_path, key, value):
    f = write(tmp_path, changed(key, value))
    p = finetune_validate(tmp_path, f)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {f}: '{key}' must be "), p.stderr
    assert not (tmp_path / "clean.jsonl").exists() and not (tmp_path / "rejects.jsonl").exists()


def test_secrets_in_a_refused_sync_url_are_not_echoed():
    url = "nosuch://user:s3cr3t@host/runs?token=abc"
    with pytest.raises(ParamsError) as e:
        parse_params(changed("train.checkpoint_sync", url), "p.yaml")
    assert "s3cr3t" not in str(e.value) and "token=abc" not in str(e.value) and "'nosuch://***@host/runs?***'" in str(e.value)


def test_a_sync_url_whose_filesystem_is_not_installed_is_refused_early():
    import fsspec

    try:
        fsspec.get_filesystem_class("s3")
        pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    with pytest.raises(ParamsError, match=r"'train.checkpoint_sync' = 's3://bucket/runs' cannot be opened here: .*s3fs"):
        parse_params(changed("train.checkpoint_sync", "s3://bucket/runs"), "p.yaml")


# --- rules across keys --------------------------------------------------------------------------------

def test_a_hub_id_needs_a_pinned_revision():
    raw = changed("model.source", "mistralai/Mistral-7B-v0.1")
    with pytest.raises(ParamsError, match=r"'model.revision' must be a commit sha or tag .* got null"):
        parse_params(raw, "p.yaml")
    assert parse_params(changed("model.revision", "a1b2c3", raw)).model.revision == "a1b2c3"


def test_a_revision_without_a_hub_id_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"'model.revision' must be null when model.source is not a hub id"):
        parse_params(changed("model.revision", "main"), "p.yaml")
    assert parse_params(changed("model.source", str(tmp_path))).model.source == str(tmp_path)


@pytest.mark.parametrize("scheduler", P.NEEDS_EVAL)
def test_a_scheduler_stepping_on_the_eval_loss_needs_eval_steps(scheduler):
    raw = changed("train.lr_scheduler", scheduler)
    with pytest.raises(ParamsError, match=rf"'train.lr_scheduler' = '{scheduler}' .* needs train.eval_steps >= 1"):
        parse_params(raw, "p.yaml")
    assert parse_params(changed("train.eval_steps", 10, raw)).train.lr_scheduler == scheduler


# --- what is allowed is accepted ----------------------------------------------------------------------

def enum_values() -> list[tuple[str, str]]:
    out = []
    for key in all_keys():
        section, _, name = key.rpartition(".")
        cls = next(f.type for f in dataclasses.fields(P.Params) if f.name == section) if section else P.Params
        tp = typing.get_type_hints(cls)[name]
        if typing.get_origin(tp) is typing.Literal:
            out += [(key, v) for v in typing.get_args(tp)]
    return out


@pytest.mark.parametrize("key, value", enum_values(), ids=[f"{k}={v}" for k, v in enum_values()])
def test_every_allowed_enum_value_is_accepted(key, value):
    raw = changed("train.eval_steps", 10)  # the schedulers that need an eval loss get one
    assert parse_params(changed(key, value, raw)) is not None


@pytest.mark.parametrize("key, value", [
    ("seed", 0), ("seed", 2**32 - 1), ("validate.max_reject_fraction", 0), ("validate.max_reject_fraction", 1),
    ("tokenize.max_length", 2), ("lora.dropout", 0), ("lora.target_modules", ["q_proj", "v_proj"]),
    ("lora.target_modules", ".*proj"), ("train.warmup_ratio", 0), ("train.warmup_ratio", 0.999),
    ("train.max_steps", -1), ("train.max_steps", 1), ("train.epochs", 0.5), ("train.eval_steps", 0),
    ("train.max_grad_norm", 0), ("train.checkpoint_sync", "/mnt/shared/ckpt"), ("train.checkpoint_sync", "rel/dir"),
    ("train.checkpoint_sync", "file:///tmp/ckpt"), ("train.checkpoint_sync", "simplecache::memory://ckpt"),
    ("train.accelerate_config", "none"), ("train.accelerate_config", str(ROOT / "configs/fsdp.yaml")),
    ("evaluate.max_generate_rows", 0), ("data.field_map", {"question": "input", "answer": "output"}),
    ("data.field_map", {"dialog": "messages"}), ("template.system_prompt", "Be brief."),
    ("wandb.entity", "my-team"), ("wandb.project", "journal-finetune"),
    ("data.train", "data/raw/train"), ("data.weights", {"support.jsonl": 2.0, "docs.jsonl": 0.5}),
    ("leakage.action", "drop"), ("leakage.threshold", 1.0),
    ("lora.init", "pissa_niter_0"), ("lora.init", "pissa_niter_16"), ("lora.init", "gaussian"), ("lora.init", "olora"),
    ("lora.modules_to_save", ["lm_head"]), ("lora.modules_to_save", ["embed_tokens", "lm_head"]),
    ("train.gpus", 1), ("train.gpus", "all"),
])
def test_values_at_the_edges_of_their_domain_are_accepted(key, value):
    assert parse_params(changed(key, value)) is not None


# --- the file itself ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (b"seed: 42\nmodel: [1\n", ":3:1: not valid YAML: expected ',' or ']'"),
    (b"seed: 42\ntrain:\n  batch_size: 8\n  batch_size: 4\n", ':4:3: not valid YAML: found duplicate key "batch_size"'),
    (b"seed: 42\n\tmodel: 1\n", ":2:1: not valid YAML: found character '\\t'"),
    (b"seed: 1\n---\nseed: 2\n", ":2:1: not valid YAML: but found another document"),
    (b"seed: !!python/object:os.system 1\n", ":1:7: not valid YAML: could not determine a constructor"),
    (b"", ": the params file is empty"),
    (b"# nothing but a comment\n\n", ": the params file is empty"),
    (b"seed: 42\nsystem_prompt: caf\xe9\n", ":2: not UTF-8 (byte 0xe9)"),
    (b"- seed\n- model\n", ": the top level must be a mapping of sections (seed, model, "),
    (b"just text\n", ": the top level must be a mapping of sections"),
])
def test_a_broken_file_is_one_line_naming_file_and_line(tmp_path, content, expected):
    f = tmp_path / "params.yaml"
    f.write_bytes(content)
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}{expected}") and "\n" not in msg, msg


@pytest.mark.parametrize("content", [b"seed: 42\n  model: x\n", b"seed: 1\nseed: 2\n", b"\xff\xfe", b""])
def test_cli_reports_a_broken_file_in_one_line(tmp_path, content):
    f = tmp_path / "params.yaml"
    f.write_bytes(content)
    p = finetune_validate(tmp_path, f)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {f}"), p.stderr


def test_a_missing_or_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="cannot read the params file"):
        load_params(tmp_path)


def test_a_utf8_bom_is_accepted(tmp_path):
    f = write(tmp_path, SHIPPED)
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert load_params(f).seed == SHIPPED["seed"]


# --- the library lists (imports transformers: seconds) ------------------------------------------------

def test_scheduler_and_optimizer_lists_are_transformers_own_less_the_excluded():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for ours, key, theirs in ((P.SCHEDULERS, "train.lr_scheduler", SchedulerType),
                              (P.OPTIMIZERS, "train.optimizer", OptimizerNames)):
        excluded = P.EXCLUDED[key][0]
        assert not set(ours) & set(excluded)
        assert sorted({*ours, *excluded}) == sorted(v.value for v in theirs)


def test_every_allowed_scheduler_builds_and_the_excluded_ones_do_not():
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name in P.SCHEDULERS:  # what Trainer.create_scheduler passes
        get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10)
    for name in P.EXCLUDED["train.lr_scheduler"][0]:
        with pytest.raises((ValueError, TypeError)):
            get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.5, 0.999])
def test_every_warmup_ratio_in_the_domain_is_read_as_a_ratio(tmp_path, ratio):
    """train.py passes train.warmup_ratio as TrainingArguments.warmup_steps: transformers 5 has no
    warmup_ratio and reads a warmup_steps < 1 as the ratio of the steps (>= 1 would be a step count,
    hence the domain [0, 1))."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, use_cpu=True, report_to=[])
    assert args.get_warmup_steps(1000) == math.ceil(1000 * ratio)


def test_row_fields_are_validates_schema_fields():
    from stages.params import ROW_FIELDS
    from stages.validate import SCHEMAS

    assert ROW_FIELDS == {name for schema in SCHEMAS.values() for name in schema["properties"]}
