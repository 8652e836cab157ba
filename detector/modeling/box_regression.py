"""Box <-> delta coding of R-CNN (Detectron2's Box2BoxTransform)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

# Largest log-scale a predicted delta may take: a box may grow at most 1000/16 times per side.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class Box2BoxTransform:
    """Encodes a target box relative to a source box as (dx, dy, dw, dh), divided by `weights`."""

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"box regression weights need 4 values (wx, wy, ww, wh), got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """Deltas (N, 4) that turn `src_boxes` (N, 4) into `target_boxes` (N, 4), XYXY."""
        src_w = src_boxes[:, 2] - src_boxes[:, 0]
        src_h = src_boxes[:, 3] - src_boxes[:, 1]
        src_x = src_boxes[:, 0] + 0.5 * src_w
        src_y = src_boxes[:, 1] + 0.5 * src_h
        tgt_w = target_boxes[:, 2] - target_boxes[:, 0]
        tgt_h = target_boxes[:, 3] - target_boxes[:, 1]
        tgt_x = target_boxes[:, 0] + 0.5 * tgt_w
        tgt_y = target_boxes[:, 1] + 0.5 * tgt_h
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (tgt_x - src_x) / src_w, wy * (tgt_y - src_y) / src_h,
                            ww * torch.log(tgt_w / src_w), wh * torch.log(tgt_h / src_h)), dim=1)

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Apply (N, 4k) deltas to (N, 4) XYXY boxes -> (N, 4k) boxes, computed in fp32."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        pred = torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                            pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h), dim=-1)
        return pred.reshape(deltas.shape)
