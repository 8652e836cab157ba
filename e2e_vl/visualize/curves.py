"""The training curve of a run: loss, accuracy and learning rate against the step, from the run's
metrics.jsonl, as one PNG beside it (`training_curve.png`). Written at the end of every run and on demand
(`python tools/plot_run.py RUN_DIR`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from e2e_vl.visualize.drawing import line_chart, save_png, stack

CURVE_NAME = "training_curve.png"


class MetricsError(ValueError):
    """metrics.jsonl is missing or has a line that is not a JSON object with a step."""


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise MetricsError(f"{path}: no such file (a run folder holds metrics.jsonl once it has logged)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetricsError(f"{path} line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise MetricsError(f"{path} line {n}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def curve_series(rows: list[dict], keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """(steps, values) per key that occurs in `rows` (finite numbers only)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        pts = [(r["step"], float(r[key])) for r in rows
               if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        if pts:
            out[key.split("/", 1)[-1]] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def write_training_curve(run_dir: str | Path) -> Path:
    """Plot `run_dir`/metrics.jsonl: the total training loss (and each part), the evaluation accuracies,
    the learning rate; three panels in `run_dir`/training_curve.png. Returns the path."""
    run = Path(run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    names = sorted({k for r in rows for k in r})
    parts = [k for k in names if k.startswith("train/") and k != "train/loss"]
    losses = ["train/loss"] + (parts if len(parts) > 1 else [])  # one part is the total itself
    accuracies = [k for k in names if k.startswith("eval/") and "accuracy" in k]
    steps = (min(r["step"] for r in rows), max(r["step"] for r in rows)) if rows else None
    panels = [line_chart(curve_series(rows, keys), title, x_range=steps) for keys, title in
              ((losses, "training loss"), (accuracies, "evaluation accuracy"), (["lr"], "learning rate"))]
    return save_png(stack(panels), run / CURVE_NAME)
