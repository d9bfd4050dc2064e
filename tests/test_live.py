"""Live progress: while a queued experiment trains, `dvc exp show` shows its step, loss and tokens/s
(DVCLive's dvclive/metrics.json, read from the experiment's temporary copy of the repo)."""

import json
import time

import pytest

from conftest import copy_project, sh
from test_pipeline import set_params


def running_rows(shown) -> list[dict]:
    """The dvclive/metrics.json figures of each running experiment in `dvc exp show --json`."""
    out = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") != "running":
                continue
            for rev in exp.get("revs") or []:
                live = ((rev.get("data") or {}).get("metrics") or {}).get("dvclive/metrics.json") or {}
                if live.get("data"):
                    out.append(live["data"])
    return out


@pytest.mark.timeout(600)
def test_dvc_exp_show_follows_a_queued_experiment_step_by_step(tmp_path, tiny_model_dir):
    root = copy_project(tmp_path / "project")
    set_params(root, model__source=str(tiny_model_dir), train__max_steps=80, train__batch_size=4,
               train__save_steps=1000, train__logging_steps=1, wandb__mode="disabled")
    sh("git init -q && git config user.name finetune-tests && git config user.email tests@finetune.invalid"
       " && git add -A && git commit -qm init", root)
    sh("dvc repro tokenize", root)  # the data stages and import_base: the queued copy checks them out
    sh("git add -A && git commit -qm data", root)
    sh("dvc exp run --queue train -S train.learning_rate=0.002 --name live", root)
    try:
        sh("dvc queue start", root)
        seen, deadline = [], time.monotonic() + 400
        while time.monotonic() < deadline:
            rows = running_rows(json.loads(sh("dvc exp show --json", root).stdout))
            seen += [(r["step"], r) for r in rows]
            status = sh("dvc queue status", root).stdout
            if "Success" in status or "Failed" in status:
                break
            time.sleep(1)
        assert "Success" in status, status + sh("dvc queue logs live", root, check=False).stdout[-3000:]
    finally:
        sh("dvc queue stop --kill", root, check=False)
    steps = [s for s, _ in seen]
    print(f"steps seen in `dvc exp show` while running: {steps}")
    assert len(set(steps)) >= 2 and steps == sorted(steps) and steps[-1] > steps[0]  # it moved while running
    last = seen[-1][1]
    assert {"loss", "learning_rate", "tokens_per_s"} <= set(last) and last["tokens_per_s"] > 0
    # the finished experiment: the stable files for `dvc metrics diff` / `dvc plots diff`, and dvclive's
    shown = json.loads(sh("dvc exp show --json", root).stdout)
    done = [rev for b in shown for e in b.get("experiments") or [] for rev in e.get("revs") or []
            if e.get("name") == "live"]
    metrics = done[0]["data"]["metrics"]
    assert metrics["metrics/train.json"]["data"]["steps"] == 80
    assert metrics["dvclive/metrics.json"]["data"]["step"] == 80
