"""Step 5: stage 2 of the demo on two processes with torchrun (only where two GPUs are)."""
from __future__ import annotations

import shutil
import statistics
from typing import TYPE_CHECKING

from .common import ACCURACY, PY, REPO, Step, fmt_cmd, read_metrics
from .demo import demo_common

if TYPE_CHECKING:
    from .runner import Check


def ddp(check: Check, s: Step, timeout: float) -> None:
    n = len(check.gpus())
    if check.dry or n < 2:
        s.status = "skipped"
        s.note = f"needs two GPUs, this machine has {n}" + (" (dry run)" if check.dry else "")
        return
    out = check.work / "ddp"
    shutil.rmtree(out, ignore_errors=True)
    weights = check.work / "demo" / "detector.pth"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           str(REPO / "tools" / "train_net.py"),
           "--config-file", str(REPO / "configs" / "easy_vqa" / "e2e.yaml"), "--output-dir", str(out),
           *demo_common(check), "MODEL.WEIGHTS", str(weights) if weights.exists() else "",
           "SOLVER.MAX_ITER", "300", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.CHECKPOINT_PERIOD", "300"]
    s.command = fmt_cmd(cmd)
    proc = check.run(cmd, timeout, name="ddp")
    if not check.from_proc(s, proc):
        return
    acc = ACCURACY.search(proc.stdout)
    ips = [r["images_per_s"] for r in read_metrics(out / "metrics.jsonl") if "images_per_s" in r]
    if "x 2 processes" not in proc.stderr:
        s.status, s.note = "fail", "the log does not show two processes"
        return
    s.data = {"accuracy": float(acc.group(2)) if acc else None,
              "images_per_s": statistics.median(ips) if ips else None}
    s.note = (f"300 steps of 8 images on 2 GPUs; test accuracy {acc.group(2)}" if acc
              else "no accuracy printed") + \
        (f"; {s.data['images_per_s']:.1f} images/s" if ips else "")
