#!/usr/bin/env python
"""Hand the jointly trained detector back as a stand-alone detector checkpoint.

    python tools/export_detector.py --checkpoint output/run/model_0001000.pth --output vg_e2e.pth \
        --base-weights faster_rcnn_from_caffe_attr.pkl [--format detectron2|pkl|safetensors] [--overwrite]

The trunk and res5 head come from the training checkpoint (a file, or a run folder: its newest valid
checkpoint); the parts the run did not train (RPN, box predictor, attribute head, as far as no update
reached them) from --base-weights when given (--take-base-head: all of them). The output's suffix names
its format (.pth, .pkl, .safetensors: what Detectron2 picks its reader by). The result loads into
Detectron2's DetectionCheckpointer, into `detector.checkpoint.load_checkpoint` and into
tools/extract_rois.py with the detector config written beside it, OUTPUT.yaml (e.g. vg_e2e.pth.yaml),
which Detectron2's get_cfg() reads after `detector.config.detectron2_keys.add_vg_config`. The output records
where it came from (run, step, config and weights hashes). Every input is checked before anything is
written (damaged or non-finite checkpoints, suffix and format); a failed write leaves nothing behind.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from detector.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint  # noqa: E402
from detector.atomic import atomic_write  # noqa: E402
from detector.checkpoint.export import DETECTOR_KEY_PREFIX, assemble_detector_state  # noqa: E402
from detector.config import ConfigError, get_cfg  # noqa: E402
from detector.modeling import build_detector  # noqa: E402

FORMAT_BY_SUFFIX = {".pth": "detectron2", ".pkl": "pkl", ".safetensors": "safetensors"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint file, or a run folder (newest valid one)")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--format", choices=sorted(set(FORMAT_BY_SUFFIX.values())), default=None,
                   help="default: from the output's suffix (.pth, .pkl, .safetensors), which must agree")
    p.add_argument("--base-weights", default=None,
                   help="the original detector weights; the RPN / box predictor / attribute tensors the run "
                        "did not train are copied from them")
    p.add_argument("--take-base-head", action="store_true",
                   help="with --base-weights: take every RPN / box predictor / attribute tensor from them, "
                        "even those the run trained")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def read_training_checkpoint(path: str) -> tuple[dict, str]:
    """(checkpoint dict, file path) for a file or the newest valid checkpoint of a run folder."""
    from e2e_vl.engine.checkpoint import Checkpointer, load_weights_file

    if os.path.isdir(path):
        found = Checkpointer(path, keep_last=1).load_latest()
        if found is None:
            raise CheckpointError(f"{path}: no readable training checkpoint (model_<step>.pth) in this "
                                  "folder")
        state, file = found
        return state, os.fspath(file)
    if not os.path.isfile(path):
        raise CheckpointError(f"training checkpoint not found: {path}")
    try:
        return load_weights_file(path), path
    except CheckpointError:
        raise
    except ValueError as exc:  # a readable file that is not a training checkpoint (names itself)
        raise CheckpointError(str(exc)) from None


def detector_cfg_from_run(state: dict, source: str):
    """The run's detector architecture: the detector sections of its saved, resolved config."""
    from e2e_vl.config import get_train_cfg

    text = state.get("config")
    if not isinstance(text, str):
        raise CheckpointError(f"{source}: the checkpoint does not record its config; cannot tell the "
                              "architecture")
    cfg = get_train_cfg()
    cfg.merge_from_dict(yaml.safe_load(text), source=f"{source} (saved config)")
    cfg.MODEL.WEIGHTS = ""
    return cfg


