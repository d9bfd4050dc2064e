"""GPUs for one experiment among several: `train.gpus` (all | a count) claimed through machine-wide locks.

`dvc queue start -j K` runs K experiments at once, each in its own temporary copy of the repo; each train
stage claims its own disjoint set of GPUs here before it starts any GPU work:
- one lock file per GPU (`gpu-<index>.lock`) in a folder every process of the machine sees:
  $FINETUNE_GPU_LOCKS, else ~/.cache/finetune/gpu-locks (not the repo: each queued experiment runs in
  another copy of it). A GPU is held by an exclusive fcntl.flock on its file, which the kernel drops
  when the holder ends in any way (exit, exception, SIGKILL), so a killed experiment frees its GPUs.
- a count takes that many free GPUs (the lowest indices first); `all` takes every GPU of the machine
  (of CUDA_VISIBLE_DEVICES when it is set), so it waits until the others have finished. Either way the
  number of processes, hence the global batch, is the same as when the experiments run one by one.
- none free: one log line naming the holders, then a poll every second until enough are free. The
  claims themselves are serialised by `claim.lock`, so two claimers never split the free GPUs
  between them and both wait.
- the claim carries what the training processes need to keep to themselves (Claim.env):
  CUDA_VISIBLE_DEVICES, a free rendezvous port (MASTER_PORT, accelerate's --main_process_port) and a
  compile cache of their own (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) named after the first GPU
  claimed: no two running experiments share one, and the next experiment on those GPUs finds it warm.
The GPU count is torch.cuda.device_count() (FINETUNE_GPU_COUNT overrides it: tests simulate machines).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.errors import StageError

log = logging.getLogger("finetune")
CLAIMED = "FINETUNE_GPUS_CLAIMED"  # set for the processes started with a claim: they do not claim again


def lock_dir() -> Path:
    return Path(os.environ.get("FINETUNE_GPU_LOCKS") or Path.home() / ".cache/finetune/gpu-locks")


def machine_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices when it is unset)."""
    count = os.environ.get("FINETUNE_GPU_COUNT")
    if count is None:
        import torch

        count = torch.cuda.device_count()  # respects CUDA_VISIBLE_DEVICES
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in visible.split(",")] if visible is not None else [str(i) for i in range(int(count))]
    return names[:int(count)]


def free_port() -> int:
    """A TCP port free now on this machine, for one run's rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Claim:
    gpus: list[str]
    port: int
    files: list = field(default_factory=list, repr=False)  # the locked files: the claim lasts while open

    def env(self) -> dict[str, str]:
        cache = lock_dir().parent / "compile-cache" / f"gpu-{self.gpus[0]}"
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus), "MASTER_PORT": str(self.port),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                CLAIMED: ",".join(self.gpus)}

    def release(self) -> None:
        for f in self.files:
            f.close()  # closing the last descriptor drops the flock
        self.files = []


def _try_lock(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.truncate(0)
    f.write(f"pid {os.getpid()} {os.environ.get('DVC_EXP_NAME') or ''}\n")
    f.flush()
    return f


def _holders(folder: Path, busy: list[str]) -> str:
    held = []
    for g in busy:
        try:
            who = (folder / f"gpu-{g}.lock").read_text().strip()
        except OSError:
            continue
        if who:
            held.append(f"{g} ({who})")
    return ", ".join(held) or "none recorded"


def claim(wanted: str | int, poll: float = 1.0) -> Claim | None:
    """Blocks until `wanted` GPUs (a count, or "all") are free, and holds them; None on a machine
    without GPUs (the run stays on the CPU). A count above the machine's GPUs is an error, not a wait."""
    gpus = machine_gpus()
    if not gpus:
        return None
    n = len(gpus) if wanted == "all" else int(wanted)
    if n > len(gpus):
        raise StageError(f"train.gpus={wanted}: this machine has {len(gpus)} GPU(s) "
                         f"({', '.join(gpus)}); set train.gpus to at most {len(gpus)} or all")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        with open(folder / "claim.lock", "a") as serial:
            fcntl.flock(serial, fcntl.LOCK_EX)  # one claimer at a time looks at the free GPUs
            got, busy = [], []
            for g in gpus:
                if len(got) < n:
                    f = _try_lock(folder / f"gpu-{g}.lock")
                    if f is None:
                        busy.append(g)
                    else:
                        got.append((g, f))
            if len(got) == n:
                held = Claim([g for g, _ in got], free_port(), [f for _, f in got])
                log.info("train.gpus=%s: GPUs %s claimed (rendezvous port %d)%s", wanted, ",".join(held.gpus),
                         held.port, f" after {time.monotonic() - waiting_since:.0f}s waiting" if waiting_since else "")
                return held
            for _, f in got:
                f.close()
        if waiting_since is None:
            waiting_since = time.monotonic()
            log.info("train.gpus=%s: %d of %d GPUs free, waiting for %d (held: %s; locks in %s)", wanted,
                     len(got), len(gpus), n, _holders(folder, busy), folder)
        time.sleep(poll)
