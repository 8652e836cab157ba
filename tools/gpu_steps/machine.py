"""The machine the report describes: GPUs, driver, torch, CUDA, nvcc, Python, packages, commit."""
from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

from .common import PY, REPO, tail

if TYPE_CHECKING:
    from .runner import Check

_ENV_PROGRAM = r"""
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


def collect_env(check: Check) -> None:
    """Fill check.env_info, asking a child process (so that a broken torch is reported, not raised)."""
    proc = check.run([PY, "-c", _ENV_PROGRAM], 120, name="env")
    try:
        check.env_info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        check.env_info = {"error": tail(proc.text, 5)}
    smi = shutil.which("nvidia-smi") or next(
        (p for p in ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi") if os.path.isfile(p)),
        None)
    if smi:
        p = check.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30,
                      name="nvidia-smi")
        check.env_info["nvidia_smi"] = p.stdout.strip()
    nvcc_path = nvcc()
    if nvcc_path:
        p = check.run([nvcc_path, "--version"], 30, name="nvcc")
        check.env_info["nvcc"] = next((ln.strip() for ln in p.stdout.splitlines() if "release" in ln),
                                      p.stdout.strip())
    git = shutil.which("git")
    if git and (REPO / ".git").exists():
        p = check.run([git, "rev-parse", "--short", "HEAD"], 30, name="git")
        d = check.run([git, "status", "--porcelain", "--untracked-files=no"], 30, name="git-status")
        check.env_info["commit"] = p.stdout.strip() + (" (with local changes)" if d.stdout.strip() else "")
    check.write_report()


def nvcc() -> str | None:
    for c in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
              shutil.which("nvcc")):
        if c and os.path.isfile(c):
            return c
    return None
