"""Step 1: `pytest -m cuda` over the test files that hold cuda tests; the counts come from its JUnit XML."""
from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from .common import PY, REPO, Step, fmt_cmd, tail

if TYPE_CHECKING:
    from .runner import Check


def parse_junit(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def pytest_cuda(check: Check, s: Step, timeout: float) -> None:
    xml = check.work / "pytest_cuda.xml"
    xml.unlink(missing_ok=True)
    # The files that hold cuda tests (so that a module that cannot be imported there, for want of a
    # package the cuda tests do not need, cannot stop the collection); all of tests/ if none is found.
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text(errors="replace"))
    cmd = [PY, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={xml}",
           *(files or ["tests"])]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd[3:3] = ["--timeout", "300"]
    if importlib.util.find_spec("xdist") is not None:
        cmd[3:3] = ["-n", "0"]
    s.command = fmt_cmd(cmd)
    proc = check.run(cmd, timeout, name="pytest-cuda")
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
    elif check.dry:
        s.status = "pass" if counts["tests"] and counts["skipped"] == counts["tests"] else "fail"
        s.note = f"dry run: {summary} (every cuda test skips without a GPU)"
    elif counts["passed"] == 0:
        s.status, s.note = "fail", f"{summary}: none ran"
    else:
        s.status, s.note = "pass", summary
