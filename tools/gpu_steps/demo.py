"""Step 4: the demo's two stages with MODEL.DEVICE cuda and bf16 autocast (tiny sizes in the dry run):
stage 1, its export, stage 2 SIGKILLed at its first checkpoint past half way, then resumed to the end."""
from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import ACCURACY, PY, REPO, Step, fmt_cmd, read_metrics, tail

if TYPE_CHECKING:
    from .runner import Check


def demo_common(check: Check) -> list[str]:
    """The overrides every demo run takes (the DDP step's too)."""
    if check.dry:
        return ["MODEL.DEVICE", "cpu", "SOLVER.AMP.DTYPE", "bf16", "DATALOADER.NUM_WORKERS", "0"]
    return ["MODEL.DEVICE", "cuda", "SOLVER.AMP.DTYPE", "bf16", "DATALOADER.NUM_WORKERS", "4"]


def stage1_cmd(check: Check) -> list[str]:
    tiny = ["SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.LOG_PERIOD", "1", "DATASETS.TRAIN_LIMIT", "16",
            "DATASETS.TEST_LIMIT", "16"] if check.dry else []
    return [PY, str(REPO / "tools" / "train_net.py"), "--config-file",
            str(REPO / "configs" / "easy_vqa" / "detector.yaml"),
            "--output-dir", str(check.work / "demo" / "detector"),
            *demo_common(check), *tiny]


def stage2_cmd(check: Check, out: Path, weights: Path) -> list[str]:
    tiny = ["SOLVER.MAX_ITER", "16", "SOLVER.WARMUP_ITERS", "2", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.LOG_PERIOD", "1", "DATASETS.TRAIN_LIMIT", "30",
            "DATASETS.TEST_LIMIT", "20"] if check.dry else []
    return [PY, str(REPO / "tools" / "train_net.py"), "--config-file",
            str(REPO / "configs" / "easy_vqa" / "e2e.yaml"), "--output-dir", str(out),
            *demo_common(check), "MODEL.WEIGHTS", str(weights), *tiny]


def stage1(check: Check, s: Step, timeout: float) -> None:
    out = check.work / "demo" / "detector"
    shutil.rmtree(out, ignore_errors=True)
    cmd = stage1_cmd(check)
    s.command = fmt_cmd(cmd)
    proc = check.run(cmd, timeout, name="demo-stage1")
    if not check.from_proc(s, proc):
        return
    m = re.search(r"region_accuracy: ([0-9.]+)", proc.stdout)
    ips = [r["images_per_s"] for r in read_metrics(out / "metrics.jsonl") if "images_per_s" in r]
    s.data = {"region_accuracy": float(m.group(1)) if m else None,
              "images_per_s": statistics.median(ips) if ips else None, "seconds": proc.seconds}
    check.results["demo_stage1"] = s.data
    s.note = (f"region accuracy {s.data['region_accuracy']}, " if m else "") + \
        (f"{s.data['images_per_s']:.1f} images/s" if ips else "no throughput logged")


def export(check: Check, s: Step, timeout: float) -> None:
    weights = check.work / "demo" / "detector.pth"
    cmd = [PY, str(REPO / "tools" / "export_detector.py"),
           "--checkpoint", str(check.work / "demo" / "detector"),
           "--output", str(weights), "--overwrite"]
    s.command = fmt_cmd(cmd)
    proc = check.run(cmd, timeout, name="demo-export")
    if check.from_proc(s, proc) and not weights.exists():
        s.status, s.note = "fail", "no detector.pth written"


