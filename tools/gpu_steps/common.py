"""What every step uses: the repository, the Python that runs the check, the result records, and the
readers of what the tools print."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CHECKS = ("pytest", "sanitizer", "bench", "demo", "ddp", "perf")  # what --steps selects; setup always runs
DEFAULT_CHECKS = ("pytest", "sanitizer", "bench", "demo", "ddp")  # without --steps (perf has its own call)
GROUP_TITLES = {"setup": "0. setup", "pytest": "1. pytest -m cuda", "sanitizer": "2. compute-sanitizer",
                "bench": "3. benchmarks", "demo": "4. end-to-end demo", "ddp": "5. two-process DDP",
                "perf": "6. perf (issue 30)"}
ACCURACY = re.compile(r"(\w+) accuracy: ([0-9.]+) \((\d+) questions\)(?:; by type: (.*))?")


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
    """The command as the report shows it: the Python as `python`, paths relative to the repository."""
    def rel(a: str) -> str:
        for root, name in ((PY, "python"), (str(REPO), ".")):
            if a == root:
                return name
            if a.startswith(root + os.sep):
                return a[len(root) + 1:]
        return a

    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env_extra or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(rel(a)) for a in cmd)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl that parse (a killed run may leave its last line cut)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return rows
