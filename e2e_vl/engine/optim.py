"""AdamW with parameter groups and a warm-up + linear/cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from detector.config import CfgNode

DETECTOR_PREFIX = "detector."


def param_groups(model: nn.Module, cfg: CfgNode) -> list[dict]:
    """Split trainable parameters by (detector or not) x (decayed or not).

    Biases and normalisation weights (every parameter with at most one dimension) get
    SOLVER.WEIGHT_DECAY_NORM_BIAS (0 by default): decaying a LayerNorm gain towards zero only hurts.
    Parameters of `model.detector` get BASE_LR * DETECTOR_LR_MULT. Each group keeps its multiplier
    in "lr_mult" so the schedule can rescale it.
    """
    s = cfg.SOLVER
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_det = name.startswith(DETECTOR_PREFIX)
        no_decay = p.ndim <= 1
        key = (is_det, no_decay)
        if key not in groups:
            mult = s.DETECTOR_LR_MULT if is_det else 1.0
            groups[key] = {
                "params": [], "names": [], "lr": s.BASE_LR * mult, "initial_lr": s.BASE_LR * mult,
                "lr_mult": mult, "weight_decay": s.WEIGHT_DECAY_NORM_BIAS if no_decay else s.WEIGHT_DECAY,
                "name": ("detector" if is_det else "model") + ("/no_decay" if no_decay else "/decay"),
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: CfgNode) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    groups = param_groups(model, cfg)
    for g in groups:
        del g["names"]  # not part of the optimizer state (keeps checkpoints small and loadable)
    return torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), eps=s.EPS, weight_decay=s.WEIGHT_DECAY)


def lr_factor(step: int, cfg: CfgNode, max_iter: int) -> float:
    """Multiplier of every group's initial lr after `step` optimiser steps."""
    s = cfg.SOLVER
    if step < s.WARMUP_ITERS:
        alpha = step / s.WARMUP_ITERS
        return s.WARMUP_FACTOR * (1 - alpha) + alpha
    if s.LR_SCHEDULER == "constant":
        return 1.0
    span = max(1, max_iter - s.WARMUP_ITERS)
    progress = min(1.0, (step - s.WARMUP_ITERS) / span)
    if s.LR_SCHEDULER == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return s.MIN_LR_FACTOR + (1.0 - s.MIN_LR_FACTOR) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: CfgNode, max_iter: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_iter))
