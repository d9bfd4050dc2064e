"""The multi-node path, launched for real: two "nodes" on localhost (`accelerate launch --num_machines 2
--machine_rank 0|1 --main_process_ip 127.0.0.1`, DDP over gloo on the CPU) train the tiny model; rank 0
alone writes, and the adapter matches one process with the same global batch."""

import json
import subprocess
import sys

import pytest
from ruamel.yaml import YAML

from conftest import ROOT
from stages.gpus import free_port

STEPS, PER_RANK = 6, 4  # 6 steps of 2 nodes x 4 rows = the same global batch as 1 process x 8 rows
TOLERANCE = 1e-5  # max |a - b| / max |b| over the LoRA weights; measured 1.5e-6 (float32 summation order, gloo)


def params_file(tmp_path, batch_size: int):
    raw = YAML(typ="safe").load((ROOT / "params.yaml").read_text())
    raw["lora"]["dropout"] = 0.0  # dropout draws from each process's own RNG: not comparable across layouts
    raw["train"].update(max_steps=STEPS, batch_size=batch_size, save_steps=100, logging_steps=1)
    raw["wandb"]["mode"] = "disabled"
    path = tmp_path / f"params-b{batch_size}.yaml"
    with path.open("w") as f:
        YAML().dump(raw, f)
    return path


def outputs(root):
    return ["--output", str(root / "adapter"), "--metrics", str(root / "train.json"), "--plots",
            str(root / "plots"), "--checkpoints", str(root / "checkpoints")]


def lora_weights(adapter):
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.mark.timeout(300)
def test_two_nodes_on_localhost_train_like_one_process_and_rank_0_alone_writes(tiny_base, tiny_data, tmp_path):
    from stages import train
    from stages.params import load_params

    data = ["--train", str(tiny_data / "tokenized/train"), "--base", str(tiny_base)]
    port = free_port()
    nodes = []
    for rank in (0, 1):  # each node is told its own output paths: node 1 must write none of them
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/ddp.yaml"),
               "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
               "-m", "stages.cli", "train", *data, *outputs(tmp_path / f"node{rank}"),
               "--params", str(params_file(tmp_path, PER_RANK))]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={"OMP_NUM_THREADS": "1", "PATH": str(tmp_path), "HOME": str(tmp_path),
                                           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}))
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    # rank 1 wrote no adapter, metrics, plots or lineage; into the checkpoints only its own RNG state, which a
    # resumed run needs on that node (a checkpoint is rank 0's files and one rng_state_<rank>.pth a rank)
    written = [p.relative_to(node1).as_posix() for p in node1.rglob("*") if not p.is_dir()]
    assert [p.rsplit("/", 1)[1] for p in written] == ["rng_state_1.pth"] * len(written), written
    assert all(p.startswith("checkpoints/") for p in written)
    metrics = json.loads((node0 / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert (node0 / "adapter/lineage.json").exists() and (node0 / "plots/loss.csv").exists()

    one = tmp_path / "one"
    single = train.run(tiny_data / "tokenized/train", None, tiny_base, one / "adapter", one / "train.json",
                       one / "plots", one / "checkpoints", [], load_params(params_file(tmp_path, 2 * PER_RANK)))
    assert single["tokens_seen"] == metrics["tokens_seen"]  # the same rows, split over the two nodes
    a, b = lora_weights(node0 / "adapter"), lora_weights(one / "adapter")
    assert a.keys() == b.keys()
    scale = max(t.abs().max().item() for t in b.values())
    diff = max((a[k] - b[k]).abs().max().item() for k in a) / scale
    print(f"two nodes vs one process: max |diff| / max |w| = {diff:.2e}; "
          f"loss {metrics['final_loss']} vs {single['final_loss']}")
    assert diff < TOLERANCE
    assert metrics["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
