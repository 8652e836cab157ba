"""Region classification accuracy of the detector-only task (`TASK: regions`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from e2e_vl import distributed as du
from e2e_vl.evaluation.runner import evaluation_batches


class RegionEvaluator:
    """Share of labelled boxes whose arg-max class (background included) is the label; summed over ranks."""

    def __init__(self, dataset: Dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.num_workers = device, num_workers

    def __call__(self, model: nn.Module) -> dict[str, float]:
        correct = count = 0.0
        for _, _, out in evaluation_batches(model, self.dataset, self.batch_size, self.collate_fn,
                                            self.device, num_workers=self.num_workers):
            used = out["region_labels"] >= 0
            correct += float((out["class_logits"][used].argmax(1) == out["region_labels"][used]).sum())
            count += float(used.sum())
        correct, count = du.all_reduce_sum(torch.tensor([correct, count], dtype=torch.float64,
                                                        device=self.device)).tolist()
        return {"num_regions": count, "region_accuracy": correct / count if count else float("nan")}
