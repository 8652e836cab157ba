"""Region proposal network of the C4 model: anchors, StandardRPNHead and Detectron2's proposal selection."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms

from detector.config import CfgNode
from detector.modeling.box_regression import Box2BoxTransform
from detector.structures import clip_boxes, nonempty


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """(len(sizes) * len(ratios), 4) XYXY anchors centred on 0, size-major (all ratios of size 0 first).

    aspect ratio = height / width; each anchor keeps the area size**2.
    """
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class DefaultAnchorGenerator(nn.Module):
    """Cell anchors replicated at every position of one feature map (row-major positions, then anchors)."""

    def __init__(self, sizes: Sequence[float], aspect_ratios: Sequence[float], stride: int,
                 offset: float = 0.0):
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {offset}")
        self.stride = stride
        self.offset = offset
        self.num_sizes, self.num_ratios = len(sizes), len(aspect_ratios)
        # Not saved in checkpoints: derived from the config (Detectron2 also keeps them out of state dicts).
        self.register_buffer("cell_anchors", generate_cell_anchors(sizes, aspect_ratios), persistent=False)

    @property
    def num_anchors(self) -> int:
        return self.cell_anchors.shape[0]

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(H * W * A, 4) anchors in input pixels for a (N, C, H, W) feature map."""
        h, w = feature.shape[-2:]
        device = self.cell_anchors.device
        shifts_x = torch.arange(self.offset * self.stride, w * self.stride, step=self.stride,
                                dtype=torch.float32, device=device)
        shifts_y = torch.arange(self.offset * self.stride, h * self.stride, step=self.stride,
                                dtype=torch.float32, device=device)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts.view(-1, 1, 4) + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)


class StandardRPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for one objectness logit and 4 deltas per anchor."""

    def __init__(self, in_channels: int, num_anchors: int, conv_dim: int, box_dim: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, conv_dim, kernel_size=3, stride=1, padding=1)
        self.objectness_logits = nn.Conv2d(conv_dim, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(conv_dim, num_anchors * box_dim, kernel_size=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """Proposals for each image: decode all anchors, keep the pre-NMS top-k by objectness, clip,
    drop small boxes, NMS, keep the post-NMS top-k (Detectron2's find_top_rpn_proposals, one level)."""

    def __init__(self, cfg: CfgNode, in_channels: int, feature_stride: int):
        super().__init__()
        rpn, ag = cfg.MODEL.RPN, cfg.MODEL.ANCHOR_GENERATOR
        if len(rpn.IN_FEATURES) != 1:
            raise ValueError(f"MODEL.RPN.IN_FEATURES: the C4 RPN uses one feature map, got {rpn.IN_FEATURES}")
        if len(ag.SIZES) != 1 or len(ag.ASPECT_RATIOS) != 1:
            raise ValueError("MODEL.ANCHOR_GENERATOR.SIZES/ASPECT_RATIOS need exactly one list (one feature "
                             f"map), got {ag.SIZES} / {ag.ASPECT_RATIOS}")
        if len(rpn.CONV_DIMS) != 1:
            raise ValueError(f"MODEL.RPN.CONV_DIMS: one hidden conv is supported, got {rpn.CONV_DIMS}")
        self.in_feature = rpn.IN_FEATURES[0]
        self.anchor_generator = DefaultAnchorGenerator(ag.SIZES[0], ag.ASPECT_RATIOS[0], feature_stride,
                                                       ag.OFFSET)
        conv_dim = in_channels if rpn.CONV_DIMS[0] == -1 else rpn.CONV_DIMS[0]
        self.rpn_head = StandardRPNHead(in_channels, self.anchor_generator.num_anchors, conv_dim)
        self.box2box_transform = Box2BoxTransform(rpn.BBOX_REG_WEIGHTS)
        self.pre_nms_topk = {True: rpn.PRE_NMS_TOPK_TRAIN, False: rpn.PRE_NMS_TOPK_TEST}
        self.post_nms_topk = {True: rpn.POST_NMS_TOPK_TRAIN, False: rpn.POST_NMS_TOPK_TEST}
        self.nms_thresh = rpn.NMS_THRESH
        self.min_box_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)

    def forward(self, feature: torch.Tensor,
                image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """feature (N, C, H, W) -> per image dict(proposal_boxes (P, 4), objectness_logits (P,))."""
        anchors = self.anchor_generator(feature)
        logits, deltas = self.rpn_head(feature)
        n = feature.shape[0]
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)  # (N, H*W*A), positions then anchors
        deltas = (deltas.view(n, -1, 4, deltas.shape[-2], deltas.shape[-1])
                  .permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        with torch.no_grad():
            proposals = self.box2box_transform.apply_deltas(
                deltas.reshape(-1, 4), anchors.unsqueeze(0).expand(n, -1, -1).reshape(-1, 4)).view(n, -1, 4)
            return self._select(proposals, logits.float(), image_sizes)

    def _select(self, proposals: torch.Tensor, logits: torch.Tensor,
                image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        k = min(self.pre_nms_topk[self.training], logits.shape[1])
        sorted_logits, order = logits.sort(descending=True, dim=1)
        top_logits, top_idx = sorted_logits[:, :k], order[:, :k]
        batch_idx = torch.arange(proposals.shape[0], device=proposals.device)[:, None]
        top_props = proposals[batch_idx, top_idx]
        results = []
        for boxes, scores, size in zip(top_props, top_logits, image_sizes):
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if not valid.all():
                if self.training:
                    raise FloatingPointError("RPN produced non-finite proposals or scores during training")
                boxes, scores = boxes[valid], scores[valid]
            boxes = clip_boxes(boxes, size)
            keep = nonempty(boxes, self.min_box_size)
            if not keep.all():
                boxes, scores = boxes[keep], scores[keep]
            keep = nms(boxes, scores, self.nms_thresh)[: self.post_nms_topk[self.training]]
            results.append({"proposal_boxes": boxes[keep], "objectness_logits": scores[keep]})
        return results
