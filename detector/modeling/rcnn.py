"""GeneralizedRCNN for the C4 design: backbone (res4) + RPN + Res5ROIHeads, Detectron2's module tree.

Two ways to run it:
- `region_outputs(features(images), boxes)` (or `fast_rcnn`): features and scores of given boxes, the one
  path of extraction, training and the parity tests;
- `inference(images, image_sizes)`: Faster R-CNN detections with class/attribute probabilities and features.
Both take a batch that is already resized, normalised (`preprocess_image`) and padded.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detector.config import CfgNode, validate_detector_cfg
from detector.layers.wrappers import fold_frozen_batchnorm
from detector.modeling.resnet import build_resnet_backbone
from detector.modeling.roi_heads import Res5ROIHeads
from detector.modeling.rpn import RPN
from detector.structures import box_pixel_mask, clip_boxes, nonempty, scale_boxes


class GeneralizedRCNN(nn.Module):
    """Faster/Fast R-CNN with keys `backbone.*`, `proposal_generator.*`, `roi_heads.*` as in Detectron2."""

    def __init__(self, cfg: CfgNode):
        super().__init__()
        m = cfg.MODEL
        validate_detector_cfg(cfg)
        if len(m.PIXEL_MEAN) != len(m.PIXEL_STD):
            raise ValueError(f"MODEL.PIXEL_MEAN {m.PIXEL_MEAN} and MODEL.PIXEL_STD {m.PIXEL_STD} differ in "
                             "length")
        self.input_format = cfg.INPUT.FORMAT
        self.backbone = build_resnet_backbone(cfg)
        shapes = self.backbone.output_shape()
        feature = m.ROI_HEADS.IN_FEATURES[0]
        if feature not in shapes:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES {m.ROI_HEADS.IN_FEATURES} is not produced by the "
                             f"backbone (MODEL.RESNETS.OUT_FEATURES = {list(shapes)})")
        channels, stride = shapes[feature]
        self.in_feature = feature
        # PrecomputedProposals: a Fast R-CNN-only model without RPN weights.
        self.proposal_generator = RPN(cfg, channels, stride) if m.PROPOSAL_GENERATOR.NAME == "RPN" else None
        self.roi_heads = Res5ROIHeads(cfg, channels, stride)
        # Not part of checkpoints (as in Detectron2): they come from the config.
        self.register_buffer("pixel_mean", torch.tensor(m.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(m.PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.compute_dtype: torch.dtype | None = None  # set by optimize_for_inference

    def optimize_for_inference(self, dtype: torch.dtype = torch.float32) -> "GeneralizedRCNN":
        """Make inference faster, in place: fold the frozen BatchNorms into the convs, switch to the
        channels-last layout (what oneDNN/cuDNN prefer), and for bfloat16/float16 store the conv and
        linear weights in that dtype and run `inference`/`fast_rcnn` under autocast of it.

        Outputs then differ from Detectron2's: at fp32 rounding level for float32, at bf16 precision
        for bfloat16. State-dict keys change (BatchNorms disappear): save checkpoints before.
        """
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError("optimize_for_inference: dtype must be float32, bfloat16 or float16, got "
                             f"{dtype}")
        fold_frozen_batchnorm(self)
        self.to(memory_format=torch.channels_last)
        if dtype != torch.float32:
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    module.to(dtype)
            self.compute_dtype = dtype
        return self.eval()

    def _precision(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) floats 0..255 in INPUT.FORMAT channel order -> (x - PIXEL_MEAN) / PIXEL_STD.

        Images must already be resized (detector.transforms) and, for a batch, padded; pad *after*
        normalising with zeros to match Detectron2 (see detector.structures.pad_images).
        """
        if images.dim() != 4 or images.shape[1] != self.pixel_mean.shape[0]:
            raise ValueError(f"preprocess_image expects (B, {self.pixel_mean.shape[0]}, H, W), got "
                             f"{tuple(images.shape)}")
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The C4 feature map (res4) of a normalised batch (in `compute_dtype` after
        optimize_for_inference)."""
        with self._precision():
            return self.backbone(images)[self.in_feature]

    def prepare_batch(self, images: torch.Tensor, image_sizes: torch.Tensor,
                      masked_boxes: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """A zero-padded batch (N, 3, H, W, 0..255) -> the backbone's input: normalised, the padding zero
        and, when given, the pixels of each image's `masked_boxes` (K_i, 4) zero too (zero = the mean
        colour after normalisation, what VL-BERT's pixel masking shows)."""
        x = self.preprocess_image(images.float())
        sizes = torch.as_tensor(image_sizes, device=x.device)
        _, _, height, width = x.shape
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        keep = ((rows[None, :, None] < sizes[:, 0, None, None])
                & (cols[None, None, :] < sizes[:, 1, None, None]))
        for i, boxes in enumerate(masked_boxes or ()):
            if len(boxes):
                keep[i] &= ~box_pixel_mask(boxes.float(), height, width).to(x.device)
        return x * keep[:, None].to(x.dtype)

    def region_outputs(self, res4: torch.Tensor, boxes: Sequence[torch.Tensor],
                       classes: Sequence[torch.Tensor] | None = None,
                       scores: bool = True) -> dict[str, torch.Tensor]:
        """Features and scores of given boxes on a res4 map: the one entry point that extraction,
        training (VL-BERT's regions, the region classifier) and `fast_rcnn` share.

        Boxes are in input-tensor pixels, one (K_i, 4) tensor per image, used as given (not clipped), like
        Detectron2's pooler. `classes` (optional, one (K_i,) tensor per image) feed the attribute head
        instead of the arg-max class. Returns features (sum K_i, 2048) and, with `scores`, class_logits,
        class_probs (background last), box_deltas and with attributes attr_logits / attr_probs ("no
        attribute" last); rows follow the boxes.
        """
        if len(boxes) != res4.shape[0]:
            raise ValueError(f"got {len(boxes)} box tensors for a batch of {res4.shape[0]} images")
        with self._precision():
            features = self.roi_heads.region_features(res4, boxes)
            if not scores:
                return {"features": features}
            given = torch.cat(list(classes)).to(features.device).long() if classes is not None else None
            out = self.roi_heads.predict(features, given)
        out["features"] = features
        out["class_probs"] = F.softmax(out["class_logits"].float(), dim=-1)
        if "attr_logits" in out:
            out["attr_probs"] = F.softmax(out["attr_logits"].float(), dim=-1)
        return out

    def fast_rcnn(self, images: torch.Tensor, boxes: Sequence[torch.Tensor],
                  classes: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Fast R-CNN on given boxes of a normalised batch: `region_outputs` of its res4 map."""
        if len(boxes) != images.shape[0]:
            raise ValueError(f"fast_rcnn got {len(boxes)} box tensors for a batch of {images.shape[0]} "
                             "images")
        return self.region_outputs(self.features(images), boxes, classes)

    @torch.no_grad()
    def inference(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                  output_sizes: Sequence[tuple[int, int]] | None = None,
                  proposals: Sequence[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """Faster R-CNN detections per image: boxes, scores, classes, class_probs, attr_probs, features,
        proposal_boxes (the proposal each detection was regressed from), proposal_indices.

        `image_sizes`: each image's (h, w) inside the padded batch. With `output_sizes` (e.g. the
        original image sizes) boxes are rescaled to them, clipped, and empty boxes dropped, as in
        Detectron2's detector_postprocess. `proposals` replaces the RPN (PrecomputedProposals).
        """
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {images.shape[0]} images")
        if proposals is None and self.proposal_generator is None:
            raise ValueError("this model has no RPN (PROPOSAL_GENERATOR.NAME = PrecomputedProposals); pass "
                             "proposals=")
        with self._precision():
            res4 = self.features(images)
            if proposals is None:
                proposals = [p["proposal_boxes"] for p in self.proposal_generator(res4, image_sizes)]
            results = self.roi_heads(res4, proposals, image_sizes)
        if output_sizes is None:
            return results
        return [postprocess(r, size, out) for r, size, out in zip(results, image_sizes, output_sizes)]


def postprocess(result: dict[str, torch.Tensor], image_size: tuple[int, int],
                output_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rescale one image's boxes from the network input size to `output_size`, clip, drop empty boxes."""
    scale_x = output_size[1] / image_size[1]
    scale_y = output_size[0] / image_size[0]
    boxes = clip_boxes(scale_boxes(result["boxes"], scale_x, scale_y), output_size)
    keep = nonempty(boxes)
    out = {k: v[keep] for k, v in result.items()}
    out["boxes"] = boxes[keep]
    out["proposal_boxes"] = scale_boxes(out["proposal_boxes"], scale_x, scale_y)
    return out


def build_detector(cfg: CfgNode) -> GeneralizedRCNN:
    """The detector described by `cfg`, on MODEL.DEVICE, in eval mode."""
    model = GeneralizedRCNN(cfg)
    return model.to(torch.device(cfg.MODEL.DEVICE)).eval()
