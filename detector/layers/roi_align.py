"""RoIAlign on the native `torch.ops.detector.roi_align` op (CPU and CUDA kernels of this package).

Same semantics as `torchvision.ops.roi_align`, so it can be swapped in; unlike it, it runs float16/bfloat16
natively (also under autocast), keeps channels-last inputs channels-last, and has a deterministic backward
(used under `torch.use_deterministic_algorithms(True)`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detector import _ext

__all__ = ["roi_align", "RoIAlign"]


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"roi_align: output_size must be a positive int or (height, width), got {output_size!r}"
        )
    return size  # type: ignore[return-value]


def _boxes_to_rois(boxes: Tensor | Sequence[Tensor], input: Tensor) -> Tensor:
    """Accept a (K, 5) tensor or a list of per-image (K_i, 4) tensors; return (K, 5) rois."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                "roi_align: boxes must be a (K, 5) tensor [batch_index, x1, y1, x2, y2] or a list of "
                f"(K_i, 4) tensors, got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    boxes = list(boxes)
    if not boxes:
        raise ValueError("roi_align: boxes is an empty list; pass one (K_i, 4) tensor per image")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"roi_align: boxes[{i}] must be a (K_i, 4) tensor [x1, y1, x2, y2], got {shape}")
    if len(boxes) > input.shape[0]:
        raise ValueError(
            f"roi_align: {len(boxes)} box tensors given for an input batch of {input.shape[0]} images"
        )
    return boxes_to_rois(boxes)


def boxes_to_rois(boxes: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Per-image (K_i, 4) boxes -> one (sum K_i, 5) tensor [batch_index, x1, y1, x2, y2] in `dtype`
    (default: the boxes' own); the one conversion the op and the poolers share."""
    if len(boxes) == 0:
        raise ValueError("boxes must be a list with one (K, 4) tensor per image; got an empty list")
    dtype = dtype or boxes[0].dtype
    index = torch.cat(
        [torch.full((b.shape[0], 1), i, dtype=dtype, device=b.device) for i, b in enumerate(boxes)], dim=0
    )
    return torch.cat([index, torch.cat([b.to(dtype) for b in boxes], dim=0)], dim=1)


def _check(input: Tensor, rois: Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"roi_align: input must be floating point, got {input.dtype}")
    if rois.device != input.device:
        raise ValueError(f"roi_align: boxes are on {rois.device} but input is on {input.device}")
    allowed = {input.dtype} | ({torch.float32} if input.dtype in (torch.float16, torch.bfloat16) else set())
    if rois.dtype not in allowed:
        raise TypeError(
            f"roi_align: boxes dtype {rois.dtype} does not match input dtype {input.dtype} "
            "(use the input's dtype, or float32 for float16/bfloat16 inputs)"
        )
    if rois.numel() == 0 or torch.compiler.is_compiling():
        return  # value checks read the data: skipped while tracing (the CPU kernel checks again itself)
    index = rois[:, 0]
    finite = torch.isfinite(rois).all(dim=1)
    valid_index = (index >= 0) & (index < input.shape[0]) & (index == index.floor())
    bad = ~(finite & valid_index)
    if bool(bad.any()):  # one host sync on CUDA; details only on the error path
        k = int(bad.nonzero()[0, 0])
        if not bool(finite[k]):
            raise ValueError(f"roi_align: box {k} has non-finite coordinates {rois[k].tolist()}")
        raise ValueError(
            f"roi_align: box {k} has batch index {float(index[k])}, "
            f"not an image index in [0, {input.shape[0]})"
        )


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pool each box of `boxes` from `input` (N, C, H, W) into a (K, C, *output_size) tensor.

    `boxes` is a (K, 5) tensor [batch_index, x1, y1, x2, y2] or a list of per-image (K_i, 4) tensors, in
    input-image coordinates that `spatial_scale` maps onto the feature map. `sampling_ratio <= 0` samples
    adaptively (ceil(box size / output size) points per bin); `aligned=True` shifts boxes by half a pixel
    (Detectron2's ROIAlignV2), `aligned=False` is the legacy variant.
    """
    _ext.require()
    height, width = _pair(output_size)
    rois = _boxes_to_rois(boxes, input)
    _check(input, rois)
    return torch.ops.detector.roi_align(
        input, rois, float(spatial_scale), height, width, int(sampling_ratio), bool(aligned)
    )


class RoIAlign(nn.Module):
    """Module form of `roi_align` with fixed output size, scale, sampling ratio and alignment."""

    def __init__(
        self,
        output_size: int | Sequence[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(
            input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
