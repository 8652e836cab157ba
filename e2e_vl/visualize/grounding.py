"""Entity grounding by attention heads, the analysis of the VisualBERT paper (Li et al. 2019, section 5):
for every layer and head, how often the region that an entity's last word piece attends to most is a
ground-truth region of that entity (IoU >= 0.5 with one of its boxes). Beside it the paper's baseline: always
the region of highest detector confidence.

A data source only supplies `GroundingCase`s (the attention of one image + text, its regions and their
detector confidences, and the entities as (word positions, ground-truth boxes)): easy-VQA's shape words
with the shape's box (`easy_vqa_cases`), Flickr30K Entities' phrases with their chain's box
(`flickr30k_cases`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from e2e_vl.visualize.attention import TextLayout, explain
from e2e_vl.visualize.drawing import line_chart

IOU_THRESHOLD = 0.5


@dataclasses.dataclass
class GroundingCase:
    """One image + text: per site the word->region attention `[H, T, K + 1]` (last column: the rest),
    the regions `[K, 4]`, their detector confidences `[K]`, and the entities: (positions of the entity's
    word pieces in the text, its ground-truth boxes `[G, 4]`, same coordinates as the regions)."""

    attention: Mapping[str, np.ndarray]
    regions: np.ndarray
    confidences: np.ndarray
    entities: Sequence[tuple[Sequence[int], np.ndarray]]


@dataclasses.dataclass
class GroundingTable:
    """accuracy[site] = per-head accuracy `[H]`; baseline accuracy; the number of entities counted."""

    accuracy: dict[str, np.ndarray]
    baseline: float
    num_entities: int

    def to_json(self) -> dict:
        return {"accuracy": {k: v.tolist() for k, v in self.accuracy.items()}, "baseline": self.baseline,
                "num_entities": self.num_entities}

    def markdown(self) -> str:
        heads = max(len(v) for v in self.accuracy.values())
        lines = ["| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " | best |",
                 "|---" * (heads + 2) + "|"]
        for name, acc in self.accuracy.items():
            lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {acc.max():.3f} |")
        lines.append(f"\nBaseline (region of highest detector confidence): {self.baseline:.3f}; "
                     f"{self.num_entities} entities.")
        return "\n".join(lines)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` [N, 4] with every box of `b` [M, 4] (XYXY)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def grounding_table(cases: Sequence[GroundingCase]) -> GroundingTable:
    """Per site and head, the share of entities whose most-attended region (from the entity's last word
    piece, as in the paper) hits a ground-truth box; and the baseline's share."""
    hits: dict[str, np.ndarray] = {}
    baseline_hits = count = 0
    for case in cases:
        good_regions = [box_iou(case.regions, gt).max(axis=1) >= IOU_THRESHOLD if len(gt) else
                        np.zeros(len(case.regions), bool) for _, gt in case.entities]
        best_region = int(np.argmax(case.confidences))
        for (positions, _), good in zip(case.entities, good_regions):
            if not len(positions):
                raise ValueError("a grounding entity has no word positions")
            count += 1
            baseline_hits += bool(good[best_region])
            word = max(positions)
            for site, att in case.attention.items():
                chosen = att[:, word, :len(case.regions)].argmax(axis=-1)  # [H], the rest column left out
                hits[site] = hits.get(site, np.zeros(att.shape[0])) + good[chosen]
    if not count:
        raise ValueError("grounding analysis: no entities")
    return GroundingTable({k: v / count for k, v in hits.items()}, baseline_hits / count, count)


def grounding_plot(table: GroundingTable) -> Image.Image:
    """Accuracy per layer: the best head and the mean over heads, beside the baseline (a flat line)."""
    layers = list(table.accuracy)
    xs = list(range(len(layers)))
    best = [float(table.accuracy[k].max()) for k in layers]
    mean = [float(table.accuracy[k].mean()) for k in layers]
    chart = line_chart({"best head": (xs, best), "mean of heads": (xs, mean),
                        "baseline": (xs, [table.baseline] * len(xs))},
                       f"entity grounding accuracy per layer ({table.num_entities} entities)",
                       size=(640, 320), x_label="layer", y_range=(0.0, 1.0), x_range=(-0.3, len(xs) - 0.7),
                       x_ticks=list(zip(xs, layers)))
    return chart


def entity_positions(tokens: Sequence[str], words: Sequence[str]) -> dict[str, list[int]]:
    """Positions of each of `words` among word-piece `tokens` (a word and its ## continuations)."""
    found: dict[str, list[int]] = {}
    i = 0
    while i < len(tokens):
        j = i + 1
        while j < len(tokens) and tokens[j].startswith("##"):
            j += 1
        word = "".join(t.removeprefix("##") for t in tokens[i:j])
        if word in words:
            found.setdefault(word, []).extend(range(i, j))
        i = j
    return found


