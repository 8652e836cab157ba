"""VQA accuracy, overall and per answer type (`accuracy/<type>`, e.g. VQA v2's yes/no, number, other),
and the results file of the VQA evaluation server.

A question scored by its annotators' answers (VQA v2) gets the official VQA accuracy of the predicted
answer string (`e2e_vl.data.vqa_answers.answer_accuracy`), so our numbers equal the official
evaluation's on the same predictions; one with exact soft scores only (easy-VQA: one-hot) gets the
score of the predicted answer; one with neither (test-dev / test-std) is only answered. Evaluation is
sharded over ranks and gathered, so every rank returns the same numbers.

The results file (`[{"question_id": int, "answer": str}, ...]`, one entry per question of the data set,
in its order) is what the evaluation server takes; it is checked against that format and written
atomically by the main process after every evaluation.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from e2e_vl.data.vqa_answers import answer_accuracy
from e2e_vl import distributed as du
from detector.atomic import atomic_write
from e2e_vl.evaluation.runner import evaluation_batches

logger = logging.getLogger(__name__)


class ResultsFormatError(ValueError):
    """Results that the VQA evaluation server would refuse."""


def question_accuracy(question, answer: str, answer_index: int) -> float | None:
    """The accuracy of `answer` (vocabulary entry `answer_index`) for one question; None if unanswered."""
    if question.answers:
        return answer_accuracy(answer, question.answers)
    if question.scores:
        return question.scores.get(answer_index, 0.0)
    return None


def check_results(results: Any, question_ids: Sequence[int]) -> None:
    """Refuse results the evaluation server would: not a list of {"question_id": int, "answer": str}
    with each of `question_ids` exactly once and nothing else (the official loader asserts the same)."""
    if not isinstance(results, list):
        raise ResultsFormatError(f"results must be a list, got {type(results).__name__}")
    seen: set[int] = set()
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or set(entry) != {"question_id", "answer"}:
            raise ResultsFormatError(f"results[{i}] must be {{'question_id': int, 'answer': str}}, got "
                                     f"{entry!r}")
        qid, answer = entry["question_id"], entry["answer"]
        if not isinstance(qid, int) or isinstance(qid, bool) or not isinstance(answer, str):
            raise ResultsFormatError(f"results[{i}]: question_id must be an int and answer a str, got "
                                     f"{entry!r}")
        if qid in seen:
            raise ResultsFormatError(f"results[{i}]: question_id {qid} is answered twice")
        seen.add(qid)
    wanted = set(question_ids)
    if seen != wanted:
        missing, extra = sorted(wanted - seen), sorted(seen - wanted)
        raise ResultsFormatError(f"results must answer every question once: {len(missing)} missing "
                                 f"(e.g. {missing[:5]}), {len(extra)} not in the questions (e.g. "
                                 f"{extra[:5]})")


def write_results(path: str | Path, results: list[dict], question_ids: Sequence[int]) -> None:
    """Check `results` (`check_results`) and write them to `path` as JSON, atomically."""
    check_results(results, question_ids)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(results).encode("utf-8")))


class VQAEvaluator:
    """Runs the model over a data set of `ImageQuestionsDataset` items, scores its answers (`answers`:
    the vocabulary) and writes the results file to `results_path` (if given)."""

    def __init__(self, dataset, collate_fn: Callable, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None, answers: Sequence[str],
                 results_path: str | Path | None = None, num_workers: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.device, self.amp_dtype = device, amp_dtype
        self.answers, self.results_path = list(answers), results_path
        self.num_workers = num_workers

    def __call__(self, model: nn.Module) -> dict[str, float]:
        predicted: dict[int, int] = {}  # question id -> answer index
        for indices, _, out in evaluation_batches(model, self.dataset, self.batch_size, self.collate_fn,
                                                  self.device, self.amp_dtype, self.num_workers):
            qids = [q for i in indices for q in self.dataset.item_question_ids(i)]
            predicted.update(zip(qids, out["vqa_logits"].float().argmax(dim=1).tolist()))
        merged: dict[int, int] = {}
        for part in du.all_gather_objects(predicted):
            merged.update(part)
        questions = self.dataset.questions
        if self.results_path is not None and du.is_main_process():
            results = [{"question_id": q.question_id, "answer": self.answers[merged[q.question_id]]}
                       for q in questions]
            write_results(self.results_path, results, [q.question_id for q in questions])
            logger.info("wrote %d answers to %s", len(results), self.results_path)
        return vqa_metrics(questions, merged, self.answers)


def vqa_metrics(questions: Sequence, predicted: Mapping[int, int],
                answers: Sequence[str]) -> dict[str, float]:
    """`num_questions` answered, and `accuracy` (and `accuracy/<answer type>`) over those that can be
    scored (`question_accuracy`), for the answers `predicted` (question id -> index into `answers`)."""
    by_type: dict[str, list[float]] = {"": []}
    for q in questions:
        score = question_accuracy(q, answers[predicted[q.question_id]], predicted[q.question_id])
        if score is not None:
            by_type[""].append(score)
            if q.answer_type:
                by_type.setdefault(q.answer_type, []).append(score)
    out = {"num_questions": float(len(predicted))}
    for kind, scores in sorted(by_type.items()):
        if scores:
            out["accuracy" + (f"/{kind}" if kind else "")] = sum(scores) / len(scores)
    return out
