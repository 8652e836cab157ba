#!/usr/bin/env python
"""Draw stored regions on their images: one PNG per image with "attribute object score" labels.

    python tools/visualize_rois.py --store rois/ --image-id 139 --output vis/
    python tools/visualize_rois.py --store rois/139.npz --output vis/      # an npz file works too

What users look at first to decide whether to trust a detector: boxes in the right places, sensible
names. Names come from the VG vocabulary when the store has 1600 classes / 400 attributes, otherwise
(e.g. a test model) they are shown as `class<i>` / `attr<i>`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector import vocab  # noqa: E402
from detector.image_sources import ImageError, load_image  # noqa: E402
from detector.roi_store import RoIRecord, RoIStore, RoIStoreError, read_npz  # noqa: E402

# Distinct, readable colours (BGR), cycled over boxes.
PALETTE = [(75, 25, 230), (75, 180, 60), (25, 225, 255), (200, 130, 0), (48, 130, 245), (180, 30, 145),
           (240, 240, 70), (230, 50, 240), (60, 245, 210), (212, 190, 250), (128, 128, 0), (40, 110, 170)]


def label_names(record: RoIRecord) -> tuple[list[str] | None, list[str] | None]:
    """VG names if the record's score widths match the VG vocabulary, else None (numbered labels)."""
    objects = attrs = None
    if record.class_probs is not None and record.class_probs.shape[1] == vocab.NUM_OBJECTS + 1:
        objects = vocab.object_names()
    if record.attr_probs is not None and record.attr_probs.shape[1] == vocab.NUM_ATTRIBUTES + 1:
        attrs = vocab.attribute_names()
    return objects, attrs


def box_labels(record: RoIRecord, attr_thresh: float) -> list[str]:
    objects, attrs = label_names(record)
    labels = []
    for i in range(record.num_boxes):
        parts = []
        if (record.attr_ids is not None and record.attr_conf is not None
            and record.attr_conf[i] >= attr_thresh):
            a = int(record.attr_ids[i])
            parts.append(attrs[a] if attrs else f"attr{a}")
        if record.object_ids is not None:
            o = int(record.object_ids[i])
            parts.append(objects[o] if objects else f"class{o}")
        if record.object_conf is not None:
            parts.append(f"{float(record.object_conf[i]):.2f}")
        labels.append(" ".join(parts) or f"box{i}")
    return labels


def draw(image: np.ndarray, record: RoIRecord, max_boxes: int, attr_thresh: float) -> np.ndarray:
    """Boxes (best first, as stored) with a filled label tag above each; line and font scale with size."""
    out = image.copy()
    scale = max(out.shape[:2]) / 800.0
    thickness = max(1, int(round(2 * scale)))
    font_scale = max(0.35, 0.5 * scale)
    labels = box_labels(record, attr_thresh)
    for i in range(min(record.num_boxes, max_boxes)):
        x1, y1, x2, y2 = (int(round(float(v))) for v in record.boxes[i])
        color = PALETTE[i % len(PALETTE)]
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        (tw, th), base = cv2.getTextSize(labels[i], cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty + 1), color, -1)
        cv2.putText(out, labels[i], (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    1, cv2.LINE_AA)
    return out


def resolve_image_path(path: str, image_root: str | None) -> str:
    return path if image_root is None or Path(path).is_absolute() else str(Path(image_root) / path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True,
                   help="RoI store directory (lmdb, sharded or not) or one .npz file")
    p.add_argument("--image-id", action="append", default=None, help="image id(s) to draw (repeatable)")
    p.add_argument("--num", type=int, default=1, help="without --image-id: draw the store's first N images")
    p.add_argument("--image-root", default=None, help="prefix for relative image paths stored in the records")
    p.add_argument("--output", required=True, help="folder for <image_id>.png")
    p.add_argument("--max-boxes", type=int, default=36, help="draw at most this many boxes (best first)")
    p.add_argument("--attr-thresh", type=float, default=0.1,
                   help="show an attribute only above this confidence")
    args = p.parse_args(argv)

    try:
        if args.store.endswith(".npz"):
            records = [read_npz(args.store)]
        else:
            store = RoIStore(args.store)
            ids = args.image_id or store.ids()[: args.num]
            records = [store[i] for i in ids]
    except (RoIStoreError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for record in records:
        path = resolve_image_path(record.path, args.image_root)
        try:
            image = load_image(path)
        except (ImageError, OSError, KeyError) as exc:
            print(f"error: image {record.image_id!r} at {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        if image.shape[:2] != (record.height, record.width):
            print(f"warning: {path} is {image.shape[1]}x{image.shape[0]} but the record says "
                  f"{record.width}x{record.height}; boxes may not line up", file=sys.stderr)
        target = out_dir / f"{record.image_id}.png"
        cv2.imwrite(str(target), draw(image, record, args.max_boxes, args.attr_thresh))
        print(f"{target}: {min(record.num_boxes, args.max_boxes)} of {record.num_boxes} boxes")
    return status


if __name__ == "__main__":
    sys.exit(main())
