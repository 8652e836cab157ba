"""Collation of VL-BERT samples (variable numbers of tokens and boxes) into the model's batch dict.

A *sample* is one text (caption, question, expression) with its image. Keys (tensors unless noted):

    input_ids        Long [T]        [CLS] text-A [SEP] (text-B [SEP]) as token ids
    token_type_ids   Long [T]        0 for text A, 1 for text B (optional: all 0)
    text_region_index Long [T]       optional: the region (index into this sample's boxes) whose feature is
                                     each token's visual feature, e.g. VCR's object references; absent
                                     or 0 = the whole image (box 0)
    image            [3, h, w]       resized image, uint8 or float 0..255 in the detector's channel order;
                                     absent or None for a text-only sample
    boxes            Float [K, 4]    x1, y1, x2, y2 in the resized image; box 0 is the whole image
    image_key        hashable        optional: samples with the same key carry the same image and boxes,
                                     which is then put in the batch (and run through the detector) once
    image_id         any             optional: passed through as the list `image_ids`
    region_masked    Bool [K]        optional: regions whose pixels (or features) are masked

Every other key is a head's target: each head declares the sample keys it reads and how they are batched
(`Head.targets`, built from the classes below: `TokenTargets`, `RegionTargets`, `SampleTargets`,
`GroupTargets`, `LabelledRegionTargets`, `AnswerTargets`; registering the head registers them in
`BATCH_TARGETS`), and `collate_samples` builds them from those declarations, so a new head needs no
change here. A declared target is batched when any sample of the
batch carries one of its keys; samples without it get its fill value (no loss).

A data set item may also be a list of samples (e.g. an image with all its questions); lists are
flattened. The batch layout is documented in `e2e_vl.modeling.vlbert.VLBert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Protocol, Sequence

import torch
import torch.nn.functional as F

from detector.structures import pad_images

Sample = dict[str, Any]


class BatchTarget(Protocol):
    """A head's declaration of the sample keys it reads and how they become batch entries."""

    @property
    def sample_keys(self) -> tuple[str, ...]:
        """The keys that, on any sample of a batch, make the batch carry this target."""

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """The batch entries built from `samples` (a ValueError/KeyError naming the sample when malformed)."""


@dataclass(frozen=True)
class _KeyedTargets:
    """A target under one sample key."""

    key: str

    @property
    def sample_keys(self) -> tuple[str, ...]:
        return (self.key,)


@dataclass(frozen=True)
class TokenTargets(_KeyedTargets):
    """One label per text token, Long [T] -> Long [B, T] padded with `fill` (e.g. masked-LM labels)."""

    fill: int

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        rows = [s.get(self.key, torch.full((len(s["input_ids"]),), self.fill)) for s in samples]
        return {self.key: _pad_1d(rows, self.fill)}


@dataclass(frozen=True)
class RegionTargets(_KeyedTargets):
    """One label per region, [K] (as many as the sample's boxes) -> [B, K_max] padded with `fill`."""

    fill: int | float
    dtype: torch.dtype

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        for i, s in enumerate(samples):
            if self.key in s and len(s[self.key]) != len(s["boxes"]):
                raise ValueError(f"sample {i}: {len(s[self.key])} {self.key} for {len(s['boxes'])} boxes")
        rows = [torch.as_tensor(s.get(self.key, torch.zeros(0, dtype=self.dtype))).to(self.dtype)
                for s in samples]
        return {self.key: _pad_1d(rows, self.fill)}


@dataclass(frozen=True)
class SampleTargets(_KeyedTargets):
    """One int label per sample -> Long [B]; `fill` for samples without one."""

    fill: int

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        return {self.key: torch.tensor([int(s.get(self.key, self.fill)) for s in samples], dtype=torch.long)}


@dataclass(frozen=True)
class GroupTargets(_KeyedTargets):
    """One int label per group of consecutive samples, carried by the group's first sample (VCR's
    choices of one question) -> `batch_key` Long [groups]."""

    batch_key: str

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        return {self.batch_key: torch.tensor([int(s[self.key]) for s in samples if self.key in s])}


@dataclass(frozen=True)
class LabelledRegionTargets:
    """Chosen regions with a target row each: `flags` Bool [K] per sample -> Bool [B, K_max] (padded
    False), and the rows of `rows` Float [K, C] at the chosen regions -> Float [chosen, C], in row-major
    order of the flags."""

    flags: str
    rows: str

    @property
    def sample_keys(self) -> tuple[str, ...]:
        return (self.flags,)

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        num_boxes = [len(s["boxes"]) if s.get("image") is not None else 0 for s in samples]
        flags = [s.get(self.flags, torch.zeros(n, dtype=torch.bool)).bool()
                 for s, n in zip(samples, num_boxes)]
        batch = {self.flags: _pad_1d(flags, False, min_len=max(num_boxes))}
        rows = [s[self.rows][f] for s, f in zip(samples, flags) if f.any()]
        if rows:
            batch[self.rows] = torch.cat(rows).float()
        else:
            width = next((s[self.rows].shape[1] for s in samples if self.rows in s), 0)
            batch[self.rows] = torch.zeros(0, width)
        return batch


