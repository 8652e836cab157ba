"""RefCOCO+ accuracy: a sentence is right when the box of its highest-scoring region overlaps the referred
box with IoU >= 0.5 (VL-BERT's and MAttNet's criterion), reported overall and per split
(`accuracy/val`, `accuracy/testA`, ...). Evaluation is sharded over ranks and the per-sentence results
gathered, so every rank returns the same numbers; rank 0 writes the predictions and the metrics as json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from detector.atomic import atomic_write_text
from detector.structures import paired_box_iou
from e2e_vl import distributed as du
from e2e_vl.evaluation.runner import evaluation_batches

CORRECT_IOU = 0.5


def grounding_accuracy(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, splits: Sequence[str]
                       ) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics and per-sentence IoU for predicted and referred XYXY boxes `[N, 4]` of sentences in
    `splits`."""
    if len(pred_boxes) != len(target_boxes) or len(pred_boxes) != len(splits):
        raise ValueError(f"{len(pred_boxes)} predictions, {len(target_boxes)} targets and {len(splits)} "
                         "splits")
    iou = paired_box_iou(pred_boxes.double(), target_boxes.double())
    correct = (iou >= CORRECT_IOU).tolist()
    out = {"num_sentences": float(len(correct))}
    if correct:
        out["accuracy"] = sum(correct) / len(correct)
    for split in sorted(set(splits)):
        hits = [c for c, s in zip(correct, splits) if s == split]
        out[f"accuracy/{split}"] = sum(hits) / len(hits)
    return out, iou


class RefCOCOEvaluator:
    """Runs the model over a `e2e_vl.data.refcoco.RefCOCODataset` (unflipped) and scores the arg-max region
    of each sentence. Writes `predictions_path` ([{sent_id, ref_id, split, box: [x, y, w, h], iou, correct}],
    boxes in original pixels) and `metrics_path` when given."""

    def __init__(self, dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, predictions_path: str | Path | None = None,
                 metrics_path: str | Path | None = None, num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.amp_dtype = device, amp_dtype
        self.predictions_path, self.metrics_path = predictions_path, metrics_path
        self.num_workers = num_workers

    def __call__(self, model: nn.Module) -> dict[str, float]:
        picks: dict[int, int] = {}  # sentence index -> chosen region
        for indices, _, out in evaluation_batches(model, self.dataset, self.batch_size, self.collate_fn,
                                                  self.device, self.amp_dtype, self.num_workers):
            sentence_ids = [s for i in indices for s in self.dataset.item_sentences(i)]
            logits = out["ref_logits"].float().masked_fill(~out["region_valid"], float("-inf"))
            picks.update(zip(sentence_ids, logits.argmax(dim=1).tolist()))
        merged: dict[int, int] = {}
        for part in du.all_gather_objects(picks):
            merged.update(part)
        order = sorted(merged)
        sentences = [self.dataset.sentences[i] for i in order]
        pred = torch.tensor([self.dataset.candidates(s.image_id)[merged[i]].tolist()
                             for i, s in zip(order, sentences)],
                            dtype=torch.float64).reshape(-1, 4)
        target = torch.tensor([s.box for s in sentences], dtype=torch.float64).reshape(-1, 4)
        metrics, iou = grounding_accuracy(pred, target, [s.split for s in sentences])
        if du.is_main_process():
            self._write(sentences, pred, iou, metrics)
        return metrics

    def _write(self, sentences, pred: torch.Tensor, iou: torch.Tensor, metrics: dict[str, float]) -> None:
        if self.predictions_path is not None:
            rows = [{"sent_id": s.sent_id, "ref_id": s.ref_id, "split": s.split,
                     "box": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iou": float(v),
                     "correct": bool(v >= CORRECT_IOU)}
                    for s, b, v in zip(sentences, pred.tolist(), iou.tolist())]
            _dump(self.predictions_path, rows)
        if self.metrics_path is not None:
            _dump(self.metrics_path, metrics)


def _dump(path: str | Path, data: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))
