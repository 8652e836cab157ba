"""benchmarks/demo_seeds.py reads train_net's closing line and tabulates runs (the runs themselves are the
demo's, measured by hand: see the README)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "demo_seeds", Path(__file__).resolve().parents[1] / "benchmarks" / "demo_seeds.py")
demo_seeds = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo_seeds)


def test_parse_accuracy_reads_overall_and_per_type():
    line = ("easy_vqa_test accuracy: 0.9987 (9673 questions); "
            "by type: colour 1.0000, shape 0.9968, yes/no 0.9982\n")
    assert demo_seeds.parse_accuracy("log line\n" + line) == {
        "accuracy": 0.9987, "questions": 9673, "colour": 1.0, "shape": 0.9968, "yes/no": 0.9982}
    with pytest.raises(ValueError, match="no accuracy line"):
        demo_seeds.parse_accuracy("Traceback ...")


def test_parse_metrics_reads_stage_one_closing_line():
    out = ("[18:16:52 r0] eval at step 1200: num_regions: 888.0000  region_accuracy: 0.9000\n"
           "num_regions: 888.0000  region_accuracy: 0.9977  worst_class_accuracy: 0.9714\n")
    assert demo_seeds.parse_metrics(out) == {"num_regions": 888.0, "region_accuracy": 0.9977,
                                             "worst_class_accuracy": 0.9714}
    with pytest.raises(ValueError, match="no metrics line"):
        demo_seeds.parse_metrics("[12:00 r0] step 1: loss: 1.0\n")


def test_table_has_a_row_per_run_and_the_spread_per_setting():
    rows = [{"setting": "joint", "seed": s, "threads": 1, "stage2_s": 600.0, "accuracy": a, "yes/no": a,
             "colour": 1.0, "shape": 1.0} for s, a in ((0, 0.99), (1, 0.97))]
    text = demo_seeds.table(rows, {1: 0.0})
    assert "| joint | 1 | 0 | 0.9900 |" in text and "| joint | 1 | 1 | 0.9700 |" in text
    assert "| joint | 2 | 0.9800 | 0.9700 | 0.9900 |" in text
    text = demo_seeds.table(rows, {2: 500.0}, {2: {"region_accuracy": 0.99, "worst_class_accuracy": 0.9,
                                                   "num_regions": 888.0}})
    assert "stage 1, 2 threads: region accuracy 0.9900, worst class 0.9000 (888 test boxes)" in text
