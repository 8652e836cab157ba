"""One run of the check: the time budget, each step in its own time box, every command's output in the
log, the report rewritten after every step."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .common import CHECKS, DEFAULT_CHECKS, REPO, Proc, Step, fmt_cmd, tail
from .report import write_report

StepFn = Callable[["Check", Step, float], None]  # fills step.status/note within the timeout (seconds)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.dry = args.device == "cpu"
        self.device = args.device
        self.steps: list[Step] = []
        self.env_info: dict = {}
        self.results: dict = {}  # the benchmarks' JSON and the demo's numbers
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_check_log.txt"
        self.log_path.write_text(f"tools/gpu_check.py {' '.join(sys.argv[1:])}\n")
        self.site = self.work / "site"  # the carried wheels, installed (on PYTHONPATH of every step)
        selected = set(args.steps.split(",")) if args.steps else set(DEFAULT_CHECKS)
        unknown = selected - set(CHECKS)
        if unknown:
            raise SystemExit(f"--steps: unknown {sorted(unknown)}; choose from {','.join(CHECKS)}")
        self.selected = selected
        self.skip = set(filter(None, args.skip.split(",")))

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        paths = [str(REPO)] + ([str(self.site)] if self.site.exists() else [])
        old = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
               "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        return {**env, **(extra or {})}

    def remaining(self) -> float:
        return self.deadline - time.time()

    def gpus(self) -> list[dict]:
        return self.env_info.get("gpus") or []

    def run(self, cmd: list[str], timeout: float, env_extra: dict[str, str] | None = None, name: str = "",
            poll: Callable[[subprocess.Popen], None] | None = None) -> Proc:
        """Run `cmd` in its own process group, output to files; killed (the whole group) after `timeout`
        seconds. `poll(proc)` is called every 0.05 s while it runs (the demo's kill uses it)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "cmd")
        out_f, err_f = self.work / f"{safe}.stdout", self.work / f"{safe}.stderr"
        t = time.perf_counter()
        with open(out_f, "w") as so, open(err_f, "w") as se:
            p = subprocess.Popen(cmd, cwd=REPO, env=self.env(env_extra), stdout=so, stderr=se,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            rc: int | None = None
            while True:
                try:
                    rc = p.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if poll is not None:
                    poll(p)
                if time.perf_counter() - t > timeout:
                    _kill_group(p)
                    rc = None
                    break
        _kill_group(p, quiet=True)  # stragglers (e.g. data-loader workers)
        proc = Proc(rc, time.perf_counter() - t, out_f.read_text(errors="replace"),
                    err_f.read_text(errors="replace"))
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name}: {fmt_cmd(cmd, env_extra)}\n"
                      f"===== exit {rc if rc is not None else 'TIMEOUT'}"
                      f" after {proc.seconds:.1f} s\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
        return proc

    def step(self, key: str, group: str, title: str, cap: float, fn: StepFn) -> Step:
        """Run one step: fn(self, step, timeout) fills step.status/note; exceptions become failures."""
        s = Step(key, group, title)
        self.steps.append(s)
        if key in self.skip:
            s.status, s.note = "skipped", "skipped by --skip"
        elif self.remaining() < min(cap, 20):
            s.status, s.note = "skipped", "the time budget (--budget) was spent before it could start"
        else:
            t = time.perf_counter()
            try:
                fn(self, s, max(5.0, min(cap, self.remaining())))
            except Exception as exc:  # noqa: BLE001 - a broken step must not stop the others
                s.status, s.note = "fail", f"{type(exc).__name__}: {exc}"
            s.seconds = time.perf_counter() - t
        print(f"[gpu-check] {s.group} / {s.title}: {s.status} ({s.seconds:.0f} s) {s.note}", flush=True)
        self.write_report()
        return s

    def from_proc(self, s: Step, proc: Proc, ok_note: str = "") -> bool:
        """The step's status from a finished command: pass on exit 0, else fail or timeout."""
        s.tail = tail(proc.text)
        if proc.timed_out:
            s.status, s.note = "timeout", f"killed after {proc.seconds:.0f} s"
            return False
        if proc.rc != 0:
            s.status, s.note = "fail", f"exit {proc.rc}"
            return False
        s.status, s.note = "pass", ok_note
        return True

    def write_report(self, final: bool = False) -> None:
        write_report(self, final)


def _kill_group(p: subprocess.Popen, quiet: bool = False) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if not quiet:
        p.wait()
