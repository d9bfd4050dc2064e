"""The DVC graph tells the truth: every stage depends on the project files its code imports or reads,
and on exactly the params that change its outputs."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import shipped_with

from conftest import ROOT, copy_project, sh

STAGES = ROOT / "stages"


def dvc_stages() -> dict[str, dict]:
    """stage name -> its definition (the `do` part of a foreach stage)."""
    data = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    return {name: stage.get("do", stage) for name, stage in data["stages"].items()}


def stage_outputs() -> set[str]:
    """Every path a stage writes (outs, metrics, plots), foreach items expanded."""
    data = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    out = set()
    for stage in data["stages"].values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                out |= {path.replace("${item}", str(item)).replace("${key}", str(item))
                        for item in stage.get("foreach", [None])}
    return out


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split())


# --- deps: derived from the code ---------------------------------------------------------------------

def project_imports(nodes) -> set[str]:
    """stages.* modules imported anywhere in these nodes (module level or inside functions)."""
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and n.module == "stages":
                out |= {f"stages.{a.name}" for a in n.names}
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("stages."):
                out.add(n.module)
            elif isinstance(n, ast.Import):
                out |= {a.name for a in n.names if a.name.startswith("stages.")}
    return out


def constants(nodes) -> set[str]:
    return {n.value for node in nodes for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def reads_attribute(nodes, name: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == name for node in nodes for n in ast.walk(node))


def module_path(module: str) -> Path:
    return STAGES / (module.removeprefix("stages.").replace(".", "/") + ".py")


def cli_command_nodes() -> tuple[list[ast.AST], dict[str, ast.FunctionDef]]:
    """stages/cli.py split into what every command runs (module level, helpers, main) and the command
    functions by subcommand name (Typer's: the decorator's name, else the function's with - for _)."""
    tree = ast.parse((STAGES / "cli.py").read_text())
    common, commands = [], {}
    for node in tree.body:
        deco = [d for d in getattr(node, "decorator_list", []) if isinstance(d, ast.Call)
                and isinstance(d.func, ast.Attribute) and d.func.attr == "command"]
        if deco:
            args = deco[0].args
            commands[args[0].value if args else node.name.replace("_", "-")] = node
        else:
            common.append(node)
    return common, commands


def derived_code_deps(subcommand: str) -> set[str]:
    """The project files `finetune SUBCOMMAND` imports or reads: stages/cli.py (the part that runs for
    this command), the modules it imports, transitively, and the tracked files their code names."""
    common, commands = cli_command_nodes()
    nodes = [*common, commands[subcommand]]
    files = {"stages/cli.py"}
    todo = project_imports(nodes)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        seen.add(module)
        tree = ast.parse(module_path(module).read_text())
        nodes.append(tree)
        files.add(str(module_path(module).relative_to(ROOT)))
        todo |= project_imports([tree]) - seen
    if (STAGES / "__init__.py").exists():
        files.add("stages/__init__.py")
    # Files named in the code: a tracked path in a folder as a string ("configs/fsdp.yaml"), or a file
    # name next to its folder's name (CONFIGS / "fsdp.yaml" with CONFIGS = ... / "configs"). Not bare
    # names of root files: "README.md" is the model card merge writes into its output folder; params.yaml
    # is tracked key by key in `params`.
    names = constants(nodes)
    # Tracked files the stages write themselves (metrics/, plots/) are outputs, not code.
    outputs = stage_outputs()
    tracked = {f for f in tracked_files() if not f.startswith(("data/", "tests/")) and f != "params.yaml"
               and not any(f == o or f.startswith(f"{o}/") for o in outputs)}
    files |= {f for f in tracked if "/" in f and (f in names or {Path(f).name, Path(f).parent.name} <= names)}
    if reads_attribute(nodes, "accelerate_config"):  # a path in params: any shipped accelerate config
        files |= {f for f in tracked if f.startswith("configs/") and f.endswith(".yaml")
                  and "distributed_type" in (YAML(typ="safe").load((ROOT / f).read_text()) or {})}
    return files


def test_every_stage_lists_the_project_files_its_code_imports_or_reads():
    tracked = tracked_files()
    checked = []
    for name, stage in dvc_stages().items():
        cmd = stage["cmd"].split()
        assert cmd[0] == "finetune", f"{name}: the test derives deps for `finetune` commands only"
        outputs = stage_outputs()  # another stage's outputs (report reads metrics/...) are data, not code
        listed = {d for d in stage["deps"] if d in tracked and not d.startswith("data/")
                  and not any(d == o or d.startswith(f"{o}/") for o in outputs)}
        assert listed == derived_code_deps(cmd[1]), name
        checked.append(name)
    assert checked == list(dvc_stages()) and len(checked) >= 9  # every stage, none skipped


def test_the_derivation_sees_shared_modules_and_configs():
    """Guards the test above against deriving too little: train imports lineage, which imports jsonl,
    and reads configs/fsdp.yaml; validate runs no model code."""
    train, validate = derived_code_deps("train"), derived_code_deps("validate")
    assert {"stages/lineage.py", "stages/jsonl.py", "stages/modeling.py", "configs/fsdp.yaml"} <= train
    assert not {"stages/modeling.py", "stages/train.py", "configs/fsdp.yaml"} & validate
    assert {"stages/cli.py", "stages/params.py", "stages/errors.py", "stages/validate.py"} <= validate


# --- params: which stages a change of each key makes stale --------------------------------------------

EVAL = ("evaluate",)
TRAIN = ("train",)
NOTHING = ()
STALE = {
    "seed": ("mix", "train", "evaluate"),  # the weights' draw; data order, LoRA init, dropout; evaluate seeds torch
    "model.source": ("import_base",),
    "model.revision": ("import_base",),
    "model.quantize": TRAIN,  # evaluate and merge load the base as the adapter's lineage.json says
    "model.dtype": TRAIN,
    "model.attn_implementation": TRAIN,
    "model.copy_hub_weights": ("import_base",),  # what models/base holds
    "data.format": ("validate",),
    "data.field_map": ("validate",),
    "data.train": ("validate", "train"),  # where the split's sources are; train records them in lineage
    "data.eval": ("validate",),
    "data.weights": ("mix",),
    "template.name": ("format",),
    "template.system_prompt": ("format",),
    "template.train_on": ("format",),
    "validate.max_reject_fraction": ("validate",),  # whether the stage passes
    "validate.max_chars": ("validate",),
    "tokenize.max_length": ("tokenize",),
    "tokenize.overlength": ("tokenize",),
    "tokenize.train_on_prompt": ("tokenize",),
    "tokenize.batch_size": NOTHING,  # rows per tokenizer call: the same rows (test below)
    "lora.r": TRAIN,
    "lora.alpha": TRAIN,
    "lora.dropout": TRAIN,
    "lora.target_modules": TRAIN,
    "lora.use_dora": TRAIN,
    "lora.use_rslora": TRAIN,
    "lora.init": TRAIN,
    "lora.modules_to_save": TRAIN,
    "train.learning_rate": TRAIN,
    "train.lr_scheduler": TRAIN,
    "train.warmup_ratio": TRAIN,
    "train.weight_decay": TRAIN,
    "train.batch_size": TRAIN,
    "train.batch_tokens": TRAIN,  # which rows share a micro-batch
    "train.gradient_accumulation_steps": TRAIN,
    "train.max_steps": TRAIN,
    "train.epochs": TRAIN,
    "train.gradient_checkpointing": NOTHING,  # memory for speed: the same adapter bytes (test below)
    "train.checkpoint_fraction": NOTHING,  # likewise, for a share of the layers
    "train.packing": TRAIN,
    "train.eval_steps": TRAIN,  # each eval pass draws from the RNG dropout uses: other adapter bytes
    "train.logging_steps": NOTHING,  # log lines and the rows of plots/train/loss.csv only
    "train.save_steps": NOTHING,  # resume points
    "train.save_total_limit": NOTHING,
    "train.checkpoint_sync": NOTHING,  # where checkpoints are mirrored
    "train.optimizer": TRAIN,
    "train.max_grad_norm": TRAIN,
    "train.accelerate_config": TRAIN,  # the number of processes, so the global batch, on several GPUs
    "train.method": TRAIN,  # evaluate and merge read the method from what models/adapter holds
    "train.gpus": TRAIN,  # likewise: one process a GPU claimed
    "evaluate.batch_size": EVAL,  # padding changes the matmuls' shapes: the last digits of the metrics
    "evaluate.max_new_tokens": EVAL,
    "evaluate.max_generate_rows": EVAL,
    "merge.into": ("merge",),
    "merge.dtype": ("merge",),
    "merge.parity_prompts": ("merge",),  # parity.json is part of models/merged
    "merge.parity_tolerance": ("merge",),
    "export.types": ("export",),
    "export.parity_prompts": ("export",),  # parity.json is part of models/gguf
    "export.parity_tokens": ("export",),
    "export.min_agreement_16bit": ("export",),  # whether the stage passes
    "export.max_ppl_change_q8_0": ("export",),
    "export.max_ppl_change_q4_k_m": ("export",),
    "wandb.mode": NOTHING,  # tracking
    "wandb.project": NOTHING,
    "wandb.entity": NOTHING,
    "leakage.action": ("mix",),
    "leakage.threshold": ("mix",),
    "leakage.max_fraction": ("mix",),  # whether the stage passes, with action=fail
}


def flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not prefix:
            out.update(flat_keys(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def another(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, dict):
        return {**value, "changed": "yes"}
    return "changed"


@pytest.fixture(scope="module")
def params_only_project(tmp_path_factory):
    """The project with each stage's cmd replaced by `true` and only its params kept, run once: a
    dvc.lock that records every stage's params, so `dvc status` reports exactly the params changes."""
    root = copy_project(tmp_path_factory.mktemp("graph"))
    yaml = YAML()
    data = yaml.load((root / "dvc.yaml").read_text())
    for name, stage in list(data["stages"].items()):
        body = stage.get("do", stage)
        if "params" not in body:  # no params (report): nothing to go stale, and DVC runs a dep-less stage always
            del data["stages"][name]
            continue
        for key in list(body):
            if key != "params":
                del body[key]
        body["cmd"] = "true"
    data.pop("plots", None)
    with (root / "dvc.yaml").open("w") as f:
        yaml.dump(data, f)
    sh("git init -q && git config user.name finetune-tests && git config user.email tests@finetune.invalid"
       " && dvc repro -q && git add -A && git commit -qm init", root)
    return root


def stale_stages(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {name.rsplit(":", 1)[-1].split("@")[0] for name in repo.status()}  # [dvc.yaml:]stage[@item]


def test_the_table_covers_every_key_of_params_yaml():
    keys = flat_keys(YAML(typ="safe").load((ROOT / "params.yaml").read_text()))
    assert set(STALE) == set(keys)


def test_changing_each_key_makes_exactly_the_stages_in_the_table_stale(params_only_project):
    root = params_only_project
    original = (root / "params.yaml").read_text()
    assert stale_stages(root) == set()
    yaml = YAML()
    got = {}
    try:
        for key in STALE:
            data = yaml.load(original)
            section, _, name = key.rpartition(".")
            holder = data[section] if section else data
            holder[name] = another(holder[name])
            with (root / "params.yaml").open("w") as f:
                yaml.dump(data, f)
            got[key] = stale_stages(root)
    finally:
        (root / "params.yaml").write_text(original)
    assert got == {k: set(v) for k, v in STALE.items()}
    # the same answer from the command line, for one operational key and one that retrains
    for key, expected in (("train.checkpoint_sync", set()), ("train.learning_rate", {"train"})):
        data = yaml.load(original)
        data["train"][key.split(".")[1]] = another(data["train"][key.split(".")[1]])
        with (root / "params.yaml").open("w") as f:
            yaml.dump(data, f)
        assert set(json.loads(sh("dvc status --json", root).stdout)) == expected, key
    (root / "params.yaml").write_text(original)


# --- the keys left out do not change the outputs ------------------------------------------------------

TINY_TRAIN = {"train": {"max_steps": 6, "batch_size": 4, "save_steps": 3, "eval_steps": 0, "learning_rate": 0.001},
              "wandb": {"mode": "disabled"}}
OPERATIONAL_TRAIN = {  # a value other than TINY_TRAIN's (or the default) for every train key left out
    "gradient_checkpointing": True,
    "checkpoint_fraction": 0.5,
    "logging_steps": 5,
    "save_steps": 2,
    "save_total_limit": 1,
    "checkpoint_sync": "memory://test-graph/mirror",
}


def adapter_bytes(tiny_base, tiny_data, tmp_path, **train) -> str:
    from stages import train as stage
    from conftest import shipped_with

    raw = {"train": {**TINY_TRAIN["train"], **train}, "wandb": TINY_TRAIN["wandb"]}
    out = tmp_path / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    stage.run(tiny_data / "tokenized/train", tiny_data / "tokenized/eval", tiny_base, out, tmp_path / "train.json",
              tmp_path / "plots", tmp_path / "checkpoints", [], shipped_with(raw))
    return hashlib.md5((out / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_train_keys_left_out_of_dvc_yaml_leave_the_adapter_bytes_unchanged(tiny_base, tiny_data, tmp_path):
    assert {f"train.{k}" for k in OPERATIONAL_TRAIN} == {k for k, v in STALE.items() if k.startswith("train.") and not v}
    reference = adapter_bytes(tiny_base, tiny_data, tmp_path)
    for key, value in OPERATIONAL_TRAIN.items():
        assert adapter_bytes(tiny_base, tiny_data, tmp_path, **{key: value}) == reference, key
    # and the test can tell: eval_steps looks like logging but changes the adapter, so it is listed
    assert adapter_bytes(tiny_base, tiny_data, tmp_path, eval_steps=3) != reference


def test_tokenize_batch_size_gives_the_same_rows(tiny_base, tiny_data, tmp_path):
    import datasets

    from stages import tokenize
    from conftest import shipped_with

    rows = []
    for size in (1000, 7):
        tokenize.run(tiny_data / "prompts/train.jsonl", tmp_path / str(size), tiny_base, None, None,
                     shipped_with({"tokenize": {"batch_size": size}}).tokenize)
        rows.append(datasets.load_from_disk(str(tmp_path / str(size))).to_dict())
    assert rows[0] == rows[1] and len(rows[0]["id"]) > 300


def test_the_checkpoint_fingerprint_ignores_exactly_the_operational_train_keys(tiny_base, tiny_data):
    from stages import train
    from stages.modeling import read_base_json

    assert set(train.OPERATIONAL) == set(OPERATIONAL_TRAIN)
    meta, data = read_base_json(tiny_base), tiny_data / "tokenized/train"
    reference = train.fingerprint(shipped_with({}), data, meta)
    for key, value in OPERATIONAL_TRAIN.items():  # a resume after changing one of these finds its checkpoints
        assert train.fingerprint(shipped_with({"train": {key: value}}), data, meta) == reference, key
    assert train.fingerprint(shipped_with({"train": {"learning_rate": 0.5}}), data, meta) != reference
