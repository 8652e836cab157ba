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
    region_labelled  Bool [K]        optional: regions with a masked-RoI-classification target
    mrc_targets      Float [K, C]    optional: class distributions (rows of labelled regions are used)
    mlm_labels       Long [T]        optional: target ids at masked words, -100 elsewhere
    vqa_targets      Float [A]       optional: soft answer scores
    answer_pos       int             optional: index of the answer [MASK] token in input_ids
    ref_labels       Float [K]       optional: per-region targets (RefCOCO+), -1 = ignore
    object_labels    Long [K]        optional: per-region class (VCR's COCO classes, 0 = background),
                                     -1 = ignore
    choice_label     int             optional: on the first sample of each group of choices (VCR);
                                     -1 = unknown (a split without labels)
    itm_labels       int             optional: caption pre-training, 1 = the caption's own image, 0 = another
                                     image's (image-text matching); -1 (or absent) = not a caption pair

Samples with vqa_targets and answer_pos may share a batch with samples that have neither (questions mixed
into pre-training): the batch then says which carry an answer (`vqa_labelled`).

A data set item may also be a list of samples (e.g. an image with all its questions); lists are
flattened. The batch layout is documented in `e2e_vl.modeling.vlbert.VLBert`.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
import torch.nn.functional as F

from detector.structures import pad_images
from e2e_vl.data.masking import IGNORE_INDEX

Sample = dict[str, Any]


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
    if any("mlm_labels" in s for s in samples):
        batch["mlm_labels"] = _pad_1d(
            [s.get("mlm_labels", torch.full((len(s["input_ids"]),), IGNORE_INDEX)) for s in samples],
            IGNORE_INDEX,
        )

    # ---- per-sample region targets ---------------------------------------------------------------------
    if any("region_labelled" in s for s in samples):
        num_boxes = [len(s["boxes"]) if s.get("image") is not None else 0 for s in samples]
        flags = [
            s.get("region_labelled", torch.zeros(n, dtype=torch.bool)).bool()
            for s, n in zip(samples, num_boxes)
        ]
        batch["region_labelled"] = _pad_1d(flags, False, min_len=max(num_boxes))
        rows = [s["mrc_targets"][f] for s, f in zip(samples, flags) if f.any()]
        if rows:
            batch["mrc_targets"] = torch.cat(rows).float()
        else:
            width = next((s["mrc_targets"].shape[1] for s in samples if "mrc_targets" in s), 0)
            batch["mrc_targets"] = torch.zeros(0, width)
    if any("object_labels" in s for s in samples):
        for i, s in enumerate(samples):
            if "object_labels" in s and len(s["object_labels"]) != len(s["boxes"]):
                raise ValueError(f"sample {i}: {len(s['object_labels'])} object_labels for {len(s['boxes'])} "
                                 "boxes")
        batch["object_labels"] = _pad_1d([s.get("object_labels", torch.zeros(0, dtype=torch.long)).long()
                                          for s in samples], -1)
    if any("ref_labels" in s for s in samples):
        batch["ref_labels"] = _pad_1d([s.get("ref_labels", torch.zeros(0)).float() for s in samples], -1.0)

    if any("itm_labels" in s for s in samples):
        batch["itm_labels"] = torch.tensor([int(s.get("itm_labels", -1)) for s in samples], dtype=torch.long)

    # ---- answers -----------------------------------------------------------------------------------------
    if any("vqa_targets" in s for s in samples):
        is_question = ["vqa_targets" in s or "answer_pos" in s for s in samples]
        for i, sample in enumerate(samples):
            if is_question[i] and not {"vqa_targets", "answer_pos"} <= set(sample):
                raise KeyError(f"sample {i} lacks "
                               f"{'answer_pos' if 'vqa_targets' in sample else 'vqa_targets'}; "
                               "a question carries both")
        if not all(is_question):  # questions mixed into pre-training: only they get the vqa loss
            batch["vqa_labelled"] = torch.tensor(is_question)
        width = next(len(s["vqa_targets"]) for s in samples if "vqa_targets" in s)
        batch["vqa_targets"] = torch.stack([torch.as_tensor(s.get("vqa_targets", torch.zeros(width))).float()
                                            for s in samples])
        batch["answer_pos"] = torch.tensor([int(s.get("answer_pos", 0)) for s in samples], dtype=torch.long)
    elif any("answer_pos" in s for s in samples):
        _require_all(samples, ("answer_pos",))
        batch["answer_pos"] = torch.tensor([int(s["answer_pos"]) for s in samples], dtype=torch.long)
    if any("image_id" in s for s in samples):  # passed through for evaluation and bookkeeping
        batch["image_ids"] = [s.get("image_id") for s in samples]
    if any("choice_label" in s for s in samples):
        batch["choice_labels"] = torch.tensor(
            [int(s["choice_label"]) for s in samples if "choice_label" in s]
        )
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
