"""NLVR2 accuracy and consistency as the official evaluation (lil-lab/nlvr, nlvr2/eval/metrics.py) computes
them: accuracy over examples; consistency over sentences (identifiers grouped with the pair id blanked), a
sentence counting when every one of its examples is right.

The evaluator runs the model over a `e2e_vl.data.nlvr2.NLVR2Dataset`, sharded over ranks, and writes beside
the run `nlvr2_<split>_predictions.csv` (one `identifier,True|False` line per example: the file the
official script and the leaderboard, test-P and test-U, take) and `nlvr2_<split>_metrics.json`.
"""
from __future__ import annotations

import json
from typing import Mapping

from torch import nn

from detector.atomic import atomic_write_text
from e2e_vl import distributed as du
from e2e_vl.data.nlvr2 import sentence_key
from e2e_vl.evaluation.runner import Evaluator


def nlvr2_metrics(predictions: Mapping[str, bool], labels: Mapping[str, bool]) -> dict[str, float]:
    """`accuracy`, `consistency`, `num_examples`, `num_sentences` of `predictions` (identifier -> True/False)
    against `labels`; a labelled example without a prediction is an error, as in the official script."""
    missing = [i for i in labels if i not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(labels)} examples have no prediction (e.g. {missing[0]})")
    consistent: dict[str, bool] = {}
    right = 0
    for identifier, label in labels.items():
        hit = predictions[identifier] == label
        right += hit
        key = sentence_key(identifier)
        consistent[key] = consistent.get(key, True) and hit
    return {"accuracy": right / len(labels), "consistency": sum(consistent.values()) / len(consistent),
            "num_examples": float(len(labels)), "num_sentences": float(len(consistent))}


class NLVR2Evaluator(Evaluator):
    """Scores the model's `nlvr2_logits` (arg-max; column 1 = True) on an NLVR2 data set; see the module
    docstring for what it writes."""

    default_split = "dev"

    def __call__(self, model: nn.Module) -> dict[str, float]:
        predicted: dict[str, bool] = {}
        for indices, _, out in self.batches(model):
            picks = out["nlvr2_logits"].float().argmax(dim=1).tolist()
            if len(picks) != len(indices):
                raise ValueError(f"the model scored {len(picks)} examples, the batch holds {len(indices)}")
            predicted.update((self.dataset.examples[i].identifier, bool(p)) for i, p in zip(indices, picks))
        merged: dict[str, bool] = {}
        for part in du.all_gather_objects(predicted):
            merged.update(part)
        metrics = nlvr2_metrics(merged, {e.identifier: bool(e.label) for e in self.dataset.examples})
        if self.output_dir is not None and du.is_main_process():
            self._write(merged, metrics)
        return metrics

    def _write(self, predicted: Mapping[str, bool], metrics: dict[str, float]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / f"nlvr2_{self.split}"
        order = [e.identifier for e in self.dataset.examples]
        atomic_write_text(f"{stem}_predictions.csv", "".join(f"{i},{predicted[i]}\n" for i in order))
        atomic_write_text(f"{stem}_metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
