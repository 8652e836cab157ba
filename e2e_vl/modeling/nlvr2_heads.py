"""NLVR2's two classifier heads, one per pair format (`TASK nlvr2`, `e2e_vl.tasks.nlvr2`); both give
`nlvr2_logits` `[E, 2]` (column 1 = "True") per example and the cross-entropy loss "nlvr2" against
`nlvr2_labels` (`[E]`, 1 = True, 0 = False, -1 = unknown: no loss).

- "nlvr2" (VisualBERT's format): one sequence per example holds the sentence and both images' regions, so
  one pooled vector per example -> Dropout -> Linear(h, 2), VisualBERT's NLVR2 classifier.
- "nlvr2_pair" (LXMERT's format, usable with every architecture): the sentence is encoded with each image
  in turn (two consecutive samples per example, image 0 first); their pooled vectors concatenated ->
  Linear(2h, 2h) -> GELU -> LayerNorm -> Linear(2h, 2), LXMERT's `logit_fc`.

A module of `e2e_vl.modeling`, so the registry imports it (and registers the heads) before any model is
built.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from e2e_vl.modeling.heads import Encoded, Head, HeadSpec, register_head

NUM_CLASSES = 2  # False, True
LAYER_NORM_EPS = 1e-12  # BERT's and LXMERT's


def nlvr2_outputs(logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    labels = batch["nlvr2_labels"].to(logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} NLVR2 examples scored, the batch has {labels.shape[0]} labels")
    known = labels >= 0
    losses = {"nlvr2": F.cross_entropy(logits[known].float(), labels[known])} if bool(known.any()) else {}
    return {"nlvr2_logits": logits, "losses": losses}


@register_head("nlvr2")
class JointPairHead(Head):
    """VisualBERT's NLVR2 classifier on the pooled output of the joint (sentence, image 0, image 1)
    sequence."""

    reads_image = True

    def __init__(self, pooled_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(pooled_size, NUM_CLASSES)

    @classmethod
    def build(cls, spec: HeadSpec) -> "JointPairHead":
        return cls(spec.pooled_size)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "nlvr2_labels" not in batch:
            return None
        return nlvr2_outputs(self.classifier(self.dropout(encoded.pooled)), batch)


@register_head("nlvr2_pair")
class SeparatePairHead(Head):
    """LXMERT's NLVR2 classifier on the two pooled outputs of an example, image 0's first. Weights start
    from BERT's initialisation (normal, std 0.02; zero biases; LayerNorm 1 and 0), as LXMERT's."""

    reads_image = True

    def __init__(self, pooled_size: int):
        super().__init__()
        width = 2 * pooled_size
        self.logit_fc = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                      nn.LayerNorm(width, eps=LAYER_NORM_EPS), nn.Linear(width, NUM_CLASSES))
        for layer in (self.logit_fc[0], self.logit_fc[3]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    @classmethod
    def build(cls, spec: HeadSpec) -> "SeparatePairHead":
        return cls(spec.pooled_size)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "nlvr2_labels" not in batch:
            return None
        pooled = encoded.pooled
        if pooled.shape[0] % 2:
            raise ValueError("the nlvr2_pair head pairs consecutive samples; the batch has "
                             f"{pooled.shape[0]}")
        return nlvr2_outputs(self.logit_fc(pooled.reshape(pooled.shape[0] // 2, -1)), batch)
