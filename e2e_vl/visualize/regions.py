"""What the model's own detector says about given boxes: a class and attribute name and a confidence per
box, with names from the detector's vocabulary (Visual Genome's 1600 classes / 400 attributes), from a
task's class list (easy-VQA's colour-shape classes) or numbered when neither fits."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from detector import vocab
from detector.modeling import GeneralizedRCNN


@dataclasses.dataclass(frozen=True)
class RegionLabels:
    """Per box: object class (background excluded), its probability, best attribute and its probability."""

    classes: np.ndarray
    scores: np.ndarray
    num_classes: int
    attributes: np.ndarray | None = None
    attr_scores: np.ndarray | None = None
    num_attributes: int = 0


def class_names(num_classes: int, task_classes: Sequence[str] = ()) -> list[str]:
    """Names of `num_classes` object classes: VG's when they are 1600, the task's when they match in
    number, else class<i>."""
    if num_classes == vocab.NUM_OBJECTS:
        return list(vocab.object_names())
    if len(task_classes) == num_classes:
        return list(task_classes)
    return [f"class{i}" for i in range(num_classes)]


def attribute_names(num_attributes: int) -> list[str]:
    return (list(vocab.attribute_names()) if num_attributes == vocab.NUM_ATTRIBUTES
            else [f"attr{i}" for i in range(num_attributes)])


def label_text(labels: RegionLabels, i: int, names: Sequence[str], attrs: Sequence[str] | None,
               attr_thresh: float = 0.1) -> str:
    """"attribute class score" of box `i` (the attribute only above `attr_thresh`)."""
    parts = []
    if labels.attributes is not None and attrs is not None and labels.attr_scores[i] >= attr_thresh:
        parts.append(attrs[int(labels.attributes[i])])
    parts += [names[int(labels.classes[i])], f"{float(labels.scores[i]):.2f}"]
    return " ".join(parts)


@torch.no_grad()
def label_boxes(detector: GeneralizedRCNN, image: torch.Tensor, boxes: torch.Tensor) -> RegionLabels:
    """The detector's best class (and attribute) of each box of one resized image `[3, h, w]` (0..255)."""
    images = image[None].float().to(detector.device)
    sizes = torch.tensor([[image.shape[1], image.shape[2]]])
    out = detector.fast_rcnn(detector.prepare_batch(images, sizes), [boxes.float().to(detector.device)])
    probs = out["class_probs"][:, :-1]  # background is the last column
    scores, classes = probs.max(dim=1)
    attributes = attr_scores = None
    num_attributes = 0
    if "attr_probs" in out:
        num_attributes = out["attr_probs"].shape[1] - 1
        attr_scores, attributes = out["attr_probs"][:, :-1].max(dim=1)
        attributes, attr_scores = attributes.cpu().numpy(), attr_scores.cpu().numpy()
    return RegionLabels(classes.cpu().numpy(), scores.cpu().numpy(), probs.shape[1], attributes, attr_scores,
                        num_attributes)
