"""VQA accuracy: the soft score of the predicted answer, averaged over questions, and per answer type
(`accuracy/<type>`, e.g. VQA v2's yes/no, number, other) when the questions carry one.

With VQA v2's targets (min(1, matches/3), leave-one-out averaged; see `e2e_vl.data.vqa`) this is the
official VQA accuracy; with one-hot targets (easy-VQA) it is plain accuracy. Evaluation is sharded
over ranks and the per-question results are gathered, so every rank returns the same numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from e2e_vl.engine import distributed as du
from e2e_vl.engine.sampler import sharded_eval_loader


def vqa_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-question accuracy `[B]`: the target score of the arg-max answer."""
    return targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


class VQAEvaluator:
    """Runs the model over a data set of `ImageQuestionsDataset` items and scores its answers."""

    def __init__(self, dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, answers: list[str] | None = None,
                 predictions_path: str | Path | None = None, num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.amp_dtype = device, amp_dtype
        self.answers, self.predictions_path = answers, predictions_path
        self.num_workers = num_workers

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        from e2e_vl.engine.trainer import move_to_device

        was_training = model.training
        model.eval()
        sampler, loader = sharded_eval_loader(self.dataset, self.batch_size, self.collate_fn, self.num_workers)
        results: dict[int, tuple[int, float]] = {}  # question id -> (answer index, score or nan)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        for indices, batch in zip(sampler, loader):
            qids = [q for i in indices for q in self.dataset.item_question_ids(i)]
            batch = move_to_device(batch, self.device)
            with autocast:
                logits = model(batch)["vqa_logits"].float()
            pred = logits.argmax(dim=1)
            score = vqa_accuracy(logits, batch["vqa_targets"].float()) if "vqa_targets" in batch else None
            for j, q in enumerate(qids):
                results[q] = (int(pred[j]), float(score[j]) if score is not None else float("nan"))
        merged: dict[int, tuple[int, float]] = {}
        for part in du.all_gather_objects(results):
            merged.update(part)
        if was_training:
            model.train()
        if self.predictions_path is not None and du.is_main_process() and self.answers is not None:
            Path(self.predictions_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.predictions_path, "w", encoding="utf-8") as f:
                json.dump([{"question_id": q, "answer": self.answers[a]} for q, (a, _) in sorted(merged.items())], f)
        by_type: dict[str, list[float]] = {"": []}
        types = {q.question_id: q.answer_type for q in getattr(self.dataset, "questions", [])}
        for qid, (_, score) in merged.items():
            if score == score:  # not nan: the question has answers
                by_type[""].append(score)
                if types.get(qid):
                    by_type.setdefault(types[qid], []).append(score)
        out = {"num_questions": float(len(merged))}
        for kind, scores in sorted(by_type.items()):
            if scores:
                out["accuracy" + (f"/{kind}" if kind else "")] = sum(scores) / len(scores)
        return out

