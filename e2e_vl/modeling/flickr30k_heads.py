"""Phrase grounding (Flickr30K Entities, `TASK flickr30k`), VisualBERT's way: every word piece of a phrase
scores every region output by one attention head's scaled dot product (VisualBERT's FlickrAttention:
query = Linear(h, h)(word output), key = Linear(h_region, h)(region output), score = q.k / sqrt(h)); the
phrase's score of a region is the mean over its pieces. Loss: KL divergence from the phrase's target
distribution (uniform over the right candidates) to the softmax of its scores, averaged over phrases with a
right candidate, as VisualBERT's KLDivLoss("batchmean").

A module of `e2e_vl.modeling`, so the registry imports it (and registers the head) before any model is
built.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.nn import functional as F

from e2e_vl.modeling.heads import Encoded, Head, HeadSpec, register_head


@register_head("phrase")
class PhraseGroundingHead(Head):
    """Reads `phrase_sample` [P], `phrase_tokens` [P, T] and (training) `phrase_targets` [P, K]; gives
    `phrase_logits` [P, K] (-inf on padding regions and on region 0, the whole image, never a candidate)."""

    reads_image = True

    def __init__(self, text_size: int, region_size: int):
        super().__init__()
        self.query = nn.Linear(text_size, text_size)
        self.key = nn.Linear(region_size, text_size)

    @classmethod
    def build(cls, spec: HeadSpec) -> "PhraseGroundingHead":
        return cls(spec.config.hidden_size, spec.region_size)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "phrase_tokens" not in batch:
            return None
        device = encoded.text.device
        sample = batch["phrase_sample"].to(device)
        tokens = batch["phrase_tokens"].to(device).float()
        query, key = self.query(encoded.text[sample]), self.key(encoded.regions[sample])
        scores = query @ key.transpose(1, 2) / math.sqrt(query.shape[-1])  # [P, T, K]
        logits = (tokens[:, :, None] * scores).sum(1) / tokens.sum(1).clamp(min=1.0)[:, None]
        usable = encoded.region_valid[sample].clone()
        usable[:, 0] = False
        logits = logits.float().masked_fill(~usable, float("-inf"))
        out: dict[str, Any] = {"phrase_logits": logits, "losses": {}}
        if "phrase_targets" in batch:
            targets = batch["phrase_targets"].to(device).float() * usable
            known = targets.sum(1) > 0
            if bool(known.any()):
                target = targets[known] / targets[known].sum(1, keepdim=True)
                log_probs = F.log_softmax(logits[known], dim=1).masked_fill(~usable[known], 0.0)
                out["losses"]["phrase"] = F.kl_div(log_probs, target, reduction="sum") / int(known.sum())
        return out