@dataclass(frozen=True)
class AnswerTargets:
    """Questions: the answer token's index `position` (int) and the soft answer scores `targets` Float [A].
    A question carries both (training) or only `position` (inference, then every sample has it). When
    questions share a batch with other samples (pre-training), `labelled` Bool [B] says which are questions;
    the others get zero scores and position 0."""

    targets: str
    position: str
    labelled: str

    @property
    def sample_keys(self) -> tuple[str, ...]:
        return (self.targets, self.position)

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if not any(self.targets in s for s in samples):
            _require_all(samples, (self.position,))
            return {self.position: torch.tensor([int(s[self.position]) for s in samples], dtype=torch.long)}
        batch: dict[str, Any] = {}
        is_question = [self.targets in s or self.position in s for s in samples]
        for i, sample in enumerate(samples):
            if is_question[i] and not {self.targets, self.position} <= set(sample):
                missing = self.position if self.targets in sample else self.targets
                raise KeyError(f"sample {i} lacks {missing}; a question carries both")
        if not all(is_question):  # questions mixed into pre-training: only they get the answer loss
            batch[self.labelled] = torch.tensor(is_question)
        width = next(len(s[self.targets]) for s in samples if self.targets in s)
        batch[self.targets] = torch.stack([torch.as_tensor(s.get(self.targets, torch.zeros(width))).float()
                                           for s in samples])
        batch[self.position] = torch.tensor([int(s.get(self.position, 0)) for s in samples], dtype=torch.long)
        return batch


# Each head's declared targets under its name, in registration order: `e2e_vl.modeling.heads.register_head`
# fills it (the data layer does not import the models), so every head of an imported model is here.
BATCH_TARGETS: dict[str, tuple[BatchTarget, ...]] = {}


def declared_targets() -> tuple[BatchTarget, ...]:
    """Every registered head's targets, each once, in registration order. None registered means the
    models were never imported, and batches would silently lack every target: that is refused."""
    if not BATCH_TARGETS:
        raise RuntimeError("no head has declared its batch targets: import e2e_vl.modeling (which registers "
                           "the heads) before collating")
    return tuple(dict.fromkeys(t for targets in BATCH_TARGETS.values() for t in targets))


class VLCollator:
    """Callable collate_fn; `pad_token_id` from the tokenizer, `size_divisibility` pads image sides up to
    a multiple (0: to the batch maximum, Detectron2's choice for C4 models)."""

    def __init__(self, pad_token_id: int = 0, size_divisibility: int = 0):
        self.pad_token_id = pad_token_id
        self.size_divisibility = size_divisibility

    def __call__(self, items: Sequence[Sample | Sequence[Sample]]) -> dict[str, Any]:
        samples: list[Sample] = []
        for item in items:
            samples.extend(item if isinstance(item, (list, tuple)) else [item])
        if not samples:
            raise ValueError("cannot collate an empty batch")
        return collate_samples(samples, self.pad_token_id, self.size_divisibility)


def collate_samples(
    samples: Sequence[Sample], pad_token_id: int = 0, size_divisibility: int = 0
) -> dict[str, Any]:
    """Build the batch dict from samples (see the module docstring for the keys)."""
    batch: dict[str, Any] = {}
    # ---- images: one slot per distinct image (samples sharing an image_key share a slot) --------------
    image_slots: list[Sample] = []
    key_to_slot: dict[Hashable, int] = {}
    sample_image_index = []
    for i, sample in enumerate(samples):
        if sample.get("image") is None:
            sample_image_index.append(-1)
            continue
        if "boxes" not in sample:
            raise KeyError(f"sample {i} has an image but no 'boxes'")
        key = sample.get("image_key")
        if key is not None and key in key_to_slot:
            slot = key_to_slot[key]
            _check_same_image(image_slots[slot], sample, key)
        else:
            slot = len(image_slots)
            image_slots.append(sample)
            if key is not None:
                key_to_slot[key] = slot
        sample_image_index.append(slot)
    batch["sample_image_index"] = torch.tensor(sample_image_index, dtype=torch.long)
    if image_slots:
        batch["images"], batch["image_sizes"] = _pad_images([s["image"] for s in image_slots],
                                                            size_divisibility)
        batch["boxes"] = [s["boxes"].float() for s in image_slots]
        if any("region_masked" in s for s in image_slots):
            batch["region_masked"] = [
                s.get("region_masked", torch.zeros(len(s["boxes"]), dtype=torch.bool)).bool()
                for s in image_slots
            ]

    # ---- text ----------------------------------------------------------------------------------------
    batch["input_ids"] = _pad_1d([s["input_ids"] for s in samples], pad_token_id)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    batch["text_mask"] = torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]
    batch["token_type_ids"] = _pad_1d(
        [s.get("token_type_ids", torch.zeros(len(s["input_ids"]), dtype=torch.long)) for s in samples], 0
    )
    if any("text_region_index" in s for s in samples):
        batch["text_region_index"] = _pad_1d([_text_regions(i, s) for i, s in enumerate(samples)], 0)
    if any("image_id" in s for s in samples):  # passed through for evaluation and bookkeeping
        batch["image_ids"] = [s.get("image_id") for s in samples]

    # ---- the heads' targets, as they declare them ---------------------------------------------------------
    for target in declared_targets():
        if any(k in s for s in samples for k in target.sample_keys):
            batch.update(target.collate(samples))
    return batch


