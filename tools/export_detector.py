#!/usr/bin/env python
"""Hand the jointly trained detector back as a stand-alone detector checkpoint.

    python tools/export_detector.py --checkpoint output/run/model_0001000.pth --output vg_e2e.pth \
        --base-weights faster_rcnn_from_caffe_attr.pkl [--format detectron2|pkl|safetensors] [--overwrite]

The trunk and res5 head come from the training checkpoint (a file, or a run folder: its newest valid
checkpoint); the parts training did not touch (RPN, box predictor, attribute head) from --base-weights
when given. The result loads into Detectron2's DetectionCheckpointer, into
`detector.checkpoint.load_checkpoint` and into tools/extract_rois.py (with the detector config written
beside it, OUTPUT.yaml), and records where it came from (run, step, config and weights hashes).
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
                   help="default: from the output's suffix (.pth, .pkl, .safetensors)")
    p.add_argument("--base-weights", default=None,
                   help="the original detector weights; the parts training did not touch are copied from "
                        "them")
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
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({exc})") from None


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


def export(args: argparse.Namespace) -> dict:
    fmt = args.format or FORMAT_BY_SUFFIX.get(Path(args.output).suffix)
    if fmt is None:
        raise CheckpointError(f"--output {args.output}: cannot tell the format from its suffix; pass "
                              "--format")
    for existing in (args.output, Path(args.output).with_suffix(".yaml")):
        if os.path.exists(existing) and not args.overwrite:
            raise CheckpointError(f"{existing} exists; pass --overwrite to replace it")
    state, ckpt_file = read_training_checkpoint(args.checkpoint)
    cfg = detector_cfg_from_run(state, ckpt_file)
    trained = {k[len(DETECTOR_KEY_PREFIX):]: v for k, v in state["model"].items()
               if k.startswith(DETECTOR_KEY_PREFIX)}
    if not trained:
        raise CheckpointError(f"{ckpt_file}: holds no detector ('detector.*' tensors); nothing to export")
    model = build_detector(cfg)
    base = None
    if args.base_weights:
        # converts bua layouts, checks the architecture
        load_checkpoint(model, args.base_weights, strict=True)
        base = model.state_dict()
    sd, counts = assemble_detector_state(model, trained, base, source=ckpt_file)
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
    config_file = Path(args.output).with_suffix(".yaml")
    config_file.write_text(config_text, encoding="utf-8")
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
    print(f"wrote {info['output']} ({info['format']}) and its config {info['config']}: {info['tensors']} "
          f"tensors, {info['trained']} from the run (step {info['step']}), {info['base']} from the base "
          "weights")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
