"""A Conv2d that owns its normalisation layer, so checkpoint keys read `conv1.weight`, `conv1.norm.*`."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from detector.layers.batch_norm import FrozenBatchNorm2d


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` followed by an optional `norm` submodule and activation (Detectron2's layout)."""

    def __init__(self, *args, norm: nn.Module | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_msra_fill(module: nn.Conv2d) -> None:
    """Kaiming-normal (fan_out, ReLU) weights and zero bias: the init of Detectron2's ResNet convs."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every FrozenBatchNorm2d that follows a Conv2d into the conv's weight and bias, in place.

    For inference only: it saves one pass over every feature map (and, under autocast, the
    normalisation in reduced precision) at the cost of fp32 rounding-level differences. The state-dict
    keys change (`*.norm.*` disappear, `*.bias` appear), so save checkpoints before folding.
    """
    for conv in module.modules():
        if isinstance(conv, Conv2d) and isinstance(conv.norm, FrozenBatchNorm2d):
            norm = conv.norm
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            shift = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            conv.norm = None
    return module
