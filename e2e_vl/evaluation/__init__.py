"""Task metrics."""
from e2e_vl.evaluation.vqa import VQAEvaluator

__all__ = ["VQAEvaluator"]
