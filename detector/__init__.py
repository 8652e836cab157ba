"""Detectron2-architecture Faster/Fast R-CNN for Visual Genome, on e2e-vl's own RoIAlign op."""
from detector import _ext

__version__ = "0.1.0"
__all__ = ["_ext", "__version__"]
