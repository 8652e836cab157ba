"""Batches that are the same on every run: a seeded permutation per epoch, sharded over ranks, resumable.

The position in the data is two integers, (epoch, batches already consumed in that epoch). The order
of epoch `e` is `randperm(n, seed + e)`, so a resumed run re-creates it and skips the consumed batches
without loading them, and every rank agrees on it without communication.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detector.workers import init_worker


class ResumableBatchSampler(Sampler[list[int]]):
    """Training batches of `batch_size` items for one rank.

    Each global micro-step takes `batch_size * world_size` consecutive indices of the epoch's
    permutation and rank r takes the r-th slice of them, so the ranks never overlap. The incomplete
    tail of an epoch is dropped (every rank must run the same number of steps under DDP).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        per_step = batch_size * world_size
        if num_items < per_step:
            raise ValueError(
                f"data set has {num_items} items but one step needs {per_step} "
                f"({batch_size} per process x {world_size} processes); use a smaller batch"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (for this rank; the same on every rank)."""
        return self.num_items // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        per_step = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            lo = b * per_step + self.rank * self.batch_size
            yield order[lo:lo + self.batch_size]


class ShardedEvalSampler(Sampler[list[int]]):
    """Evaluation batches: rank r takes items r, r + W, r + 2W, ... in order; nothing dropped."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_items, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]


def sharded_eval_loader(dataset: Dataset, batch_size: int, collate_fn: Callable,
                        num_workers: int = 0) -> tuple[ShardedEvalSampler, DataLoader]:
    """This rank's share of an evaluation set, in order; the sampler tells which items each batch holds."""
    from e2e_vl import distributed as du

    sampler = ShardedEvalSampler(len(dataset), batch_size, du.get_rank(), du.get_world_size())
    return sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                               worker_init_fn=init_worker)


class EpochLoader:
    """An endless stream of training batches whose position can be saved and restored exactly.

    The DataLoader gets its own generator so that starting a new iterator (each epoch, or on resume)
    never draws from the global torch RNG that dropout uses; otherwise a resumed run would diverge.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableBatchSampler, collate_fn: Callable,
                 num_workers: int = 0, pin_memory: bool = False):
        self.sampler = sampler
        self.loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(sampler.seed),
            persistent_workers=False, worker_init_fn=init_worker,
        )
        self.epoch, self.batch_in_epoch = 0, 0
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def next(self):
        """The next batch, rolling over to the next epoch's permutation when one runs out."""
        if self.batch_in_epoch >= len(self.sampler):
            self.epoch, self.batch_in_epoch, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            if hasattr(self.loader.dataset, "set_epoch"):  # per-epoch randomness (e.g. new MLM masks)
                self.loader.dataset.set_epoch(self.epoch)
            self._it = iter(self.loader)
        batch = next(self._it)
        self.batch_in_epoch += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch, self._it = int(state["epoch"]), int(state["batch_in_epoch"]), None
