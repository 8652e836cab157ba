"""From a run's model and one image + text to the pictures and numbers of `tools/visualize_attention.py`:
the regions with the detector's labels, the answers, and word->region attention overlays per chosen
site and head. `look` is the entry point a page calls (arrays in, a `Look` out); `write_look` saves it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from detector.atomic import atomic_write_text
from detector.transforms import resize_with_boxes
from e2e_vl.visualize.attention import Explanation, TextLayout, explain
from e2e_vl.visualize.drawing import DrawnBox, attention_overlay, contact_sheet, draw_boxes, save_png
from e2e_vl.visualize.regions import attribute_names, class_names, label_boxes, label_text

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")


@dataclasses.dataclass
class Look:
    """Everything about one image + text: boxes (original pixels), their labels and confidences, the
    explanation (answers, attention), the region picture and the boxes drawn on it."""

    boxes: np.ndarray
    labels: list[str]
    confidences: np.ndarray
    explanation: Explanation
    regions_picture: Image.Image
    drawn: list[DrawnBox]

    def to_json(self) -> dict:
        return {"boxes": self.boxes.tolist(), "labels": self.labels,
                "confidences": self.confidences.tolist(), **self.explanation.to_json()}


def whole_image_first(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """The model's convention: box 0 is the whole image; the given boxes follow."""
    whole = np.array([[0, 0, width, height]], np.float32)
    return np.concatenate([whole, np.asarray(boxes, np.float32).reshape(-1, 4)])


def look(model: torch.nn.Module, image_bgr: np.ndarray, boxes: np.ndarray, text: str, min_size: int,
         max_size: int, answer_names: Sequence[str] = (), task_classes: Sequence[str] = (),
         top_k: int = 5, layout: TextLayout = TextLayout()) -> Look:
    """Resize the image as the run's test input (`min_size`/`max_size`), label `boxes` (original pixels,
    box 0 the whole image) with the model's detector, run the model with attention recorded."""
    boxes = np.asarray(boxes, np.float32)
    resized, resized_boxes, _ = resize_with_boxes(image_bgr, boxes, min_size, max_size)
    image_t = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    boxes_t = torch.as_tensor(resized_boxes, dtype=torch.float32)
    region = label_boxes(model.detector, image_t, boxes_t)
    names = class_names(region.num_classes, task_classes)
    attrs = attribute_names(region.num_attributes) if region.attributes is not None else None
    labels = ["whole image"] + [label_text(region, i, names, attrs) for i in range(1, len(boxes))]
    explanation = explain(model, image_t, boxes_t, text, answer_names, top_k, layout)
    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    picture, drawn = draw_boxes(rgb, boxes, labels)
    return Look(np.asarray(boxes, np.float32), labels, region.scores, explanation, picture, drawn)


def attention_pictures(look_: Look, image_bgr: np.ndarray, sites: Sequence[str], heads: Sequence[int]
                       ) -> dict[str, Image.Image]:
    """One picture per (site, head): a panel per text word (special tokens left out) with each region
    tinted by that word's attention to it."""
    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    att_all = look_.explanation.attention
    unknown = [s for s in sites if s not in att_all]
    if unknown:
        raise ValueError(f"unknown attention sites {unknown}; this model has {list(att_all)}")
    out = {}
    tokens = look_.explanation.tokens
    for site in sites:
        att = att_all[site]
        bad = [h for h in heads if not 0 <= h < att.shape[0]]
        if bad:
            raise ValueError(f"heads {bad}: {site} has {att.shape[0]} heads")
        for head in heads:
            panels = [attention_overlay(rgb, look_.boxes, att[head, t, :-1],
                                        f"{site} head {head}: '{tok}' (rest {att[head, t, -1]:.2f})")
                      for t, tok in enumerate(tokens) if tok not in SPECIAL_TOKENS]
            out[f"{site}_head{head}"] = (contact_sheet(panels, columns=4, cell=360) if panels
                                         else look_.regions_picture)
    return out


def write_look(look_: Look, pictures: dict[str, Image.Image], out_dir: str | Path) -> list[Path]:
    """regions.png, attention_<site>_head<h>.png and look.json (all numbers) in `out_dir`."""
    out = Path(out_dir)
    paths = [save_png(look_.regions_picture, out / "regions.png")]
    paths += [save_png(p, out / f"attention_{name}.png") for name, p in pictures.items()]
    atomic_write_text(out / "look.json", json.dumps(look_.to_json(), indent=1))
    return [*paths, out / "look.json"]
