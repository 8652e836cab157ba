"""Test-time resizing exactly as Detectron2's ResizeShortestEdge computes the new size.

The new (h, w) is the shortest side scaled to `min_size`, shrunk if the longest side would exceed
`max_size`, each side then rounded with int(x + 0.5). Pixels: uint8 images are resized with
antialiased bilinear filtering (Detectron2 uses PIL's BILINEAR, which antialiases when shrinking;
torch's antialias mode follows PIL's filter, values may differ by one grey level from PIL's
fixed-point arithmetic); float images use plain bilinear interpolation (align_corners=False), as
Detectron2 does for them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def get_output_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[tuple[int, int], float]:
    """((new_h, new_w), scale) for an image of (height, width); scale is before rounding."""
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize an empty image of size {height}x{width}")
    if min_size <= 0:
        raise ValueError(f"min_size must be positive, got {min_size}")
    size = float(min_size)
    scale = size / min(height, width)
    if height < width:
        new_h, new_w = size, scale * width
    else:
        new_h, new_w = scale * height, size
    if max_size > 0 and max(new_h, new_w) > max_size:
        shrink = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
        scale *= shrink
    return (int(new_h + 0.5), int(new_w + 0.5)), scale


def resize_shortest_edge(img: np.ndarray, min_size: int, max_size: int) -> tuple[np.ndarray, float]:
    """Resize an HxWxC (or HxW) image; returns (resized, scale).

    Map coordinates with the actual per-axis factors new_w / w and new_h / h (Detectron2 does), which
    differ from `scale` by the rounding of the new size.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"resize_shortest_edge takes a numpy array, got {type(img).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    (new_h, new_w), scale = get_output_shape(img.shape[0], img.shape[1], min_size, max_size)
    if (new_h, new_w) == img.shape[:2]:
        return img.copy(), scale
    t = torch.from_numpy(np.ascontiguousarray(img))
    t = (t[..., None] if img.ndim == 2 else t).permute(2, 0, 1)[None].float()
    if img.dtype == np.uint8:
        out = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    else:
        out = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    out = out[0].permute(1, 2, 0).numpy()
    out = out[..., 0] if img.ndim == 2 else out
    return out.astype(img.dtype, copy=False), scale
