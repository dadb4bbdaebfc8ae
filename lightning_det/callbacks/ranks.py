"""DDP ranks that end with their launcher, and the failing rank's error reported last.

Lightning's launcher (rank 0) starts the other ranks of a node as child processes running the same command. If the
launcher dies without ending them (killed, out of memory), they wait on their peers until the collective timeout
(30 minutes), holding their memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L

from lightning_det.io import write_atomically

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def end_with_launcher() -> None:
    """In a rank started by a launcher (``LOCAL_RANK`` > 0), ask Linux to kill this process when its parent dies."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def peer_failure(trainer: L.Trainer, error: BaseException, folder: Path, wait: float = 10.0) -> str | None:
    """After ``error`` ended ``fit`` on this rank: the error of the rank that failed first, when it was another one.

    A failing rank takes its peers down with it: they stop with the backend's "connection closed", which would be
    the last thing printed. So each non-zero rank leaves its error in ``folder``; the launcher (rank 0) waits up to
    ``wait`` seconds for its child ranks to end, ends the rest (they would only add their own "connection closed"),
    and returns the peer's error to report last; None when this rank failed by itself (or there are no peers).
    """
    if trainer.world_size == 1:
        return None
    record = folder / f".rank{trainer.global_rank}.error"
    if not trainer.is_global_zero:
        write_atomically(record, lambda file: file.write(f"{type(error).__name__}: {error}".encode()))
        return None
    children = getattr(trainer.strategy.launcher, "procs", [])
    deadline = time.monotonic() + wait
    while any(child.poll() is None for child in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.kill()
    failed = sorted(folder.glob(".rank*.error"), key=lambda path: path.stat().st_mtime)
    if not failed:
        return None
    rank = failed[0].name.removeprefix(".rank").removesuffix(".error")
    return (f"rank {rank} failed first: {failed[0].read_text()}  (rank 0 then stopped with {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})")
