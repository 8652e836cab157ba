"""AdamW or SGD with parameter groups and a warm-up + linear / cosine / step learning-rate schedule."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from detector.config import CfgNode, ConfigError

if TYPE_CHECKING:  # typing only: the engine does not import the models
    from e2e_vl.modeling.registry import VLModel


def param_groups(model: VLModel, cfg: CfgNode) -> list[dict]:
    """Split trainable parameters by kind (detector / bert / head) x (decayed or not).

    The kind comes from `model.parameter_kind(name)` (`e2e_vl.modeling.registry.VLModel`). Learning rates:
    detector BASE_LR * DETECTOR_LR_MULT, head (freshly initialised layers) BASE_LR * HEAD_LR_MULT,
    bert BASE_LR. Biases and normalisation weights (every parameter with at most one dimension) get
    SOLVER.WEIGHT_DECAY_NORM_BIAS (0 by default): decaying a LayerNorm gain towards zero only hurts.
    Each group keeps its multiplier in "lr_mult".
    """
    s = cfg.SOLVER
    mults = {"detector": s.DETECTOR_LR_MULT, "head": s.HEAD_LR_MULT, "bert": 1.0}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = model.parameter_kind(name)
        if kind not in mults:
            raise ValueError(f"parameter_kind({name!r}) returned {kind!r}; expected one of {sorted(mults)}")
        no_decay = p.ndim <= 1
        key = (kind, no_decay)
        if key not in groups:
            mult = mults[kind]
            groups[key] = {
                "params": [], "lr": s.BASE_LR * mult, "initial_lr": s.BASE_LR * mult, "lr_mult": mult,
                "weight_decay": s.WEIGHT_DECAY_NORM_BIAS if no_decay else s.WEIGHT_DECAY,
                "name": kind + ("/no_decay" if no_decay else "/decay"),
            }
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def freeze_params(model: nn.Module, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters whose name matches any regex; return how many matched."""
    if not patterns:
        return 0
    regexes = [re.compile(p) for p in patterns]
    count = 0
    for name, p in model.named_parameters():
        if any(r.search(name) for r in regexes):
            p.requires_grad_(False)
            count += 1
    if count == 0:
        raise ConfigError(f"'SOLVER.FREEZE_PARAMS' {patterns} matches no parameter of {type(model).__name__}")
    return count


# SOLVER.OPTIMIZER -> the optimiser over parameter groups (with the solver keys it reads); e2e_vl.config
# validates the key against these names. SGD is VL-BERT's choice for VCR and RefCOCO+.
OPTIMIZERS: dict[str, Callable[[list[dict], CfgNode, bool], torch.optim.Optimizer]] = {
    "AdamW": lambda groups, s, fused: torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), eps=s.EPS,
                                                        weight_decay=s.WEIGHT_DECAY, fused=fused),
    "SGD": lambda groups, s, fused: torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM,
                                                    weight_decay=s.WEIGHT_DECAY, fused=fused),
}


def build_optimizer(model: VLModel, cfg: CfgNode) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER over `param_groups`; the fused kernel (one pass over all tensors) on CPU and CUDA."""
    groups = param_groups(model, cfg)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups
                for p in g["params"])
    return OPTIMIZERS[cfg.SOLVER.OPTIMIZER](groups, cfg.SOLVER, fused)


def lr_factor(step: int, cfg: CfgNode, max_iter: int) -> float:
    """Multiplier of every group's initial lr after `step` optimiser steps."""
    s = cfg.SOLVER
    if step < s.WARMUP_ITERS:
        alpha = step / s.WARMUP_ITERS
        return s.WARMUP_FACTOR * (1 - alpha) + alpha
    if s.LR_SCHEDULER == "constant":
        return 1.0
    if s.LR_SCHEDULER == "step":  # x DECAY_FACTOR at each DECAY_AT fraction of the run
        return s.DECAY_FACTOR ** sum(step >= round(f * max_iter) for f in s.DECAY_AT)
    span = max(1, max_iter - s.WARMUP_ITERS)
    progress = min(1.0, (step - s.WARMUP_ITERS) / span)
    if s.LR_SCHEDULER == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return s.MIN_LR_FACTOR + (1.0 - s.MIN_LR_FACTOR) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: CfgNode, max_iter: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_iter))
