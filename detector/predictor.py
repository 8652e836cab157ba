"""One-call detector for BGR uint8 images (as read by cv2.imread): resize, run, map back.

Accepted images and conversions (documented, never silent about anything ambiguous):
- HxWx3 uint8 BGR: used as is (converted to RGB first if INPUT.FORMAT is RGB);
- HxW or HxWx1 uint8 grayscale: replicated to three channels;
- HxWx4 uint8 BGRA (cv2.IMREAD_UNCHANGED of a PNG with alpha): the alpha channel is dropped;
- anything else (16-bit, float, empty, other channel counts, non-arrays) raises ImageError saying
  what was received and how to convert it.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from detector.config import CfgNode
from detector.image_sources import ImageError, as_bgr_uint8
from detector.modeling import GeneralizedRCNN, build_detector
from detector.transforms import rescale_boxes, resize_shortest_edge

# ImageError is re-exported: it is what DetectorPredictor raises for an image it cannot take.
__all__ = ["DetectorPredictor", "ImageError", "as_bgr_uint8"]


class DetectorPredictor:
    """Builds the detector of `cfg`, loads `weights` (or MODEL.WEIGHTS), and runs single images."""

    def __init__(self, cfg: CfgNode, weights: str | os.PathLike | None = None,
                 optimize_dtype: torch.dtype | None = None):
        """`optimize_dtype` (float32 / bfloat16 / float16): apply GeneralizedRCNN.optimize_for_inference
        after loading; faster, but outputs no longer equal Detectron2's bit for bit (None keeps them)."""
        self.cfg = cfg.clone()
        self.model: GeneralizedRCNN = build_detector(self.cfg)
        weights = weights if weights is not None else (self.cfg.MODEL.WEIGHTS or None)
        if weights:
            from detector.checkpoint import load_checkpoint

            load_checkpoint(self.model, weights)
        if optimize_dtype is not None:
            self.model.optimize_for_inference(optimize_dtype)
        self.min_size = self.cfg.INPUT.MIN_SIZE_TEST
        self.max_size = self.cfg.INPUT.MAX_SIZE_TEST

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        image = as_bgr_uint8(image)
        if self.model.input_format == "RGB":
            image = image[:, :, ::-1]
        resized, _ = resize_shortest_edge(image, self.min_size, self.max_size)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), device=self.model.device)
        x = self.model.preprocess_image(tensor[None].float())
        return x, tuple(resized.shape[:2]), tuple(image.shape[:2])

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """Faster R-CNN detections in the original image's pixels (see GeneralizedRCNN.inference)."""
        x, size, original = self._prepare(image)
        return self.model.inference(x, [size], output_sizes=[original])[0]

    @torch.no_grad()
    def fast_rcnn(self, image: np.ndarray, boxes: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Region features and scores for `boxes` (K, 4) XYXY in the original image's pixels."""
        x, size, original = self._prepare(image)
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.model.device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        return self.model.fast_rcnn(x, [rescale_boxes(boxes, original, size)])
