"""The loop every evaluator shares: this rank's share of a data set through the model, in eval mode."""
from __future__ import annotations

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
