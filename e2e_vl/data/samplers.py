"""Batch sampler that groups images of similar aspect ratio, so padding to the batch's largest image
wastes little backbone compute (landscape and portrait images are never mixed, as in Detectron2)."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from torch.utils.data import Sampler


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices from `sampler`, each batch all landscape (w >= h) or all portrait.

    `aspect_ratios[i]` is width / height of sample i. The wrapped sampler decides the order (and the
    shard, under DDP), so shuffling, seeding and resuming stay the wrapped sampler's business; this
    class only regroups. Indices waiting in a group when the wrapped sampler ends are emitted as a final
    short batch per group unless `drop_last`.
    """

    def __init__(
        self, sampler: Iterable[int], aspect_ratios: Sequence[float], batch_size: int, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.aspect_ratios = aspect_ratios
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        groups: tuple[list[int], list[int]] = ([], [])
        for index in self.sampler:
            group = groups[0 if self.aspect_ratios[index] >= 1.0 else 1]
            group.append(index)
            if len(group) == self.batch_size:
                yield group[:]
                group.clear()
        if not self.drop_last:
            for group in groups:
                if group:
                    yield group[:]

    def __len__(self) -> int:
        """Exact when the wrapped sampler is a sequence of indices (the groups' sizes fix the count)."""
        if not isinstance(self.sampler, Sequence):
            raise TypeError("len() needs the wrapped sampler to be a sequence of indices (e.g. a list)")
        landscape = sum(1 for i in self.sampler if self.aspect_ratios[i] >= 1.0)
        sizes = (landscape, len(self.sampler) - landscape)
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes)
        return sum(-(-n // self.batch_size) for n in sizes)
