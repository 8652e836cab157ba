"""NLVR2 (Suhr et al. 2019) from its official files (github.com/lil-lab/nlvr, nlvr2/).

Layout under the data root: `train.json`, `dev.json`, `test1.json` (the public test set, test-P): JSON
lines, one example each, with `identifier` (`<split>-<set_id>-<pair_id>-<sentence_id>`), `sentence` and
`label` ("True" / "False"); other fields are ignored. The example's images are named, as the official
repository fixes it, `<split>-<set_id>-<pair_id>-img0.png` (left) and `...-img1.png` (right); they are
found by name anywhere under the image folder (the training images come in numbered sub-folders). Their
regions come from the RoI store, keyed by the file stem (`detector.image_sources`); box 0 is the whole image.

An item is one example: the sentence with image 0, then with image 1, two samples. `NLVR2Collator` batches
them in either pair format (`e2e_vl.modeling.nlvr2_heads`): "separate" (LXMERT's) keeps the two samples;
"joint" (VisualBERT's) keeps the text once per example with both images' slots (`sample_image_index`,
`second_image_index`). The labels ride on the batch as `nlvr2_labels`, one per example.

Every line, label and image is checked when the data set is built, before training starts; a bad one stops
it with the file, the line and the problem.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detector.image_sources import load_image
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.collate import collate_samples
from e2e_vl.data.jsonl import json_objects
from e2e_vl.data.transforms import ResizeFlip

LABELS = {"True": 1, "False": 0}
PAIR_FORMATS = ("joint", "separate")
IMAGE_SUFFIX = ".png"


class NLVR2DataError(DatasetError):
    """An NLVR2 file, line or image that cannot be used; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    sentence: str
    label: int  # 1 = True, 0 = False
    where: str  # "<file>:<line>", for messages

    @property
    def images(self) -> tuple[str, str]:
        """The stems of the left and right images: the identifier without its sentence id, + -img0/-img1."""
        pair = self.identifier.rsplit("-", 1)[0]
        return f"{pair}-img0", f"{pair}-img1"


def sentence_key(identifier: str) -> str:
    """What the official evaluation groups consistency by: the identifier with its pair id blanked (one
    sentence of one image set, over the pairs it was written for)."""
    parts = identifier.split("-")
    parts[2] = ""
    return "-".join(parts)


def read_nlvr2_jsonl(path: str | os.PathLike) -> list[NLVR2Example]:
    """Every example of one official file, validated (JSON object, identifier of four parts, a sentence,
    label "True" or "False", no identifier twice)."""
    examples: list[NLVR2Example] = []
    seen: dict[str, str] = {}
    for where, raw in json_objects(path, NLVR2DataError, "NLVR2 file"):
        missing = [k for k in ("identifier", "sentence", "label") if k not in raw]
        if missing:
            raise NLVR2DataError(f"{where}: missing key(s) {missing}")
        identifier, sentence, label = raw["identifier"], raw["sentence"], raw["label"]
        if not isinstance(identifier, str) or len(identifier.split("-")) != 4:
            raise NLVR2DataError(f"{where}: identifier {identifier!r} is not "
                                 "<split>-<set_id>-<pair_id>-<sentence_id>")
        if not isinstance(sentence, str) or not sentence.strip():
            raise NLVR2DataError(f"{where} ({identifier}): empty sentence")
        if label not in LABELS:
            raise NLVR2DataError(f"{where} ({identifier}): label {label!r} is not \"True\" or \"False\"")
        if identifier in seen:
            raise NLVR2DataError(f"{where}: identifier {identifier!r} already on {seen[identifier]}")
        seen[identifier] = where
        examples.append(NLVR2Example(identifier, sentence, LABELS[label], where))
    if not examples:
        raise NLVR2DataError(f"{path}: no examples")
    return examples


