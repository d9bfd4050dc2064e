"""train.gpus: disjoint GPU sets for experiments running side by side (stages/gpus.py), on simulated machines."""

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from stages import gpus
from stages.errors import StageError

fork = mp.get_context("fork")  # the children inherit the simulated machine (env) and import nothing new


@pytest.fixture(autouse=True)
def machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_GPU_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "8")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path / "locks"


def test_a_claim_takes_free_gpus_and_says_how_to_use_them(monkeypatch):
    first, second = gpus.claim(2), gpus.claim(3)
    assert (first.gpus, second.gpus) == (["0", "1"], ["2", "3", "4"])
    env = first.env()
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["MASTER_PORT"] == str(first.port)
    assert first.port != second.port
    assert env["TORCHINDUCTOR_CACHE_DIR"] != second.env()["TORCHINDUCTOR_CACHE_DIR"]  # a compile cache each
    assert env["TRITON_CACHE_DIR"] != second.env()["TRITON_CACHE_DIR"]
    first.release()
    assert gpus.claim(2).gpus == ["0", "1"]  # released: free again

    with pytest.raises(StageError, match=r"train.gpus=9: this machine has 8 GPU\(s\).*at most 8 or all"):
        gpus.claim(9)
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "0")
    assert gpus.claim("all") is None  # no GPU: the run stays on the CPU
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # a machine shared by a scheduler: its names
    assert gpus.claim("all").gpus == ["5", "7"]


def _claim_and_hold(wanted, barrier, out):
    held = gpus.claim(wanted, poll=0.05)
    out.put(held.gpus)
    barrier.wait(timeout=30)  # every claimer holds its GPUs at once


def test_concurrent_claimers_get_disjoint_sets():
    barrier, out = fork.Barrier(4), fork.Queue()
    procs = [fork.Process(target=_claim_and_hold, args=(2, barrier, out), daemon=True) for _ in range(4)]
    for p in procs:
        p.start()
    sets = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(g for s in sets for g in s) == [str(i) for i in range(8)]  # 4 x 2 of 8: each GPU once


def _claim_in_thread(wanted):
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("claim", gpus.claim(wanted, poll=0.05)), daemon=True)
    t.start()
    return t, got


@pytest.mark.parametrize("wanted", [6, "all"])
def test_a_claimer_waits_until_enough_are_released(wanted, caplog):
    caplog.set_level("INFO", logger="finetune")
    holder = gpus.claim(3)
    t, got = _claim_in_thread(wanted)  # 6 (or all 8) of 8 while 3 are held: waits
    time.sleep(0.5)
    assert t.is_alive() and "claim" not in got
    assert f"train.gpus={wanted}: 5 of 8 GPUs free, waiting for {6 if wanted == 6 else 8}" in caplog.text
    assert f"held: 0 (pid {os.getpid()}" in caplog.text  # names the holders
    holder.release()
    t.join(timeout=10)
    assert got["claim"].gpus == [str(i) for i in range(6 if wanted == 6 else 8)]


def _hold_forever(ready):
    held = gpus.claim(2)  # noqa: F841 (held while referenced)
    ready.set()
    time.sleep(600)


def test_a_killed_holder_frees_its_gpus(monkeypatch):
    monkeypatch.setenv("FINETUNE_GPU_COUNT", "2")
    ready = fork.Event()
    p = fork.Process(target=_hold_forever, args=(ready,), daemon=True)
    p.start()
    assert ready.wait(timeout=30)
    t, got = _claim_in_thread("all")
    time.sleep(0.3)
    assert "claim" not in got  # held by the child
    os.kill(p.pid, signal.SIGKILL)  # no exit handler runs: the kernel drops the flocks
    p.join(timeout=10)
    t.join(timeout=10)
    assert got["claim"].gpus == ["0", "1"]
