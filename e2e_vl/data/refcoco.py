"""RefCOCO+ in the `refer` layout (the refer API's files, as VL-BERT reads them).

Files (paths relative to DATASETS.ROOT):

    refcoco+/refs(unc).p     a pickle (read with the restricted unpickler: plain data only) holding a list
                             of refs {ref_id, ann_id, image_id, split, sentences, category_id, sent_ids,
                             file_name}; each sentence {sent_id, tokens, raw, sent}
    refcoco+/instances.json  COCO-style {images, annotations, categories}: the referred images and every
                             annotated object in them (bbox x, y, w, h)
    <IMAGE_DIR>/<file_name>  the COCO train2014 images, named by instances.json's `file_name`

One sample per referring sentence; its text is the sentence's `tokens` joined by spaces (as VL-BERT). The
referred box is the ref's annotation. Candidate regions come from one or more registered sources
(`REGION_SOURCES`: "gt" = the image's COCO boxes, "detections" = a MAttNet detections json, "roi_store"
= an RoI store), concatenated in the order given, clipped to the image, with the whole image prepended
as box 0. A region's label is 1 when its IoU with the referred box exceeds 0.5.

Everything that can be checked without decoding images is checked when the data set is built (a missing
key, a ref whose annotation is not in instances.json, an image without regions or without a file), so a
bad file stops the run before training with the file and the record named.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detector.structures import box_iou
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.collate import items_by_image
from e2e_vl.data.transforms import ResizeFlip, swap_left_right

REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
SENTENCE_KEYS = ("sent_id", "tokens")
IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "bbox")
DETECTION_KEYS = ("image_id", "box")
POSITIVE_IOU = 0.5  # a region is a positive when its IoU with the referred box exceeds this
_EXAMPLES = 5  # ids quoted in an error about many records


class RefCOCODataError(DatasetError):
    """A refer-layout file or record that cannot be used (the message names the file and the record)."""


@dataclasses.dataclass(frozen=True)
class RefSentence:
    """One referring sentence: a sample. `box` is the referred object, XYXY in original pixels."""

    sent_id: int
    ref_id: int
    ann_id: int
    image_id: int
    split: str
    text: str
    box: tuple[float, float, float, float]


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def _require(record: Any, keys: Sequence[str], where: str) -> None:
    """`record` must be a dict holding `keys`; otherwise a RefCOCODataError naming `where` and the key."""
    if not isinstance(record, dict):
        raise RefCOCODataError(f"{where}: expected a dict, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise RefCOCODataError(f"{where}: missing key '{key}' (has {sorted(map(str, record))})")


def _box4(value: Any, where: str) -> tuple[float, float, float, float]:
    """An x, y, w, h box of four finite numbers with w, h >= 0, as XYXY."""
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
        raise RefCOCODataError(f"{where}: expected a box [x, y, w, h] with w, h >= 0, got {value!r}")
    return xywh_to_xyxy(box)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RefCOCODataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise RefCOCODataError(f"{path}: not readable JSON ({exc})") from None


def _missing_message(what: str, where: str | os.PathLike, missing: Sequence[Any], total: int,
                     fix: str) -> str:
    examples = ", ".join(str(m) for m in sorted(missing, key=str)[:_EXAMPLES])
    return f"{len(missing)} of {total} images have no {what} in {where} (e.g. image_id {examples}); {fix}"


# ---------------------------------------------------------------------------------------------------
# instances.json and refs(unc).p
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Instances:
    """instances.json indexed: images by id (file_name, height, width) and annotation boxes (XYXY)."""

    path: Path
    images: dict[int, dict]
    ann_boxes: dict[int, tuple[float, float, float, float]]
    ann_image: dict[int, int]
    boxes_by_image: dict[int, np.ndarray]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Instances":
        path = Path(path)
        data = _read_json(path)
        _require(data, ("images", "annotations"), str(path))
        images: dict[int, dict] = {}
        for i, image in enumerate(data["images"]):
            _require(image, IMAGE_KEYS, f"{path}: images[{i}]")
            images[int(image["id"])] = image
        ann_boxes, ann_image, by_image = {}, {}, {}
        for i, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{i}] (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
            _require(ann, ANNOTATION_KEYS, where)
            ann_id, image_id = int(ann["id"]), int(ann["image_id"])
            if image_id not in images:
                raise RefCOCODataError(f"{where}: image_id {image_id} is not in the file's images")
            ann_boxes[ann_id] = _box4(ann["bbox"], f"{where}: 'bbox'")
            ann_image[ann_id] = image_id
            by_image.setdefault(image_id, []).append(ann_boxes[ann_id])
        boxes = {k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in by_image.items()}
        return cls(path, images, ann_boxes, ann_image, boxes)

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) as instances.json says."""
        info = self.images[image_id]
        return int(info["height"]), int(info["width"])


