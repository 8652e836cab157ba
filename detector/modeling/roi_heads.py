"""The C4 RoI head: pool res4 -> res5 -> mean -> class scores, box deltas and VG attributes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import batched_nms

from detector.config import CfgNode
from detector.modeling.box_regression import Box2BoxTransform
from detector.modeling.poolers import ROIPooler
from detector.modeling.resnet import BottleneckBlock, make_stage
from detector.structures import check_boxes, clip_boxes


class FastRCNNOutputLayers(nn.Module):
    """Class scores (C+1, background last), class-specific box deltas (4C) and the VG attribute head.

    The attribute head embeds the arg-max class (over all C+1 logits, or the given classes when
    training), concatenates it after the region feature and maps it to A+1 attribute scores
    ("no attribute" last) through a 512-unit hidden layer.
    """

    def __init__(self, input_dim: int, num_classes: int, cls_agnostic_bbox_reg: bool = False,
                 num_attributes: int = 0, embed_dim: int = 256, hidden_dim: int = 512):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(input_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(input_dim, 4 * (1 if cls_agnostic_bbox_reg else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.attribute_on = num_attributes > 0
        if self.attribute_on:
            self.cls_embedding = nn.Embedding(num_classes + 1, embed_dim)
            self.fc_attr = nn.Linear(input_dim + embed_dim, hidden_dim)
            self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)
            for layer in (self.cls_embedding, self.fc_attr, self.attr_score):
                nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(self.fc_attr.bias)
            nn.init.zeros_(self.attr_score.bias)

    def forward(self, features: torch.Tensor, classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """features (N, D) -> dict(class_logits (N, C+1), box_deltas (N, 4C)[, attr_logits (N, A+1)])."""
        if features.dim() > 2:
            features = torch.flatten(features, start_dim=1)
        out = {"class_logits": self.cls_score(features), "box_deltas": self.bbox_pred(features)}
        if self.attribute_on:
            if classes is None:
                classes = out["class_logits"].argmax(dim=1)
            embedded = self.cls_embedding(classes).to(features.dtype)
            hidden = F.relu(self.fc_attr(torch.cat((features, embedded), dim=1)))
            out["attr_logits"] = self.attr_score(hidden)
        return out


class Res5ROIHeads(nn.Module):
    """Detectron2's Res5ROIHeads: res5 runs per box on the pooled res4 features (the C4 design).

    With ROI_BOX_HEAD.RES5HALVE False (the VG model) the first res5 block does not stride, so
    14x14 pooled maps stay 14x14; RESNETS.RES5_DILATION sets the dilation of res5's 3x3 convs.
    """

    def __init__(self, cfg: CfgNode, in_channels: int, feature_stride: int):
        super().__init__()
        rh, bh, r = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.RESNETS
        if len(rh.IN_FEATURES) != 1:
            raise ValueError("MODEL.ROI_HEADS.IN_FEATURES: Res5ROIHeads pools one feature map, got "
                             f"{rh.IN_FEATURES}")
        self.in_feature = rh.IN_FEATURES[0]
        self.num_classes = rh.NUM_CLASSES
        self.score_thresh = rh.SCORE_THRESH_TEST
        self.nms_thresh = rh.NMS_THRESH_TEST
        self.detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        self.pooler = ROIPooler(bh.POOLER_RESOLUTION, 1.0 / feature_stride, bh.POOLER_SAMPLING_RATIO,
                                bh.POOLER_TYPE)

        factor = 8  # res5 has 8x the channels of res2
        out_channels = r.RES2_OUT_CHANNELS * factor
        if in_channels != out_channels // 2:
            raise ValueError(f"res5 expects {out_channels // 2} input channels (RES2_OUT_CHANNELS * 4) "
                             f"but {self.in_feature} has {in_channels}")
        blocks = make_stage(BottleneckBlock, 3, first_stride=2 if bh.RES5HALVE else 1,
                            in_channels=in_channels, out_channels=out_channels,
                            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * factor,
                            num_groups=r.NUM_GROUPS, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1,
                            dilation=r.RES5_DILATION)
        self.res5 = nn.Sequential(*blocks)
        self.out_channels = out_channels
        attr = cfg.MODEL.ROI_ATTRIBUTE_HEAD
        self.box_predictor = FastRCNNOutputLayers(
            out_channels, rh.NUM_CLASSES, bh.CLS_AGNOSTIC_BBOX_REG,
            num_attributes=attr.NUM_CLASSES if cfg.MODEL.ATTRIBUTE_ON else 0,
            embed_dim=attr.OBJ_EMBED_DIM, hidden_dim=attr.FC_DIM)
        self.box2box_transform = Box2BoxTransform(bh.BBOX_REG_WEIGHTS)

    # -- building blocks (the Fast R-CNN path) ------------------------------------------------------
    def region_features(self, feature: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pooled res4 -> res5 -> spatial mean: (sum K_i, 2048) for boxes given in input-tensor pixels."""
        boxes = [check_boxes(b, f"boxes[{i}]") for i, b in enumerate(boxes)]
        pooled = self.pooler(feature, boxes)
        if pooled.shape[0] == 0:
            return feature.new_zeros((0, self.out_channels))
        return self.res5(pooled).mean(dim=(2, 3))

    def predict(self, features: torch.Tensor, classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Region features -> class_logits, box_deltas and (with attributes) attr_logits."""
        return self.box_predictor(features, classes)

    # -- Faster R-CNN inference -------------------------------------------------------------------
    def forward(self, feature: torch.Tensor, proposals: Sequence[torch.Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Score proposals, regress boxes, then per-class NMS per image (Detectron2's inference)."""
        features = self.region_features(feature, proposals)
        preds = self.predict(features)
        num_per_image = [len(p) for p in proposals]
        results = []
        for i, (props, size) in enumerate(zip(proposals, image_sizes)):
            start = sum(num_per_image[:i])
            sl = slice(start, start + num_per_image[i])
            results.append(self._inference_single_image(
                props, features[sl], {k: v[sl] for k, v in preds.items()}, size))
        return results

    def _inference_single_image(self, proposals: torch.Tensor, features: torch.Tensor,
                                preds: dict[str, torch.Tensor],
                                image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        boxes = self.box2box_transform.apply_deltas(preds["box_deltas"], proposals)
        class_probs = F.softmax(preds["class_logits"].float(), dim=-1)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(class_probs).all(dim=1)
        index = torch.arange(len(proposals), device=proposals.device)
        if not valid.all():
            boxes, class_probs, index = boxes[valid], class_probs[valid], index[valid]
        scores = class_probs[:, :-1]
        num_reg = boxes.shape[1] // 4
        boxes = clip_boxes(boxes.reshape(-1, 4), image_size).view(-1, num_reg, 4)
        keep_mask = scores > self.score_thresh
        inds = keep_mask.nonzero()
        boxes = boxes[inds[:, 0], 0] if num_reg == 1 else boxes[keep_mask]
        scores = scores[keep_mask]
        keep = batched_nms(boxes, scores, inds[:, 1], self.nms_thresh)
        if self.detections_per_image >= 0:
            keep = keep[: self.detections_per_image]
        rows = index[inds[keep, 0]]
        out = {
            "boxes": boxes[keep],
            "scores": scores[keep],
            "classes": inds[keep, 1],
            "class_probs": class_probs[inds[keep, 0]],
            "features": features[rows],
            "proposal_boxes": proposals[rows],
            "proposal_indices": rows,
        }
        if "attr_logits" in preds:
            out["attr_probs"] = F.softmax(preds["attr_logits"][rows].float(), dim=-1)
        return out
