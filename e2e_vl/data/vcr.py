"""VCR (Visual Commonsense Reasoning, Zellers et al. 2019) from its released files.

Layout under the data root: `train.jsonl`, `val.jsonl`, `test.jsonl` (one annotation per line:
`annot_id, objects, img_fn, metadata_fn, question, answer_choices, answer_label, rationale_choices,
rationale_label`; the test file has no labels) and the image folder (`vcr1images/`) holding each
`img_fn` and, beside it, the `metadata_fn` json (`boxes` as [x1, y1, x2, y2, score] in image pixels, one
per entry of `objects`; `segms`, `width`, `height`, `names`).

Text is a list of tokens that mixes words with object references, e.g. `["Why", "is", [0, 2], "smiling",
"?"]`. A reference is rendered as words (people as gender-neutral names, other objects by their class,
several joined with "and") and *grounded*: every word piece of an object's name takes that object's region
as its visual feature, the other pieces (and the "and"s) the whole image's, as VL-BERT does. Regions are
box 0 = the whole image, then the metadata boxes in order, so object i is region i + 1.

Sequences (VL-BERT's): Q->A `[CLS] question [SEP] answer [SEP]`, QA->R `[CLS] question answer [SEP]
rationale [SEP]`, segment 0 up to the first [SEP], 1 after it; one sequence per choice, the choices of
one question consecutive, its label on the first. A labelled split conditions QA->R on the correct answer;
the test split, without labels, on each of the four answers in turn (the leaderboard's
`rationale_conditioned_on_a<i>` columns). All sequences of one annotation share one detector pass. Each
region carries its COCO class (`object_labels`, the whole image 0) for VL-BERT's region-classification
regulariser.

Every record, reference and file is checked when the data set is built, before training starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detector.image_sources import ImageError, load_image
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.jsonl import json_objects
from e2e_vl.data.transforms import ResizeFlip, swap_left_right

# Rendered in turn for the people of an annotation (first person -> first name, ...): VL-BERT's
# GENDER_NEUTRAL_NAMES (vcr/data/datasets/vcr.py), in its order, because its released VCR models were
# trained with exactly these words. (r2c's list has 15 entries, Peyton twice and Skyler; VL-BERT dropped
# those two.) The one deliberate difference is which person gets which name: VL-BERT cycled a counter kept
# across annotations, we start every annotation at the first name.
PERSON_NAMES = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
                "Frankie", "Pat", "Quinn")
# The classes of `objects`: COCO's, spelt as VCR spells them; index 0 is the background (the whole image),
# the target of the region-classification regulariser (head "vcr_objects").
COCO_CLASSES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "trafficlight", "firehydrant", "stopsign", "parkingmeter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sportsball", "kite", "baseballbat", "baseballglove",
    "skateboard", "surfboard", "tennisracket", "bottle", "wineglass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hotdog", "pizza", "donut", "cake",
    "chair", "couch", "pottedplant", "bed", "diningtable", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cellphone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddybear", "hairdrier", "toothbrush")
CLASS_INDEX = {name: i for i, name in enumerate(COCO_CLASSES)}
SUBTASKS = ("q2a", "qa2r")
REQUIRED_KEYS = ("annot_id", "objects", "img_fn", "metadata_fn", "question", "answer_choices",
                 "rationale_choices")
LABEL_KEYS = ("answer_label", "rationale_label")
WHOLE_IMAGE = 0  # region index of the whole image; object i is region i + 1

MixedTokens = list  # words (str) and object references (list[int])


class VCRDataError(DatasetError):
    """A VCR file or record that cannot be used; the message names the file and the record."""


@dataclasses.dataclass(frozen=True)
class VCRRecord:
    annot_id: str
    objects: tuple[str, ...]
    img_fn: str
    metadata_fn: str
    question: MixedTokens
    answer_choices: list[MixedTokens]
    rationale_choices: list[MixedTokens]
    answer_label: int | None = None  # None: the test split
    rationale_label: int | None = None


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def read_vcr_jsonl(path: str | os.PathLike, labelled: bool) -> list[VCRRecord]:
    """Every annotation of one jsonl file, validated: keys present, texts well formed, every object
    reference within `objects`, the same number of choices per question, labels in range (`labelled`)."""
    records = [_parse_record(raw, where, labelled)
               for where, raw in json_objects(path, VCRDataError, "VCR annotation file")]
    if not records:
        raise VCRDataError(f"{path}: no annotations")
    return records


def _parse_record(raw: dict, where: str, labelled: bool) -> VCRRecord:
    name = f"{where} (annot_id {raw['annot_id']!r})" if "annot_id" in raw else where
    needed = REQUIRED_KEYS + (LABEL_KEYS if labelled else ())
    missing = [k for k in needed if k not in raw]
    if missing:
        raise VCRDataError(f"{name}: missing key(s) {missing}")
    objects = raw["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise VCRDataError(f"{name}: 'objects' must be a list of class names")
    unknown = [o for o in objects if o not in CLASS_INDEX or o == COCO_CLASSES[0]]
    if unknown:
        raise VCRDataError(f"{name}: object class {unknown[0]!r} is not one of VCR's (COCO's) classes")
    texts = {"question": [raw["question"]]}
    for key in ("answer_choices", "rationale_choices"):
        choices = raw[key]
        if not isinstance(choices, list) or len(choices) < 2:
            raise VCRDataError(f"{name}: '{key}' must be a list of at least 2 choices")
        texts[key] = choices
    if len(raw["answer_choices"]) != len(raw["rationale_choices"]):
        raise VCRDataError(f"{name}: {len(raw['answer_choices'])} answer_choices but "
                           f"{len(raw['rationale_choices'])} rationale_choices")
    for key, sentences in texts.items():
        for sentence in sentences:
            _check_tokens(sentence, len(objects), f"{name}: '{key}'")
    labels = {}
    for key, choices in zip(LABEL_KEYS, ("answer_choices", "rationale_choices")):
        if labelled:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(raw[choices]):
                raise VCRDataError(f"{name}: '{key}' {value!r} is not a choice index "
                                   f"0..{len(raw[choices]) - 1}")
            labels[key] = value
    return VCRRecord(str(raw["annot_id"]), tuple(objects), str(raw["img_fn"]), str(raw["metadata_fn"]),
                     raw["question"], raw["answer_choices"], raw["rationale_choices"], **labels)


def _check_tokens(tokens: Any, num_objects: int, name: str) -> None:
    if not isinstance(tokens, list) or not tokens:
        raise VCRDataError(f"{name}: expected a non-empty list of words and object references, got "
                           f"{tokens!r}")
    for token in tokens:
        if isinstance(token, str):
            continue
        if not isinstance(token, list) or not token or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in token):
            raise VCRDataError(f"{name}: token {token!r} is neither a word nor a list of object indices")
        bad = [i for i in token if not 0 <= i < num_objects]
        if bad:
            raise VCRDataError(f"{name}: object reference {token} has index {bad[0]} out of range "
                               f"(the record has {num_objects} objects: 0..{num_objects - 1})")


# ---------------------------------------------------------------------------------------------------
# Text: references rendered and grounded
# ---------------------------------------------------------------------------------------------------
def object_names(objects: Sequence[str]) -> list[str]:
    """The word(s) each object is rendered as: people get `PERSON_NAMES` in order of appearance in
    `objects` (cycling), other objects their class name."""
    names, people = [], 0
    for cls in objects:
        if cls == "person":
            names.append(PERSON_NAMES[people % len(PERSON_NAMES)])
            people += 1
        else:
            names.append(cls)
    return names


def render_tokens(tokens: MixedTokens, names: Sequence[str],
                  flipped: bool = False) -> tuple[list[str], list[int]]:
    """Words of a mixed token list with the region each word is grounded in: a reference `[i, j]` becomes
    `names[i] and names[j]` with regions `i + 1, 0, j + 1`; plain words get the whole image (0). With
    `flipped` (a mirrored image), "left" and "right" swap in the words."""
    words, regions = [], []
    for token in tokens:
        if isinstance(token, str):
            words.append(swap_left_right(token) if flipped else token)
            regions.append(WHOLE_IMAGE)
            continue
        for k, index in enumerate(token):
            if k:
                words.append("and")
                regions.append(WHOLE_IMAGE)
            words.append(names[index])
            regions.append(index + 1)
    return words, regions


def encode_words(tokenizer, words: Sequence[str], regions: Sequence[int]) -> tuple[list[int], list[int]]:
    """Word pieces of `words` and, per piece, the region of the word it comes from."""
    if not words:
        return [], []
    encoded = tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)
    word_ids = encoded.word_ids()
    return list(encoded["input_ids"]), [regions[w] for w in word_ids]


def truncate_parts(parts: list[list[Any]], budget: int) -> None:
    """Drop word pieces from the end of the longest part (the first of equals) until all parts together
    hold at most `budget`. Parts are (ids, regions) pairs of lists, shortened in place."""
    while sum(len(ids) for ids, _ in parts) > budget:
        ids, regions = max(parts, key=lambda p: len(p[0]))
        ids.pop()
        regions.pop()


def choice_sequence(tokenizer, context: list[tuple[list[int], list[int]]],
                    response: tuple[list[int], list[int]], max_text_len: int) -> dict[str, torch.Tensor]:
    """`[CLS] context... [SEP] response [SEP]` with segments (0 through the first [SEP], then 1) and the
    region of each token (`text_region_index`; special tokens: the whole image). At most `max_text_len`
    word pieces of context and response together (the special tokens not counted, as in VL-BERT)."""
    parts = [(list(ids), list(regs)) for ids, regs in [*context, response]]
    truncate_parts(parts, max_text_len)
    ctx_ids = [i for ids, _ in parts[:-1] for i in ids]
    ctx_regs = [r for _, regs in parts[:-1] for r in regs]
    resp_ids, resp_regs = parts[-1]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = [cls, *ctx_ids, sep, *resp_ids, sep]
    regions = [WHOLE_IMAGE, *ctx_regs, WHOLE_IMAGE, *resp_regs, WHOLE_IMAGE]
    first = len(ctx_ids) + 2
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "token_type_ids": torch.tensor([0] * first + [1] * (len(ids) - first), dtype=torch.long),
            "text_region_index": torch.tensor(regions, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChoiceGroup:
    """One question's choices in a data set item: which annotation, which group of the leaderboard
    ("answer", "rationale" given the correct answer, or "rationale_conditioned_on_a<i>"), its label (-1:
    unknown)."""

    annot_id: str
    name: str
    label: int
    given_answer: int = -1  # the answer in a rationale group's context; -1 for the answer group


class VCRDataset(Dataset):
    """Items: one annotation as a list of samples, `len(choices)` per group, groups in `item_groups` order.

    `subtasks` picks the groups: "q2a" (the answers) and/or "qa2r" (the rationales). Images are resized
    (and, in training, flipped) by `transform`, with randomness seeded by (seed, epoch, index) so that a
    resumed run sees the same samples.
    """

    def __init__(self, records: Sequence[VCRRecord], image_dir: str | os.PathLike, tokenizer,
                 transform: ResizeFlip, subtasks: Sequence[str] = SUBTASKS, max_text_len: int = 64,
                 source: str = "", seed: int = 0):
        if not records:
            raise VCRDataError(f"{source or 'VCR'}: no annotations to build a data set from")
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown or not subtasks:
            raise VCRDataError(f"VCR subtasks must be some of {list(SUBTASKS)}, got {list(subtasks)}")
        labelled = {r.answer_label is not None for r in records}
        if len(labelled) != 1:
            raise VCRDataError(f"{source}: some annotations have labels and some do not")
        self.labelled = labelled.pop()
        self.records, self.image_dir, self.tokenizer = list(records), Path(image_dir), tokenizer
        self.transform, self.subtasks, self.max_text_len = transform, tuple(subtasks), max_text_len
        self.source, self.seed, self.epoch = source, seed, 0
        self._check_files()

    def _check_files(self) -> None:
        """Every image and metadata file exists (checked once per file, before any training)."""
        seen: set[str] = set()
        for record in self.records:
            for key in ("img_fn", "metadata_fn"):
                rel = getattr(record, key)
                if rel in seen:
                    continue
                if not (self.image_dir / rel).is_file():
                    raise VCRDataError(f"{self.source}: annot_id {record.annot_id!r}: {key} "
                                       f"{self.image_dir / rel} does not exist")
                seen.add(rel)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def item_groups(self, index: int) -> list[ChoiceGroup]:
        r = self.records[index]
        groups = []
        if "q2a" in self.subtasks:
            groups.append(ChoiceGroup(r.annot_id, "answer", _label(r.answer_label)))
        if "qa2r" in self.subtasks:
            if self.labelled:
                groups.append(ChoiceGroup(r.annot_id, "rationale", _label(r.rationale_label), r.answer_label))
            else:
                groups += [ChoiceGroup(r.annot_id, f"rationale_conditioned_on_a{a}", -1, a)
                           for a in range(len(r.answer_choices))]
        return groups

    def load_regions(self, record: VCRRecord) -> tuple[np.ndarray, np.ndarray]:
        """The image (HxWx3 BGR) and its regions [K + 1, 4]: the whole image, then the metadata boxes."""
        image_path, meta_path = self.image_dir / record.img_fn, self.image_dir / record.metadata_fn
        try:
            image = load_image(str(image_path))
        except ImageError as exc:
            raise ImageError(f"{image_path} (annot_id {record.annot_id!r}): {exc}") from None
        xyxy, _ = read_metadata(meta_path, record)
        h, w = image.shape[:2]
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        return image, np.concatenate([np.array([[0, 0, w, h]], np.float32), xyxy])

    def __getitem__(self, index: int) -> list[dict]:
        record = self.records[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        image, boxes = self.load_regions(record)
        out = self.transform(image, torch.from_numpy(boxes), None, rng)
        names = object_names(record.objects)

        def encode(tokens: MixedTokens) -> tuple[list[int], list[int]]:
            return encode_words(self.tokenizer, *render_tokens(tokens, names, out.flipped))

        question = encode(record.question)
        answers = [encode(a) for a in record.answer_choices]
        rationales = [encode(r) for r in record.rationale_choices] if "qa2r" in self.subtasks else []
        classes = torch.tensor([0] + [CLASS_INDEX[o] for o in record.objects], dtype=torch.long)
        samples = []
        for group in self.item_groups(index):
            context = [question] if group.given_answer < 0 else [question, answers[group.given_answer]]
            responses = answers if group.given_answer < 0 else rationales
            for k, response in enumerate(responses):
                sample = {"image": out.image, "boxes": out.boxes, "image_key": (record.annot_id, index),
                          "object_labels": classes,
                          **choice_sequence(self.tokenizer, context, response, self.max_text_len)}
                if k == 0:
                    sample["choice_label"] = group.label
                samples.append(sample)
        return samples


def read_metadata(meta_path: Path, record: VCRRecord) -> tuple[np.ndarray, dict]:
    """The metadata file's boxes ([K, 4] XYXY in image pixels, score dropped; one per object of `record`)
    and the whole parsed file (`width`, `height`, `names`, ...)."""
    where = f"{meta_path} (annot_id {record.annot_id!r})"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise VCRDataError(f"{where}: unreadable metadata: {exc}") from None
    boxes = meta.get("boxes") if isinstance(meta, dict) else None
    if not isinstance(boxes, list):
        raise VCRDataError(f"{where}: missing key 'boxes'")
    if len(boxes) != len(record.objects):
        raise VCRDataError(f"{where}: {len(boxes)} boxes for {len(record.objects)} objects")
    try:
        return np.array([b[:4] for b in boxes], np.float32).reshape(-1, 4), meta
    except (TypeError, ValueError):
        raise VCRDataError(f"{where}: 'boxes' must be [x1, y1, x2, y2, score] lists") from None


def _label(value: int | None) -> int:
    return -1 if value is None else value