def read_refs(path: str | os.PathLike) -> list[dict]:
    """The refs of a `refs(<split_by>).p`, unpickled without running code, each checked for its keys."""
    from detector.checkpoint.unpickler import CheckpointError, safe_unpickle

    try:
        refs = safe_unpickle(path, plain=True)
    except CheckpointError as exc:
        raise RefCOCODataError(str(exc)) from None
    if not isinstance(refs, list):
        raise RefCOCODataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        where = f"{path}: ref #{i} (ref_id {ref.get('ref_id', '?') if isinstance(ref, dict) else '?'})"
        _require(ref, REF_KEYS, where)
        if not isinstance(ref["sentences"], list):
            raise RefCOCODataError(f"{where}: 'sentences' must be a list, got "
                                   f"{type(ref['sentences']).__name__}")
        for j, sent in enumerate(ref["sentences"]):
            _require(sent, SENTENCE_KEYS, f"{where}: sentences[{j}]")
    return refs


def refer_sentences(refs: Iterable[dict], refs_path: str | os.PathLike, instances: Instances,
                    splits: Collection[str]) -> list[RefSentence]:
    """The sentences of the refs in `splits` (each split must have some), joined with their annotations."""
    out: list[RefSentence] = []
    seen: set[str] = set()
    for ref in refs:
        split = str(ref["split"])
        seen.add(split)
        if split not in splits:
            continue
        ref_id, ann_id, image_id = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
        where = f"{refs_path}: ref_id {ref_id}"
        if ann_id not in instances.ann_boxes:
            raise RefCOCODataError(f"{where}: ann_id {ann_id} is not an annotation of {instances.path}")
        if instances.ann_image[ann_id] != image_id:
            raise RefCOCODataError(f"{where}: image_id {image_id}, but its ann_id {ann_id} belongs to "
                                   f"image_id {instances.ann_image[ann_id]} in {instances.path}")
        for sent in ref["sentences"]:
            tokens = sent["tokens"]
            if not isinstance(tokens, (list, tuple)):
                raise RefCOCODataError(f"{where}: sent_id {sent['sent_id']}: 'tokens' must be a list of "
                                       f"words, got {tokens!r}")
            out.append(RefSentence(int(sent["sent_id"]), ref_id, ann_id, image_id, split,
                                   " ".join(str(t) for t in tokens), instances.ann_boxes[ann_id]))
    empty = [s for s in splits if not any(x.split == s for x in out)]
    if empty:
        raise RefCOCODataError(f"{refs_path}: no sentences in split(s) {empty}; the file has splits "
                               f"{sorted(seen)}")
    return out


# ---------------------------------------------------------------------------------------------------
# Candidate regions
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RegionInputs:
    """What region sources may read: instances.json, a detections json and an RoI store (paths)."""

    instances: Instances
    detections: str = ""
    roi_store: str = ""


BoxSource = Callable[[int], np.ndarray]  # image id -> [K, 4] XYXY boxes in original pixels
REGION_SOURCES: dict[str, Callable[[RegionInputs, Collection[int]], BoxSource]] = {}


def register_region_source(name: str) -> Callable[[type], type]:
    """Register a source class built as `cls.build(inputs, image_ids)`, which checks every image is
    covered."""
    def add(cls: type) -> type:
        if name in REGION_SOURCES:
            raise ValueError(f"region source {name!r} is registered twice")
        REGION_SOURCES[name] = cls.build
        return cls

    return add


@register_region_source("gt")
class GroundTruthBoxes:
    """Every COCO annotation box of the image (instances.json), VL-BERT's "gt" candidates."""

    def __init__(self, instances: Instances):
        self.instances = instances

    @classmethod
    def build(cls, inputs: RegionInputs, image_ids: Collection[int]) -> "GroundTruthBoxes":
        return cls(inputs.instances)

    def __call__(self, image_id: int) -> np.ndarray:
        return self.instances.boxes_by_image.get(image_id, np.zeros((0, 4), np.float32))


