#!/usr/bin/env python
"""The training curve of a run (loss, evaluation accuracy, learning rate) from its metrics.jsonl, written
beside it as training_curve.png. Every run writes it when it ends; this redraws it, e.g. while it trains.

    python tools/plot_run.py output/easy_vqa/e2e
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e_vl.visualize.curves import MetricsError, write_training_curve  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder holding metrics.jsonl")
    args = p.parse_args(argv)
    try:
        path = write_training_curve(args.run)
    except (MetricsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
