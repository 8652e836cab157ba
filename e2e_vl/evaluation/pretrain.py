"""Pre-training metrics on held-out captions: masked-word accuracy and loss (MLM with visual clues) and
masked-RoI-classification loss and accuracy (arg-max of the prediction = arg-max of the stored
distribution). Sums are reduced over ranks, so every rank returns the same numbers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from e2e_vl import distributed as du
from e2e_vl.evaluation.runner import evaluation_batches
from e2e_vl.modeling.heads import masked_lm_loss, soft_cross_entropy

_SUMS = ("mlm_loss", "mlm_correct", "mlm_count", "mrc_loss", "mrc_correct", "mrc_count", "num_captions")


class PretrainEvaluator:
    """Runs the model (heads mlm and/or mrc) over a `CaptionPretrainDataset` with fixed masks."""

    def __init__(self, dataset: Dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.amp_dtype, self.num_workers = device, amp_dtype, num_workers

    def __call__(self, model: nn.Module) -> dict[str, float]:
        sums = dict.fromkeys(_SUMS, 0.0)
        for _, batch, out in evaluation_batches(model, self.dataset, self.batch_size, self.collate_fn,
                                                self.device, self.amp_dtype, self.num_workers):
            sums["num_captions"] += len(batch["input_ids"])
            if "mlm_logits" in out and len(out["mlm_labels"]):
                logits, labels = out["mlm_logits"].float(), out["mlm_labels"]
                sums["mlm_loss"] += float(masked_lm_loss(logits, labels)) * len(labels)
                sums["mlm_correct"] += float((logits.argmax(1) == labels).sum())
                sums["mlm_count"] += len(labels)
            if "mrc_logits" in out and len(out["mrc_logits"]):
                logits, targets = out["mrc_logits"].float(), batch["mrc_targets"].float()
                sums["mrc_loss"] += float(soft_cross_entropy(logits, targets)) * len(targets)
                sums["mrc_correct"] += float((logits.argmax(1) == targets.argmax(1)).sum())
                sums["mrc_count"] += len(targets)
        total = torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64, device=self.device)
        sums = dict(zip(_SUMS, du.all_reduce_sum(total).tolist()))
        metrics = {"num_captions": sums["num_captions"]}
        for head in ("mlm", "mrc"):
            if sums[f"{head}_count"] > 0:
                metrics[f"{head}_accuracy"] = sums[f"{head}_correct"] / sums[f"{head}_count"]
                metrics[f"{head}_loss"] = sums[f"{head}_loss"] / sums[f"{head}_count"]
        return metrics
