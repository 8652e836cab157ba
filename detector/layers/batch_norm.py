"""Normalisation layers for the ResNet backbone.

Pretrained detection backbones keep BatchNorm statistics fixed (batches of 1-2 images are too small to
estimate them), so the default is `FrozenBatchNorm2d`: an affine transform whose four tensors are
buffers, named as in `nn.BatchNorm2d` so checkpoints load under Detectron2's keys.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, never trained)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            # One fused inference-mode pass; differentiable w.r.t. x only.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        # Reduced-precision activations (autocast): fold the statistics in fp32, then apply them in
        # x's dtype. F.batch_norm would be run in fp32 by autocast, costing two casts per layer.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d/SyncBatchNorm in `module` by a FrozenBatchNorm2d with its values."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


NORMS = ("FrozenBN", "BN", "GN", "")


def get_norm(norm: str | None, out_channels: int) -> nn.Module | None:
    """The normalisation layer named by MODEL.RESNETS.NORM: FrozenBN, BN, GN (32 groups) or '' (none;
    None too, which is what an empty command-line override parses to)."""
    if norm in ("", None):
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(out_channels)
    if norm == "BN":
        return nn.BatchNorm2d(out_channels)
    if norm == "GN":
        return nn.GroupNorm(32, out_channels)
    raise ValueError(f"MODEL.RESNETS.NORM: unknown norm {norm!r}; expected one of {NORMS}")
