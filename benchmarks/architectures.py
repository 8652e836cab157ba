"""The registered architectures side by side on easy-VQA: test accuracy overall and by answer type on all
9,673 questions, over seeds, with the detector trained jointly or frozen; training images/s, wall time
against VL-BERT's (the demo's stage 2) in the same invocation, parameter counts.

Every run is a real `tools/train_net.py` process, `configs/easy_vqa/<arch>.yaml` (`base.yaml` with MODEL.ARCH
<arch> where an architecture has none) with `SEED <seed>`: the demo's detector (stage 1's
`output/easy_vqa/detector.pth`, which `make demo` writes), data, and the architecture's own schedule
(`--steps N` sets the same MAX_ITER for all); `frozen` adds MODEL.VL.FREEZE_DETECTOR True. The baseline
is VL-BERT joint at the first seed (the demo's stage 2; run unless `--archs` omits vlbert); each row's
"x baseline" is its wall time (training + evaluation) over the baseline's. Parameters are counted by the
model's own `parameter_kind`: the detector, the transformer's pre-trained part and the layers that start new.
A finished run leaves `result.json` in its folder; `--reuse` reads those back instead of training again
(only those made by the same command from the same stage-1 file), so a table can be built over several
sittings (wall times are then from different machine loads: say so).

The table in docs/results.md (2-core CPU, 2 threads):

    .venv/bin/python benchmarks/architectures.py --seeds 0 1 2 --settings joint --threads 2 --reuse
    .venv/bin/python benchmarks/architectures.py --seeds 0 --settings frozen --threads 2 --reuse

A quick look (trailing KEY VALUE pairs override every run's config):

    .venv/bin/python benchmarks/architectures.py --steps 20 --archs vlbert lxmert --threads 1 \\
        DATASETS.TEST_LIMIT 64
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, when run as a script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_seeds import parse_accuracy, run  # noqa: E402
from detector.atomic import atomic_write_text  # noqa: E402

CONFIGS = ROOT / "configs" / "easy_vqa"
SETTINGS = {"joint": [], "frozen": ["MODEL.VL.FREEZE_DETECTOR", "True"]}
PARAMETER_KINDS = ("detector", "bert", "head")
ANSWER_TYPES = ("yes/no", "colour", "shape")
BASELINE = "vlbert"


def easy_vqa_architectures() -> list[str]:
    """The registered architectures with an easy-VQA config of their own, and TASK vqa's default
    (base.yaml's)."""
    from e2e_vl.modeling.registry import architectures
    from e2e_vl.tasks import get_task

    return sorted({a for a in architectures() if (CONFIGS / f"{a}.yaml").is_file()}
                  | {get_task("vqa").default_arch})


def arch_config(arch: str) -> tuple[Path, list[str]]:
    """The architecture's easy-VQA config, or base.yaml with MODEL.ARCH set."""
    own = CONFIGS / f"{arch}.yaml"
    return (own, []) if own.is_file() else (CONFIGS / "base.yaml", ["MODEL.ARCH", arch])


def starting_detector(config: Path, keys: list[str]) -> str:
    """SHA-256 of the run's MODEL.WEIGHTS file ("" for none): with --reuse, the same command started from
    another stage-1 export (make demo writes it again after a change to stage 1) is another run."""
    import hashlib

    from e2e_vl.config import load_train_cfg

    weights = load_train_cfg(config, keys).MODEL.WEIGHTS
    if not weights or not (ROOT / weights).is_file():
        return ""
    return hashlib.sha256((ROOT / weights).read_bytes()).hexdigest()


def count_parameters(config: Path, keys: list[str]) -> dict[str, int]:
    """Parameters per `parameter_kind` of the model the run builds (random weights: only shapes count)."""
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling.registry import build_model

    cfg = load_train_cfg(config, [*keys, "MODEL.WEIGHTS", ""])
    model = build_model(cfg, cfg.MODEL.ARCH)
    counts = dict.fromkeys(PARAMETER_KINDS, 0)
    for name, param in model.named_parameters():
        counts[model.parameter_kind(name)] += param.numel()
    return counts


def training_images_per_s(metrics_file: Path) -> float:
    """Images over the summed time of the logged training steps (evaluation excluded)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [r for r in rows if "sec_per_step" in r]
    seconds, previous, images = 0.0, 0, 0.0
    for row in rows:
        seconds += row["sec_per_step"] * (row["step"] - previous)
        images += row["images_per_s"] * row["sec_per_step"] * (row["step"] - previous)
        previous = row["step"]
    return images / seconds if seconds > 0 else float("nan")


def run_one(arch: str, setting: str, seed: int, steps: int | None, threads: int, out: Path,
            overrides: list[str], reuse: bool) -> dict:
    """One train_net run (or its stored result with `reuse`, when it was made by the same command)."""
    config, arch_keys = arch_config(arch)
    run_dir = out / f"{arch}-{setting}-seed{seed}"
    keys = [*arch_keys, *SETTINGS[setting], "SEED", str(seed), *overrides]
    if steps is not None:
        keys += ["SOLVER.MAX_ITER", str(steps), "SOLVER.WARMUP_ITERS", str(min(100, steps // 10))]
    command = ["tools/train_net.py", "--config-file", str(config.relative_to(ROOT)), "--output-dir",
               str(run_dir), *keys]
    stored = run_dir / "result.json"
    detector = starting_detector(config, keys)
    if reuse and stored.is_file():
        result = json.loads(stored.read_text())
        if [result.get(k) for k in ("command", "threads", "detector")] == [command, threads, detector]:
            return result
    stdout, wall = run(command, threads, run_dir.with_suffix(".log"))
    result = {"arch": arch, "setting": setting, "seed": seed, "threads": threads, "command": command,
              "detector": detector,
              "wall_s": round(wall, 1), "images_per_s": training_images_per_s(run_dir / "metrics.jsonl"),
              "params": count_parameters(config, keys), "metrics": parse_accuracy(stdout)}
    atomic_write_text(stored, json.dumps(result, indent=1))  # a stopped run never leaves half a file
    return result


def markdown_table(results: list[dict]) -> str:
    baseline = next((r["wall_s"] for r in results if r["arch"] == BASELINE and r["setting"] == "joint"), None)
    head = ("| arch | detector | seed | accuracy | " + " | ".join(ANSWER_TYPES) +
            " | wall (s) | x baseline | train images/s | params detector / transformer / new (M) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        m, p = r["metrics"], r["params"]
        by_type = " | ".join(f"{m.get(t, float('nan')):.4f}" for t in ANSWER_TYPES)
        ratio = f"{r['wall_s'] / baseline:.2f}" if baseline else "-"
        lines.append(f"| {r['arch']} | {r['setting']} | {r['seed']} | {m['accuracy']:.4f} | {by_type} | "
                     f"{r['wall_s']:.0f} | {ratio} | {r['images_per_s']:.1f} | "
                     + " / ".join(f"{p[k] / 1e6:.2f}" for k in PARAMETER_KINDS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from e2e_vl.modeling.registry import architectures

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimiser steps for every run, with SOLVER.WARMUP_ITERS min(100, N // 10) "
                             "(default: each config's own SOLVER.MAX_ITER and warm-up)")
    parser.add_argument("--archs", nargs="+", default=easy_vqa_architectures(), choices=architectures(),
                        help="default: those with configs/easy_vqa/<arch>.yaml, and vlbert (base.yaml)")
    parser.add_argument("--settings", nargs="+", default=["joint"], choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "architectures", help="run folders")
    parser.add_argument("--reuse", action="store_true", help="read back runs whose result.json exists")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="KEY VALUE pairs for every run's config")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    jobs = [(arch, setting, seed) for setting in args.settings for seed in args.seeds for arch in args.archs]
    if BASELINE in args.archs:  # the baseline first (also for a frozen-only table: --reuse reads it back)
        baseline = (BASELINE, "joint", args.seeds[0])
        jobs = [baseline, *(job for job in jobs if job != baseline)]
    results = []
    for arch, setting, seed in jobs:
        results.append(run_one(arch, setting, seed, args.steps, args.threads, args.out,
                               list(args.overrides), args.reuse))
        last = results[-1]
        print(f"{arch} {setting} seed {seed}: {last['metrics']['accuracy']:.4f} in {last['wall_s']:.0f} s",
              flush=True)
    steps = f"{args.steps} steps per run" if args.steps else "each config's schedule"
    print(f"\neasy-VQA, {steps}, {args.threads} thread(s)\n")
    print(markdown_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "threads": args.threads,
                                         "overrides": args.overrides, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