@register_region_source("detections")
class DetectionBoxes:
    """A detections json as MAttNet writes it (`res101_coco_minus_refer_notime_dets.json`): a list of
    {det_id, image_id, box [x, y, w, h], category_id, category_name, score}. Every image must have one."""

    def __init__(self, boxes: dict[int, np.ndarray]):
        self.boxes = boxes

    @classmethod
    def build(cls, inputs: RegionInputs, image_ids: Collection[int]) -> "DetectionBoxes":
        if not inputs.detections:
            raise RefCOCODataError("region source 'detections' needs DATASETS.REFCOCO.DETECTIONS (a "
                                   "detections json)")
        path = Path(inputs.detections)
        if not path.is_file():
            raise RefCOCODataError(f"detections file not found: {path} "
                                   "(DATASETS.REFCOCO.DETECTIONS, under DATASETS.ROOT)")
        dets = _read_json(path)
        if not isinstance(dets, list):
            raise RefCOCODataError(f"{path}: expected a list of detections, got {type(dets).__name__}")
        grouped: dict[int, list] = {}
        for i, det in enumerate(dets):
            where = (f"{path}: detection #{i} "
                     f"(det_id {det.get('det_id', '?') if isinstance(det, dict) else '?'})")
            _require(det, DETECTION_KEYS, where)
            grouped.setdefault(int(det["image_id"]), []).append(_box4(det["box"], f"{where}: 'box'"))
        missing = [i for i in image_ids if i not in grouped]
        if missing:
            raise RefCOCODataError(_missing_message("detections", path, missing, len(image_ids),
                                             "use the detections file made for these refs, or other boxes"))
        return cls({k: np.asarray(v, np.float32) for k, v in grouped.items()})

    def __call__(self, image_id: int) -> np.ndarray:
        return self.boxes[image_id]


@register_region_source("roi_store")
class StoreBoxes:
    """The boxes of an RoI store (`tools/extract_rois.py`), found by the numeric COCO image id (or the file
    stem a store written before that rule used; `e2e_vl.data.roi_records`)."""

    def __init__(self, store: Any, keys: dict[str, str]):
        self.store, self.keys = store, keys

    @classmethod
    def build(cls, inputs: RegionInputs, image_ids: Collection[int]) -> "StoreBoxes":
        from e2e_vl.data.roi_records import open_roi_store, require_roi_records

        if not inputs.roi_store:
            raise RefCOCODataError("region source 'roi_store' needs DATASETS.ROI_STORE "
                                   "(tools/extract_rois.py output)")
        store = open_roi_store(inputs.roi_store)
        return cls(store, require_roi_records(store, image_ids,
                                              f"{inputs.instances.path.parent} (refer images)"))

    def __call__(self, image_id: int) -> np.ndarray:
        return np.asarray(self.store[self.keys[str(image_id)]].boxes, np.float32).reshape(-1, 4)


def build_region_sources(names: Sequence[str], inputs: RegionInputs,
                         image_ids: Collection[int]) -> list[BoxSource]:
    unknown = [n for n in names if n not in REGION_SOURCES]
    if unknown or not names:
        raise RefCOCODataError(f"region sources must be some of {sorted(REGION_SOURCES)}, got {list(names)}")
    return [REGION_SOURCES[n](inputs, image_ids) for n in names]


# ---------------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------------
def encode_expressions(tokenizer, texts: Sequence[str], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """`[CLS] expression [SEP]` of each text (truncated to `max_tokens` word pieces), all segment 0; one
    tokenizer call for all of them (a data set's ~140k sentences tokenise in half the time)."""
    out = []
    for pieces in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        ids = [tokenizer.cls_token_id, *pieces[:max_tokens], tokenizer.sep_token_id]
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                    "token_type_ids": torch.zeros(len(ids), dtype=torch.long)})
    return out


def region_labels(candidates: torch.Tensor, target: Sequence[float]) -> torch.Tensor:
    """Float [K]: 1 where a candidate's IoU with the referred box exceeds POSITIVE_IOU, else 0."""
    return (box_iou(candidates, torch.tensor([target], dtype=candidates.dtype))[:, 0] > POSITIVE_IOU).float()


