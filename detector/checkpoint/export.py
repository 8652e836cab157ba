"""Assembling a complete detector checkpoint from an end-to-end training run.

The trunk (`backbone.*`) and the res5 head (`roi_heads.res5.*`) always come from the run. The other
parts (RPN, box predictor, attribute head) come from the original detector weights when they are given,
so they stay bit-for-bit what the user started from, except those the run trained: a run records the
parameters an update reached (`trained_parameters` in its checkpoint, e.g. a region-classification run's
`cls_score`), and those are kept unless the caller asks for the base's head anyway.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from detector.checkpoint.loading import _ignored, _listing
from detector.checkpoint.unpickler import CheckpointError

TRAINED_PREFIXES = ("backbone.", "roi_heads.res5.")
# Where a training run's model (every VL architecture, the region classifier) holds the detector.
DETECTOR_KEY_PREFIX = "detector."


def assemble_detector_state(
    model: nn.Module, trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None,
    source: str = "training checkpoint", updated: Iterable[str] | None = None, take_base_head: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The full state dict of `model`'s architecture: the run's tensors from `trained`, the rest from `base`.

    Without `base`, every tensor comes from `trained` (the run kept the untouched parts as it loaded them).
    With it, `base` fills the tensors outside the trunk and res5 that are not in `updated` (the detector
    keys the run trained); `take_base_head` takes all of them from `base`. `updated` None (a checkpoint
    that does not record it) with `base` is refused unless `take_base_head`: the run may have trained any
    of them. Raises CheckpointError when the run holds no detector, when tensors are missing, or when the
    run and the base weights disagree on shapes (different architectures). Returns (state dict, counts by
    origin: "trained", "base", "kept": head tensors the run trained, kept over `base`).
    """
    wanted = {k: v for k, v in model.state_dict().items() if not _ignored(k)}
    if not any(k.startswith(TRAINED_PREFIXES) for k in trained):
        raise CheckpointError(f"{source} holds no detector weights (no 'backbone.*' or 'roi_heads.res5.*' "
                              "tensors)")
    if base is not None and updated is None and not take_base_head:
        raise CheckpointError(f"{source} does not record which parameters the run trained (written by an "
                              "older version), so the base weights could replace trained ones; pass "
                              "--take-base-head to take every RPN/box-predictor/attribute tensor from the "
                              "base weights anyway, or export without --base-weights")
    updated = set(updated or ())
    out: dict[str, torch.Tensor] = {}
    counts = {"trained": 0, "base": 0, "kept": 0}
    missing, mismatched = [], []
    for key, ref in wanted.items():
        head = base is not None and not key.startswith(TRAINED_PREFIXES)
        from_base = head and (take_base_head or key not in updated)
        counts["kept"] += head and not from_base
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
