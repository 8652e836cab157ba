#!/usr/bin/env python
"""Prove the GPU path in one command: build, CUDA tests, sanitizers, benchmarks, a real end-to-end run.

    make gpu-check OUT=DIR              # on a CUDA machine: python tools/gpu_check.py --out DIR
    make gpu-check OUT=DIR DEVICE=cpu   # the dry run: the same steps with tiny sizes, on the CPU

Uses the Python that runs it (torch is never installed or upgraded). Steps, each time-boxed, each
result recorded even when another step fails:

  0. setup     wheels: the packages the GPU image lacks, from `.whl/` (`make gpu-wheels` fetches them)
               build:  `python setup.py build_ext --inplace` for the local GPU's architecture
  1. pytest    `pytest -m cuda tests`
  2. sanitizer a small RoIAlign forward/backward (`--smoke`), then under compute-sanitizer
               memcheck and racecheck (skipped where the tool is absent or refuses the device)
  3. bench     benchmarks/roi_align.py, detector_speed.py, extract.py, train_step.py on the device
  4. demo      the demo's two stages (configs/easy_vqa/detector.yaml, export, configs/easy_vqa/e2e.yaml)
               with MODEL.DEVICE cuda and bf16 autocast; stage 2 is SIGKILLed once half way and resumed
  5. ddp       stage 2 on two processes (only with two GPUs)
  6. perf      only when named (`STEPS=perf`, its own call of at most 8 minutes): every row of issue
               30's targets (gpu_steps/perf.py): MFU and memory per batch size up to 40 GiB, syncs per
               training step, extract_rois.py img/s on JPEG files with its records checked against the
               CPU, every RoIAlign case

`DIR/gpu_report.md` (rewritten after every step, so a run cut short still leaves one) holds the
machine, versions, pass/fail and wall time per step, every table, and the targets of issue 17 beside
the measured values; `DIR/gpu_check_log.txt` every command's full output; `DIR/gpu_report.json` the same
results as data. The exit status is 1 when a step failed or timed out. `--budget` seconds bound the
whole run: a step that would start past it is skipped, and the report says how to run what was left.

The dry run (`--device cpu`) runs the same control flow with tiny sizes and does not rebuild the
extension or install wheels (it checks that the built one loads and the packages import).

This file is the driver: which steps run, in which order, with which time box. Each step is a module of
`tools/gpu_steps/`; `gpu_steps/runner.py` runs them and `gpu_steps/report.py` writes the report.
"""
from __future__ import annotations

import argparse
import sys

from gpu_steps import bench, ddp, demo, machine, perf, prepare, pytest_cuda, sanitizer
from gpu_steps.common import CHECKS, DEFAULT_CHECKS, REPO, Step
from gpu_steps.runner import Check, StepFn

CUDA_CAPS = {"wheels": 120, "build": 300, "pytest": 180, "smoke": 60, "memcheck": 120, "racecheck": 120,
             "roi_align": 120, "detector_speed": 150, "extract": 120, "train_step": 150, "stage1": 180,
             "export": 60, "stage2": 240, "resume": 240, "ddp": 240,
             **{key: cap for key, _, cap, _ in perf.STEPS}}  # seconds per step; 240 each dry


