"""The GPU harness (benchmarks/gpu_pipeline.py) runs dvc.yaml's stage commands without DVC: they must be
the commands DVC itself runs (dvc.lock records each as DVC rendered it)."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_pipeline_renders_every_stage_command_as_dvc_does():
    spec = importlib.util.spec_from_file_location("gpu_pipeline", ROOT / "benchmarks/gpu_pipeline.py")
    gpu_pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_pipeline)
    ours = dict(gpu_pipeline.stage_commands(ROOT / "dvc.yaml"))
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert set(ours) == set(lock)  # every stage, foreach expanded
    assert ours == {name: stage["cmd"] for name, stage in lock.items()}
    assert not any("${" in cmd for cmd in ours.values())