class RefCOCODataset(Dataset):
    """Items: one image with up to `sentences_per_item` of its sentences (0 = all), as a list of samples,
    so the detector runs once for them. A training flip (drawn per item from (seed, epoch, index), so a
    resumed run draws the same) mirrors image and boxes and swaps "left"/"right" in every sentence.

    Sample keys (see `e2e_vl.data.collate`): image, boxes (resized, box 0 the whole image), image_key,
    input_ids, token_type_ids, ref_labels (Float [K]), image_id."""

    def __init__(self, sentences: Sequence[RefSentence], instances: Instances, image_dir: str | os.PathLike,
                 sources: Sequence[BoxSource], tokenizer, transform: ResizeFlip, max_text_tokens: int = 40,
                 sentences_per_item: int = 1, seed: int = 0,
                 image_loader: Callable[[str], np.ndarray] | None = None):
        if not sentences:
            raise RefCOCODataError("no referring sentences to build a data set from")
        self.sentences = list(sentences)
        self.instances, self.image_dir, self.sources = instances, Path(image_dir), list(sources)
        self.tokenizer, self.transform, self.max_text_tokens = tokenizer, transform, max_text_tokens
        self.seed, self.epoch = seed, 0
        if image_loader is None:
            from detector.image_sources import load_image as image_loader
        self.image_loader = image_loader
        texts = sorted({s.text for s in self.sentences})
        self._encoded = dict(zip(texts, encode_expressions(tokenizer, texts, max_text_tokens)))
        self.items = items_by_image([s.image_id for s in self.sentences], sentences_per_item)
        self._check_image_files(sorted({s.image_id for s in self.sentences}))

    def _check_image_files(self, image_ids: Iterable[int]) -> None:
        ids = list(image_ids)
        missing = [i for i in ids if not self.image_path(i).is_file()]
        if missing:
            raise RefCOCODataError(_missing_message("file", self.image_dir, missing, len(ids),
                                             "point DATASETS.REFCOCO.IMAGE_DIR at the COCO train2014 images"))

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.instances.images[image_id]["file_name"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def item_sentences(self, index: int) -> list[int]:
        """Indices into `self.sentences` of item `index`'s samples, in sample order."""
        return self.items[index][1]

    def candidates(self, image_id: int) -> np.ndarray:
        """Float32 [K, 4] XYXY in original pixels: the whole image, then every source's boxes, clipped."""
        h, w = self.instances.image_size(image_id)
        boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32),
                                *(src(image_id) for src in self.sources)])
        return np.clip(boxes, 0, np.array([w, h, w, h], np.float32))

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        image_id, sentence_ids = self.items[index]
        path = self.image_path(image_id)
        image = self.image_loader(str(path))
        if tuple(image.shape[:2]) != self.instances.image_size(image_id):
            h, w = self.instances.image_size(image_id)
            raise RefCOCODataError(f"{path} is {image.shape[1]}x{image.shape[0]} but {self.instances.path} "
                                   f"says {w}x{h} for image_id {image_id}")
        original = torch.from_numpy(self.candidates(image_id))
        out = self.transform(image, original, None, random.Random(f"{self.seed}/{self.epoch}/{index}"))
        # items of an image flipped and resized alike share a slot
        key = (image_id, out.flipped, *out.image.shape[1:])
        sentences = [self.sentences[i] for i in sentence_ids]
        encoded = (encode_expressions(self.tokenizer, [swap_left_right(s.text) for s in sentences],
                                      self.max_text_tokens)
                   if out.flipped else [self._encoded[s.text] for s in sentences])
        return [{"image": out.image, "boxes": out.boxes, "image_key": key, **enc,
                 "ref_labels": region_labels(original, sent.box), "image_id": image_id}
                for sent, enc in zip(sentences, encoded)]


def build_refer_dataset(root: str | os.PathLike, dataset: str, split_by: str, splits: Sequence[str],
                        image_dir: str | os.PathLike, boxes: Sequence[str], tokenizer, transform: ResizeFlip,
                        *, detections: str = "", roi_store: str = "", max_text_tokens: int = 40,
                        sentences_per_item: int = 1, seed: int = 0, limit: int = 0) -> RefCOCODataset:
    """The sentences of `splits` of `<root>/<dataset>/refs(<split_by>).p` (the first `limit`, if > 0) with
    the candidate regions of the sources `boxes`, every record checked against every file before anything
    is trained."""
    folder = Path(root) / dataset
    instances = Instances.read(folder / "instances.json")
    refs_path = folder / f"refs({split_by}).p"
    sentences = refer_sentences(read_refs(refs_path), refs_path, instances, splits)
    if limit > 0:
        sentences = sentences[:limit]
    image_ids = sorted({s.image_id for s in sentences})
    sources = build_region_sources(boxes, RegionInputs(instances, detections, roi_store), image_ids)
    return RefCOCODataset(sentences, instances, image_dir, sources, tokenizer, transform, max_text_tokens,
                          sentences_per_item, seed)