def run_all(check: Check) -> int:
    """Every selected step in order; 1 when one failed or timed out."""
    machine.collect_env(check)
    if not check.dry and not check.gpus():
        print("no CUDA device visible to torch: use --device cpu for the dry run", file=sys.stderr)
    caps = {k: (v if not check.dry else 240) for k, v in CUDA_CAPS.items()}
    check.step("wheels", "setup", "wheels from .whl/", caps["wheels"], prepare.wheels)
    built = check.step("build", "setup", "build the extension in place", caps["build"], prepare.build)
    build_ok = built.status == "pass" or (built.status == "skipped" and "--skip" in built.note)

    def step(key: str, group: str, title: str, fn: StepFn) -> None:
        """A step that needs the extension: skipped, saying so, when it did not build."""
        def needs_build(c: Check, s: Step, timeout: float) -> None:
            if not build_ok:
                s.status, s.note = "skipped", "the extension did not build"
                return
            fn(c, s, timeout)
        check.step(key, group, title, caps[key], needs_build)

    if "pytest" in check.selected:
        step("pytest", "pytest", "pytest -m cuda tests", pytest_cuda.pytest_cuda)
    if "sanitizer" in check.selected:
        step("smoke", "sanitizer", "RoIAlign fwd/bwd smoke (no tool)", sanitizer.smoke_step)
        step("memcheck", "sanitizer", "compute-sanitizer memcheck", sanitizer.sanitizer("memcheck"))
        step("racecheck", "sanitizer", "compute-sanitizer racecheck", sanitizer.sanitizer("racecheck"))
    if "bench" in check.selected:
        dev = "cpu" if check.dry else "cuda"
        step("roi_align", "bench", "benchmarks/roi_align.py",
             bench.bench("roi_align", ["--device", "cuda", "--quick"],
                         ["--device", "cpu", "--quick", "--boxes", "10", "--repeats", "1"]))
        step("detector_speed", "bench", "benchmarks/detector_speed.py",
             bench.bench("detector_speed",
                         ["--devices", "cuda", "--dtypes", "fp32,bf16+opt,bf16+cl", "--skip", "detectron2"],
                         ["--quick", "--devices", "cpu", "--dtypes", "fp32,bf16+opt,bf16+cl", "--iters", "1",
                          "--skip", "detectron2"], json_out=False))
        step("extract", "bench", "benchmarks/extract.py",
             bench.bench("extract", ["--device", "cuda"], ["--quick", "--device", dev, "--images", "2"]))
        step("train_step", "bench", "benchmarks/train_step.py",
             bench.bench("train_step", ["--device", "cuda"],
                         ["--quick", "--device", "cpu", "--regions", "10", "--batch", "1", "--repeats", "1"]))
    if "demo" in check.selected:
        step("stage1", "demo", "stage 1: detector (configs/easy_vqa/detector.yaml)", demo.stage1)
        step("export", "demo", "export the stage-1 detector", demo.export)
        step("stage2", "demo", "stage 2: VL-BERT end to end, SIGKILLed half way", demo.stage2_killed)
        step("resume", "demo", "stage 2 --resume to the end, test accuracy", demo.resume)
    if "ddp" in check.selected:
        step("ddp", "ddp", "stage 2 on two processes (torchrun)", ddp.ddp)
    if "perf" in check.selected:
        for key, title, _, fn in perf.STEPS:
            step(key, "perf", title, fn)
    check.write_report(final=True)
    bad = [s for s in check.steps if s.status in ("fail", "timeout")]
    print(f"[gpu-check] report: {check.out / 'gpu_report.md'}; "
          f"{len(bad)} of {len(check.steps)} steps failed or timed out", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "output" / "gpu_check"),
                    help="folder for gpu_report.md and the log")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="cpu: the dry run (tiny sizes); auto: cuda when torch sees a GPU")
    ap.add_argument("--work", default=str(REPO / "output" / "gpu_check_work"),
                    help="scratch folder (runs, JSON)")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels to install first (make gpu-wheels)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 540 on CUDA, 900 for the dry run)")
    ap.add_argument("--steps", default="",
                    help=f"comma list of checks to run: {','.join(CHECKS)} "
                         f"(default {','.join(DEFAULT_CHECKS)})")
    ap.add_argument("--skip", default="", help="comma list of step keys to skip, e.g. build,memcheck,ddp")
    ap.add_argument("--smoke", action="store_true",
                    help="only the RoIAlign smoke program (what the sanitizers run)")
    a = ap.parse_args(argv)
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        return 1 if sanitizer.smoke(a.device) else 0
    if a.budget is None:
        a.budget = 900.0 if a.device == "cpu" else 540.0
    return run_all(Check(a))


if __name__ == "__main__":
    sys.exit(main())
