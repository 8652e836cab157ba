"""VCR accuracy: Q->A (the answer), QA->R (the rationale, given the right answer) and Q->AR (both right),
each over the annotations that have the groups it needs.

The evaluator runs the model over a `e2e_vl.data.vcr.VCRDataset`, sharded over ranks, and writes beside
the run: `vcr_<split>_predictions.json` (per annotation, each group's softmax over its choices),
`vcr_<split>_metrics.json`, and, for a split without labels evaluated with both subtasks, the
leaderboard's `vcr_<split>_leaderboard.csv` (`annot_id, answer_0..3, rationale_conditioned_on_a0_0..3, ...`).
"""
from __future__ import annotations

import csv
import io
import json

from torch import nn

from detector.atomic import atomic_write_text
from e2e_vl import distributed as du
from e2e_vl.evaluation.runner import Evaluator

# annot_id -> group name -> (softmax over the choices, label or -1)
GroupResults = dict[str, dict[str, tuple[list[float], int]]]


def vcr_metrics(results: GroupResults) -> dict[str, float]:
    """Accuracies from each annotation's choice probabilities (arg-max, the first of equals): `q2a_accuracy`
    over annotations with a labelled "answer" group, `qa2r_accuracy` with a labelled "rationale" group,
    `q2ar_accuracy` with both; and `num_annotations`."""
    right: dict[str, list[bool]] = {"q2a": [], "qa2r": [], "q2ar": []}
    for groups in results.values():
        hits = {}
        for key, name in (("q2a", "answer"), ("qa2r", "rationale")):
            probs, label = groups.get(name, ([], -1))
            if label >= 0:
                hits[key] = max(range(len(probs)), key=probs.__getitem__) == label
                right[key].append(hits[key])
        if len(hits) == 2:
            right["q2ar"].append(hits["q2a"] and hits["qa2r"])
    out = {"num_annotations": float(len(results))}
    out.update({f"{k}_accuracy": sum(v) / len(v) for k, v in right.items() if v})
    return out


class VCREvaluator(Evaluator):
    """Scores the model's `vcr_logits` on a VCR data set; see the module docstring for what it writes."""

    def __call__(self, model: nn.Module) -> dict[str, float]:
        results: GroupResults = {}
        for indices, _, out in self.batches(model):
            groups = [g for i in indices for g in self.dataset.item_groups(i)]
            logits = out["vcr_logits"].float()
            if logits.shape[0] != len(groups):
                raise ValueError(f"the model scored {logits.shape[0]} questions, the batch holds "
                                 f"{len(groups)}")
            for group, probs in zip(groups, logits.softmax(dim=1).tolist()):
                results.setdefault(group.annot_id, {})[group.name] = (probs, group.label)
        merged: GroupResults = {}
        for part in du.all_gather_objects(results):
            merged.update(part)
        metrics = vcr_metrics(merged)
        if self.output_dir is not None and du.is_main_process():
            self._write(merged, metrics)
        return metrics

    def _write(self, results: GroupResults, metrics: dict[str, float]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / f"vcr_{self.split}"
        predictions = {a: {name: probs for name, (probs, _) in groups.items()}
                       for a, groups in sorted(results.items())}
        atomic_write_text(f"{stem}_predictions.json", json.dumps(predictions))
        atomic_write_text(f"{stem}_metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
        rows = leaderboard_rows(predictions)
        if rows:
            table = io.StringIO(newline="")
            csv.writer(table).writerows(rows)
            atomic_write_text(f"{stem}_leaderboard.csv", table.getvalue())


def leaderboard_rows(predictions: dict[str, dict[str, list[float]]]) -> list[list]:
    """The leaderboard's table (header first): per annotation the answer probabilities and the rationale
    probabilities given each answer; empty unless every annotation has all those groups."""
    if not predictions:
        return []
    num = len(next(iter(predictions.values())).get("answer", []))
    names = ["answer"] + [f"rationale_conditioned_on_a{a}" for a in range(num)]
    if not num or any(any(n not in groups for n in names) for groups in predictions.values()):
        return []
    header = ["annot_id"] + [f"{n}_{i}" for n in names for i in range(num)]
    return [header] + [[a] + [p for n in names for p in groups[n]] for a, groups in predictions.items()]
