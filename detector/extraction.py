"""Region extraction with the bottom-up-attention box selection (Caffe `generate_tsv` semantics).

For every proposal and every object class, NMS at `nms_thresh` runs per class over the proposal boxes;
each proposal's `max_conf` is the best class score it keeps through its classes' NMS. Proposals with
`max_conf >= conf_thresh` are kept, topped up / cut by `max_conf` to [min_boxes, max_boxes]. The
*proposal* boxes (not the regressed ones) are returned, as Caffe did, with their class and attribute
distributions and pooled features.

The per-class NMS is one NMS call over the (proposal, class) pairs whose score reaches a floor (classes
kept apart by coordinate offsets), never a Python loop over the 1600 classes. Dropping pairs below the
floor changes nothing at or above it: a pair can only be suppressed by a higher-scoring pair of its class.
The first floor is `conf_thresh` itself (at most 1/conf_thresh pairs per proposal, so the NMS is small);
only when fewer than `min_boxes` proposals reach it are lower floors tried, then the exact dense path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou, nms

from detector.transforms import resize_shortest_edge


@dataclasses.dataclass(frozen=True)
class Selection:
    """Bottom-up-attention box selection settings (Caffe defaults: 10..100 boxes, conf 0.2, NMS 0.3)."""

    min_boxes: int = 10
    max_boxes: int = 100
    conf_thresh: float = 0.2
    nms_thresh: float = 0.3
    # Lower floors tried, in order, when fewer than min_boxes proposals reach conf_thresh (top-up case).
    score_floors: tuple[float, ...] = (0.05, 0.01)

    def __post_init__(self) -> None:
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 0 <= min_boxes <= max_boxes, got min_boxes={self.min_boxes}, "
                             f"max_boxes={self.max_boxes}")
        if not 0.0 <= self.conf_thresh <= 1.0 or not 0.0 < self.nms_thresh <= 1.0:
            raise ValueError(f"conf_thresh must be in [0, 1] and nms_thresh in (0, 1], got "
                             f"{self.conf_thresh} / {self.nms_thresh}")


# ---------------------------------------------------------------------------------------------------
# Box selection
# ---------------------------------------------------------------------------------------------------
def max_conf_per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float,
                           floor: float) -> torch.Tensor:
    """Best score each box keeps through per-class NMS, counting only (box, class) pairs >= `floor`.

    boxes (N, 4) XYXY; scores (N, C) for the real classes (no background column). Exact for every box
    whose result is >= floor; the others get 0.
    """
    n = boxes.shape[0]
    max_conf = scores.new_zeros(n, dtype=torch.float32)
    if floor <= 0:
        raise ValueError("max_conf_per_class_nms needs a positive score floor; use max_conf_dense for all "
                         "pairs")
    rows, cols = torch.nonzero(scores >= floor, as_tuple=True)
    if rows.numel() == 0:
        return max_conf
    pair_scores = scores[rows, cols].float()
    # Offsets in float64: with up to 1600 classes side by side, float32 would round the coordinates.
    _, dense_cls = torch.unique(cols, return_inverse=True)
    pair_boxes = boxes[rows].double()
    span = float(pair_boxes.max() - min(float(pair_boxes.min()), 0.0)) + 1.0
    pair_boxes = pair_boxes + (dense_cls.double() * span)[:, None]
    keep = nms(pair_boxes, pair_scores.double(), nms_thresh)
    max_conf.scatter_reduce_(0, rows[keep], pair_scores[keep], reduce="amax", include_self=True)
    return max_conf


def max_conf_dense(boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """Exact per-class-NMS max_conf over all pairs, for when few proposals reach the score floor.

    Greedy NMS for all classes at once, one proposal rank per step; the per-class suppression masks are
    bit-packed (32 boxes per int64 word), so a step costs O(C * N / 32).
    """
    n, c = scores.shape
    max_conf = scores.new_zeros(n, dtype=torch.float32)
    if n == 0 or c == 0:
        return max_conf
    overlaps = _pack_bits(box_iou(boxes.float(), boxes.float()) > nms_thresh)
    overlaps = torch.cat((overlaps, overlaps.new_zeros(1, overlaps.shape[1])))  # row n: suppresses nothing
    order = scores.argsort(dim=0, descending=True, stable=True)  # (N, C): rank -> box, per class
    words, bits = order // 32, order % 32
    suppressed = overlaps.new_zeros(c, overlaps.shape[1])
    classes = torch.arange(c, device=scores.device)
    for rank in range(n):
        idx = order[rank]
        alive = ((suppressed.gather(1, words[rank, :, None])[:, 0] >> bits[rank]) & 1) == 0
        suppressed |= overlaps.index_select(0, torch.where(alive, idx, n))
        max_conf.scatter_reduce_(0, idx, scores[idx, classes].float() * alive, reduce="amax",
                                 include_self=True)
    return max_conf


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(R, N) bool -> (R, ceil(N / 32)) int64, bit j of word w = mask[:, 32 * w + j]."""
    r, n = mask.shape
    w = (n + 31) // 32
    padded = mask.new_zeros(r, w * 32)
    padded[:, :n] = mask
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=mask.device),
                                       torch.arange(32, device=mask.device))
    return (padded.view(r, w, 32).long() * weights).sum(dim=-1)


