"""Small helpers on XYXY box tensors and image batches (the parts of Detectron2's Boxes/ImageList we use)."""
from __future__ import annotations

from typing import Sequence

import torch


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clamp (N, 4) XYXY boxes to an image of (height, width): x to [0, w], y to [0, h]."""
    h, w = image_size
    x1 = boxes[:, 0].clamp(min=0, max=w)
    y1 = boxes[:, 1].clamp(min=0, max=h)
    x2 = boxes[:, 2].clamp(min=0, max=w)
    y2 = boxes[:, 3].clamp(min=0, max=h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mask of boxes whose width and height both exceed `threshold`."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def check_boxes(boxes: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    """Validate one image's boxes: a (K, 4) floating tensor of finite XYXY values with x2 >= x1, y2 >= y1."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (K, 4), got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (K, 4) (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if boxes.numel() and not torch.isfinite(boxes).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    if boxes.numel() and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
        bad = torch.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0, 0].item()
        raise ValueError(f"{name}[{bad}] = {boxes[bad].tolist()} has x2 < x1 or y2 < y1 (expected XYXY)")
    return boxes


def box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU `[N, M]` of XYXY boxes `[N, 4]` and `[M, 4]` (see `paired_box_iou`)."""
    return paired_box_iou(boxes[:, None], others[None, :])


def paired_box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of XYXY boxes `[..., 4]` with the boxes `[..., 4]` they broadcast against, areas as
    (x2 - x1) * (y2 - y1) (continuous coordinates, so it does not change with the image scale); 0 where
    both boxes are empty."""
    lt = torch.maximum(boxes[..., :2], others[..., :2])
    rb = torch.minimum(boxes[..., 2:], others[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    area_b = (others[..., 2:] - others[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(inter))


def scale_boxes(boxes: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    return boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 0,
               pad_value: float = 0.0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack (C, H_i, W_i) images into one (N, C, H, W) batch, padding bottom/right (Detectron2's ImageList).

    Returns the batch and each image's (height, width) before padding.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != images[0].shape[0]:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected (C, H, W) with "
                             f"C={images[0].shape[0]}")
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    max_h = max(s[0] for s in sizes)
    max_w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
        max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
    batch = images[0].new_full((len(images), images[0].shape[0], max_h, max_w), pad_value)
    for img, out in zip(images, batch):
        out[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch, sizes


def box_pixel_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool `[height, width]`: the pixels covered by any of `boxes` `[K, 4]` (x1, y1, x2, y2).

    A box covers pixel columns floor(x1) .. ceil(x2) - 1 (every pixel it touches, so a fractional box
    leaves none of its area visible) and likewise rows, clipped to the image.
    """
    if boxes.numel() == 0:
        return torch.zeros(height, width, dtype=torch.bool, device=boxes.device)
    x1, y1 = boxes[:, 0].floor(), boxes[:, 1].floor()
    x2, y2 = boxes[:, 2].ceil(), boxes[:, 3].ceil()
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    in_x = ((cols >= x1[:, None]) & (cols < x2[:, None])).to(boxes.dtype)  # [K, W]
    in_y = ((rows >= y1[:, None]) & (rows < y2[:, None])).to(boxes.dtype)  # [K, H]
    return (in_y.t() @ in_x) > 0
