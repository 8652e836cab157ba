"""Assembling a complete detector checkpoint from an end-to-end training run.

End-to-end training moves only the parts a loss reaches: the trunk (`backbone.*`) and the res5 head
(`roi_heads.res5.*`). Everything else (RPN, box predictor, attribute head) is taken from the original
detector weights when they are given, so those parts stay bit-for-bit what the user started from.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from detector.checkpoint.loading import _ignored, _listing
from detector.checkpoint.unpickler import CheckpointError

TRAINED_PREFIXES = ("backbone.", "roi_heads.res5.")
# Where a training run's model (every VL architecture, the region classifier) holds the detector.
DETECTOR_KEY_PREFIX = "detector."


def assemble_detector_state(
    model: nn.Module, trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None,
    source: str = "training checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The full state dict of `model`'s architecture: trained parts from `trained`, the rest from `base`.

    Without `base`, every tensor comes from `trained` (the run kept the untouched parts as it loaded them).
    Raises CheckpointError when the run holds no detector, when tensors are missing, or when the run and
    the base weights disagree on shapes (different architectures). Returns (state dict, counts by origin).
    """
    wanted = {k: v for k, v in model.state_dict().items() if not _ignored(k)}
    if not any(k.startswith(TRAINED_PREFIXES) for k in trained):
        raise CheckpointError(f"{source} holds no detector weights (no 'backbone.*' or 'roi_heads.res5.*' "
                              "tensors)")
    out: dict[str, torch.Tensor] = {}
    counts = {"trained": 0, "base": 0}
    missing, mismatched = [], []
    for key, ref in wanted.items():
        from_base = base is not None and not key.startswith(TRAINED_PREFIXES)
        src, name = (base, "base weights") if from_base else (trained, source)
        if key not in src:
            missing.append(f"{key} (expected from the {name})")
            continue
        tensor = src[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            mismatched.append(f"{key}: {name} {tuple(tensor.shape)} vs architecture {tuple(ref.shape)}")
            continue
        if (base is not None and key in base and key in trained
            and tuple(base[key].shape) != tuple(trained[key].shape)):
            mismatched.append(f"{key}: {source} {tuple(trained[key].shape)} vs base weights "
                              f"{tuple(base[key].shape)}")
            continue
        out[key] = tensor.detach().cpu().clone()
        counts["base" if from_base else "trained"] += 1
    if missing or mismatched:
        parts = ([_listing("wrong shape (the run and the weights are different architectures)", mismatched)]
                 if mismatched else []) + ([_listing("missing", missing)] if missing else [])
        raise CheckpointError("cannot assemble the detector:\n" + "\n".join(parts))
    return out, counts
