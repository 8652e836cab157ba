"""VQA data: questions grouped by image, the answer-slot input layout, and the VQA v2 reader.

Fine-tuning masks no pixels, so every question of an image can share one detector pass: a data set
item is one image with several of its questions (`e2e_vl.data.collate.VLCollator` flattens the list
and keeps one image slot per `image_key`). The text of a question is VL-BERT's VQA layout
`[CLS] question [SEP] [MASK] [SEP]`; the answer classifier reads the [MASK] output.

VQA v2 targets follow the official accuracy: an answer given by m of the 10 annotators scores
min(1, m/3), averaged over the 10 leave-one-annotator-out subsets, so the loss (binary cross-entropy
on these soft scores) and the metric (score of the predicted answer) agree.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from detector.transforms import resize_shortest_edge


@dataclass
class Question:
    question_id: int
    image_id: int | str
    text: str
    # answer index -> soft score; empty for a split without answers (test-dev)
    scores: dict[int, float] = field(default_factory=dict)
    # for accuracy by type: VQA v2's answer_type ("yes/no", "number", "other"); "" = none
    answer_type: str = ""


def encode_vqa_text(tokenizer, text: str, max_question_tokens: int) -> dict:
    """VL-BERT's VQA text `[CLS] question [SEP] [MASK] [SEP]` (question truncated to
    `max_question_tokens` word pieces): input_ids, token_type_ids and answer_pos, the index of the
    [MASK] whose output the answer head reads.

    All of it is segment 0, as in VL-BERT's VQA: the answer slot is not a second text, and this is the
    one layout both training and the model tests use."""
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"][:max_question_tokens]
    ids = [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id, tokenizer.mask_token_id, tokenizer.sep_token_id]
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "token_type_ids": torch.zeros(len(ids), dtype=torch.long), "answer_pos": len(ids) - 2}


ImageLoader = Callable[[object], tuple[np.ndarray, np.ndarray]]


def resized_tensors(image: np.ndarray, boxes: np.ndarray, min_size: int, max_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An HxWx3 image resized as the detector resizes it, as a [3, h, w] tensor, and its boxes scaled
    to match (Float [K, 4])."""
    resized, _ = resize_shortest_edge(image, min_size, max_size)
    factors = np.array([resized.shape[1] / image.shape[1], resized.shape[0] / image.shape[0]] * 2, np.float32)
    return (torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            torch.from_numpy(np.asarray(boxes, np.float32) * factors))


class ImageQuestionsDataset(Dataset):
    """Items: one image with up to `questions_per_item` of its questions (0 = all), as a list of samples.

    `load_image(image_id)` returns the image (HxWx3 uint8 in the detector's channel order) and its
    boxes `[K, 4]` XYXY in original pixels with box 0 the whole image. Images are resized to the
    shortest side `min_size` (at most `max_size`) exactly as the detector resizes them.
    """

    def __init__(self, questions: Sequence[Question], load_image: ImageLoader, tokenizer, num_answers: int,
                 min_size: int, max_size: int, max_question_tokens: int = 16, questions_per_item: int = 0):
        if not questions:
            raise ValueError("no questions to build a data set from")
        self.questions = list(questions)
        self.load_image = load_image
        self.num_answers = num_answers
        self.min_size, self.max_size = min_size, max_size
        texts = sorted({q.text for q in self.questions})
        self._encoded = {t: encode_vqa_text(tokenizer, t, max_question_tokens) for t in texts}
        by_image: dict[object, list[int]] = {}
        for i, q in enumerate(self.questions):
            by_image.setdefault(q.image_id, []).append(i)
        self.items: list[tuple[object, list[int]]] = []
        for image_id in sorted(by_image, key=str):
            idx = by_image[image_id]
            step = questions_per_item or len(idx)
            self.items.extend((image_id, idx[i:i + step]) for i in range(0, len(idx), step))

    def __len__(self) -> int:
        return len(self.items)

    def item_question_ids(self, index: int) -> list[int]:
        return [self.questions[i].question_id for i in self.items[index][1]]

    def __getitem__(self, index: int) -> list[dict]:
        image_id, q_indices = self.items[index]
        image_t, boxes_t = resized_tensors(*self.load_image(image_id), self.min_size, self.max_size)
        samples = []
        for qi in q_indices:
            q = self.questions[qi]
            targets = torch.zeros(self.num_answers)
            for a, s in q.scores.items():
                targets[a] = s
            samples.append({"image": image_t, "boxes": boxes_t, "image_key": image_id,
                            **self._encoded[q.text], "vqa_targets": targets})
        return samples


