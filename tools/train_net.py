#!/usr/bin/env python
"""Train or evaluate VL-BERT with the detector in the loop.

    python tools/train_net.py                                   # the embedded default: easy-VQA, CPU
    python tools/train_net.py --config-file configs/vqa/base.yaml SOLVER.BASE_LR 5e-5
    torchrun --nproc_per_node 8 tools/train_net.py --config-file ... MODEL.DEVICE cuda
    python tools/train_net.py --config-file ... --resume          # continue from the newest checkpoint
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_best.pth
    python tools/train_net.py --config-file ... MODEL.INIT_FROM vl-bert-base-e2e.model   # fine-tune it

Trailing `KEY VALUE` pairs override the config. The loop itself is `e2e_vl.engine.trainer.train`.
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
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p


def setup_cfg(args: argparse.Namespace):
    from e2e_vl.config import load_train_cfg

    overrides = list(args.opts)
    if args.output_dir:
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
    from e2e_vl.engine.checkpoint import Checkpointer, load_checkpoint_file

    from e2e_vl.modeling.init_from import load_trained_model

    if cfg.MODEL.WEIGHTS and _is_training_checkpoint(cfg.MODEL.WEIGHTS):
        state, path = load_checkpoint_file(cfg.MODEL.WEIGHTS, device), cfg.MODEL.WEIGHTS
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

    if cfg.MODEL.WEIGHTS and _is_training_checkpoint(cfg.MODEL.WEIGHTS):
        weights, run_config = cfg.MODEL.WEIGHTS, Path(cfg.MODEL.WEIGHTS).parent / "config.yaml"
    elif cfg.MODEL.INIT_FROM:  # a start the config describes, evaluated as built
        return cfg
    else:
        weights, run_config = cfg.OUTPUT_DIR, Path(cfg.OUTPUT_DIR) / "config.yaml"
    return adopt_run_model(cfg, run_config, weights) if run_config.is_file() else cfg


def _is_training_checkpoint(path: str) -> bool:
    from e2e_vl.engine.checkpoint import load_checkpoint_file

    try:
        load_checkpoint_file(path)
        return True
    except Exception:  # a detector-only weight file: the build loads it into the detector
        return False


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


def _write_eval_metrics(cfg, task_spec, weights: str, metrics: dict) -> None:
    """OUTPUT_DIR/eval_metrics.json: what --eval-only measured, on which data and weights (atomic; the last
    evaluation's; runs that train log theirs to metrics.jsonl)."""
    import json

    from e2e_vl.engine.checkpoint import atomic_write

    node = cfg
    for part in task_spec.eval_key.split("."):
        node = node[part]
    record = {"task": cfg.TASK, "data": node, "weights": weights, "metrics": metrics}
    path = Path(cfg.OUTPUT_DIR) / "eval_metrics.json"
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1, sort_keys=True).encode("utf-8")))
    logger.info("metrics -> %s", path)


def main(args: argparse.Namespace) -> dict:
    from e2e_vl.tasks import get_task

    cfg = setup_cfg(args)  # first, so that a config error is reported before the slow imports
    if args.eval_only:
        cfg = _eval_run_config(cfg)
    task_spec = get_task(cfg.TASK)
    if args.eval_only:
        task_spec.check_eval_target(cfg)

    from e2e_vl.config import ConfigError
    from e2e_vl import distributed as du
    from e2e_vl.engine.logger import setup_logging
    from e2e_vl.engine.trainer import train
    from e2e_vl.modeling import build_model

    device = du.init_distributed(cfg.MODEL.DEVICE)
    rank = du.get_rank()
    setup_logging(cfg.OUTPUT_DIR, rank)
    if rank == 0:
        # config.yaml says how the run's weights were trained; an evaluation records its own settings apart.
        name = "eval_config.yaml" if args.eval_only else "config.yaml"
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        saved, text = Path(cfg.OUTPUT_DIR) / name, cfg.dump()
        if args.resume and saved.is_file():  # a resumed run is only the same run if its config is
            import yaml

            changes = config_changes(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(text))
            if changes:
                logger.warning("--resume with %d config keys changed since %s was written: %s", len(changes),
                               saved, "; ".join(changes))
        saved.write_text(text)
        logger.info("config %s -> %s/%s", args.config_file or DEFAULT_CONFIG.relative_to(REPO),
                    cfg.OUTPUT_DIR, name)

    seed_everything(cfg.SEED)  # the same initial weights on every rank
    build_cfg = cfg
    if args.eval_only and cfg.MODEL.WEIGHTS and _is_training_checkpoint(cfg.MODEL.WEIGHTS):
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
            _write_eval_metrics(cfg, task_spec, path, metrics)
    else:
        metrics = train(cfg, model, task, device, resume=args.resume)
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
    args = build_parser().parse_args(argv)
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
