"""`gpu_report.md` and `gpu_report.json`: the machine, each step's status and wall time, the targets beside
the measured values, the demo's numbers, and each step's command and output. Rewritten after every step,
so a run cut short still leaves one."""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from .bench import targets_from
from .common import CHECKS, GROUP_TITLES
from .perf import perf_targets

if TYPE_CHECKING:
    from .runner import Check


def write_report(check: Check, final: bool = False) -> None:
    e = check.env_info
    lines = ["# GPU check report", ""]
    mode = "dry run on the CPU (tiny sizes; nothing here measures a GPU)" if check.dry else "CUDA"
    elapsed = time.time() - check.t0
    lines += [f"- mode: {mode}",
              f"- started {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(check.t0))}; "
              + (f"finished after {elapsed:.0f} s" if final else f"in progress ({elapsed:.0f} s so far)")
              + f" (budget {check.args.budget:.0f} s)",
              f"- command: `python tools/gpu_check.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
              ""]
    lines += ["## Machine", "", "| | |", "| --- | --- |"]
    gpus = ("; ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in check.gpus())
            or "none")
    for k, v in (("GPUs", gpus), ("nvidia-smi (name, driver, memory)", e.get("nvidia_smi", "not found")),
                 ("torch", e.get("torch", e.get("torch_error", "?"))),
                 ("torch CUDA", e.get("torch_cuda")), ("cuDNN", e.get("cudnn")),
                 ("nvcc", e.get("nvcc", "not found")),
                 ("python", f"{e.get('python')} ({e.get('executable', '?')})"),
                 ("torchvision / transformers / numpy",
                  f"{e.get('torchvision')} / {e.get('transformers')} / {e.get('numpy')}"),
                 ("CPU cores", e.get("cpu_count")), ("platform", e.get("platform")),
                 ("commit", e.get("commit", "unknown (no git here)"))):
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Steps", "", "| step | what | status | wall s | note |",
              "| --- | --- | --- | --- | --- |"]
    for s in check.steps:
        note = s.note.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {GROUP_TITLES[s.group]} | {s.title} | **{s.status}** | {s.seconds:.1f} "
                     f"| {note} |")
    left = [s.key for s in check.steps if s.status == "skipped" and "budget" in s.note]
    if left:
        groups = sorted({s.group for s in check.steps if s.key in left and s.group in CHECKS},
                        key=CHECKS.index)
        lines += ["", f"Left for lack of time: {', '.join(left)}. Run them with `make gpu-check OUT=$OUT "
                      f"STEPS={','.join(groups)}` (the build is kept while the machine is warm)."]
    lines += ["", "## Targets (issue 17)", "", "| target | goal | measured | verdict |",
              "| --- | --- | --- | --- |"]
    for t in targets_from(check.results, check.dry):
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} |")
    if "perf" in check.selected:
        lines += ["", "## Perf targets (issue 30)", "", "| target | goal | measured | verdict |",
                  "| --- | --- | --- | --- |"]
        for t in perf_targets(check.results, check.dry):
            lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} |")
    d1, d2 = check.results.get("demo_stage1") or {}, check.results.get("demo_stage2") or {}
    if d1 or d2:
        lines += ["", "## End-to-end demo", "", "| | |", "| --- | --- |"]
        if d1:
            lines.append(f"| stage 1 region accuracy / images/s | {d1.get('region_accuracy')} / "
                         f"{_num(d1.get('images_per_s'))} |")
        if d2:
            lines.append(f"| stage 2 test accuracy (questions) | {d2.get('accuracy')} "
                         f"({d2.get('questions')}) |")
            lines.append(f"| stage 2 accuracy by type | {d2.get('by_type')} |")
            lines.append("| stage 2 images/s (median of the logged windows) | "
                         f"{_num(d2.get('images_per_s'))} |")
            lines.append("| killed at / resumed at step | "
                         f"{(check.results.get('demo_stage2_kill') or {}).get('killed_at')}"
                         f" / {d2.get('resumed_at')} |")
    lines += ["", "## Details", ""]
    for s in check.steps:
        if not (s.command or s.table or s.tail):
            continue
        lines += [f"### {GROUP_TITLES[s.group]}: {s.title} ({s.status}, {s.seconds:.1f} s)", ""]
        if s.command:
            lines += ["```", s.command, "```", ""]
        if s.table:
            lines += ["```", s.table, "```", ""]
        elif s.tail:
            lines += ["<details><summary>output (end)</summary>", "", "```", s.tail, "```", "",
                      "</details>", ""]
    (check.out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    (check.out / "gpu_report.json").write_text(json.dumps(
        {"mode": "dry-run" if check.dry else "cuda", "env": check.env_info,
         "steps": [asdict(s) for s in check.steps], "targets": targets_from(check.results, check.dry),
         "perf_targets": perf_targets(check.results, check.dry) if "perf" in check.selected else [],
         "results": check.results, "finished": final}, indent=1, default=str))


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
