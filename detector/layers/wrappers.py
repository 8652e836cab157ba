"""A Conv2d that owns its normalisation layer, so checkpoint keys read `conv1.weight`, `conv1.norm.*`."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


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
