"""Resizing exactly as Detectron2's ResizeShortestEdge does it, and the one mapping of boxes onto the
resized image (`resize_with_boxes`, `rescale_boxes`) that training, the predictor and the VQA data use.

The new (h, w) is the shortest side scaled to `min_size`, shrunk if the longest side would exceed
`max_size`, each side then rounded with int(x + 0.5). Pixels: Detectron2 resizes uint8 images with
PIL's BILINEAR filter, so uint8 images go through PIL here too when Pillow is installed (bytes then
equal Detectron2's in the same environment). Without Pillow, `pil_bilinear_resize` reproduces
Pillow's arithmetic in numpy (antialiasing triangle filter, 22-bit fixed-point weights, horizontal
pass rounded to uint8, then vertical pass): identical bytes whenever the height grows or stays, while
Pillow 13 may run the vertical pass first when the height shrinks, which moves some pixels by one
grey level. Float images use plain bilinear interpolation (align_corners=False), as Detectron2 does.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from detector.structures import scale_boxes


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


_PIL_PRECISION_BITS = 22  # 32 bits - 8 for the pixel - 2 of headroom


def _pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, int weights), both (out_size, taps), of PIL's BILINEAR resampling along one axis.

    Follows PIL's coefficient computation step by step (same float operations in the same order)
    so the fixed-point weights are bit-identical.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the triangle filter has support 1, widened when shrinking
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    pos = first[:, None] + np.arange(taps)[None, :]
    arg = np.abs((pos - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where((arg < 1.0) & (np.arange(taps)[None, :] < count[:, None]), 1.0 - arg, 0.0)
    total = np.zeros(out_size)
    for j in range(taps):  # sequential sum, as PIL adds them
        total += weights[:, j]
    weights = weights / np.where(total != 0.0, total, 1.0)[:, None]
    fixed = np.trunc(0.5 + weights * (1 << _PIL_PRECISION_BITS)).astype(np.int64)
    return np.minimum(pos, in_size - 1), fixed


def _pil_resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One PIL pass along `axis` (1: width, 0: height) of an HxWxC uint8 array, rounded to uint8."""
    index, weight = _pil_bilinear_taps(img.shape[axis], out_size)
    acc = np.full(img.shape[:axis] + (out_size,) + img.shape[axis + 1:], 1 << (_PIL_PRECISION_BITS - 1),
                  np.int64)
    shape = (1, -1, 1) if axis == 1 else (-1, 1, 1)
    for j in range(index.shape[1]):
        acc += np.take(img, index[:, j], axis=axis).astype(np.int64) * weight[:, j].reshape(shape)
    return np.clip(acc >> _PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def pil_bilinear_resize(img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """PIL's `Image.resize((new_w, new_h), BILINEAR)` of an HxWxC uint8 array, per channel."""
    out = img
    if new_w != img.shape[1]:
        out = _pil_resample_axis(out, new_w, axis=1)
    if new_h != img.shape[0]:
        out = _pil_resample_axis(out, new_h, axis=0)
    return out if out is not img else img.copy()


def _resize_uint8(img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Detectron2's ResizeTransform on uint8: PIL BILINEAR (single channel as mode "L")."""
    try:
        from PIL import Image
    except ImportError:
        out = pil_bilinear_resize(img[:, :, None] if img.ndim == 2 else img, new_h, new_w)
        return out[:, :, 0] if img.ndim == 2 else out
    squeeze = img.ndim == 3 and img.shape[2] == 1
    if img.ndim == 3 and img.shape[2] not in (1, 3):
        # PIL would treat 4 channels as RGBA and premultiply alpha: resample channels independently.
        return np.stack([_resize_uint8(np.ascontiguousarray(img[:, :, c]), new_h, new_w)
                         for c in range(img.shape[2])], axis=2)
    pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if squeeze else img))
    out = np.array(pil.resize((new_w, new_h), Image.BILINEAR))  # writable, like every other branch
    return out[:, :, None] if squeeze else out


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
    if img.dtype == np.uint8:
        return _resize_uint8(img, new_h, new_w), scale
    t = torch.from_numpy(np.ascontiguousarray(img))
    t = (t[..., None] if img.ndim == 2 else t).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=(new_h, new_w), mode="bilinear",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    out = out[..., 0] if img.ndim == 2 else out
    return out.astype(img.dtype, copy=False), scale


def rescale_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """XYXY boxes of an image of size `from_hw` in the pixels of that image resized to `to_hw`, as float32.

    The factors are the actual per-axis ratios of the sizes (as Detectron2 maps boxes), not the resize's
    `scale`, which the rounding of the new size makes differ slightly.
    """
    return scale_boxes(boxes.float(), to_hw[1] / from_hw[1], to_hw[0] / from_hw[0])


def resize_with_boxes(img: np.ndarray, boxes: torch.Tensor | np.ndarray, min_size: int, max_size: int
                      ) -> tuple[np.ndarray, torch.Tensor, float]:
    """`resize_shortest_edge` of an HxWxC image plus its [K, 4] XYXY boxes mapped onto the result (float32
    tensor); returns (resized, boxes, scale)."""
    resized, scale = resize_shortest_edge(img, min_size, max_size)
    boxes = torch.from_numpy(np.asarray(boxes, np.float32)) if isinstance(boxes, np.ndarray) else boxes
    return resized, rescale_boxes(boxes, img.shape[:2], resized.shape[:2]), scale
