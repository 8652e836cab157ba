"""ResNet backbones (depths 18-152) with Detectron2's module names.

Module and parameter names follow Detectron2 (`stem.conv1`, `res2.0.conv1.norm.running_var`, ...) so
its checkpoints load without renaming. The Caffe stem (MODEL.CAFFE_MAXPOOL) reproduces the max-pool of
the Caffe models the Visual Genome weights come from (k3 s2, no padding, ceil mode), which changes the
feature map size on odd inputs and therefore every box position downstream.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detector.config import CfgNode
from detector.layers.batch_norm import FrozenBatchNorm2d, get_norm
from detector.layers.wrappers import Conv2d, c2_msra_fill

DEPTH_TO_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
                   152: [3, 8, 36, 3]}


def _freeze(module: nn.Module) -> nn.Module:
    """Stop gradients through `module` and fix its BatchNorm statistics."""
    for p in module.parameters():
        p.requires_grad_(False)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU, then a 3x3/2 max-pool (Detectron2's: pad 1; `caffe_maxpool`: pad 0,
    ceil mode)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN",
                 caffe_maxpool: bool = False):
        super().__init__()
        self.caffe_maxpool = caffe_maxpool
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, 4
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
                            norm=get_norm(norm, out_channels))
        c2_msra_fill(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def freeze(self) -> "BasicStem":
        _freeze(self)
        return self


class _Block(nn.Module):
    """Common parts of the residual blocks: the optional projection shortcut and freezing."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                   norm=get_norm(norm, out_channels))
        else:
            self.shortcut = None

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) if self.shortcut is not None else x

    def freeze(self) -> "_Block":
        _freeze(self)
        return self


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "FrozenBN"):
        super().__init__(in_channels, out_channels, stride, norm)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        for layer in (self.conv1, self.conv2, self.shortcut):
            if layer is not None:
                c2_msra_fill(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = self.conv2(out)
        return F.relu_(out + self._residual(x))


class BottleneckBlock(_Block):
    """1x1 -> 3x3 -> 1x1 bottleneck; the stride sits on the first 1x1 when `stride_in_1x1` (MSRA/Caffe)."""

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, norm: str = "FrozenBN", stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__(in_channels, out_channels, stride, norm)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1, bias=False,
                            norm=get_norm(norm, bottleneck_channels))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
                            padding=dilation, bias=False, groups=num_groups, dilation=dilation,
                            norm=get_norm(norm, bottleneck_channels))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                            norm=get_norm(norm, out_channels))
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                c2_msra_fill(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        return F.relu_(out + self._residual(x))


def make_stage(block_class: type, num_blocks: int, *, first_stride: int, in_channels: int, out_channels: int,
               **kwargs) -> list[nn.Module]:
    """`num_blocks` blocks; only the first one strides (and projects the shortcut)."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(block_class(in_channels, out_channels, stride=first_stride if i == 0 else 1, **kwargs))
        in_channels = out_channels
    return blocks


class ResNet(nn.Module):
    """Stem + stages `res2`.. up to the last of `out_features`; returns a dict of the requested maps."""

    def __init__(self, stem: BasicStem, stages: Sequence[Sequence[nn.Module]], out_features: Sequence[str],
                 freeze_at: int = 0):
        super().__init__()
        self.stem = stem
        self.stage_names: list[str] = []
        self._out_feature_strides = {"stem": stem.stride}
        self._out_feature_channels = {"stem": stem.out_channels}
        stride = stem.stride
        for i, blocks in enumerate(stages):
            name = f"res{i + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            for block in blocks:
                stride *= block.stride
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = blocks[-1].out_channels
        self.out_features = list(out_features)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> "ResNet":
        """Freeze the stem (freeze_at >= 1) and the first `freeze_at - 1` stages, as Detectron2 does."""
        if freeze_at >= 1:
            self.stem.freeze()
        for i, name in enumerate(self.stage_names, start=2):
            if freeze_at >= i:
                for block in getattr(self, name):
                    block.freeze()
        return self

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """(channels, stride) of each output feature."""
        return {n: (self._out_feature_channels[n], self._out_feature_strides[n]) for n in self.out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"ResNet takes a (N, C, H, W) tensor; got shape {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self.out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs


def build_resnet_backbone(cfg: CfgNode) -> ResNet:
    """The ResNet of MODEL.RESNETS, built up to the last stage named in OUT_FEATURES (res4 for C4)."""
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in DEPTH_TO_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH: unsupported depth {depth}; expected one of "
                         f"{sorted(DEPTH_TO_BLOCKS)}")
    stem = BasicStem(len(cfg.MODEL.PIXEL_MEAN), r.STEM_OUT_CHANNELS, r.NORM, cfg.MODEL.CAFFE_MAXPOOL)
    valid = ["stem", "res2", "res3", "res4", "res5"]
    for name in r.OUT_FEATURES:
        if name not in valid:
            raise ValueError(f"MODEL.RESNETS.OUT_FEATURES: unknown feature {name!r}; expected some of "
                             f"{valid}")
    max_stage = max(valid.index(n) for n in r.OUT_FEATURES) + 1  # res2 -> stage index 2
    if depth in (18, 34):
        if r.RES2_OUT_CHANNELS != 64:
            raise ValueError(f"MODEL.RESNETS.RES2_OUT_CHANNELS must be 64 for depth {depth}, got "
                             f"{r.RES2_OUT_CHANNELS}")
        if max_stage == 5 and r.RES5_DILATION != 1:
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 for depth {depth}, got "
                             f"{r.RES5_DILATION}")
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}")

    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, stage_idx in enumerate(range(2, max_stage + 1)):
        dilation = r.RES5_DILATION if stage_idx == 5 else 1
        first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
        kwargs = dict(first_stride=first_stride, in_channels=in_channels, out_channels=out_channels,
                      norm=r.NORM)
        if depth in (18, 34):
            blocks = make_stage(BasicBlock, DEPTH_TO_BLOCKS[depth][idx], **kwargs)
        else:
            blocks = make_stage(BottleneckBlock, DEPTH_TO_BLOCKS[depth][idx],
                                bottleneck_channels=bottleneck_channels, num_groups=r.NUM_GROUPS,
                                stride_in_1x1=r.STRIDE_IN_1X1, dilation=dilation,
                                **kwargs)
            bottleneck_channels *= 2
        stages.append(blocks)
        in_channels = out_channels
        out_channels *= 2
    return ResNet(stem, stages, r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
