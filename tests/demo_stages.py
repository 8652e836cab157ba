"""Runs of the demo's tools for tests: `tools/*.py` in a subprocess, and stage 1 (the detector's
region-classification stand-in for Visual Genome pre-training) trained and exported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <script> args` from the repository (e.g. "tools/train_net.py"), two threads, quiet HF."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def stage1_detector(tmp_path: Path, steps: int = 30, images: int = 16, batch: int = 8,
                    timeout: int = 600) -> Path:
    """Stage 1 of the demo (configs/easy_vqa/detector.yaml) for `steps` steps of `batch` of the first
    `images` training images (0: all), exported with tools/export_detector.py; checks that its loss fell."""
    out = tmp_path / "detector"
    r = run_script("tools/train_net.py",
                   "--config-file", str(REPO / "configs" / "easy_vqa" / "detector.yaml"),
                   "--output-dir", str(out), "SOLVER.MAX_ITER", str(steps),
                   "SOLVER.WARMUP_ITERS", str(min(50, steps // 10)), "SOLVER.IMS_PER_BATCH", str(batch),
                   "DATASETS.TRAIN_LIMIT", str(images), "DATASETS.TEST_LIMIT", "16", "SOLVER.LOG_PERIOD", "1",
                   "DATALOADER.NUM_WORKERS", "0", timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["train/cls"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/cls" in line]
    assert len(losses) == steps and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    assert "region_accuracy:" in r.stdout
    weights = tmp_path / "detector.pth"
    e = run_script("tools/export_detector.py", "--checkpoint", str(out), "--output", str(weights),
                   timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    return weights