def find_images(image_dir: str | os.PathLike, examples: Sequence[NLVR2Example]) -> dict[str, Path]:
    """Each example image's file under `image_dir` (any depth), by stem; the first example whose image is
    absent is an error naming its line."""
    wanted = {stem for e in examples for stem in e.images}
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(image_dir):
        for name in files:
            stem = name[:-len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else None
            if stem in wanted:
                found.setdefault(stem, Path(folder) / name)
    for example in examples:
        for stem in example.images:
            if stem not in found:
                raise NLVR2DataError(f"{example.where} ({example.identifier}): image {stem}{IMAGE_SUFFIX} "
                                     f"is not under {image_dir}")
    return found


def store_boxes(store: Any, examples: Sequence[NLVR2Example], source: str) -> dict[str, np.ndarray]:
    """Each example image's boxes (XYXY, original pixels) from the RoI store; the first example whose image
    has no record is an error naming its line and the extraction that adds it."""
    from e2e_vl.data.roi_records import EXTRACT_COMMAND, describe_store, store_keys

    keys = set(store_keys(store))
    for example in examples:
        for stem in example.images:
            if stem not in keys:
                raise NLVR2DataError(f"{example.where} ({example.identifier}): image {stem} has no record in "
                                     f"{describe_store(store)} ({source}); extract its regions: "
                                     f"{EXTRACT_COMMAND}")
    stems = sorted({stem for e in examples for stem in e.images})
    return {stem: np.asarray(store[stem].boxes, np.float32).reshape(-1, 4) for stem in stems}


class NLVR2Dataset(Dataset):
    """Items: one example as its two (sentence, image) samples; see the module docstring.
    Images are resized by `transform` (never flipped: "left" and "right" name the two images)."""

    def __init__(self, examples: Sequence[NLVR2Example], images: dict[str, Path],
                 boxes: dict[str, np.ndarray], tokenizer, transform: ResizeFlip, pair_format: str,
                 max_text_len: int = 40, seed: int = 0):
        if pair_format not in PAIR_FORMATS:
            raise ValueError(f"pair format must be one of {PAIR_FORMATS}, got {pair_format!r}")
        self.examples, self.images, self.boxes = list(examples), images, boxes
        self.transform, self.pair_format, self.seed, self.epoch = transform, pair_format, seed, 0
        encoded = tokenizer([e.sentence for e in self.examples], add_special_tokens=False)["input_ids"]
        self.input_ids = [torch.tensor([tokenizer.cls_token_id, *ids[:max_text_len], tokenizer.sep_token_id])
                          for ids in encoded]

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _image(self, stem: str, rng: random.Random) -> dict[str, Any]:
        image = load_image(str(self.images[stem]))
        h, w = image.shape[:2]
        boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), self.boxes[stem]])
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
        out = self.transform(image, torch.from_numpy(boxes), None, rng)
        # samples of one image at one size (the two sentences of a pair) share a detector pass
        return {"image": out.image, "boxes": out.boxes, "image_key": (stem, *out.image.shape[1:]),
                "image_id": stem}

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        example = self.examples[index]
        text = {"input_ids": self.input_ids[index],
                "token_type_ids": torch.zeros(len(self.input_ids[index]), dtype=torch.long)}
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")  # a resumed run draws the same sizes
        samples = [{**self._image(stem, rng), **text} for stem in example.images]
        samples[0]["nlvr2_label"] = example.label
        return samples


class NLVR2Collator:
    """Batches NLVR2 items: `collate_samples` over every (sentence, image) sample, then `nlvr2_labels`
    (one per example) and, for the joint format, the text of each example once with its two image slots
    (`sample_image_index`, `second_image_index`)."""

    def __init__(self, pair_format: str, pad_token_id: int = 0):
        if pair_format not in PAIR_FORMATS:
            raise ValueError(f"pair format must be one of {PAIR_FORMATS}, got {pair_format!r}")
        self.joint, self.pad_token_id = pair_format == "joint", pad_token_id

    def __call__(self, items: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
        samples = [s for item in items for s in item]
        if not samples:
            raise ValueError("cannot collate an empty batch")
        batch = collate_samples(samples, self.pad_token_id)
        batch["nlvr2_labels"] = torch.tensor([int(s["nlvr2_label"]) for s in samples if "nlvr2_label" in s],
                                             dtype=torch.long)
        if self.joint:  # samples alternate image 0 / image 1 of one example
            slots = batch["sample_image_index"]
            batch["second_image_index"] = slots[1::2]
            for key in ("sample_image_index", "input_ids", "text_mask", "token_type_ids"):
                batch[key] = batch[key][0::2]
            batch["image_ids"] = batch["image_ids"][0::2]
        return batch
