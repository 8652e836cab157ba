"""Tiny models, samples and files that several test modules share (test modules import from here, never
from each other): a random detector of the ResNet-50 layout at narrow widths, a 2-layer BERT at width 32
with BERT's uncased vocabulary (so real tokenizer output fits), caption data for pre-training, Flickr30K
Entities files, and a hostile checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from transformers import BertConfig, BertModel

from detector.config import CfgNode, get_cfg
from detector.modeling import build_detector
from detector.roi_store import RoIRecord, RoIStoreWriter
from e2e_vl.config import get_train_cfg
from e2e_vl.modeling.registry import build_model
from e2e_vl.modeling.vlbert import VLBert

VOCAB = 30522  # the uncased BERT vocabulary
NUM_CLASSES = 11  # the tiny detector's region classes (background included)
NUM_ANSWERS = 5
# The tiny BERT: BertConfig arguments (conftest's `tiny_bert_folder` writes it as a Hugging Face folder).
TINY_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)


def tiny_detector_cfg(cfg: CfgNode | None = None) -> CfgNode:
    """`cfg` (default: the detector's defaults) with the tiny detector: precomputed boxes, 4x4 RoIs."""
    cfg = cfg or get_cfg()
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.RES2_OUT_CHANNELS, r.STEM_OUT_CHANNELS, r.WIDTH_PER_GROUP = 50, 32, 16, 8
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES - 1
    return cfg


def tiny_model(heads=("mlm", "mrc", "vqa"), masking="pixel", **kwargs) -> VLBert:
    """VL-BERT on the tiny detector and BERT, seeded (the same weights on every call)."""
    torch.manual_seed(0)
    detector = build_detector(tiny_detector_cfg())
    bert = BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False)
    return VLBert(detector, bert, heads=heads, num_answers=NUM_ANSWERS, num_mrc_classes=NUM_CLASSES,
                  masking=masking, sep_token_id=102, mask_token_id=103, **kwargs)


def image_sample(num_boxes=3, text_len=6, height=64, width=48, seed=0, **extra) -> dict:
    """A random image with up to four boxes (box 0 the whole image) and random token ids; `extra` keys
    (targets, masks) added as given."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[0, 0, width, height], [4, 6, 20, 30], [20, 30, 44, 60], [10, 2, 40, 22.0]])[
        :num_boxes
    ]
    sample = {
        "input_ids": torch.randint(5, VOCAB, (text_len,), generator=g),
        "image": torch.rand(3, height, width, generator=g) * 255,
        "boxes": boxes,
    }
    sample.update(extra)
    return sample


def capture_backbone_input(model) -> list:
    """The list that every later input of `model.detector.backbone` is appended to (detached copies)."""
    seen = []
    model.detector.backbone.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    return seen


def arch_cfg(arch: str, bert_folder: str, *overrides: str) -> CfgNode:
    """The training config of architecture `arch` on the tiny detector and the BERT folder, with the
    heads mlm, mrc, vqa and ref, one LXMERT relationship and cross-modality layer, and `overrides`."""
    cfg = tiny_detector_cfg(get_train_cfg())
    cfg.MODEL.ARCH = arch
    v = cfg.MODEL.VL
    v.BERT_PATH, v.HEADS, v.NUM_ANSWERS, v.NUM_MRC_CLASSES = (bert_folder, ["mlm", "mrc", "vqa", "ref"],
                                                              NUM_ANSWERS, NUM_CLASSES)
    cfg.MODEL.LXMERT.R_LAYERS = cfg.MODEL.LXMERT.X_LAYERS = 1
    cfg.merge_from_list(list(overrides))
    return cfg


def build_arch(arch: str, bert_folder: str, *overrides: str):
    """`arch_cfg`'s model, seeded."""
    torch.manual_seed(0)
    return build_model(arch_cfg(arch, bert_folder, *overrides), arch)


# ---- caption pre-training data ------------------------------------------------------------------------
CAPTION_COLOURS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}  # BGR
CAPTION_CLASSES = 5  # classes of the stored region distributions


def write_caption_data(root: Path) -> None:
    """Six 64x64 images (a coloured square each), their captions split 4 train / 2 held out, RoI records
    with two boxes and stored class distributions, and a text-only corpus."""
    rng = np.random.default_rng(0)
    images, anns, records = [], [], []
    for k in range(6):
        colour = list(CAPTION_COLOURS)[k % 3]
        image = np.full((64, 64, 3), 255, np.uint8)
        x, y = 8 + 4 * k, 12
        cv2.rectangle(image, (x, y), (x + 24, y + 24), CAPTION_COLOURS[colour], thickness=-1)
        cv2.imwrite(str(root / f"{k}.png"), image)
        images.append({"id": k, "file_name": f"{k}.png", "height": 64, "width": 64})
        anns.append({"id": 100 + k, "image_id": k, "caption": f"a {colour} square on a white background"})
        probs = rng.dirichlet(np.ones(CAPTION_CLASSES), size=2).astype(np.float16)
        boxes = np.array([[x, y, x + 24, y + 24], [0, 0, 32, 64]], np.float32)
        records.append(RoIRecord(str(k), str(root / f"{k}.png"), 64, 64, boxes=boxes, class_probs=probs,
                                 object_conf=np.array([0.9, 0.5], np.float32)))
    for name, ids in (("train.json", range(4)), ("val.json", range(4, 6))):
        coco = {"images": [images[k] for k in ids], "annotations": [anns[k] for k in ids]}
        (root / name).write_text(json.dumps(coco))
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(records)
    (root / "text.txt").write_text("squares and circles come in colours\nthe sky is blue today\n")


