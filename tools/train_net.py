#!/usr/bin/env python
r"""Train or evaluate VL-BERT with the detector in the loop.

    python tools/train_net.py                                   # the embedded default: easy-VQA, CPU
    python tools/train_net.py --config-file configs/easy_vqa/smoke.yaml       # ~40 s on 2 CPU cores
    python tools/train_net.py --config-file configs/easy_vqa/smoke.yaml SOLVER.MAX_ITER 80 --resume
    python tools/train_net.py --config-file configs/easy_vqa/smoke.yaml --eval-only   # its newest checkpoint
    python tools/train_net.py --config-file configs/easy_vqa/smoke.yaml MODEL.ARCH visualbert \
        --output-dir output/easy_vqa/smoke_visualbert
    torchrun --nproc_per_node 8 tools/train_net.py --config-file configs/vqa/vlbert_base_e2e.yaml \
        DATASETS.ROOT path/to/vqa MODEL.INIT_FROM path/to/vl-bert-base-e2e.model   # fine-tune it

`KEY VALUE` pairs override the config; the flags (--config-file, --output-dir, --resume, --eval-only) may
stand before, between or after them. The loop itself is `e2e_vl.engine.trainer.train`.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = REPO / "configs" / "easy_vqa" / "e2e.yaml"

logger = logging.getLogger("e2e_vl.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=None, metavar="FILE",
                   help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in OUTPUT_DIR")
    p.add_argument("--eval-only", action="store_true",
                   help="only evaluate (MODEL.WEIGHTS, MODEL.INIT_FROM or the newest checkpoint)")
    p.add_argument("--output-dir", default=None, help="shorthand for OUTPUT_DIR")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="config overrides (the flags may stand among them)")
    return p


VALUE_FLAGS = ("--config-file", "--output-dir")  # the flags that take the next word as their value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags wherever they stand among the `KEY VALUE` overrides: a word that starts with "--" (or is -h)
    is a flag, --config-file and --output-dir take the next word; the rest are the overrides, in order
    (a value such as -1 stays an override)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags, opts, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("--") or word == "-h":
            takes_value = word in VALUE_FLAGS
            flags += argv[i:i + 2] if takes_value else [word]
            i += 2 if takes_value else 1
        else:
            opts.append(word)
            i += 1
    return build_parser().parse_args([*flags, "--", *opts])


def setup_cfg(args: argparse.Namespace):
    from e2e_vl.config import ConfigError, load_train_cfg

    overrides = list(args.opts)
    if args.output_dir:
        given = [v for k, v in zip(overrides[0::2], overrides[1::2]) if k == "OUTPUT_DIR"]
        if given and given[-1] != args.output_dir:  # two answers to one question: no silent winner
            raise ConfigError(f"--output-dir {args.output_dir} and the override OUTPUT_DIR {given[-1]} "
                              "disagree; give one of them")
        overrides += ["OUTPUT_DIR", args.output_dir]
    return load_train_cfg(args.config_file or DEFAULT_CONFIG, overrides)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_eval_weights(cfg, model, device) -> str:
    """Weights for --eval-only: MODEL.WEIGHTS if it is a training checkpoint, else MODEL.INIT_FROM (the
    model was built from it, e.g. a fine-tuned VL-BERT release), else the newest checkpoint of OUTPUT_DIR."""
    from e2e_vl.config import ConfigError
    from e2e_vl.engine.checkpoint import Checkpointer, is_weights_file, load_weights_file

    from e2e_vl.modeling.init_from import load_trained_model

    if cfg.MODEL.WEIGHTS and is_weights_file(cfg.MODEL.WEIGHTS):
        state, path = load_weights_file(cfg.MODEL.WEIGHTS, device), cfg.MODEL.WEIGHTS
    elif cfg.MODEL.INIT_FROM:
        report = getattr(model, "init_report", None)
        fresh = [reason for reason in (report.fresh if report else {}) if reason.startswith("new '")]
        if fresh:  # it would evaluate untrained weights under the file's name
            raise ConfigError(f"--eval-only: MODEL.INIT_FROM {cfg.MODEL.INIT_FROM} has no trained weights "
                              f"for this task's heads ({'; '.join(fresh)}); evaluate a fine-tuned checkpoint")
        return cfg.MODEL.INIT_FROM
    else:
        found = Checkpointer(cfg.OUTPUT_DIR, 1).load_latest(device)
        if found is None:
            raise ConfigError(f"--eval-only: no training checkpoint in MODEL.WEIGHTS or in {cfg.OUTPUT_DIR}")
        state, path = found
    load_trained_model(model, state["model"], str(path))
    return str(path)


def _eval_run_config(cfg):
    """--eval-only of a run's checkpoint (MODEL.WEIGHTS, or the newest of OUTPUT_DIR): the config with the
    MODEL keys of that run (its config.yaml beside the file), so the model it trained is rebuilt."""
    from e2e_vl.config import adopt_run_model
    from e2e_vl.engine.checkpoint import is_weights_file

    if cfg.MODEL.WEIGHTS and is_weights_file(cfg.MODEL.WEIGHTS):
        weights, run_config = cfg.MODEL.WEIGHTS, Path(cfg.MODEL.WEIGHTS).parent / "config.yaml"
    elif cfg.MODEL.INIT_FROM:  # a start the config describes, evaluated as built
        return cfg
    else:
        weights, run_config = cfg.OUTPUT_DIR, Path(cfg.OUTPUT_DIR) / "config.yaml"
    return adopt_run_model(cfg, run_config, weights) if run_config.is_file() else cfg



def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`KEY: saved -> current` for every leaf that differs between a run's saved config.yaml and the config
    it is resumed with, both as YAML loads them (a key only one of them has counts as changed)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        a, b, name = saved.get(key, "<absent>"), current.get(key, "<absent>"), prefix + key
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes


def _write_eval_record(cfg, task_spec, weights: str, metrics: dict) -> None:
    """OUTPUT_DIR/eval_metrics.json (what --eval-only measured, on which data and weights) and
    eval_config.yaml (its settings), written only after the evaluation succeeded and each atomically, so a
    failed evaluation leaves the last good pair as it was (runs that train log theirs to metrics.jsonl)."""
    import json

    from detector.atomic import atomic_write_text

    node = cfg
    for part in task_spec.eval_key.split("."):
        node = node[part]
    record = {"task": cfg.TASK, "data": node, "weights": weights, "metrics": metrics}
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval_config.yaml", cfg.dump())
    atomic_write_text(out / "eval_metrics.json", json.dumps(record, indent=1, sort_keys=True))
    logger.info("config -> %s, metrics -> %s", out / "eval_config.yaml", out / "eval_metrics.json")


def _warn_cpu_autocast(dtype_name: str) -> None:
    """One warning at the start of a CPU run under autocast, with the slowdown measured on this machine."""
    from e2e_vl.engine.amp import cpu_autocast_warning, measure_autocast_slowdown
    from e2e_vl.engine.trainer import AMP_DTYPES

    warning = cpu_autocast_warning(dtype_name, measure_autocast_slowdown(AMP_DTYPES[dtype_name]))
    if warning:
        logger.warning("%s", warning)


def main(args: argparse.Namespace) -> dict:
    from e2e_vl.tasks import get_task

    cfg = setup_cfg(args)  # first, so that a config error is reported before the slow imports
    if args.eval_only:
        cfg = _eval_run_config(cfg)
    task_spec = get_task(cfg.TASK)
    if args.eval_only:
        task_spec.check_eval_target(cfg)

    from detector.atomic import atomic_write_text
    from e2e_vl.config import ConfigError
    from e2e_vl import distributed as du
    from e2e_vl.engine.logger import setup_logging
    from e2e_vl.engine.checkpoint import is_weights_file
    from e2e_vl.engine.trainer import train
    from e2e_vl.modeling import build_model

    device = du.init_distributed(cfg.MODEL.DEVICE)
    rank = du.get_rank()
    setup_logging(cfg.OUTPUT_DIR, rank)
    if rank == 0 and not args.eval_only:
        # config.yaml says how the run's weights were trained (at once: a killed run is resumed against it);
        # an evaluation records its own settings apart, and only once it has succeeded (_write_eval_record).
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        saved, text = Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump()
        if args.resume and saved.is_file():  # a resumed run is only the same run if its config is
            import yaml

            changes = config_changes(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(text))
            if changes:
                logger.warning("--resume with %d config keys changed since %s was written: %s", len(changes),
                               saved, "; ".join(changes))
        atomic_write_text(saved, text)
        logger.info("config %s -> %s", args.config_file or DEFAULT_CONFIG.relative_to(REPO), saved)

    if rank == 0 and device.type == "cpu" and cfg.SOLVER.AMP.DTYPE != "none" and not args.eval_only:
        _warn_cpu_autocast(cfg.SOLVER.AMP.DTYPE)
    seed_everything(cfg.SEED)  # the same initial weights on every rank
    build_cfg = cfg
    if args.eval_only and cfg.MODEL.WEIGHTS and is_weights_file(cfg.MODEL.WEIGHTS):
        build_cfg = cfg.clone()  # an unfrozen copy: the whole-model checkpoint is loaded below instead
        build_cfg.MODEL.WEIGHTS = ""
    model = build_model(build_cfg, task_spec.arch(cfg)).to(device)
    task = task_spec.build(cfg, model, device, args.eval_only)
    seed_everything(cfg.SEED + rank)  # different dropout masks per rank

    if args.eval_only:
        if task.evaluate is None:
            raise ConfigError(f"--eval-only: TASK {cfg.TASK} has nothing to evaluate with this config")
        path = _load_eval_weights(cfg, model, device)
        metrics = task.evaluate(model) if task.evaluate else {}
        logger.info("evaluated %s", path)
        if rank == 0:
            _write_eval_record(cfg, task_spec, path, metrics)
    else:
        metrics = train(cfg, model, task, device, resume=args.resume)
        if rank == 0 and (Path(cfg.OUTPUT_DIR) / "metrics.jsonl").is_file():  # none when nothing was logged
            from e2e_vl.visualize.curves import write_training_curve

            logger.info("training curve -> %s", write_training_curve(cfg.OUTPUT_DIR))
    if rank == 0 and "accuracy" in metrics:
        kinds = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items() if k.startswith("accuracy/")]
        # what was counted: "num_questions" (VQA), "num_sentences" (RefCOCO+), ...
        count, unit = next(((int(v), k[4:]) for k, v in metrics.items() if k.startswith("num_")),
                           (0, "questions"))
        print(f"{cfg.DATASETS.TEST} accuracy: {metrics['accuracy']:.4f} ({count} {unit})"
              + (f"; by type: {', '.join(kinds)}" if kinds else ""), flush=True)
    elif rank == 0 and metrics:  # e.g. TASK pretrain's masked-word / masked-RoI or TASK regions' metrics
        print("  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()), flush=True)
    du.cleanup()
    return metrics


def _without_worker_traceback(exc: BaseException) -> str:
    """The message of an error re-raised from a DataLoader worker, without the worker's traceback that
    torch puts in front of it ("Caught ImageError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.strip().splitlines()[-1]  # "detector.image_sources.ImageError: cannot read file ..."
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from e2e_vl.config import ConfigError
    from detector.checkpoint import CheckpointError
    from detector.image_sources import ImageError
    from e2e_vl.data.catalog import DatasetError
    from e2e_vl.engine.trainer import NonFiniteLossError, ResumeError, TrainingInterrupted

    try:
        main(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, ImageError, DatasetError) as exc:  # the message names the file
        logger.error("error: %s", _without_worker_traceback(exc))
        return 2
    except ResumeError as exc:
        logger.error("%s", exc)
        return 2
    except TrainingInterrupted as exc:  # SIGINT/SIGTERM: the checkpoint is saved; say so, exit 128 + signal
        logger.error("%s", exc)
        return 128 + exc.signum
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # e.g. a read-only or full OUTPUT_DIR; one line when the file is known
        if exc.filename is None:
            raise
        logger.error("error: cannot write or read %s: %s", exc.filename, exc.strerror or exc)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
