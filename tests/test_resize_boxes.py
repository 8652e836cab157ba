"""One resize-with-boxes transform: every call site that resizes an image and maps its boxes gives the
bits it gave before they shared `detector.transforms.resize_with_boxes` / `rescale_boxes`.

The golden file holds the outputs of the call sites as they were before the change (float32 boxes as
their bit patterns, resized pixels as a SHA-256); `python tests/test_resize_boxes.py` rewrites it.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import PIL
import torch

from detector.config import load_cfg
from detector.predictor import DetectorPredictor
from e2e_vl.data.transforms import ResizeFlip
from e2e_vl.data.vqa import resized_tensors

GOLDEN = Path(__file__).parent / "data" / "resize_boxes_golden.json"
TINY = Path(__file__).resolve().parent.parent / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"
# (height, width, min_size, max_size): up- and down-scaling, the max_size cap, odd sizes whose rounding
# makes the per-axis factors differ.
CASES = [(37, 53, 64, 100), (120, 45, 32, 1000), (33, 257, 50, 128), (64, 64, 64, 64)]


def _case(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    x = np.sort(rng.uniform(0, width, (5, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (5, 2)), axis=1)
    return image, np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)  # float64, as loaders give


def _record(image: torch.Tensor | np.ndarray, boxes: torch.Tensor) -> dict:
    pixels = np.ascontiguousarray(np.asarray(image))
    assert boxes.dtype == torch.float32
    return {"pixels": hashlib.sha256(pixels.tobytes()).hexdigest(), "shape": list(pixels.shape),
            "boxes": boxes.contiguous().view(torch.int32).flatten().tolist()}


def _outputs() -> dict:
    """Every call site on every case: ResizeFlip (plain and flipped), resized_tensors, and the boxes the
    predictor hands to the model's Fast R-CNN path."""
    predictor = DetectorPredictor(load_cfg(TINY), weights="")
    seen: list[torch.Tensor] = []
    predictor.model.fast_rcnn = lambda x, boxes: seen.append(boxes[0]) or {}
    out: dict = {}
    for i, (h, w, min_size, max_size) in enumerate(CASES):
        image, boxes = _case(h, w, i)
        for flip in (0.0, 1.0):
            t = ResizeFlip(min_size, max_size, flip_prob=flip)(image, torch.from_numpy(boxes),
                                                              rng=random.Random(0))
            out[f"resize_flip_{i}_{flip}"] = _record(t.image, t.boxes)
        out[f"resized_tensors_{i}"] = _record(*resized_tensors(image, boxes, min_size, max_size))
        predictor.min_size, predictor.max_size = min_size, max_size
        predictor.fast_rcnn(image, boxes)
        out[f"predictor_{i}"] = _record(np.zeros(0), seen.pop())
    return out


def test_call_sites_unchanged_bit_for_bit():
    expected = json.loads(GOLDEN.read_text())
    # PIL's bilinear downscaling gives other bits from one major version to the next (12 -> 13 did):
    # a golden of another Pillow says nothing about our call sites.
    written_with = expected.pop("pillow")
    assert written_with.split(".")[0] == PIL.__version__.split(".")[0], (
        f"{GOLDEN.name} was written with Pillow {written_with}, this is {PIL.__version__} (setup.py pins "
        f"the major version); rewrite it with `python {Path(__file__).name}` on the unchanged code")
    got = _outputs()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value, key


if __name__ == "__main__":
    lines = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in
             {"pillow": PIL.__version__, **_outputs()}.items()]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
