"""Flickr30K Entities phrase grounding: Recall@1/5/10 (a phrase is right at k when one of its k
highest-scoring candidates overlaps the union of its chain's boxes with IoU >= 0.5) and the upper bound
(the share of phrases with any such candidate), over the phrases that have a box; phrases of chain 0 or of
nobndbox / scene chains are not counted.

The evaluator runs the model over a `e2e_vl.data.flickr30k.Flickr30KDataset`, sharded over ranks, and
writes beside the run `flickr30k_<split>_predictions.json` (per phrase: image, caption line, chain id,
words, its 10 best boxes in original pixels and the IoU of each) and `flickr30k_<split>_metrics.json`.
"""
from __future__ import annotations

import json
from typing import Sequence

import torch
from torch import nn

from detector.atomic import atomic_write_text
from detector.structures import box_iou
from e2e_vl import distributed as du
from e2e_vl.data.flickr30k import POSITIVE_IOU
from e2e_vl.evaluation.runner import Evaluator

RECALL_AT = (1, 5, 10)


def recall_metrics(ranked_ious: Sequence[Sequence[float]]) -> dict[str, float]:
    """`recall@k` for k in RECALL_AT, `upper_bound` and `num_phrases` from each phrase's candidate IoUs
    with its box, in the order the model ranks the candidates (best first)."""
    if not ranked_ious:
        raise ValueError("no phrases to score")
    out = {}
    for k in RECALL_AT:
        out[f"recall@{k}"] = sum(any(v >= POSITIVE_IOU for v in ious[:k]) for ious in ranked_ious) / len(
            ranked_ious)
    out["upper_bound"] = sum(any(v >= POSITIVE_IOU for v in ious) for ious in ranked_ious) / len(ranked_ious)
    out["num_phrases"] = float(len(ranked_ious))
    return out


class Flickr30KEvaluator(Evaluator):
    """Ranks every phrase's candidates by the model's `phrase_logits`; see the module docstring."""

    def __call__(self, model: nn.Module) -> dict[str, float]:
        ranked: dict[int, list[int]] = {}  # grounded phrase index -> candidate indices, best first
        for indices, _, out in self.batches(model):
            phrase_ids = [p for i in indices for p in self.dataset.item_phrases(i)]
            logits = out["phrase_logits"].float().cpu()
            if logits.shape[0] != len(phrase_ids):
                raise ValueError(f"the model scored {logits.shape[0]} phrases, the batch holds "
                                 f"{len(phrase_ids)}")
            for p, row in zip(phrase_ids, logits):
                order = torch.argsort(row, descending=True, stable=True)
                ranked[p] = [int(c) for c in order if torch.isfinite(row[c])]
        merged: dict[int, list[int]] = {}
        for part in du.all_gather_objects(ranked):
            merged.update(part)
        rows, ranked_ious = [], []
        for p in sorted(merged):
            grounded = self.dataset.grounded[p]
            caption = self.dataset.captions[grounded.caption]
            boxes = torch.from_numpy(self.dataset.candidates(caption.image_id))[merged[p]].double()
            ious = box_iou(boxes, torch.tensor([grounded.box], dtype=torch.float64))[:, 0].tolist()
            ranked_ious.append(ious)
            first, num = grounded.phrase.first_word, grounded.phrase.num_words
            rows.append({"image_id": caption.image_id, "caption": caption.where.rsplit("/", 1)[-1],
                         "chain_id": grounded.phrase.chain_id,
                         "phrase": " ".join(caption.words[first:first + num]),
                         "boxes": boxes[:RECALL_AT[-1]].tolist(), "iou": ious[:RECALL_AT[-1]]})
        metrics = recall_metrics(ranked_ious)
        if self.output_dir is not None and du.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            stem = self.output_dir / f"flickr30k_{self.split}"
            atomic_write_text(f"{stem}_predictions.json", json.dumps(rows))
            atomic_write_text(f"{stem}_metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
        return metrics
