"""tools/boxes_from_annotations.py: ground-truth box stores from COCO instances, refer and VCR metadata, and
tools/extract_rois.py --boxes-from reading one (issue 27)."""
from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.checkpoint import save_checkpoint
from detector.config import load_cfg
from detector.modeling import build_detector
from detector.roi_store import RoIStore

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_gt_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool("boxes_from_annotations")

IMAGES = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 90, "width": 120},
          {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 100, "width": 80},
          {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 60, "width": 60}]
ANNOTATIONS = [{"id": 10, "image_id": 1, "bbox": [10, 20, 30, 40]},
               {"id": 11, "image_id": 1, "bbox": [0, 0, 5, 5]},
               {"id": 12, "image_id": 2, "bbox": [4, 8, 50, 60]}]  # image 3: no boxes


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    for image in IMAGES:
        pixels = np.full((image["height"], image["width"], 3), 40 * image["id"], np.uint8)
        cv2.imwrite(str(root / "train2014" / image["file_name"]), pixels)
    (root / "refcoco+").mkdir()
    instances = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": []}
    (root / "refcoco+" / "instances.json").write_text(json.dumps(instances))
    refs = [{"ref_id": 0, "ann_id": 12, "image_id": 2, "split": "train", "category_id": 1,
             "sentences": [{"sent_id": 0, "tokens": ["left", "one"], "raw": "left one", "sent": "left one"}]}]
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def stored(path: Path) -> dict[str, tuple[str, int, int, list]]:
    with RoIStore(path) as store:
        return {r.image_id: (r.path, r.height, r.width, r.boxes.tolist()) for r in store}


def test_coco_and_refer_boxes_make_a_store_that_extract_rois_reads(coco, tmp_path, capsys):
    instances = coco / "refcoco+" / "instances.json"
    out = tmp_path / "gt"
    assert tool.main(["coco", "--instances", str(instances), "--image-root", str(coco / "train2014"),
                      "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (f"stored 2 images (0 already there, 3 boxes in all) in {out}; "
                                               "1 images without boxes not stored")
    image_dir = coco / "train2014"
    assert stored(out) == {  # keyed as extract_rois keys COCO file names; x, y, w, h -> x1, y1, x2, y2
        "1": (str(image_dir / IMAGES[0]["file_name"]), 90, 120, [[10, 20, 40, 60], [0, 0, 5, 5]]),
        "2": (str(image_dir / IMAGES[1]["file_name"]), 100, 80, [[4, 8, 54, 68]])}
    assert tool.main(["refer", "--root", str(coco), "--output", str(tmp_path / "refer")]) == 0
    assert list(stored(tmp_path / "refer")) == ["2"]  # the referred image only

    torch.manual_seed(0)  # the detector's features for exactly those boxes
    config = REPO / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"
    save_checkpoint(build_detector(load_cfg(config)), tmp_path / "tiny.pth")
    extract = load_tool("extract_rois")
    assert extract.main(["--config-file", str(config), "--weights", str(tmp_path / "tiny.pth"), "--input",
                         str(image_dir), "--output", str(tmp_path / "rois"), "--boxes-from", str(out),
                         "--device", "cpu", "--no-progress", "--num-workers", "0"]) == 0
    rois = stored(tmp_path / "rois")
    assert {k: v[3] for k, v in rois.items()} == {k: v[3] for k, v in stored(out).items()}


def test_vcr_metadata_boxes_make_a_store(tmp_path, capsys):
    root = tmp_path / "vcr"
    movie = root / "vcr1images" / "lsmdc_0001_Movie"
    movie.mkdir(parents=True)
    meta = {"boxes": [[1, 2, 30, 40, 0.9], [5, 5, 20, 25, 0.8]], "segms": [[], []], "width": 64, "height": 48,
            "names": ["person", "dog"]}
    (movie / "a@0.json").write_text(json.dumps(meta))
    record = {"annot_id": "val-0", "objects": ["person", "dog"], "img_fn": "lsmdc_0001_Movie/a@0.jpg",
              "metadata_fn": "lsmdc_0001_Movie/a@0.json", "question": ["Why", "is", [0], "here", "?"],
              "answer_choices": [["It", "is"], ["No"]], "rationale_choices": [["Because"], ["So"]],
              "answer_label": 0, "rationale_label": 1}
    lines = [json.dumps(record), json.dumps({**record, "annot_id": "val-1"})]  # one image, two annotations
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "gt"
    assert tool.main(["vcr", "--root", str(root), "--splits", "val", "--output", str(out)]) == 0
    assert "stored 1 images" in capsys.readouterr().out
    assert stored(out) == {"a@0": (str(movie / "a@0.jpg"), 48, 64, [[1, 2, 30, 40], [5, 5, 20, 25]])}

    (movie / "a@0.json").write_text(json.dumps({**meta, "boxes": meta["boxes"][:1]}))
    assert tool.main(["vcr", "--root", str(root), "--splits", "val", "--output", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()  # refused before anything was written
