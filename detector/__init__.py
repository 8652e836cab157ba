"""Detectron2-architecture Faster/Fast R-CNN for Visual Genome, on e2e-vl's own RoIAlign op."""
from typing import Any

from detector import _ext
from detector.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = ["_ext", "__version__", "CheckpointError", "GeneralizedRCNN", "build_detector", "load_checkpoint",
           "save_checkpoint"]


def __getattr__(name: str) -> Any:
    """The models on first use: they import torchvision, seconds that a process which only reads a
    config (e.g. `detector.config`, a training worker's first import) would otherwise pay at start."""
    if name in ("GeneralizedRCNN", "build_detector"):
        from detector import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
