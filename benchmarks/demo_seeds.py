"""The demo's result over seeds and thread counts: the table behind the README's claim (docs/results.md).

For each thread count, stage 1 (`configs/easy_vqa/detector.yaml`, then `tools/export_detector.py`) runs
once with the config's seed, as `make demo` runs it; then stage 2 runs once per seed and setting, started
from that stage-1 file: `joint` is the embedded default (`configs/easy_vqa/e2e.yaml`, detector trained
with BERT), `frozen` the ablation (`configs/easy_vqa/frozen_detector.yaml`). Every run is a real
`tools/train_net.py` process with `OMP_NUM_THREADS` set to its thread count, evaluated on all 9,673 test
questions; the table gives accuracy overall and per answer type, and each stage's wall time.

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [--settings joint frozen]
        [--jobs 2] [--out output/demo_seeds] [--json table.json] [KEY VALUE ...]

`--jobs N` runs N stage-2 runs side by side (use it for 1-thread runs on a 2-core machine: the cores
are then each busy with one run, but the wall times are those of a loaded machine). Trailing KEY VALUE
pairs override both stages' configs (e.g. `SOLVER.MAX_ITER 500` for a quick look).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"joint": "configs/easy_vqa/e2e.yaml", "frozen": "configs/easy_vqa/frozen_detector.yaml"}
RESULT = re.compile(r"accuracy: (?P<acc>[0-9.]+) \((?P<n>\d+) questions\)(?:; by type: (?P<types>.*))?")


def run(args: list[str], threads: int, log: Path) -> tuple[str, float]:
    """Run `python args` from the repository with `threads` torch threads; stdout and wall seconds.
    The full output goes to `log`; a failed run stops the table with its tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {r.returncode}; log {log}):\n{r.stderr[-2000:]}")
    return r.stdout, wall


def parse_accuracy(stdout: str) -> dict[str, float]:
    """train_net's closing line -> {"accuracy": ..., "yes/no": ..., "colour": ..., "shape": ...}."""
    match = RESULT.search(stdout)
    if match is None:
        raise ValueError(f"no accuracy line in the run's output:\n{stdout[-1000:]}")
    result = {"accuracy": float(match["acc"]), "questions": int(match["n"])}
    for part in (match["types"] or "").split(", "):
        if part:
            name, value = part.rsplit(" ", 1)
            result[name] = float(value)
    return result


def parse_metrics(stdout: str) -> dict[str, float]:
    """train_net's closing "key: value  key: value" line (TASK regions) -> {key: value}."""
    for line in reversed(stdout.splitlines()):
        pairs = re.findall(r"([\w/]+): ([0-9.]+|nan)", line)
        if pairs and not line.startswith("["):
            return {k: float(v) for k, v in pairs}
    raise ValueError(f"no metrics line in the run's output:\n{stdout[-1000:]}")


def stage1(out: Path, threads: int, overrides: list[str]) -> tuple[Path, float, dict[str, float]]:
    """The exported stage-1 detector, the wall seconds of training + export, and stage 1's test metrics."""
    weights = out / f"threads{threads}" / "detector.pth"
    run_dir = out / f"threads{threads}" / "detector"
    stdout, wall = run(["tools/train_net.py", "--config-file", "configs/easy_vqa/detector.yaml",
                        "--output-dir", str(run_dir), *overrides], threads, run_dir.with_suffix(".log"))
    _, wall_export = run(["tools/export_detector.py", "--checkpoint", str(run_dir), "--output", str(weights),
                          "--overwrite"], threads, run_dir.with_suffix(".export.log"))
    return weights, wall + wall_export, parse_metrics(stdout)


def stage2(out: Path, weights: Path, setting: str, seed: int, threads: int, overrides: list[str]) -> dict:
    run_dir = out / f"threads{threads}" / f"{setting}_seed{seed}"
    stdout, wall = run(["tools/train_net.py", "--config-file", SETTINGS[setting],
                        "--output-dir", str(run_dir), "SEED", str(seed), "MODEL.WEIGHTS", str(weights),
                        *overrides],
                       threads, run_dir.with_suffix(".log"))
    return {"setting": setting, "seed": seed, "threads": threads, "stage2_s": round(wall, 1),
            **parse_accuracy(stdout)}


def table(rows: list[dict], stage1_s: dict[int, float], stage1_metrics: dict[int, dict] | None = None) -> str:
    types = ("yes/no", "colour", "shape")
    lines = ["| setting | threads | seed | accuracy | " + " | ".join(types) + " | stage 2 + eval (s) |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in types) + " | --- |"]
    for r in sorted(rows, key=lambda r: (r["setting"], r["threads"], r["seed"])):
        lines.append(f"| {r['setting']} | {r['threads']} | {r['seed']} | {r['accuracy']:.4f} | "
                     + " | ".join(f"{r.get(t, float('nan')):.4f}" for t in types)
                     + f" | {r['stage2_s']:.0f} |")
    lines.append("")
    lines.append("| setting | runs | mean | min | max |")
    lines.append("| --- | --- | --- | --- | --- |")
    for setting in sorted({r["setting"] for r in rows}):
        acc = [r["accuracy"] for r in rows if r["setting"] == setting]
        lines.append(f"| {setting} | {len(acc)} | {statistics.mean(acc):.4f} | {min(acc):.4f} | "
                     f"{max(acc):.4f} |")
    lines.append("")
    lines.append("stage 1 + export (s): "
                 + ", ".join(f"{t} threads {s:.0f}" for t, s in sorted(stage1_s.items())))
    for t, m in sorted((stage1_metrics or {}).items()):
        lines.append(f"stage 1, {t} threads: region accuracy {m['region_accuracy']:.4f}, worst class "
                     f"{m.get('worst_class_accuracy', float('nan')):.4f} ({m['num_regions']:.0f} test boxes)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["joint"])
    p.add_argument("--jobs", type=int, default=1, help="stage-2 runs side by side")
    p.add_argument("--stage1", type=Path, default=None,
                   help="use this exported stage-1 detector for every thread count instead of training one")
    p.add_argument("--out", type=Path, default=REPO / "output" / "demo_seeds")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE")
    args = p.parse_args()

    weights, stage1_s, stage1_metrics = {}, {}, {}
    for threads in args.threads:
        if args.stage1 is not None:
            weights[threads], stage1_s[threads] = args.stage1, 0.0
        else:
            weights[threads], stage1_s[threads], stage1_metrics[threads] = stage1(args.out, threads,
                                                                                  args.opts)
            print(f"stage 1, {threads} threads: {stage1_s[threads]:.0f} s, region accuracy "
                  f"{stage1_metrics[threads]['region_accuracy']:.4f}", flush=True)
    jobs = [(setting, seed, threads) for threads in args.threads for setting in args.settings
            for seed in args.seeds]
    rows: list[dict] = []

    def one(job: tuple[str, int, int]) -> dict:
        setting, seed, threads = job
        row = stage2(args.out, weights[threads], setting, seed, threads, args.opts)
        print(f"{setting} seed {seed} threads {threads}: {row['accuracy']:.4f} in {row['stage2_s']:.0f} s",
              flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(one, jobs))
    text = table(rows, stage1_s, stage1_metrics)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "stage1_s": stage1_s, "stage1": stage1_metrics},
                                        indent=1))


if __name__ == "__main__":
    main()
