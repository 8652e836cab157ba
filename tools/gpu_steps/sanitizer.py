"""Step 2: a small RoIAlign forward/backward checked against the CPU op (the smoke program), then the same
program under compute-sanitizer memcheck and racecheck."""
from __future__ import annotations

import os
import re
import shutil
import sys
from typing import TYPE_CHECKING

from .common import PY, REPO, Step, fmt_cmd, tail

if TYPE_CHECKING:
    from .runner import Check, StepFn

REFUSALS = ("Device not supported", "device is not supported", "Target application terminated before first "
            "instrumented API call", "Unable to find injection library",
            "Error: Target application returned an error", "Unable to launch",
            "not supported on this platform")


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


def smoke_cmd(check: Check) -> list[str]:
    return [PY, str(REPO / "tools" / "gpu_check.py"), "--smoke", "--device", "cpu" if check.dry else "cuda"]


def smoke_step(check: Check, s: Step, timeout: float) -> None:
    s.command = fmt_cmd(smoke_cmd(check))
    proc = check.run(smoke_cmd(check), timeout, name="smoke")
    if check.from_proc(s, proc):
        s.note = tail(proc.stdout, 1)


def sanitizer_path() -> str | None:
    for c in (shutil.which("compute-sanitizer"),
              os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")):
        if c and os.path.isfile(c):
            return c
    return None


def sanitizer(tool: str) -> StepFn:
    """The step that runs the smoke program under `compute-sanitizer --tool <tool>`."""
    def fn(check: Check, s: Step, timeout: float) -> None:
        cs = sanitizer_path()
        if check.dry:
            s.status, s.note = ("skipped", "dry run: needs a CUDA device"
                                + ("" if cs else " (and compute-sanitizer)"))
            return
        if cs is None:
            s.status, s.note = "skipped", "compute-sanitizer not found (PATH, CUDA_HOME/bin)"
            return
        cmd = [cs, "--tool", tool, "--error-exitcode", "9", "--print-limit", "20", *smoke_cmd(check)]
        # without the caching allocator an out-of-bounds access leaves its allocation and is seen
        extra = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        s.command = fmt_cmd(cmd, extra)
        proc = check.run(cmd, timeout, extra, name=tool)
        s.tail = tail(proc.text, 25)
        s.status, s.note = judge_sanitizer(proc.rc, proc.text)
        if s.status == "pass" and "cases agree" not in proc.stdout:
            s.status, s.note = "fail", "the smoke program did not finish under the tool"
    return fn
