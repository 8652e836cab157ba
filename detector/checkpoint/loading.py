"""Strict loading of detector weights: every model tensor must come from the file, with its shape."""
from __future__ import annotations

import os
import warnings
from typing import Mapping

import torch
from torch import nn

from detector.checkpoint.formats import FORMATS, convert_bua, is_bua_layout, read_checkpoint, write_checkpoint
from detector.checkpoint.unpickler import CheckpointError

# Never weights: BatchNorm step counters and tensors derived from the config (anchors, pixel stats),
# which older Detectron2 versions saved.
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PARTS = ("anchor_generator.", "pixel_mean", "pixel_std")
_MAX_LISTED = 20


def _ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES) or any(part in key for part in IGNORED_PARTS)


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "<state dict>") -> dict[str, list[str]]:
    """Copy `sd` into `model`; raise CheckpointError listing missing/unexpected/wrong-shaped tensors.

    Wrong shapes are always an error (Detectron2 only warns and keeps the random init). With
    strict=False, missing and unexpected tensors are reported (warning + returned) instead.
    """
    own = model.state_dict()
    has_rpn = getattr(model, "proposal_generator", True) is not None
    ckpt = {k: v for k, v in sd.items()
            if not _ignored(k) and (has_rpn or not k.startswith("proposal_generator."))}
    wanted = {k for k in own if not _ignored(k)}
    missing = sorted(wanted - set(ckpt))
    unexpected = sorted(set(ckpt) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(ckpt[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in wanted & set(ckpt) if tuple(ckpt[k].shape) != tuple(own[k].shape))
    problems = []
    if mismatched:
        problems.append(_listing("wrong shape", mismatched))
    if strict and missing:
        problems.append(_listing("missing from the checkpoint", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected in the checkpoint (not in the model)", unexpected))
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n" + "\n".join(problems))
    if missing or unexpected:
        warnings.warn(f"{source}: {len(missing)} model tensors keep their initial values, "
                      f"{len(unexpected)} checkpoint tensors are unused", stacklevel=3)
    with torch.no_grad():
        for key in wanted & set(ckpt):
            own[key].copy_(ckpt[key].to(dtype=own[key].dtype))
    return {"missing": missing, "unexpected": unexpected}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, list[str]]:
    """Load a .pth / .pkl / bottom-up-attention .pth / .safetensors file into a GeneralizedRCNN.

    bottom-up-attention.pytorch layouts are converted using the model's anchor counts and box weights.
    A model without an RPN (Fast R-CNN only) ignores the checkpoint's proposal_generator tensors.
    Returns {"missing": [...], "unexpected": [...]} (both empty when strict).
    """
    sd, _ = read_checkpoint(path)
    if is_bua_layout(sd):
        rpn = getattr(model, "proposal_generator", None)
        ag = rpn.anchor_generator if rpn is not None else None
        num_sizes, num_ratios = (ag.num_sizes, ag.num_ratios) if ag is not None else (4, 3)
        weights = (model.roi_heads.box2box_transform.weights if hasattr(model, "roi_heads")
                   else (10.0, 10.0, 5.0, 5.0))
        sd = convert_bua(sd, num_sizes, num_ratios, weights)
    return load_state_dict_checked(model, sd, strict, source=os.fspath(path))


def save_checkpoint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                    fmt: str = "detectron2", metadata: Mapping[str, str] | None = None) -> None:
    """Save weights in Detectron2's layout: fmt 'detectron2' (.pth), 'pkl' (model zoo) or 'safetensors'.

    `metadata` (strings, e.g. {"config": cfg.dump()}) is stored alongside the tensors.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    sd = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
          else model_or_state_dict)
    write_checkpoint({k: v for k, v in sd.items() if not _ignored(k)}, path, fmt, metadata)
