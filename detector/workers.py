"""Set-up of DataLoader worker processes (extraction and training loaders)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def init_worker(_: int = 0) -> None:
    """`worker_init_fn` for every DataLoader here: one OpenCV thread per worker (the workers already run
    in parallel), SIGINT/SIGTERM left to the parent, and on Linux the worker is killed with its parent.
    A parent killed with SIGKILL (the OOM killer, `kill -9`) otherwise leaves its workers behind for good:
    they block flushing batches into a pipe nobody reads."""
    import cv2

    cv2.setNumThreads(1)
    # Ctrl-C reaches the whole foreground process group and clusters send SIGTERM to every process; the
    # parent decides (training saves a checkpoint first), so a worker must not die under it mid-batch.
    # Workers still end with their parent: the loader's shutdown, or the death signal below.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
