"""RoI pooling of one feature map: ROIAlign (legacy), ROIAlignV2 (aligned) or ROIPool."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.ops import roi_pool

from detector.layers import boxes_to_rois, roi_align

POOLER_TYPES = ("ROIAlign", "ROIAlignV2", "ROIPool")


class ROIPooler(nn.Module):
    """Pools each box of a single-level feature map (stride `1/scale`) into `output_size` bins.

    ROIAlign is the legacy (aligned=False) sampling of Detectron2/Caffe2; ROIAlignV2 shifts box
    coordinates by half a pixel (aligned=True); ROIPool is Caffe's max pooling (torchvision op).
    """

    def __init__(self, output_size: int, scale: float, sampling_ratio: int, pooler_type: str):
        super().__init__()
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.POOLER_TYPE: unknown pooler {pooler_type!r}; "
                             f"expected one of {POOLER_TYPES}")
        self.output_size = (output_size, output_size)
        self.scale = scale
        self.sampling_ratio = sampling_ratio
        self.pooler_type = pooler_type

    def forward(self, feature: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """feature (N, C, H, W), boxes: N tensors (K_i, 4) in input pixels -> (sum K_i, C, S, S)."""
        if len(boxes) != feature.shape[0]:
            raise ValueError(f"got boxes for {len(boxes)} images but a feature batch of {feature.shape[0]}")
        rois = boxes_to_rois(boxes, dtype=feature.dtype)
        if rois.shape[0] == 0:
            return feature.new_zeros((0, feature.shape[1]) + self.output_size)
        if self.pooler_type == "ROIPool":
            if feature.dtype in (torch.float16, torch.bfloat16):
                # torchvision's CPU roi_pool has no half kernels; a max is exact in float32, and float32
                # boxes keep the bin edges of the full-precision model.
                rois = boxes_to_rois(boxes, dtype=torch.float32)
                return roi_pool(feature.float(), rois, self.output_size, self.scale).to(feature.dtype)
            return roi_pool(feature, rois, self.output_size, self.scale)
        return roi_align(feature, rois, self.output_size, spatial_scale=self.scale,
                         sampling_ratio=self.sampling_ratio, aligned=self.pooler_type == "ROIAlignV2")