def output_paths(output: str, fmt: str | None) -> tuple[str, Path]:
    """(format, config file) of --output: the suffix names the format (Detectron2 picks its reader by it)
    and --format, when given, must agree; the config is OUTPUT.yaml, so it never replaces weights and
    two formats with one stem do not share it."""
    suffix = Path(output).suffix
    by_suffix = FORMAT_BY_SUFFIX.get(suffix)
    if by_suffix is None:
        wanted = {v: k for k, v in FORMAT_BY_SUFFIX.items()}
        hint = f"use {wanted[fmt]} for --format {fmt}" if fmt else f"use one of {', '.join(FORMAT_BY_SUFFIX)}"
        raise CheckpointError(f"--output {output}: the suffix {suffix or '(none)'!r} names no weights format "
                              f"(Detectron2 picks its reader by it); {hint}")
    if fmt is not None and fmt != by_suffix:
        raise CheckpointError(f"--output {output}: the suffix {suffix} means --format {by_suffix}, not "
                              f"{fmt}; Detectron2 would read it as {by_suffix}")
    return by_suffix, Path(output + ".yaml")


def export(args: argparse.Namespace) -> dict:
    fmt, config_file = output_paths(args.output, args.format)
    for existing in (args.output, config_file):
        if os.path.exists(existing) and not args.overwrite:
            raise CheckpointError(f"{existing} exists; pass --overwrite to replace it")
    if args.take_base_head and not args.base_weights:
        raise CheckpointError("--take-base-head needs --base-weights")
    state, ckpt_file = read_training_checkpoint(args.checkpoint)
    cfg = detector_cfg_from_run(state, ckpt_file)
    trained = {k[len(DETECTOR_KEY_PREFIX):]: v for k, v in state["model"].items()
               if k.startswith(DETECTOR_KEY_PREFIX)}
    if not trained:
        raise CheckpointError(f"{ckpt_file}: holds no detector ('detector.*' tensors); nothing to export")
    recorded = state.get("trained_parameters")
    updated = (None if recorded is None else
               [k[len(DETECTOR_KEY_PREFIX):] for k in recorded if k.startswith(DETECTOR_KEY_PREFIX)])
    model = build_detector(cfg)
    base = None
    if args.base_weights:
        # converts bua layouts, checks the architecture
        load_checkpoint(model, args.base_weights, strict=True)
        base = model.state_dict()
    sd, counts = assemble_detector_state(model, trained, base, source=ckpt_file, updated=updated,
                                         take_base_head=args.take_base_head)
    config_text = yaml.safe_dump(_restrict(cfg.to_dict(), get_cfg().to_dict()), sort_keys=False)
    metadata = {
        "exported_from": os.path.basename(os.path.dirname(os.path.abspath(ckpt_file))) + "/"
                         + os.path.basename(ckpt_file),
        "checkpoint_sha256": file_sha256(ckpt_file),
        "step": str(state.get("step", "")),
        "config_sha256": hashlib.sha256(state["config"].encode()).hexdigest(),
        "base_weights": os.path.basename(args.base_weights) if args.base_weights else "",
        "base_weights_sha256": file_sha256(args.base_weights) if args.base_weights else "",
        "config": config_text,
    }
    save_checkpoint(sd, args.output, fmt=fmt, metadata=metadata)
    try:
        atomic_write(config_file, lambda f: f.write(config_text.encode("utf-8")))
    except OSError as exc:  # the weights alone would be an export without its config: remove them too
        os.unlink(args.output)
        raise CheckpointError(f"cannot write {config_file}: {exc.strerror or exc}; nothing was "
                              "written") from None
    return {"output": args.output, "config": str(config_file), "format": fmt, "tensors": len(sd), **counts,
            "step": state.get("step")}


def _restrict(values: dict, template: dict) -> dict:
    """The keys of `values` that the detector's own config has (drops the training sections)."""
    return {k: (_restrict(v, template[k]) if isinstance(v, dict) else v)
            for k, v in values.items() if k in template}


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = export(args)
    except (CheckpointError, ConfigError) as exc:
        print(f"export_detector: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output folder that cannot be created
        where = exc.filename or args.output
        print(f"export_detector: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    kept = (f" ({info['kept']} of them trained RPN/box-predictor/attribute tensors kept over the base)"
            if info["kept"] else "")
    print(f"wrote {info['output']} ({info['format']}) and its config {info['config']}: {info['tensors']} "
          f"tensors, {info['trained']} from the run (step {info['step']}){kept}, {info['base']} from the "
          "base weights")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
