"""Training checkpoints that survive being killed at any moment.

A checkpoint is one file `model_<step>.pth` holding everything needed to continue exactly: model,
optimizer, scheduler, grad scaler, the RNG states of python/numpy/torch/cuda of every rank, the data
position and the step (and the names of the parameters an update reached, `trained_parameters`, which
tools/export_detector.py keeps over --base-weights). It is written to a temporary file, fsync'ed and
renamed, so a reader sees either the old set of files or the new one. Resuming picks the newest file that
loads; a damaged one (truncated by a full disk, copied half-way, failing its zip CRC check) is skipped
with a warning. Weights that are NaN or
infinite are refused both when saving and when loading (a checkpoint that cannot continue training is
worse than none: it would replace the last good one). A write that fails (disk full, read-only folder)
leaves the existing checkpoints as they were and raises one error naming the file.

`model_best.pth` holds the weights only (model, step, best_metric, config): it is for evaluating and
fine-tuning, never resumed from, so it carries no optimiser state (AdamW's two moments would make it 3x
the weights' size, a second full copy beside the step checkpoints).
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.atomic import atomic_write
from detector.checkpoint import CheckpointError
from detector.checkpoint.formats import NonFiniteWeightsError  # noqa: F401 (callers catch it from here)
from detector.checkpoint.formats import check_finite_weights, load_data_file

logger = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^model_(\d{7,})\.pth$")
BEST_NAME = "model_best.pth"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step", "data", "rng")
WEIGHTS_KEYS = ("model", "step")  # of every file the trainer writes, model_best.pth included
BEST_KEYS = ("model", "step", "best_metric", "config", "trained_parameters")


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only folder); the older checkpoints are untouched."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path` so that `path` is never seen half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_weights_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a file the trainer wrote (a step checkpoint or model_best.pth) safely (tensors and plain
    containers only; no pickled code) for its weights: "model" and "step" must be there."""
    return _load(path, map_location, WEIGHTS_KEYS)


def is_weights_file(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a file the trainer wrote (its top level has "model" and "step"), told
    without reading its tensors (memory-mapped), so asking costs nothing for a 900 MB checkpoint. A file
    that looks so but is damaged is then refused with the reason by `load_weights_file`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file (a .pkl, safetensors, an old-format file, ...)
        return False
    return isinstance(state, dict) and all(k in state for k in WEIGHTS_KEYS)


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a resumable training checkpoint safely: everything `REQUIRED_KEYS` names must be there."""
    return _load(path, map_location, REQUIRED_KEYS)


def _load(path: str | os.PathLike, map_location: str | torch.device, required: tuple[str, ...]) -> dict:
    """Load a file the trainer wrote safely (tensors and plain containers only; no pickled code), after
    checking that the file is whole (`load_data_file`: not empty, not cut short, zip CRCs)."""
    state = load_data_file(path, map_location)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a training checkpoint (top level is {type(state).__name__})")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint, missing {missing}")
    check_finite_weights(state["model"], str(path))
    return state


# RNG states -------------------------------------------------------------------------------------------
# Stored as tensors and ints so that `weights_only=True` loading accepts them.
def capture_rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class Checkpointer:
    """Writes step checkpoints (keeping the last K) and the best one; finds the newest valid one."""

    def __init__(self, directory: str | os.PathLike, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every `model_<step>.pth`, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict, step: int) -> Path:
        """Write `model_<step>.pth` atomically, then delete all but the newest `keep_last`."""
        path = self.directory / f"model_{step:07d}.pth"
        self._write(state, path)
        for _, old in self.step_checkpoints()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict) -> Path:
        """Write `model_best.pth`: the weights-only part of `state` (BEST_KEYS), no optimiser state."""
        path = self.directory / BEST_NAME
        self._write({k: state[k] for k in BEST_KEYS if k in state}, path)
        return path

    def _write(self, state: dict, path: Path) -> None:
        """Refuse non-finite weights; write atomically; turn an OS error into one line naming the file."""
        check_finite_weights(state["model"], f"not saving {path}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason} (older checkpoints are "
                                       "kept as they were)") from exc

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that loads, or None; unreadable ones are skipped with a warning."""
        for step, path in reversed(self.step_checkpoints()):
            try:
                return load_checkpoint_file(path, map_location), path
            except Exception as exc:  # a damaged file of any kind must not stop the resume
                logger.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(exc).__name__,
                               str(exc).splitlines()[0] if str(exc) else "")
        return None
