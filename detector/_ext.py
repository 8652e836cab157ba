"""Loads the compiled extension (`detector/_C*.so`) that registers the `torch.ops.detector` ops.

Importing `detector` never fails for want of the build: the ops raise `NativeOpMissing`, which says
how to build it, the first time they are used.
"""
from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_HELP = (
    "the native op library of `detector` (detector/_C*.so) is not built. Build it from the repository "
    "root with `make build` (or `pip install -e . --no-build-isolation`, which compiles it against the "
    "installed torch)."
)


class NativeOpMissing(ImportError):
    """The compiled extension is absent or was built against another torch."""


def _load() -> tuple[bool, str]:
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    if not candidates:
        return False, BUILD_HELP
    try:
        torch.ops.load_library(candidates[0])
    except OSError as exc:  # built against another torch/CUDA: undefined symbols
        return False, f"{candidates[0]} could not be loaded ({exc}); rebuild it: `make build`."
    return True, ""


LOADED, _WHY = _load()


def require() -> None:
    """Raise a clear error if the native ops are unavailable."""
    if not LOADED:
        raise NativeOpMissing(_WHY)


def cuda_version() -> int:
    """CUDA version the extension was compiled with (e.g. 13000), or -1 for a CPU-only build."""
    require()
    return int(torch.ops.detector._cuda_version())
