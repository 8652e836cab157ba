"""The registered architectures side by side on easy-VQA at the same budget: test accuracy overall and by
answer type, training images/s, parameter counts, with the detector trained jointly or frozen.

Every run is `configs/easy_vqa/<arch>.yaml` (`base.yaml` with MODEL.ARCH <arch> where an architecture has
none), i.e. the demo's detector (stage 1's `output/easy_vqa/detector.pth`, which `make demo` writes), data and
schedule, for --steps optimiser steps; `frozen` adds MODEL.VL.FREEZE_DETECTOR True. Runs are in this
process, one after another, with --threads torch threads. Parameters are counted by the model's own
`parameter_kind`: the detector, the transformer's pre-trained part ("bert") and the layers that start new
(heads, object embedding, and the transformer layers no checkpoint filled). images/s counts training steps
only (from the loop's log), not the final evaluation.

Full run (about 2,000 steps x 4 runs per architecture pair; hours on 2 CPU cores):

    .venv/bin/python benchmarks/architectures.py --steps 2000 --settings joint frozen --threads 2 \\
        --json output/architectures/table.json

A quick look (trailing KEY VALUE pairs override every run's config):

    .venv/bin/python benchmarks/architectures.py --steps 20 --archs vlbert lxmert --threads 1 \\
        DATASETS.TEST_LIMIT 64
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, when run as a script from a checkout

import torch  # noqa: E402

from e2e_vl.config import load_train_cfg  # noqa: E402
from e2e_vl.modeling.registry import architectures, build_model  # noqa: E402

CONFIGS = ROOT / "configs" / "easy_vqa"
SETTINGS = {"joint": [], "frozen": ["MODEL.VL.FREEZE_DETECTOR", "True"]}
PARAMETER_KINDS = ("detector", "bert", "head")
ANSWER_TYPES = ("yes/no", "colour", "shape")


def easy_vqa_architectures() -> list[str]:
    """The registered architectures with an easy-VQA config of their own, and TASK vqa's default
    (base.yaml's)."""
    from e2e_vl.tasks import get_task

    return sorted({a for a in architectures() if (CONFIGS / f"{a}.yaml").is_file()}
                  | {get_task("vqa").default_arch})


def arch_config(arch: str) -> tuple[Path, list[str]]:
    """The architecture's easy-VQA config, or base.yaml with MODEL.ARCH set."""
    own = CONFIGS / f"{arch}.yaml"
    return (own, []) if own.is_file() else (CONFIGS / "base.yaml", ["MODEL.ARCH", arch])


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(PARAMETER_KINDS, 0)
    for name, param in model.named_parameters():
        counts[model.parameter_kind(name)] += param.numel()
    return counts


def training_images_per_s(metrics_file: Path, ims_per_batch: int) -> float:
    """Images over the summed time of the logged training steps (evaluation excluded)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [r for r in rows if "sec_per_step" in r]
    seconds, previous = 0.0, 0
    for row in rows:
        seconds += row["sec_per_step"] * (row["step"] - previous)
        previous = row["step"]
    return previous * ims_per_batch / seconds if seconds > 0 else float("nan")


def run_one(arch: str, setting: str, steps: int, out: Path, overrides: list[str]) -> dict:
    from e2e_vl.engine.trainer import train
    from e2e_vl.tasks import get_task

    config, arch_keys = arch_config(arch)
    keys = [*arch_keys, *SETTINGS[setting], "SOLVER.MAX_ITER", str(steps),
            "OUTPUT_DIR", str(out / f"{arch}-{setting}")]
    cfg = load_train_cfg(config, [*keys, *overrides])
    if cfg.SOLVER.WARMUP_ITERS >= steps:  # a short budget keeps a proportionate warm-up
        cfg = load_train_cfg(config, [*keys, "SOLVER.WARMUP_ITERS", str(steps // 10), *overrides])
    device = torch.device(cfg.MODEL.DEVICE)
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, arch)
    params = count_parameters(model)
    start = time.perf_counter()
    metrics = train(cfg, model, get_task(cfg.TASK).build(cfg, model, device, False), device)
    wall = time.perf_counter() - start
    return {"arch": arch, "setting": setting, "steps": steps, "wall_s": wall, "params": params,
            "images_per_s": training_images_per_s(Path(cfg.OUTPUT_DIR) / "metrics.jsonl",
                                                  cfg.SOLVER.IMS_PER_BATCH),
            "metrics": metrics}


def markdown_table(results: list[dict]) -> str:
    head = ("| arch | detector | accuracy | " + " | ".join(ANSWER_TYPES) +
            " | train images/s | params detector / transformer / new (M) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        m, p = r["metrics"], r["params"]
        by_type = " | ".join(f"{m.get(f'accuracy/{t}', float('nan')):.3f}" for t in ANSWER_TYPES)
        lines.append(f"| {r['arch']} | {r['setting']} | {m.get('accuracy', float('nan')):.3f} | {by_type} | "
                     f"{r['images_per_s']:.1f} | " + " / ".join(f"{p[k] / 1e6:.2f}" for k in PARAMETER_KINDS)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = architectures()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps per run (same for all)")
    parser.add_argument("--archs", nargs="+", default=easy_vqa_architectures(), choices=names,
                        help="default: those with configs/easy_vqa/<arch>.yaml, and vlbert (base.yaml)")
    parser.add_argument("--settings", nargs="+", default=["joint", "frozen"], choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "architectures", help="run folders")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="KEY VALUE pairs for every run's config")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    results = []
    for arch in args.archs:
        for setting in args.settings:
            results.append(run_one(arch, setting, args.steps, args.out, list(args.overrides)))
            print(f"{arch} {setting}: {json.dumps(results[-1]['metrics'])}", flush=True)
    print(f"\neasy-VQA, {args.steps} steps per run, {args.threads} thread(s)\n")
    print(markdown_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "threads": args.threads,
                                         "overrides": args.overrides, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
