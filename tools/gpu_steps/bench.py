"""Step 3: the speed benchmarks on the device, each table copied into the report, and issue 17's targets
beside the values they measured."""
from __future__ import annotations

import json
import statistics
from typing import TYPE_CHECKING

from .common import PY, REPO, Step, fmt_cmd

if TYPE_CHECKING:
    from .runner import Check, StepFn

TARGETS = {  # issue 17
    "roi_bf16": "RoIAlign bf16 forward+backward vs torchvision's autocast path",
    "det_bwd": "deterministic RoIAlign backward vs the fast one",
    "extract": "extraction (VG R101-C4, bf16, with features)",
    "mfu": "training step model FLOP utilisation (R101-C4 + BERT-base, bf16, batch 8)",
}


def bench(name: str, args_gpu: list[str], args_cpu: list[str], json_out: bool = True,
          key: str | None = None) -> StepFn:
    """The step that runs benchmarks/<name>.py (args_cpu in the dry run) and keeps its JSON results as
    `check.results[key]` (default: the name)."""
    key = key or name

    def fn(check: Check, s: Step, timeout: float) -> None:
        js = check.work / f"bench_{key}.json"
        js.unlink(missing_ok=True)
        cmd = [PY, str(REPO / "benchmarks" / f"{name}.py"), *(args_cpu if check.dry else args_gpu)]
        if json_out:
            cmd += ["--json", str(js)]
        s.command = fmt_cmd(cmd)
        proc = check.run(cmd, timeout, name=f"bench-{key}")
        s.table = proc.stdout.strip()
        if check.from_proc(s, proc) and json_out:
            if not js.exists():
                s.status, s.note = "fail", "no JSON written"
                return
            check.results[key] = json.loads(js.read_text())
            s.note = f"{len(check.results[key]['rows'])} rows" if "rows" in check.results[key] else ""
    return fn


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
           for r in ts.get("rows", []) if "mfu_meas" in r]
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
