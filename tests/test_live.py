"""Live progress: while a queued experiment trains, `dvc exp show` shows its step, loss and tokens/s
(DVCLive's dvclive/metrics.json, read from the experiment's temporary copy of the repo)."""

import json
import time

import pytest

from conftest import copy_project, sh
from test_pipeline import set_params

STEPS = 200  # 40 ms (idle 2 cores) to 1 s a step (8 users): several `dvc exp show` (1-3 s each) see it run


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
    set_params(root, model__source=str(tiny_model_dir), train__max_steps=STEPS, train__batch_size=4,
               train__save_steps=1000, train__logging_steps=1, wandb__mode="disabled")
    sh("git init -q && git config user.name finetune-tests && git config user.email tests@finetune.invalid"
       " && git add -A && git commit -qm init", root)
    sh("dvc repro tokenize", root)  # the data stages and import_base: the queued copy checks them out
    sh("git add -A && git commit -qm data", root)
    sh("dvc exp run --queue train -S train.learning_rate=0.002 --name live", root)
    try:
        sh("dvc queue start >/dev/null 2>&1", root)  # the worker it leaves must not hold our pipes open
        seen, polls, started = [], [], time.monotonic()
        while time.monotonic() < started + 400:
            proc = sh("dvc exp show --json", root, check=False)
            if proc.returncode != 0 and ".dvc/tmp/exps/" in proc.stderr:
                # DVC 3.67's own race: exp show opened the running experiment's temporary copy just as the
                # worker removed it at the end (seen once in CI); the next poll sees the finished experiment
                polls.append((round(time.monotonic() - started, 1), "exp show raced the cleanup", []))
                time.sleep(0.5)
                continue
            assert proc.returncode == 0, proc.stderr[-3000:]
            shown = json.loads(proc.stdout)
            states = [(e.get("executor") or {}).get("state") for b in shown for e in b.get("experiments") or []]
            rows = running_rows(shown)
            polls.append((round(time.monotonic() - started, 1), states, [r["step"] for r in rows]))
            seen += [(r["step"], r) for r in rows]
            if "success" in states or "failed" in states:
                break
            time.sleep(0.5)
        status = sh("dvc queue status", root).stdout
        assert "Success" in status, status + sh("dvc queue logs live", root, check=False).stdout[-3000:]
    finally:
        sh("dvc queue stop --kill", root, check=False)
    print(f"dvc exp show polls (seconds since dvc queue start, states, dvclive steps): {polls}")
    steps = [s for s, _ in seen]
    assert len(set(steps)) >= 2 and steps == sorted(steps) and steps[-1] > steps[0]  # it moved while running
    last = seen[-1][1]
    assert {"loss", "learning_rate", "tokens_per_s"} <= set(last) and last["tokens_per_s"] > 0
    # the finished experiment: the stable files for `dvc metrics diff` / `dvc plots diff`, and dvclive's
    shown = json.loads(sh("dvc exp show --json", root).stdout)
    done = [rev for b in shown for e in b.get("experiments") or [] for rev in e.get("revs") or []
            if e.get("name") == "live"]
    metrics = done[0]["data"]["metrics"]
    assert metrics["metrics/train.json"]["data"]["steps"] == STEPS
    assert metrics["dvclive/metrics.json"]["data"]["step"] == STEPS