def stage2_killed(check: Check, s: Step, timeout: float) -> None:
    """Stage 2, SIGKILLed once a checkpoint at or past half of its steps is written."""
    out = check.work / "demo" / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    weights = check.work / "demo" / "detector.pth"
    if not weights.exists():
        s.status, s.note = "skipped", "no stage-1 detector (stage 1 or its export failed)"
        return
    cmd = stage2_cmd(check, out, weights)
    s.command = fmt_cmd(cmd) + "   # SIGKILL at the first checkpoint >= half of SOLVER.MAX_ITER"
    killed: dict = {}

    def poll(p: subprocess.Popen) -> None:
        if "at" in killed or not (out / "config.yaml").exists():
            return
        if "max_iter" not in killed:
            import yaml

            try:
                cfg = yaml.safe_load((out / "config.yaml").read_text())
                killed["max_iter"] = int(cfg["SOLVER"]["MAX_ITER"])
            except Exception:  # noqa: BLE001 - half written: try again
                return
        steps = [int(m.group(1))
                 for f in out.glob("model_*.pth") if (m := re.match(r"model_(\d+)\.pth$", f.name))]
        past = [n for n in steps if 2 * n >= killed["max_iter"] and n < killed["max_iter"]]
        if past:
            os.kill(p.pid, signal.SIGKILL)
            killed.update(at=min(past), time=time.time())

    proc = check.run(cmd, timeout, name="demo-stage2-killed", poll=poll)
    s.tail = tail(proc.text)
    ips = [r["images_per_s"] for r in read_metrics(out / "metrics.jsonl") if "images_per_s" in r]
    s.data = {"killed_at": killed.get("at"), "max_iter": killed.get("max_iter"), "seconds": proc.seconds,
              "images_per_s_before_kill": statistics.median(ips) if ips else None}
    if proc.timed_out:
        s.status, s.note = "timeout", f"killed after {proc.seconds:.0f} s, before the half-way checkpoint"
    elif "at" not in killed:
        s.status, s.note = "fail", f"exit {proc.rc} before a half-way checkpoint was seen (not killed)"
    elif proc.rc != -signal.SIGKILL:
        s.status, s.note = "fail", f"exit {proc.rc} (expected SIGKILL)"
    else:
        s.status = "pass"
        s.note = f"SIGKILLed after model_{killed['at']:07d}.pth of {killed['max_iter']} steps" + \
            (f", {s.data['images_per_s_before_kill']:.1f} images/s" if ips else "")
    check.results["demo_stage2_kill"] = s.data


def resume(check: Check, s: Step, timeout: float) -> None:
    out = check.work / "demo" / "e2e"
    killed = check.results.get("demo_stage2_kill") or {}
    if not killed.get("killed_at"):
        s.status, s.note = "skipped", "stage 2 was not killed half way"
        return
    cmd = stage2_cmd(check, out, check.work / "demo" / "detector.pth")
    cmd.insert(2, "--resume")  # before the KEY VALUE overrides
    s.command = fmt_cmd(cmd)
    proc = check.run(cmd, timeout, name="demo-stage2-resume")
    if not check.from_proc(s, proc):
        return
    m = re.search(r"resumed from \S*model_(\d+)\.pth at step (\d+)", proc.stderr)
    acc = ACCURACY.search(proc.stdout)
    rows = read_metrics(out / "metrics.jsonl")
    ips_all = [r["images_per_s"] for r in rows if "images_per_s" in r]
    final = killed.get("max_iter")
    problems = []
    if not m:
        problems.append("no 'resumed from' in its log")
    elif int(m.group(2)) < killed["killed_at"]:
        problems.append(f"resumed at step {m.group(2)}, before the kill point {killed['killed_at']}")
    if not acc:
        problems.append("no test accuracy printed")
    if final and not (out / f"model_{final:07d}.pth").exists():
        problems.append(f"no model_{final:07d}.pth")
    s.data = {"resumed_at": int(m.group(2)) if m else None,
              "accuracy": float(acc.group(2)) if acc else None,
              "questions": int(acc.group(3)) if acc else None, "by_type": acc.group(4) if acc else None,
              "images_per_s": statistics.median(ips_all) if ips_all else None}
    check.results["demo_stage2"] = s.data
    if problems:
        s.status, s.note = "fail", "; ".join(problems)
        return
    s.note = (f"resumed at step {m.group(2)}; test accuracy {acc.group(2)} ({acc.group(3)} questions)"
              + (f"; {s.data['images_per_s']:.1f} images/s" if ips_all else ""))
