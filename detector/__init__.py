"""Detectron2-architecture Faster/Fast R-CNN for Visual Genome, on e2e-vl's own RoIAlign op."""
from detector import _ext
from detector.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detector.modeling import GeneralizedRCNN, build_detector

__version__ = "0.1.0"
__all__ = ["_ext", "__version__", "CheckpointError", "GeneralizedRCNN", "build_detector", "load_checkpoint",
           "save_checkpoint"]
