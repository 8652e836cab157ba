"""The visual side every VL architecture shares: the detector in the loop, from a collated batch to one
object feature per region.

images -> `GeneralizedRCNN.prepare_batch` (normalised; padding and, with pixel masking, masked boxes
zeroed) -> res4 -> `GeneralizedRCNN.region_outputs` (our RoIAlign -> res5 -> mean) -> optional running
standardisation -> object embedding (geometry + appearance) -> optional learned feature for masked
regions. An architecture subclasses `RegionEncoder`, so the detector's keys stay `detector.<Detectron2
key>` in every model's state dict.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from detector.checkpoint import CheckpointError, load_checkpoint
from detector.checkpoint.export import DETECTOR_KEY_PREFIX, TRAINED_PREFIXES
from detector.config import CfgNode
from detector.modeling import GeneralizedRCNN, build_detector
from e2e_vl.modeling.embeddings import ObjectFeatureEmbedding, RunningStandardize

logger = logging.getLogger(__name__)

MASKING_MODES = ("pixel", "feature")
APPEARANCE_NORMS = ("none", "running")


def build_trained_detector(cfg: CfgNode) -> GeneralizedRCNN:
    """The detector of the detector keys, loaded from MODEL.WEIGHTS when set: the one weights policy of
    every model with a detector inside.

    The trunk and res5 make every region feature, so a hole there is an error; other missing or extra
    tensors (an RPN or attribute head the file lacks) are a warning."""
    detector = build_detector(cfg)
    if not cfg.MODEL.WEIGHTS:
        return detector
    report = load_checkpoint(detector, cfg.MODEL.WEIGHTS, strict=False)
    used = [k for k in report["missing"] if k.startswith(TRAINED_PREFIXES)]
    if used:
        raise CheckpointError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {len(used)} tensors of the backbone / res5 head are "
            f"missing (e.g. {used[:3]}); is this a checkpoint of the same detector architecture?"
        )
    if report["missing"] or report["unexpected"]:
        logger.warning(
            "MODEL.WEIGHTS %s: %d detector keys missing (e.g. %s), %d unexpected (e.g. %s)",
            cfg.MODEL.WEIGHTS, len(report["missing"]), report["missing"][:3],
            len(report["unexpected"]), report["unexpected"][:3],
        )
    return detector


def token_region_features(sample_objects: torch.Tensor, batch: dict[str, Any], text_len: int) -> torch.Tensor:
    """The object feature of the region each text token is grounded in, `[B, T, h]`, from the per-sample
    object features `[B, K, h]`: region `text_region_index[b, t]` (VCR's object references), or the whole
    image (region 0) for every token when the batch has no such index."""
    index = batch.get("text_region_index")
    if index is None:
        return sample_objects[:, :1].expand(-1, text_len, -1)
    index = index.to(sample_objects.device)[..., None].expand(-1, -1, sample_objects.shape[-1])
    return sample_objects.gather(1, index)


class RegionEncoder(nn.Module):
    """Base class of the VL architectures. `__init__` takes the detector; `init_object_embedding` and
    `init_masked_region_feature`, called by the subclass where it wants them (VL-BERT: after its text
    encoder, so that initial values and parameter order stay those of its existing runs), add the rest. The RPN and box predictor get no gradient here (no
    loss reaches them; they are kept for export), so optimisers and DDP ignore them."""

    def __init__(self, detector: GeneralizedRCNN, *, masking: str = "pixel", freeze_detector: bool = False):
        super().__init__()
        if masking not in MASKING_MODES:
            raise ValueError(f"MODEL.VLBERT.MASKING: expected one of {MASKING_MODES}, got {masking!r}")
        self.detector = detector
        self.masking = masking
        self.freeze_detector = freeze_detector
        for part in (detector.proposal_generator, detector.roi_heads.box_predictor):
            if part is not None:
                part.requires_grad_(False)
        if freeze_detector:
            detector.requires_grad_(False)

    def init_object_embedding(self, hidden: int, *, object_dropout: float, appearance_norm: str) -> None:
        if appearance_norm not in APPEARANCE_NORMS:
            raise ValueError(
                f"MODEL.VLBERT.APPEARANCE_NORM: expected one of {APPEARANCE_NORMS}, got {appearance_norm!r}"
            )
        channels = self.detector.roi_heads.out_channels
        self.object_embedding = ObjectFeatureEmbedding(hidden, appearance_dim=channels, dropout=object_dropout)
        self.appearance_norm = RunningStandardize(channels) if appearance_norm == "running" else None

    def init_masked_region_feature(self, hidden: int) -> None:
        """The learned object feature of masked regions (feature masking only). Separate from
        `init_object_embedding` so an architecture can create it after its own parameters: parameter
        order is the order of the optimiser's saved state."""
        self.masked_region_feature = nn.Parameter(torch.zeros(hidden)) if self.masking == "feature" else None

    @staticmethod
    def parameter_kind(name: str) -> str:
        """'detector' for the detector's parameters, 'head' for everything an architecture adds."""
        return "detector" if name.startswith(DETECTOR_KEY_PREFIX) else "head"

    def backbone_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The normalised image tensor the backbone sees; with pixel masking the masked boxes are zero."""
        masked = batch.get("region_masked") if self.masking == "pixel" else None
        masked_boxes = None if masked is None else [
            boxes[flags.to(boxes.device).bool()] for boxes, flags in zip(batch["boxes"], masked)]
        return self.detector.prepare_batch(batch["images"], batch["image_sizes"], masked_boxes)

    def encode_regions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Object features of every region, padded per image: `[N, K_max, hidden]`, and the validity
        `[N, K_max]`."""
        boxes = [b.to(self.detector.device).float() for b in batch["boxes"]]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_detector):
            res4 = self.detector.features(self.backbone_input(batch))
            appearance = self.detector.region_outputs(res4, boxes, scores=False)["features"]
        if self.appearance_norm is not None:
            appearance = self.appearance_norm(appearance)
        counts = torch.tensor([len(b) for b in boxes], device=appearance.device)
        sizes = batch["image_sizes"].to(appearance.device)
        image_wh = sizes[:, [1, 0]].repeat_interleave(counts, dim=0)
        objects = self.object_embedding(appearance, torch.cat(boxes), image_wh)
        masked = batch.get("region_masked")
        if self.masked_region_feature is not None and masked is not None:
            flat = torch.cat([m.to(objects.device) for m in masked]).bool()
            objects = torch.where(flat[:, None], self.masked_region_feature.to(objects.dtype), objects)
        k_max = int(counts.max())
        valid = torch.arange(k_max, device=counts.device)[None, :] < counts[:, None]
        padded = objects.new_zeros((len(boxes), k_max, objects.shape[1]))
        padded[valid] = objects
        return padded, valid
