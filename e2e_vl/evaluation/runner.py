"""The loop every evaluator shares (this rank's share of a data set through the model, in eval mode) and
the one evaluator interface: an `Evaluator` is called with the model and returns its metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from e2e_vl.engine.sampler import sharded_eval_loader


@torch.no_grad()
def evaluation_batches(model: nn.Module, dataset: Dataset, batch_size: int, collate_fn: Callable,
                       device: torch.device, amp_dtype: torch.dtype | None = None, num_workers: int = 0
                       ) -> Iterator[tuple[list[int], dict[str, Any], dict[str, Any]]]:
    """(item indices, batch on `device`, model outputs) for this rank's items in order, without gradients
    and under autocast to `amp_dtype` (None: off). The model's training mode is restored at the end."""
    from e2e_vl.engine.trainer import move_to_device

    was_training = model.training
    model.eval()
    sampler, loader = sharded_eval_loader(dataset, batch_size, collate_fn, num_workers)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    try:
        for indices, batch in zip(sampler, loader):
            batch = move_to_device(batch, device)
            with autocast:
                out = model(batch)
            yield indices, batch, out
    finally:
        if was_training:
            model.train()


class Evaluator:
    """What every task's evaluator holds: the data set and how to batch it, where to run it, and where (if
    anywhere) to write its prediction and metric files, named with `split`. A task's evaluator scores what
    `batches` yields in `__call__(model) -> metrics`; rank 0 writes the files after the evaluation."""

    default_split = "val"

    def __init__(self, dataset: Dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, output_dir: str | Path | None = None,
                 split: str | None = None, num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.amp_dtype, self.num_workers = device, amp_dtype, num_workers
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.split = split if split is not None else self.default_split

    def batches(self, model: nn.Module) -> Iterator[tuple[list[int], dict[str, Any], dict[str, Any]]]:
        return evaluation_batches(model, self.dataset, self.batch_size, self.collate_fn, self.device,
                                  self.amp_dtype, self.num_workers)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError
