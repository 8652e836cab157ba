"""Pre-training objectives of the other region transformers, as heads that any architecture feeds through
`Encoded` (registered in `heads.HEADS`, selected by MODEL.VL.HEADS, weighted by LOSS_WEIGHTS):

- `itm`: sentence-image prediction / image-text matching (VisualBERT, ViLBERT, LXMERT): matched or not,
  from the pooled output; the batch's `itm_labels` (1 = the caption's own image, 0 = another image's).
- `mrc_kl`: masked region classification as KL(detector's stored distribution || predicted) (ViLBERT).
- `obj_label`: detected-label classification, cross-entropy to the stored top class (LXMERT).
- `feat_regression`: RoI-feature regression, smooth-L1 to the region's unmasked appearance feature (LXMERT).
- `contrastive`: image-text contrastive loss over the pooled text and image summaries, in-batch negatives
  gathered over processes, symmetric InfoNCE with a learned temperature (CLIP / ALIGN).

The region objectives read the regions chosen for masked-region targets (`region_labelled`: 15% of the
regions, 90% of those masked, as VL-BERT's MRC), the same rows as `mrc`, whose `mrc_targets` hold the
detector's stored class distributions. Mismatched captions carry no word or region targets (the data set
leaves them out), so masked-word and masked-region losses never see a wrong pair.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from e2e_vl.distributed import all_gather_with_grad, get_world_size
from e2e_vl.modeling.heads import (
    IMAGE_TEXT_MATCH,
    MASKED_REGIONS,
    Encoded,
    Head,
    HeadSpec,
    labelled_regions,
    register_head,
)

# CLIP's initial temperature (0.07) and its cap on the logit scale (100).
CONTRASTIVE_INIT_TEMPERATURE = 0.07
CONTRASTIVE_MAX_SCALE = 100.0


@register_head("itm")
class MatchHead(Head):
    """Linear(h, 2) on the pooled output (VisualBERT's `seq_relationship`); class 1 = matched."""

    targets = (IMAGE_TEXT_MATCH,)

    reads_image = True

    def __init__(self, hidden_size: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, 2)

    @classmethod
    def build(cls, spec: HeadSpec) -> "MatchHead":
        return cls(spec.pooled_size)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "itm_labels" not in batch or encoded.pooled is None:
            return None
        labels = batch["itm_labels"].to(encoded.pooled.device)
        use = labels >= 0  # -1: a sample that is no caption-image pair (text only, a question)
        logits = self.classifier(encoded.pooled[use])
        return {"itm_logits": logits, "itm_labels": labels[use],
                "losses": {"itm": _mean_or_zero(F.cross_entropy, logits, labels[use])}}


class RegionTargetHead(Head):
    """BERT's prediction transform (dense -> GELU -> LayerNorm) then Linear(h, out) on each chosen region's
    output (ViLBERT's image prediction head, LXMERT's visual heads). A subclass gives the width and the
    loss."""

    targets = (MASKED_REGIONS,)

    reads_image = True

    def __init__(self, config, out_features: int):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, out_features)

    @classmethod
    def out_features(cls, spec: HeadSpec) -> int:
        return spec.num_mrc_classes

    @classmethod
    def build(cls, spec: HeadSpec) -> "RegionTargetHead":
        width = cls.out_features(spec)
        if width < 1:
            raise ValueError(f"the {cls.name} head needs an output width >= 1, got {width} (HeadSpec of "
                             f"{spec.config.model_type})")
        config = copy.copy(spec.config)  # the transform runs at the width of the region outputs
        config.hidden_size = spec.region_size
        return cls(config, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))

    def loss(self, logits: torch.Tensor, encoded: Encoded, chosen: torch.Tensor,
             batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if ("region_labelled" not in batch
            or (self.needs_appearance_target and encoded.appearance_target is None)):
            return None
        chosen = labelled_regions(encoded, batch)
        logits = self(encoded.regions[chosen])
        return {f"{self.name}_logits": logits,
                "losses": {self.name: self.loss(logits, encoded, chosen, batch)}}


@register_head("mrc_kl")
class RegionKLHead(RegionTargetHead):
    """ViLBERT's masked multimodal modelling on regions: KL(stored || predicted) per chosen region."""

    def loss(self, logits: torch.Tensor, encoded: Encoded, chosen: torch.Tensor,
             batch: dict[str, Any]) -> torch.Tensor:
        return kl_to_distribution(logits, batch["mrc_targets"].to(logits.device))


@register_head("obj_label")
class DetectedLabelHead(RegionTargetHead):
    """LXMERT's detected-label classification: cross-entropy to the top class of the stored distribution."""

    def loss(self, logits: torch.Tensor, encoded: Encoded, chosen: torch.Tensor,
             batch: dict[str, Any]) -> torch.Tensor:
        return _mean_or_zero(F.cross_entropy, logits.float(),
                             batch["mrc_targets"].to(logits.device).argmax(-1))


@register_head("feat_regression")
class FeatureRegressionHead(RegionTargetHead):
    """LXMERT's RoI-feature regression: smooth-L1 (averaged over the feature's channels, then over regions)
    to the region's appearance feature as the detector gives it without masking, detached (a target
    the detector could otherwise chase by collapsing its features)."""

    needs_appearance_target = True

    @classmethod
    def out_features(cls, spec: HeadSpec) -> int:
        return spec.appearance_dim

    def loss(self, logits: torch.Tensor, encoded: Encoded, chosen: torch.Tensor,
             batch: dict[str, Any]) -> torch.Tensor:
        return feature_regression_loss(logits, encoded.appearance_target[chosen])


@register_head("contrastive")
class ContrastiveHead(Head):
    """Separate linear projections of `Encoded.text_summary()` and `image_summary()` to a shared space,
    L2-normalised, scaled by a learned exp(logit scale) (CLIP's start: 1 / 0.07, capped at 100).
    Pairs: caption samples with their own image (`itm_labels` 1); the other pairs of the batch, and of
    every process under DDP, are the negatives."""

    targets = (IMAGE_TEXT_MATCH,)

    reads_image = True

    def __init__(self, text_size: int, image_size: int, dim: int):
        super().__init__()
        self.text_projection = nn.Linear(text_size, dim, bias=False)
        self.image_projection = nn.Linear(image_size, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / CONTRASTIVE_INIT_TEMPERATURE)))

    @classmethod
    def build(cls, spec: HeadSpec) -> "ContrastiveHead":
        # The summaries' widths: a model's own per-stream poolers (`pooled_size`), else [CLS] and the
        # regions'.
        if spec.pooled_hidden_size:
            return cls(spec.pooled_size, spec.pooled_size, spec.config.hidden_size)
        return cls(spec.config.hidden_size, spec.region_size, spec.config.hidden_size)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "itm_labels" not in batch:
            return None
        pairs = ((batch["itm_labels"].to(encoded.text.device) == 1) & encoded.has_image
                 & encoded.region_valid.any(1))
        text = F.normalize(self.text_projection(encoded.text_summary()[pairs]).float(), dim=-1)
        image = F.normalize(self.image_projection(encoded.image_summary()[pairs]).float(), dim=-1)
        logits, loss = contrastive_loss(text, image, self.logit_scale)
        return {"contrastive_logits": logits, "losses": {"contrastive": loss}}


def contrastive_loss(text: torch.Tensor, image: torch.Tensor,
                     logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over every process's pairs: rows of `text` and `image` `[n, d]` (normalised) are
    this process's pairs; both are gathered (`all_gather_with_grad`) so each process computes the loss of
    the whole global batch, (CE(s T I^T, diag) + CE(s I T^T, diag)) / 2 with s = exp(logit_scale) capped.
    Returns the local rows' text-to-image logits and the loss. Under DDP its gradient is multiplied by the
    world size (its value unchanged): DDP averages gradients over processes and each process holds only its
    own rows' share, so the average then equals the gradient of the global loss."""
    all_text, start = all_gather_with_grad(text)
    all_image, _ = all_gather_with_grad(image)
    scale = logit_scale.exp().clamp(max=CONTRASTIVE_MAX_SCALE)
    logits = scale * all_text @ all_image.T
    local = logits[start:start + len(text)]
    if not len(all_text):
        return local, logits.sum() * 0.0 + logit_scale * 0.0
    targets = torch.arange(len(all_text), device=logits.device)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    world = get_world_size()
    if world > 1:
        loss = loss + (world - 1) * (loss - loss.detach())
    return local, loss


def kl_to_distribution(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) per row (0 log 0 = 0), averaged over rows; q = softmax(logits);
    0 (keeping the graph) without rows."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target distributions {tuple(targets.shape)} must "
                         "match")
    if not len(logits):
        return logits.sum() * 0.0
    return F.kl_div(F.log_softmax(logits.float(), -1), targets.float(), reduction="batchmean")


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 1) averaged over channels and regions, against the detached target."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted features {tuple(predicted.shape)} and targets {tuple(target.shape)} "
                         "must match")
    return _mean_or_zero(F.smooth_l1_loss, predicted.float(), target.detach().float())


def _mean_or_zero(loss_fn, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`loss_fn(inputs, targets)` (a mean), or 0 keeping the graph when there are no rows."""
    return loss_fn(inputs, targets) if len(inputs) else inputs.sum() * 0.0
