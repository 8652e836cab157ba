"""The one atomic file write of the project: a reader sees the old file or the complete new one, never a
half-written file, and a write that fails (disk full, a kill, an exception in the writer) leaves the old
file as it was and no temporary file behind. Checkpoints, RoI npz files, metrics, predictions and configs
all go through it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it and rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
