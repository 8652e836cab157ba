"""VQA data: questions grouped by image, the answer-slot input layout, and the VQA v2 reader.

Fine-tuning masks no pixels, so every question of an image can share one detector pass: a data set
item is one image with several of its questions (`e2e_vl.data.collate.VLCollator` flattens the list
and keeps one image slot per `image_key`). The text of a question is VL-BERT's VQA layout
`[CLS] question [SEP] [MASK] [SEP]`; the answer classifier reads the [MASK] output.

VQA v2 targets follow the official accuracy (`e2e_vl.data.vqa_answers`): an answer given by m of the
10 annotators scores min(1, m/3), averaged over the 10 leave-one-annotator-out subsets, so the loss
(binary cross-entropy on these soft scores) and the metric (the official accuracy of the predicted
answer) agree. Image ids are decimal text, as the RoI store keys them (`detector.image_sources`).
Several official splits can form one data set (VL-BERT trains for test-dev on train2014 + val2014):
`join_splits` refuses ids that two splits share, and `SplitImageLoader` reads each image from its own
split's folder.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from detector.image_sources import IMAGE_EXTENSIONS, image_id_from_path
from detector.transforms import resize_with_boxes
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.collate import items_by_image
from e2e_vl.data.roi_records import require_roi_records
from e2e_vl.data.vqa_answers import normalize_answer, soft_scores


@dataclass
class Question:
    question_id: int
    image_id: int | str
    text: str
    # answer index -> soft score; empty for a split without answers (test-dev)
    scores: dict[int, float] = field(default_factory=dict)
    # for accuracy by type: VQA v2's answer_type ("yes/no", "number", "other"); "" = none
    answer_type: str = ""
    # the annotators' answers as written (VQA v2), scored by the official rule; empty: `scores` are exact
    answers: tuple[str, ...] = ()


def encode_vqa_text(tokenizer, text: str, max_question_tokens: int, answer_segment: int = 1) -> dict:
    """VL-BERT's VQA text `[CLS] question [SEP] [MASK] [SEP]` (question truncated to
    `max_question_tokens` word pieces): input_ids, token_type_ids and answer_pos, the index of the
    [MASK] whose output the answer head reads.

    `[CLS] question [SEP]` is segment 0 and `[MASK] [SEP]` segment `answer_segment`: 1 in VL-BERT's VQA
    (`prepare_text_from_qa`), which its released VQA models were fine-tuned with (DATASETS.ANSWER_SEGMENT)."""
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"][:max_question_tokens]
    ids = [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id, tokenizer.mask_token_id,
           tokenizer.sep_token_id]
    segments = torch.zeros(len(ids), dtype=torch.long)
    segments[-2:] = answer_segment
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "token_type_ids": segments,
            "answer_pos": len(ids) - 2}


ImageLoader = Callable[[object], tuple[np.ndarray, np.ndarray]]


def resized_tensors(image: np.ndarray, boxes: np.ndarray, min_size: int, max_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An HxWx3 image resized as the detector resizes it, as a [3, h, w] tensor, and its boxes scaled
    to match (Float [K, 4])."""
    resized, boxes, _ = resize_with_boxes(image, np.asarray(boxes), min_size, max_size)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), boxes


class ImageQuestionsDataset(Dataset):
    """Items: one image with up to `questions_per_item` of its questions (0 = all), as a list of samples.

    `load_image(image_id)` returns the image (HxWx3 uint8 in the detector's channel order) and its
    boxes `[K, 4]` XYXY in original pixels with box 0 the whole image. Images are resized to the
    shortest side `min_size` (at most `max_size`) exactly as the detector resizes them.
    """

    def __init__(self, questions: Sequence[Question], load_image: ImageLoader, tokenizer, num_answers: int,
                 min_size: int, max_size: int, max_question_tokens: int = 16, questions_per_item: int = 0,
                 answer_segment: int = 1):
        if not questions:
            raise ValueError("no questions to build a data set from")
        self.questions = list(questions)
        self.load_image = load_image
        self.num_answers = num_answers
        self.min_size, self.max_size = min_size, max_size
        texts = sorted({q.text for q in self.questions})
        self._encoded = {t: encode_vqa_text(tokenizer, t, max_question_tokens, answer_segment) for t in texts}
        self.items = items_by_image([q.image_id for q in self.questions], questions_per_item)

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
def read_answer_vocab(path: str | os.PathLike) -> list[str]:
    """One answer per line, normalised as the evaluation normalises answers."""
    if not os.path.isfile(path):
        raise DatasetError(f"answer vocabulary not found: {path}")
    with open(path, encoding="utf-8") as f:
        vocab = [normalize_answer(line) for line in f if line.strip()]
    if not vocab:
        raise DatasetError(f"{path}: the answer vocabulary is empty")
    return vocab


