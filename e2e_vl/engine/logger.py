"""What a training run reports: a progress line, TensorBoard events and `metrics.jsonl` (rank 0 only)."""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from detector.atomic import atomic_write_text

logger = logging.getLogger("e2e_vl.train")


def setup_logging(output_dir: str | Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr and `<output_dir>/log.txt`; other ranks only warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    root.addHandler(h)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / "log.txt")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """Peak accelerator memory of this process, or peak resident set size on CPU."""
    if device.type == "cuda":
        return "peak_mem", torch.cuda.max_memory_allocated(device) / 2**20
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def drop_after(path: Path, step: int) -> int:
    """Rewrite the metrics.jsonl `path` (atomically) without the lines logged after `step`; their count."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped as well
            continue
        if logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        atomic_write_text(path, "".join(kept))
        logger.info("%s: dropped %d lines logged after step %d (they are logged again)", path,
                    len(lines) - len(kept), step)
    return len(lines) - len(kept)


class MetricWriter:
    """Writes scalars to TensorBoard and to one JSON object per line in metrics.jsonl.

    `resumed_at`: the step a resumed run continues from. What the interrupted run logged after it is
    dropped (from metrics.jsonl and, via purge_step, from TensorBoard): the resumed run logs those steps
    again, so each step is recorded once.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, resumed_at: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None:
                drop_after(out / "metrics.jsonl", resumed_at)
            self._jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"),
                                     purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class ProgressMeter:
    """Throughput and ETA over the steps since the last report (so start-up does not skew them)."""

    def __init__(self, start_step: int, max_iter: int):
        self.max_iter = max_iter
        self._t = time.perf_counter()
        self._step = start_step
        self._images = 0.0

    def add_images(self, n: float) -> None:
        self._images += n

    def report(self, step: int, losses: dict[str, float], lr: float,
               device: torch.device) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(1e-9, now - self._t)
        ips = self._images / dt
        sec_per_step = dt / max(1, step - self._step)
        eta = sec_per_step * (self.max_iter - step)
        mem_name, mem = peak_memory_mb(device)
        loss_txt = "  ".join(f"{k}: {v:.4f}" for k, v in losses.items())
        logger.info(
            "step %d/%d  %s  lr: %.3g  images/s: %.1f  eta: %s  %s: %.0f MiB",
            step, self.max_iter, loss_txt, lr, ips, _fmt_duration(eta), mem_name, mem,
        )
        self._t, self._step, self._images = now, step, 0.0
        return {"lr": lr, "images_per_s": ips, "sec_per_step": sec_per_step, mem_name + "_mb": mem}
