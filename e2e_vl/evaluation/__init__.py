"""Task metrics."""
from e2e_vl.evaluation.vqa import VQAEvaluator, vqa_accuracy

__all__ = ["VQAEvaluator", "vqa_accuracy"]
