#!/usr/bin/env python
"""Draw stored regions on their images: one PNG per image with "attribute object score" labels, numbered
boxes and a legend, small images scaled up so the labels stay readable; optionally all of them on one
contact sheet.

    python tools/visualize_rois.py --store rois/ --image-id 139 --output vis/
    python tools/visualize_rois.py --store rois/139.npz --output vis/      # an npz file works too
    python tools/visualize_rois.py --store rois/ --num 24 --output vis/ --contact-sheet vis/sheet.png
    python tools/visualize_rois.py --store rois/ --num 8 --output vis/ --classes easy_vqa  # the demo detector

What users look at first to decide whether to trust a detector: boxes in the right places, sensible
names. Names come from the VG vocabulary when the store has 1600 classes / 400 attributes, from --classes
(easy_vqa: the demo detector's colour-shape classes, or a file with one name per line) when their number
matches, otherwise they are shown as `class<i>` / `attr<i>`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector import vocab  # noqa: E402
from detector.image_sources import ImageError, load_image  # noqa: E402
from detector.roi_store import RoIRecord, RoIStore, RoIStoreError, read_npz  # noqa: E402
from e2e_vl.visualize.drawing import DrawnBox, contact_sheet, draw_boxes, save_png  # noqa: E402
from e2e_vl.visualize.regions import class_names  # noqa: E402
from PIL import Image  # noqa: E402


def label_names(record: RoIRecord, task_classes: Sequence[str] = ()
                ) -> tuple[list[str] | None, list[str] | None]:
    """Class names for the record's score width (VG's, else `task_classes` when their number matches;
    None = numbered labels) and VG attribute names when the width is VG's."""
    objects = attrs = None
    if record.class_probs is not None:
        names = class_names(record.class_probs.shape[1] - 1, task_classes)
        objects = None if names[0] == "class0" else names
    if record.attr_probs is not None and record.attr_probs.shape[1] == vocab.NUM_ATTRIBUTES + 1:
        attrs = vocab.attribute_names()
    return objects, attrs


def box_labels(record: RoIRecord, attr_thresh: float, task_classes: Sequence[str] = ()) -> list[str]:
    objects, attrs = label_names(record, task_classes)
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


def draw(image_bgr, record: RoIRecord, max_boxes: int, attr_thresh: float, task_classes: Sequence[str] = ()
         ) -> tuple[Image.Image, list[DrawnBox]]:
    """The best `max_boxes` boxes (as stored, best first), numbered, with a legend of their labels."""
    n = min(record.num_boxes, max_boxes)
    labels = box_labels(record, attr_thresh, task_classes)[:n]
    return draw_boxes(image_bgr[..., ::-1], record.boxes[:n], labels)


def read_classes(spec: str | None) -> list[str]:
    """--classes: "easy_vqa" (the demo detector's classes) or a file with one class name per line."""
    if not spec:
        return []
    if spec == "easy_vqa":
        from e2e_vl.data.easy_vqa import REGION_CLASSES

        return list(REGION_CLASSES)
    return [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]


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
    p.add_argument("--classes", default=None,
                   help="class names of a detector without VG's vocabulary: easy_vqa, or a file, one a line")
    p.add_argument("--contact-sheet", default=None, help="also put every picture into this one PNG")
    p.add_argument("--columns", type=int, default=4, help="pictures per row of the contact sheet")
    args = p.parse_args(argv)
    try:
        task_classes = read_classes(args.classes)
    except OSError as exc:
        print(f"error: --classes {args.classes}: {exc.strerror or exc}", file=sys.stderr)
        return 2

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
    pictures = []
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
        picture, drawn = draw(image, record, args.max_boxes, args.attr_thresh, task_classes)
        target = save_png(picture, out_dir / f"{record.image_id}.png")
        pictures.append(picture)
        print(f"{target}: {len(drawn)} of {record.num_boxes} boxes")
    if args.contact_sheet and pictures:
        sheet = save_png(contact_sheet(pictures, args.columns), args.contact_sheet)
        print(f"{sheet}: {len(pictures)} images")
    return status


if __name__ == "__main__":
    sys.exit(main())