def build_answer_vocab(annotations: Sequence[dict], size: int = 3129) -> list[str]:
    """The `size` most frequent (normalised) most-common answers, ties broken alphabetically."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def _read_json(path: str | os.PathLike, key: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DatasetError(f"VQA file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DatasetError(f"{path}: expected a JSON object with a '{key}' list")
    return data[key]


def _field(record: object, key: str, kind: type | tuple[type, ...], where: str):
    """record[key], checked to be of `kind`; a DatasetError naming the file and record otherwise."""
    if not isinstance(record, dict) or key not in record:
        raise DatasetError(f"{where}: has no '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetError(f"{where}: '{key}' is {value!r}, expected {names}")
    return value


def load_vqa_v2(questions_json: str | os.PathLike, annotations_json: str | os.PathLike | None,
                vocab: Sequence[str]) -> list[Question]:
    """Questions of one split (the official `questions` json), with the annotators' answers, soft
    scores over `vocab` and the answer type when the split's annotations json is given (none for
    test-dev / test-std). A missing or mistyped key is a DatasetError naming the file and the record."""
    answer_index = {a: i for i, a in enumerate(vocab)}
    annotations: dict[int, tuple[tuple[str, ...], str]] = {}
    if annotations_json:
        for i, ann in enumerate(_read_json(annotations_json, "annotations")):
            where = f"{annotations_json}: annotations[{i}]"
            qid = _field(ann, "question_id", int, where)
            where = f"{where} (question_id {qid})"
            answers = _field(ann, "answers", list, where)
            texts = tuple(_field(a, "answer", str, f"{where}: answers[{j}]") for j, a in enumerate(answers))
            if not texts:
                raise DatasetError(f"{where}: 'answers' is empty")
            annotations[qid] = (texts, str(ann.get("answer_type", "")))
    out = []
    seen: set[int] = set()
    for i, q in enumerate(_read_json(questions_json, "questions")):
        where = f"{questions_json}: questions[{i}]"
        qid = _field(q, "question_id", int, where)
        if qid in seen:
            raise DatasetError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        where = f"{where} (question_id {qid})"
        image_id = _field(q, "image_id", (int, str), where)
        text = _field(q, "question", str, where)
        if annotations_json and qid not in annotations:
            raise DatasetError(f"{annotations_json}: no annotation for question_id {qid} of {questions_json}")
        texts, answer_type = annotations.get(qid, ((), ""))
        scores = {answer_index[a]: s for a, s in soft_scores(texts).items() if a in answer_index and s > 0}
        out.append(Question(qid, str(image_id), text, scores, answer_type, texts))
    return out


class CocoImageLoader:
    """Images of a COCO-style folder (`COCO_<split>_<12-digit id>.jpg` or `<12-digit id>.jpg`, ids as
    `detector.image_sources.image_id_from_path` gives them) with the regions of an RoI store
    (`tools/extract_rois.py`), whole-image box prepended.

    Built in the main process for the images a data set needs: each must have a file in the folder and
    a record in the store (`require_roi_records`), or a DatasetError says how many do not, and which.
    """

    def __init__(self, image_dir: str | os.PathLike, roi_store, image_ids: Iterable[object], dataset: str):
        self.image_dir = Path(image_dir)
        self.roi_store = roi_store
        if not self.image_dir.is_dir():
            raise DatasetError(f"{dataset}: image folder not found: {self.image_dir}")
        self._names: dict[str, str] = {}
        for path in sorted(self.image_dir.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                first = self._names.setdefault(image_id_from_path(path), path.name)
                if first != path.name:
                    raise DatasetError(f"{self.image_dir}: {first} and {path.name} are both image "
                                       f"{image_id_from_path(path)!r}")
        wanted = list(dict.fromkeys(str(i) for i in image_ids))
        missing = [i for i in wanted if i not in self._names]
        if missing:
            raise DatasetError(f"{dataset}: {len(missing)} of {len(wanted)} images have no file in "
                               f"{self.image_dir} (e.g. image ids "
                               f"{', '.join(repr(m) for m in missing[:5])}); "
                               "COCO images are named COCO_<split>_<12-digit id>.jpg or <12-digit id>.jpg")
        self._keys = require_roi_records(roi_store, wanted, dataset)

    def __call__(self, image_id) -> tuple[np.ndarray, np.ndarray]:
        path = self.image_dir / self._names[str(image_id)]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"cannot decode image {path}")
        record = self.roi_store[self._keys[str(image_id)]]
        h, w = image.shape[:2]
        if (record.height, record.width) != (h, w):
            raise DatasetError(f"{path} is {w}x{h} but its RoI record ({record.path}) says "
                               f"{record.width}x{record.height}: the store was extracted from other images")
        boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), record.boxes.astype(np.float32)])
        return image, boxes


@dataclass
class VQASplit:
    """One official split as a data set reads it: its questions (from `questions_json`, which messages
    name) and the folder of its images."""

    questions_json: Path
    image_dir: Path
    questions: list[Question]


def join_splits(splits: Sequence[VQASplit]) -> list[Question]:
    """The questions of `splits`, in order, as one data set.

    Why ids must not repeat across splits: questions are told apart by question id (results file,
    evaluation) and images by image id (one image slot and one RoI record per id, one folder per split),
    so a shared id would silently mix two questions or two images. A DatasetError names both files."""
    seen: dict[str, dict[object, int]] = {"question ids": {}, "image ids": {}}
    for i, split in enumerate(splits):
        ids = {"question ids": list(dict.fromkeys(q.question_id for q in split.questions)),
               "image ids": list(dict.fromkeys(str(q.image_id) for q in split.questions))}
        for kind, owner in seen.items():
            shared = [x for x in ids[kind] if x in owner]
            if shared:
                other = splits[owner[shared[0]]].questions_json
                raise DatasetError(
                    f"{split.questions_json}: {len(shared)} {kind} are also in {other} (e.g. "
                    f"{', '.join(repr(x) for x in shared[:5])}); the splits of one data set must not share "
                    "ids (the official train2014 and val2014 do not: is one file given twice?)")
            owner.update(dict.fromkeys(ids[kind], i))
    return [q for split in splits for q in split.questions]


class SplitImageLoader:
    """The images of several splits (`VQASplit`, ids unique across them: `join_splits`), each read from
    its own split's folder by a `CocoImageLoader` built for the images `questions` ask about; a missing
    file or RoI record is a DatasetError naming that split's questions file."""

    def __init__(self, splits: Sequence[VQASplit], questions: Iterable[Question], roi_store):
        owner = {str(q.image_id): i for i, split in enumerate(splits) for q in split.questions}
        wanted: list[list[str]] = [[] for _ in splits]
        for q in questions:
            wanted[owner[str(q.image_id)]].append(str(q.image_id))
        self._loaders = [CocoImageLoader(split.image_dir, roi_store, ids, str(split.questions_json))
                         for split, ids in zip(splits, wanted)]
        self._split_of = {image_id: i for i, ids in enumerate(wanted) for image_id in ids}

    def __call__(self, image_id) -> tuple[np.ndarray, np.ndarray]:
        return self._loaders[self._split_of[str(image_id)]](image_id)
