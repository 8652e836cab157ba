"""Task heads on the VL-BERT outputs and their losses.

Pre-training: masked language modelling (tied to the word embeddings) and masked RoI classification.
Fine-tuning: the VQA answer classifier (shared by easy-VQA and VQA v2), a per-region scorer (RefCOCO+)
and a per-choice scorer (VCR).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform


class MLMHead(nn.Module):
    """BERT's masked-LM head: transform (dense -> GELU -> LayerNorm), then the word embeddings as the
    output matrix (tied: same Parameter), plus a per-word bias.

    Names `transform.*` and `bias` match BERT's `cls.predictions.*`, so a checkpoint that has the
    pre-trained head (bert-base-uncased does, sentence-transformer exports don't) fills it.
    """

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.word_embeddings = [word_embeddings]  # a list: not registered twice in the state dict
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.word_embeddings[0].weight, self.bias)


class MRCHead(nn.Module):
    """Masked RoI classification: Linear(h, h) -> GELU -> Linear(h, num_classes) (VL-BERT's MVRC head)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.dense(hidden)))


class AnswerHead(nn.Module):
    """VQA answer classifier on the [MASK] output: BERT transform -> Dropout -> Linear(h, num_answers)."""

    def __init__(self, config, num_answers: int, dropout: float = 0.1):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, num_answers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.transform(hidden)))


class ScoreHead(nn.Module):
    """One logit per element: Dropout -> Linear(h, h) -> ReLU -> Linear(h, 1). Used per region
    (RefCOCO+) and per choice on [CLS] (VCR)."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(t * log_softmax(z)).sum(-1), averaged over rows; 0 (keeping the graph) when there are no rows."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must match")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled positions (logits `[M, V]`, labels `[M]`); 0 when M == 0."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def soft_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on soft answer scores, summed over answers and averaged over questions.

    This equals VL-BERT's element mean multiplied by the number of answers."""
    if logits.shape != targets.shape:
        raise ValueError(f"answer logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must match")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return (
        F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]
    )