def select_boxes(boxes: torch.Tensor, class_probs: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Indices of the selected proposals, best `max_conf` first.

    class_probs (N, C+1) with the background in the last column (Detectron2 layout).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    scores = class_probs[:, :-1]
    floors = sorted({f for f in (selection.conf_thresh, *selection.score_floors)
                     if 0 < f <= selection.conf_thresh},
                    reverse=True)
    need = min(selection.min_boxes, n)
    for floor in floors:
        max_conf = max_conf_per_class_nms(boxes, scores, selection.nms_thresh, floor)
        if int((max_conf >= floor).sum()) >= need:  # every value that decides the selection is exact
            break
    else:  # the top-up needs the order of boxes below every floor
        max_conf = max_conf_dense(boxes, scores, selection.nms_thresh)
    above = int((max_conf >= selection.conf_thresh).sum())
    count = min(max(above, selection.min_boxes), selection.max_boxes, n)
    order = torch.argsort(max_conf, descending=True, stable=True)
    return order[:count]


# ---------------------------------------------------------------------------------------------------
# Running the detector
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PreparedImage:
    """An image resized for the network (done in DataLoader workers) plus what is needed to map back."""

    image: np.ndarray  # resized HxWx3 uint8, BGR
    height: int  # original size
    width: int


def prepare_image(image_bgr: np.ndarray, min_size: int, max_size: int) -> PreparedImage:
    resized, _ = resize_shortest_edge(image_bgr, min_size, max_size)
    return PreparedImage(resized, int(image_bgr.shape[0]), int(image_bgr.shape[1]))


class RegionExtractor:
    """Runs a GeneralizedRCNN on prepared images and returns per-image numpy regions.

    Faster R-CNN mode: RPN proposals + bottom-up-attention selection. Fast R-CNN mode (`boxes` given, in
    original pixels): exactly those boxes, in their order. The network runs one image at a time (no
    padding to batch mates), so an image's regions never depend on the other images of the call.
    `timings` accumulates seconds per stage (backbone, rpn, roi_heads, selection) for benchmarks.
    """

    def __init__(self, model: torch.nn.Module, input_format: str, selection: Selection = Selection(),
                 with_features: bool = False, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.flip_channels = input_format == "RGB"
        self.selection = selection
        self.with_features = with_features
        self.timings: dict[str, float] = defaultdict(float)
        # bf16/fp16 autocast for the network; scores, boxes and selection stay in fp32.
        self.autocast_dtype = autocast_dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _tick(self, name: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] += now - start
        return now

    @torch.no_grad()
    def __call__(self, images: Sequence[PreparedImage],
                 boxes: Sequence[np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        """Regions of each image. The network runs image by image: padding a batch to its largest image
        leaks into the backbone's border activations, and batched kernels may round differently, so a
        batched forward would make an image's regions depend on its batch mates. One image at a time,
        every result is a function of that image (and the weights and settings) alone."""
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got boxes for {len(boxes)} images, batch has {len(images)}")
        return [self._one(p, None if boxes is None else boxes[i]) for i, p in enumerate(images)]

    def _one(self, p: PreparedImage, given: np.ndarray | None) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        # A writable contiguous copy: decoded images may be read-only views.
        x = torch.from_numpy(np.array(p.image[:, :, ::-1] if self.flip_channels else p.image, order="C"))
        x = x.to(self.device, non_blocking=True).permute(2, 0, 1).float()
        batch = self.model.preprocess_image(x[None])  # a batch of one: nothing padded
        sizes = [(int(batch.shape[-2]), int(batch.shape[-1]))]
        with self._autocast():
            res4 = self.model.features(batch)
        t = self._tick("backbone", t)
        # Scale from original pixels to network input pixels, per axis (rounding makes them differ).
        h, w = sizes[0]
        sy, sx = h / p.height, w / p.width
        if given is None:
            with self._autocast():
                prop = self.model.proposal_generator(res4, sizes)[0]["proposal_boxes"].float()
            t = self._tick("rpn", t)
        else:
            prop = (torch.as_tensor(np.asarray(given, np.float32).reshape(-1, 4), device=self.device)
                    * torch.tensor([sx, sy, sx, sy], device=self.device))
        with self._autocast():
            out = self.model.region_outputs(res4, [prop])
        feats, class_probs, attr_probs = out["features"], out["class_probs"], out.get("attr_probs")
        if (not torch.isfinite(class_probs).all()
            or (attr_probs is not None and not torch.isfinite(attr_probs).all())):
            raise FloatingPointError("the detector produced NaN/inf class or attribute scores")
        t = self._tick("roi_heads", t)

        if given is None:
            orig = prop / torch.tensor([sx, sy, sx, sy], device=self.device)
            orig[:, 0::2] = orig[:, 0::2].clamp(0, p.width)
            orig[:, 1::2] = orig[:, 1::2].clamp(0, p.height)
            keep = select_boxes(orig, class_probs, self.selection)
            out_boxes = orig[keep].cpu().numpy().astype(np.float32)
        else:
            keep = torch.arange(len(prop), device=self.device)
            out_boxes = np.asarray(given, np.float32).reshape(-1, 4).copy()
        result = self._region_arrays(out_boxes, keep, class_probs, attr_probs, feats)
        self._tick("selection", t)
        return result

    def _region_arrays(self, out_boxes: np.ndarray, keep: torch.Tensor, class_probs: torch.Tensor,
                       attr_probs: torch.Tensor | None, feats: torch.Tensor) -> dict[str, np.ndarray]:
        cp = class_probs[keep]
        obj_conf, obj_ids = cp[:, :-1].max(dim=1)
        out = {
            "boxes": out_boxes,
            "class_probs": cp.cpu().numpy().astype(np.float16),
            "object_ids": obj_ids.cpu().numpy().astype(np.int32),
            "object_conf": obj_conf.cpu().numpy().astype(np.float32),
        }
        if attr_probs is not None:
            ap = attr_probs[keep]
            attr_conf, attr_ids = ap[:, :-1].max(dim=1)
            out.update(attr_probs=ap.cpu().numpy().astype(np.float16),
                       attr_ids=attr_ids.cpu().numpy().astype(np.int32),
                       attr_conf=attr_conf.cpu().numpy().astype(np.float32))
        if self.with_features:
            out["features"] = feats[keep].to(torch.float16).cpu().numpy()
        return out