def easy_vqa_cases(model, sizes: tuple[int, int], limit: int, layout: TextLayout = TextLayout()
                   ) -> list[GroundingCase]:
    """easy-VQA's first `limit` test questions that name a shape ("is there a circle?"): the shape word's
    word pieces -> the image's shape box. Regions: the whole image and the shape box, as the model is
    trained; confidences: the model's detector's best class score of each."""
    import torch

    from detector.transforms import resize_with_boxes
    from e2e_vl.data.easy_vqa import SHAPES, EasyVQAImages, load_questions
    from e2e_vl.visualize.regions import label_boxes

    questions = [q for q in load_questions("test") if set(q.text.lower().rstrip("?").split()) & set(SHAPES)]
    questions = questions[:limit]
    images = EasyVQAImages("test", {q.image_id for q in questions})
    cases = []
    for q in questions:
        image, boxes = images(q.image_id)
        if len(boxes) < 2:
            continue
        resized, resized_boxes, _ = resize_with_boxes(image, boxes, *sizes)
        image_t = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        explanation = explain(model, image_t, resized_boxes, q.text, layout=layout)
        confidences = label_boxes(model.detector, image_t, resized_boxes).scores
        words = entity_positions(explanation.tokens, SHAPES)
        entities = [(positions, boxes[1:2]) for positions in words.values()]
        cases.append(GroundingCase(explanation.attention, boxes, confidences, entities))
    return cases


def flickr30k_cases(model, sizes: tuple[int, int], root: str | os.PathLike, split: str, limit: int,
                    layout: TextLayout, rois: str | os.PathLike | None = None,
                    image_dir: str | os.PathLike = "flickr30k-images") -> list[GroundingCase]:
    """The captions of the first `limit` images of Flickr30K Entities' `split` (the official layout under
    `root`, read as TASK flickr30k reads it: phrases of chain 0 and of nobndbox / scene chains left out):
    every word piece of a phrase -> the union of its chain's boxes, so a region is right when its IoU with
    that union is >= 0.5, as the flickr30k evaluator scores. `grounding_table` reads the phrase's last
    word piece, the head noun of an English noun phrase.

    The phrase's pieces come from the task's own encoding of the caption (`Flickr30KDataset`: the words'
    pieces by word index, so a repeated word is told apart), checked against the text the model read.
    Regions: the image's boxes in the RoI store `rois` (relative to `root`, as DATASETS.ROI_STORE; the
    detector's proposals, as VisualBERT used), else the annotation's boxes; the whole image is read by the
    model but is no candidate, as in the task. Confidences: the store's detector scores (`object_conf`)
    where it holds them, else the model's detector's best class score. Captions are cut at
    `layout.max_tokens` word pieces, as the task cuts them at DATASETS.FLICKR30K.MAX_TEXT_LEN; a phrase cut
    off whole is left out."""
    from e2e_vl.data.flickr30k import Flickr30KDataset, gt_boxes, read_flickr30k, store_boxes, store_records
    from e2e_vl.data.roi_records import open_roi_store
    from e2e_vl.data.transforms import ResizeFlip
    from e2e_vl.visualize.regions import label_boxes

    root = Path(root)
    captions, annotations, grounded = read_flickr30k(root, split, limit)
    scores: dict[str, np.ndarray] = {}
    if rois is None:
        candidates = gt_boxes(annotations)
    else:
        records = store_records(open_roi_store(root / rois, "--rois"), sorted(annotations),
                                f"{root / split}.txt (Flickr30K images)")
        candidates = store_boxes(records)
        scores = {i: np.asarray(r.object_conf, float) for i, r in records.items()
                  if r.object_conf is not None}
    dataset = Flickr30KDataset(captions, annotations, grounded, candidates, root / image_dir, model.tokenizer,
                               ResizeFlip(*sizes), layout.max_tokens)
    cases = []
    for index, (caption_index, phrase_ids) in enumerate(dataset.items):
        sample, caption = dataset[index], dataset.captions[caption_index]
        explanation = explain(model, sample["image"], sample["boxes"], " ".join(caption.words), layout=layout)
        read = model.tokenizer.convert_ids_to_tokens(sample["input_ids"][:-1].tolist())  # no closing [SEP]
        if explanation.tokens[:len(read)] != read:
            raise ValueError(f"{caption.where}: the model read {explanation.tokens}, not the caption's word "
                             f"pieces {read}")
        confidences = scores.get(caption.image_id)
        if confidences is None:
            confidences = label_boxes(model.detector, sample["image"], sample["boxes"]).scores[1:]
        entities = [(np.flatnonzero(pieces).tolist(), np.array([dataset.grounded[k].box]))
                    for k, pieces in zip(phrase_ids, sample["phrase_tokens"].numpy()) if pieces.any()]
        cases.append(GroundingCase({site: att[..., 1:] for site, att in explanation.attention.items()},
                                   dataset.candidates(caption.image_id)[1:], confidences, entities))
    return cases
