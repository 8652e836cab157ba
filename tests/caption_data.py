"""Tiny caption pre-training data (TASK pretrain) shared by the tests that pre-train: COCO captions, an
LMDB RoI store with stored class distributions, and a text-only corpus. A helper module, not a test module."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from detector.roi_store import RoIRecord, RoIStoreWriter

COLOURS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}  # BGR
NUM_CLASSES = 5


def write_caption_data(root: Path) -> None:
    """Six 64x64 images (a coloured square each), their captions split 4 train / 2 held out, RoI records
    with two boxes and stored class distributions, and a text-only corpus."""
    rng = np.random.default_rng(0)
    images, anns, records = [], [], []
    for k in range(6):
        colour = list(COLOURS)[k % 3]
        image = np.full((64, 64, 3), 255, np.uint8)
        x, y = 8 + 4 * k, 12
        cv2.rectangle(image, (x, y), (x + 24, y + 24), COLOURS[colour], thickness=-1)
        cv2.imwrite(str(root / f"{k}.png"), image)
        images.append({"id": k, "file_name": f"{k}.png", "height": 64, "width": 64})
        anns.append({"id": 100 + k, "image_id": k, "caption": f"a {colour} square on a white background"})
        probs = rng.dirichlet(np.ones(NUM_CLASSES), size=2).astype(np.float16)
        boxes = np.array([[x, y, x + 24, y + 24], [0, 0, 32, 64]], np.float32)
        records.append(RoIRecord(str(k), str(root / f"{k}.png"), 64, 64, boxes=boxes, class_probs=probs,
                                 object_conf=np.array([0.9, 0.5], np.float32)))
    for name, ids in (("train.json", range(4)), ("val.json", range(4, 6))):
        coco = {"images": [images[k] for k in ids], "annotations": [anns[k] for k in ids]}
        (root / name).write_text(json.dumps(coco))
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(records)
    (root / "text.txt").write_text("squares and circles come in colours\nthe sky is blue today\n")