# ---- Flickr30K Entities files ------------------------------------------------------------------------
FLICKR_H, FLICKR_W = 40, 56
FLICKR_SENTENCES = {
    "1000": ["[/EN#1/people A man] in [/EN#2/clothing a red shirt] holds [/EN#3/other two cups] in "
             "[/EN#4/scene a kitchen] .",
             "[/EN#1/people The man] drinks [/EN#0/notvisual something] with [/EN#5/bodyparts his hands] ."],
    "1001": ["[/EN#11/animals A dog] jumps over [/EN#12/other a fence] ."],
    # chain 7: two boxes, neither alone overlapping their union enough; chain 9: nobndbox
    "1002": ["[/EN#7/animals Two dogs] sit on [/EN#8/other a mat] .",
             "[/EN#9/bodyparts Their tails] are hidden by [/EN#7/animals the dogs] ."],
}
# image -> [(chain ids, 1-based xmin ymin xmax ymax, or "nobndbox" / "scene")]
FLICKR_OBJECTS = {
    "1000": [(["1"], (2, 2, 20, 38)), (["2"], (4, 10, 18, 30)), (["3"], (30, 5, 40, 15)),
             (["3"], (42, 5, 52, 15)), (["4"], "scene"), (["5"], "nobndbox")],
    "1001": [(["11"], (5, 5, 30, 35)), (["12"], (1, 20, 56, 40))],
    "1002": [(["7"], (1, 1, 16, 21)), (["7"], (26, 1, 41, 21)), (["8"], (1, 21, 56, 40)),
             (["9"], "nobndbox")],
}
FLICKR_SPLITS = {"train": ["1000", "1001"], "val": ["1002"], "test": ["1002"]}
# RoI store boxes (0-based): for 1002 the union of chain 7 ([0, 0, 40, 20]), one of its parts, the mat
FLICKR_STORE = {"1000": [[1, 1, 19, 37], [29, 4, 51, 14]], "1001": [[4, 4, 29, 34]],
                "1002": [[0, 0, 40, 20], [0, 0, 15, 20], [0, 20, 55, 39]]}
# detector scores of the store's boxes, written with `write_flickr30k(..., scores=True)`
FLICKR_STORE_SCORES = {"1000": [0.6, 0.7], "1001": [0.8], "1002": [0.9, 0.2, 0.5]}


def _flickr_xml(image_id: str, objects) -> str:
    parts = [f"<annotation><filename>{image_id}.jpg</filename><size><width>{FLICKR_W}</width>"
             f"<height>{FLICKR_H}</height><depth>3</depth></size>"]
    for names, box in objects:
        tags = "".join(f"<name>{n}</name>" for n in names)
        if isinstance(box, tuple):
            x1, y1, x2, y2 = box
            tags += (f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                     "</bndbox>")
        else:
            tags += (f"<nobndbox>{int(box == 'nobndbox')}</nobndbox><scene>{int(box == 'scene')}</scene>")
        parts.append(f"<object>{tags}</object>")
    return "\n".join(parts) + "</annotation>\n"


def write_flickr30k(root: Path, sentences=None, objects=None, scores: bool = False) -> Path:
    """The official layout under `root`: Sentences/, Annotations/, train/val/test.txt, the images in
    flickr30k-images/ and an RoI store rois/ keyed by image id (with `scores`, holding the detector's
    scores of its boxes as extraction writes them)."""
    sentences, objects = sentences or FLICKR_SENTENCES, objects or FLICKR_OBJECTS
    for folder in ("Sentences", "Annotations", "flickr30k-images"):
        (root / folder).mkdir(parents=True)
    for split, ids in FLICKR_SPLITS.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    records = []
    for image_id, lines in sentences.items():
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
        (root / "Annotations" / f"{image_id}.xml").write_text(_flickr_xml(image_id, objects[image_id]))
        image = np.full((FLICKR_H, FLICKR_W, 3), 220, np.uint8)
        cv2.rectangle(image, (4, 4), (30, 30), (30, 120, 200), -1)
        cv2.imwrite(str(root / "flickr30k-images" / f"{image_id}.jpg"), image)
        conf = np.array(FLICKR_STORE_SCORES[image_id], np.float32) if scores else None
        records.append(RoIRecord(image_id, f"{image_id}.jpg", FLICKR_H, FLICKR_W,
                                 boxes=np.array(FLICKR_STORE[image_id], np.float32), object_conf=conf))
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(records)
    return root


# ---- a hostile checkpoint ----------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this writes a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


def write_hostile_checkpoint(path: Path, marker: Path) -> None:
    """A file shaped like a training checkpoint whose unpickling runs code (it creates `marker`)."""
    torch.save({"model": {"head.1.bias": torch.zeros(3)}, "optimizer": {}, "scheduler": {}, "data": {},
                "rng": [], "step": 4, "config": _RunsCode(marker)}, path)
