"""Region classification accuracy of the detector-only task (`TASK: regions`)."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from e2e_vl import distributed as du
from e2e_vl.evaluation.runner import evaluation_batches

logger = logging.getLogger(__name__)


class RegionEvaluator:
    """Share of labelled boxes whose arg-max class (background included) is the label, and the worst
    class's share; summed over ranks. `class_names`: one per logit, background last. The confusion
    matrix's largest off-diagonal cells go to the log: an overall accuracy hides a single pair of classes
    the detector cannot tell apart (on the demo, yellow circles and rectangles on one seed, which then
    became the demo's shape errors)."""

    def __init__(self, dataset: Dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 class_names: Sequence[str], num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.num_workers, self.class_names = device, num_workers, list(class_names)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        n = len(self.class_names)
        confusion = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for _, _, out in evaluation_batches(model, self.dataset, self.batch_size, self.collate_fn,
                                            self.device, num_workers=self.num_workers):
            used = out["region_labels"] >= 0
            if out["class_logits"].shape[1] != n:
                raise ValueError(f"the model gives {out['class_logits'].shape[1]} class logits per region, "
                                 f"the evaluator names {n} classes (background included)")
            pairs = out["region_labels"][used] * n + out["class_logits"][used].argmax(1)
            confusion += torch.bincount(pairs, minlength=n * n).view(n, n).to(confusion)
        du.all_reduce_sum(confusion)
        count = float(confusion.sum())
        per_class = confusion.diagonal() / confusion.sum(1)
        seen = confusion.sum(1) > 0
        self._log_confusions(confusion)
        return {"num_regions": count,
                "region_accuracy": float(confusion.diagonal().sum()) / count if count else float("nan"),
                "worst_class_accuracy": float(per_class[seen].min()) if bool(seen.any()) else float("nan")}

    def _log_confusions(self, confusion: torch.Tensor, top: int = 5) -> None:
        off = confusion.clone().fill_diagonal_(0).flatten()
        order = off.argsort(descending=True, stable=True)[:top]
        n = confusion.shape[1]
        cells = [f"{self.class_names[int(i) // n]} -> {self.class_names[int(i) % n]}: {int(off[i])}"
                 for i in order if off[i] > 0]
        logger.info("region errors (label -> predicted): %s", "; ".join(cells) if cells else "none")
