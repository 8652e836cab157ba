#!/usr/bin/env python
r"""Write an RoI store of ground-truth boxes from annotations, for `tools/extract_rois.py --boxes-from`.

    python tools/boxes_from_annotations.py coco --instances annotations/instances_val2014.json \
        --image-root val2014 --output gt_boxes/val2014
    python tools/boxes_from_annotations.py refer --root data/coco --dataset refcoco+ --split-by unc \
        --output gt_boxes/refcoco+
    python tools/boxes_from_annotations.py vcr --root path/to/vcr --splits train val test \
        --output gt_boxes/vcr

then the detector's features and scores for exactly those boxes (Fast R-CNN mode):

    python tools/extract_rois.py --config-file configs/vg/faster_rcnn_R_101_C4_attr_caffemaxpool.yaml \
        --weights faster_rcnn_from_caffe_attr_original.pkl --input val2014 --boxes-from gt_boxes/val2014 \
        --output rois/val2014 --features

coco: every annotation of a COCO instances json (`bbox` x, y, w, h; crowd boxes included), images by
`file_name` under --image-root. refer: the images the refs of `<dataset>/refs(<split-by>).p` (read without
running code) refer to, with every box `<dataset>/instances.json` has for them, images under
--root/--image-dir (DATASETS.REFCOCO.IMAGE_DIR; refer's own layout: images/mscoco/images/train2014).
vcr: the metadata boxes (x1, y1, x2, y2; score dropped) of every image of `<split>.jsonl`, in the metadata's
order, so object i is box i as the VCR loader numbers them. Records are keyed as extract_rois keys images
(COCO: the numeric image id; VCR: the image file's stem). Images without a box are not stored (counted).
Exit status 2, with one line naming the file and record, for bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from detector.image_sources import image_id_from_path  # noqa: E402
from detector.roi_store import RoIRecord, RoIStoreError, RoIStoreWriter  # noqa: E402
from e2e_vl.data.catalog import DatasetError  # noqa: E402

log = logging.getLogger("boxes_from_annotations")
BATCH = 1000  # records per store transaction


def coco_records(instances: Path, image_root: Path,
                 only: set[int] | None = None) -> tuple[list[RoIRecord], int]:
    """(records of the images with boxes, count of images without) of a COCO-style instances json."""
    from e2e_vl.data.refcoco import Instances

    index = Instances.read(instances)
    records, empty = [], 0
    for image_id in sorted(index.images if only is None else only & set(index.images)):
        boxes = index.boxes_by_image.get(image_id)
        if boxes is None:
            empty += 1
            continue
        height, width = index.image_size(image_id)
        records.append(RoIRecord(str(image_id), str(image_root / index.images[image_id]["file_name"]), height,
                                 width, boxes))
    return records, empty


def refer_records(root: Path, dataset: str, split_by: str, image_dir: str) -> tuple[list[RoIRecord], int]:
    from e2e_vl.data.refcoco import read_refs

    referred = {int(ref["image_id"]) for ref in read_refs(root / dataset / f"refs({split_by}).p")}
    return coco_records(root / dataset / "instances.json", root / image_dir, referred)


def vcr_records(root: Path, splits: Sequence[str], image_dir: str) -> tuple[list[RoIRecord], int]:
    from e2e_vl.data.vcr import VCRDataError, read_metadata, read_vcr_jsonl

    images = root / image_dir
    records: dict[str, RoIRecord] = {}
    empty: set[str] = set()
    for split in splits:
        for record in read_vcr_jsonl(root / f"{split}.jsonl", labelled=split != "test"):
            image_id = image_id_from_path(record.img_fn)
            path = str(images / record.img_fn)
            seen = records.get(image_id)
            if seen is not None or image_id in empty:
                if seen is not None and seen.path != path:
                    raise VCRDataError(f"two images have image id {image_id!r}: {seen.path} and {path}")
                continue
            boxes, meta = read_metadata(images / record.metadata_fn, record)
            if not all(isinstance(meta.get(k), int) for k in ("height", "width")):
                raise VCRDataError(f"{images / record.metadata_fn}: needs integer 'height' and 'width'")
            if len(boxes) == 0:
                empty.add(image_id)
                continue
            records[image_id] = RoIRecord(image_id, path, meta["height"], meta["width"], boxes)
    return list(records.values()), len(empty)


def fingerprint(records: Iterable[RoIRecord]) -> str:
    """Of the stored content: a re-run over the same annotations appends to (or skips in) its store, other
    boxes are refused by RoIStoreWriter."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.image_id, r.path, r.height, r.width]).encode("utf-8"))
        digest.update(np.ascontiguousarray(r.boxes, np.float32).tobytes())
    return digest.hexdigest()


def write_store(records: list[RoIRecord], output: str, source: dict, overwrite: bool) -> int:
    """Write the records not yet in `output`; how many were written."""
    header = {"mode": "annotations", "source": source, "fingerprint": fingerprint(records)}
    with RoIStoreWriter(output, header, overwrite=overwrite) as writer:
        done = writer.existing_ids()
        todo = [r for r in records if r.image_id not in done]
        for start in range(0, len(todo), BATCH):
            writer.write_batch(todo[start:start + BATCH])
    return len(todo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    coco = sub.add_parser("coco", help="a COCO instances json")
    coco.add_argument("--instances", required=True, help="instances_<split>.json")
    coco.add_argument("--image-root", required=True, help="folder of the json's file_name entries")
    refer = sub.add_parser("refer", help="refer's refs(<split-by>).p + instances.json (RefCOCO+, ...)")
    refer.add_argument("--root", required=True, help="DATASETS.ROOT of TASK refcoco")
    refer.add_argument("--dataset", default="refcoco+")
    refer.add_argument("--split-by", default="unc")
    refer.add_argument("--image-dir", default="train2014", help="under --root (DATASETS.REFCOCO.IMAGE_DIR)")
    vcr = sub.add_parser("vcr", help="VCR's <split>.jsonl + per-image metadata json")
    vcr.add_argument("--root", required=True, help="DATASETS.ROOT of TASK vcr")
    vcr.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    vcr.add_argument("--image-dir", default="vcr1images", help="under --root (DATASETS.IMAGE_DIR_TRAIN)")
    for each in (coco, refer, vcr):
        each.add_argument("--output", required=True, help="RoI store folder (LMDB)")
        each.add_argument("--overwrite", action="store_true", help="delete an existing store first")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.kind == "coco":
            records, empty = coco_records(Path(args.instances), Path(args.image_root))
            source = {"kind": "coco", "instances": args.instances}
        elif args.kind == "refer":
            records, empty = refer_records(Path(args.root), args.dataset, args.split_by, args.image_dir)
            source = {"kind": "refer", "dataset": args.dataset, "split_by": args.split_by}
        else:
            records, empty = vcr_records(Path(args.root), args.splits, args.image_dir)
            source = {"kind": "vcr", "splits": list(args.splits)}
        written = write_store(records, args.output, source, args.overwrite)
    except (DatasetError, RoIStoreError) as exc:
        log.error("%s", exc)
        return 2
    print(f"stored {written} images ({len(records) - written} already there, "
          f"{sum(r.num_boxes for r in records)} boxes in all) in {args.output}; {empty} images without "
          "boxes not stored", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