# ---------------------------------------------------------------------------------------------------
# VQA v2
# ---------------------------------------------------------------------------------------------------
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """Lower-case, drop punctuation (keeping decimal points) and articles, spell numbers as digits.

    A simplified form of the official VQA answer processing, applied to both the annotators' answers
    and the answer vocabulary so that "Two." and "2" are the same answer.
    """
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PUNCT.sub("", text)
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """VQA accuracy of every distinct answer: mean over leave-one-out subsets of min(1, matches / 3)."""
    answers = [normalize_answer(a) for a in answers]
    counts = Counter(answers)
    n = len(answers)
    out = {}
    for a, c in counts.items():
        # Leaving out one of the c annotators who gave `a` leaves c - 1 matches; leaving out another, c.
        out[a] = (c * min(1.0, (c - 1) / 3) + (n - c) * min(1.0, c / 3)) / n
    return out


def read_answer_vocab(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as f:
        vocab = [normalize_answer(line) for line in f if line.strip()]
    if not vocab:
        raise ValueError(f"{path}: the answer vocabulary is empty")
    return vocab


def build_answer_vocab(annotations: Sequence[dict], size: int = 3129) -> list[str]:
    """The `size` most frequent (normalised) most-common answers, ties broken alphabetically."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def _read_json(path: str | os.PathLike, key: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQA file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{path}: expected a JSON object with a '{key}' list")
    return data[key]


def load_vqa_v2(questions_json: str | os.PathLike, annotations_json: str | os.PathLike | None,
                vocab: Sequence[str]) -> list[Question]:
    """Questions of one split, with soft scores over `vocab` when annotations are given."""
    answer_index = {a: i for i, a in enumerate(vocab)}
    annotations = {}
    if annotations_json:
        for ann in _read_json(annotations_json, "annotations"):
            annotations[ann["question_id"]] = ann
    out = []
    for q in _read_json(questions_json, "questions"):
        scores: dict[int, float] = {}
        ann = annotations.get(q["question_id"])
        if annotations_json and ann is None:
            raise ValueError(f"{annotations_json}: no annotation for question_id {q['question_id']}")
        if ann is not None:
            for a, s in soft_scores([x["answer"] for x in ann["answers"]]).items():
                if a in answer_index and s > 0:
                    scores[answer_index[a]] = s
        answer_type = str(ann.get("answer_type", "")) if ann is not None else ""
        out.append(Question(q["question_id"], q["image_id"], q["question"], scores, answer_type))
    return out


class CocoImageLoader:
    """Images of a COCO-style folder (`COCO_<split>_<12-digit id>.jpg` or `<id>.jpg`) with the regions
    of an RoI store (`tools/extract_rois.py`), whole-image box prepended."""

    def __init__(self, image_dir: str | os.PathLike, roi_store):
        self.image_dir = Path(image_dir)
        self.roi_store = roi_store
        self._names: dict[str, str] | None = None

    def _path(self, image_id) -> Path:
        if self._names is None:
            names = {}
            for p in self.image_dir.iterdir():
                m = re.search(r"(\d+)$", p.stem)
                if m:
                    names[str(int(m.group(1)))] = p.name
            self._names = names
        name = self._names.get(str(int(image_id)))
        if name is None:
            raise FileNotFoundError(f"no image for image_id {image_id} in {self.image_dir}")
        return self.image_dir / name

    def __call__(self, image_id) -> tuple[np.ndarray, np.ndarray]:
        path = self._path(image_id)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot decode image {path}")
        record = self.roi_store.get(str(image_id))
        if record is None:
            raise KeyError(f"image_id {image_id} has no record in the RoI store")
        h, w = image.shape[:2]
        boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), record.boxes.astype(np.float32)])
        return image, boxes
