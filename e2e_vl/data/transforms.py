"""Image transforms shared by pre-training and fine-tuning: shortest-side resize and horizontal flip.

Resizing uses the detector's own `detector.transforms.resize_with_boxes` so that images reach the
backbone exactly as the detector saw them when the RoIs were extracted. Boxes are carried along in
the resized pixel coordinates. A flip mirrors the boxes and, when the task's text refers to sides, swaps
"left" and "right" in it (VL-BERT does this for RefCOCO+; captions and VQA questions can ask for it
too).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap the words "left" and "right" (whole words, keeping capitalisation): "Left-most" ->
    "Right-most"."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _SIDE_WORDS.sub(swap, text)


def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror (x1, y1, x2, y2) boxes horizontally in an image `width` pixels wide."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


@dataclass
class TransformedImage:
    """An image ready for collation: CHW uint8 tensor (channel order as read), boxes in its coordinates."""

    image: torch.Tensor
    boxes: torch.Tensor
    text: str | None
    scale: float
    flipped: bool


class ResizeFlip:
    """Shortest-side resize (size drawn from `min_sizes` in training) and optional horizontal flip.

    `swap_text_sides` turns on the "left"/"right" swap of the text when an image is flipped.
    """

    def __init__(
        self,
        min_sizes: Sequence[int] | int,
        max_size: int,
        flip_prob: float = 0.0,
        swap_text_sides: bool = False,
    ):
        self.min_sizes = [min_sizes] if isinstance(min_sizes, int) else list(min_sizes)
        if not self.min_sizes or min(self.min_sizes) <= 0:
            raise ValueError(f"min_sizes must be positive sizes, got {min_sizes!r}")
        self.max_size = max_size
        self.flip_prob = flip_prob
        self.swap_text_sides = swap_text_sides

    def __call__(
        self,
        image: np.ndarray,
        boxes: torch.Tensor,
        text: str | None = None,
        rng: random.Random | None = None,
    ) -> TransformedImage:
        """`image` HxWxC uint8 (BGR as read by OpenCV); `boxes` [K, 4] in its original pixel coordinates."""
        from detector.transforms import resize_with_boxes

        rng = rng or random
        if image.ndim != 3:
            raise ValueError(f"image must be HxWxC, got shape {image.shape}")
        min_size = self.min_sizes[0] if len(self.min_sizes) == 1 else rng.choice(self.min_sizes)
        resized, boxes, scale = resize_with_boxes(image, boxes, min_size, self.max_size)
        flipped = self.flip_prob > 0 and rng.random() < self.flip_prob
        if flipped:
            resized = resized[:, ::-1]
            boxes = flip_boxes(boxes, resized.shape[1])
            if text is not None and self.swap_text_sides:
                text = swap_left_right(text)
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return TransformedImage(tensor, boxes, text, float(scale), flipped)