def items_by_image(image_ids: Sequence[Hashable], per_item: int = 0) -> list[tuple[Hashable, list[int]]]:
    """Data set items that share an image: (image id, indices of its samples), at most `per_item` samples
    per item (0 = all of the image's), images in order of str(id), samples in their given order. The
    samples of an item run through the detector once."""
    by_image: dict[Hashable, list[int]] = {}
    for i, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(i)
    items = []
    for image_id in sorted(by_image, key=str):
        idx = by_image[image_id]
        step = per_item or len(idx)
        items.extend((image_id, idx[i:i + step]) for i in range(0, len(idx), step))
    return items


def collate_region_samples(samples: Sequence[Sample]) -> dict[str, Any]:
    """Batch for detector-only region classification: samples with "image", "boxes" and "region_labels"
    (Long [K], -1 = ignore) -> images, image_sizes, boxes (list), region_labels (Long [sum K])."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    _require_all(samples, ("image", "boxes", "region_labels"))
    for i, s in enumerate(samples):
        if len(s["region_labels"]) != len(s["boxes"]):
            raise ValueError(f"sample {i}: {len(s['region_labels'])} region_labels for {len(s['boxes'])} "
                             "boxes")
    images, sizes = _pad_images([s["image"] for s in samples])
    return {"images": images, "image_sizes": sizes, "boxes": [s["boxes"].float() for s in samples],
            "region_labels": torch.cat([torch.as_tensor(s["region_labels"]).long() for s in samples])}


def _pad_images(images: Sequence[torch.Tensor],
                size_divisibility: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The detector's padding, with the sizes as the Long [N, 2] (h, w) tensor the batch carries."""
    padded, sizes = pad_images(images, size_divisibility)
    return padded, torch.tensor(sizes, dtype=torch.long)


def _pad_1d(rows: Sequence[Any], value: Any, min_len: int = 0) -> torch.Tensor:
    tensors = [torch.as_tensor(row) for row in rows]
    length = max([min_len] + [len(t) for t in tensors])
    return torch.stack(
        [F.pad(t, (0, length - len(t)), value=value) if len(t) < length else t for t in tensors]
    )


def _text_regions(i: int, sample: Sample) -> torch.Tensor:
    """The sample's token -> region index, checked against its tokens and boxes (all 0 when absent)."""
    index = torch.as_tensor(sample.get("text_region_index", torch.zeros(len(sample["input_ids"]))),
                            dtype=torch.long)
    if len(index) != len(sample["input_ids"]):
        raise ValueError(f"sample {i}: {len(index)} text_region_index entries for {len(sample['input_ids'])} "
                         "tokens")
    num_boxes = len(sample["boxes"]) if sample.get("image") is not None else 1
    bad = index[(index < 0) | (index >= num_boxes)]
    if len(bad):
        raise ValueError(f"sample {i}: text_region_index {int(bad[0])} is outside its {num_boxes} regions "
                         f"(0..{num_boxes - 1})")
    return index


def _check_same_image(first: Sample, other: Sample, key: Hashable) -> None:
    if first["image"].shape != other["image"].shape or first["boxes"].shape != other["boxes"].shape:
        raise ValueError(f"samples with image_key {key!r} carry different images or boxes")
    for sample in (first, other):
        if "region_masked" in sample and bool(sample["region_masked"].any()):
            raise ValueError(f"a sample with image_key {key!r} masks regions; masked images cannot be shared")


def _require_all(samples: Sequence[Sample], keys: Sequence[str]) -> None:
    for i, sample in enumerate(samples):
        missing = [k for k in keys if k not in sample]
        if missing:
            raise KeyError(f"sample {i} lacks {missing}; either every sample in a batch has them or none")
