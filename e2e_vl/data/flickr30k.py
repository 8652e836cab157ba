"""Flickr30K Entities (Plummer et al.) phrase grounding from its official files
(github.com/BryanPlummer/flickr30k_entities).

Layout under the data root: `Sentences/<image id>.txt` (five captions, one a line, phrases marked
`[/EN#<chain id>/<type 1>/.../<type n> <words>]`; chain id 0 is "notvisual", never annotated),
`Annotations/<image id>.xml` (PASCAL-VOC-like: per `object`, one or more `name` tags holding chain ids and
either a `bndbox` (xmin, ymin, xmax, ymax, 1-based: the official reader subtracts 1) or the `nobndbox` /
`scene` flags), the split files `train.txt`, `val.txt`, `test.txt` (image ids) and the images
(`<image id>.jpg`).

A phrase is grounded, as in VisualBERT, by its word pieces scoring every candidate region; its target is
the union of its chain's boxes (the smallest box holding them all). Phrases of chain 0 and of chains
without a box (nobndbox, scene) are read but neither trained nor scored. Candidates are box 0 = the whole
image (read by the model, never ranked), then the RoI store's boxes for the image (detector proposals, as
VisualBERT used) or the annotation's own boxes ("gt").

Every file, line and phrase is checked when the data set is built, before training starts; a bad one stops
it with the file, the line and the problem.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from detector.image_sources import load_image
from detector.structures import box_iou
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.collate import collate_samples
from e2e_vl.data.transforms import ResizeFlip

SPLITS = ("train", "val", "test")
BOX_SOURCES = ("roi_store", "gt")
POSITIVE_IOU = 0.5  # a candidate overlapping the phrase's box this much is right (training and Recall@k)
_TAG = re.compile(r"^\[/EN#(\d+)((?:/[^/\s\]]+)+)$")


class Flickr30KDataError(DatasetError):
    """A Flickr30K Entities file, line or phrase that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Phrase:
    chain_id: str
    types: tuple[str, ...]
    first_word: int  # index of its first word in the caption's words
    num_words: int


@dataclasses.dataclass(frozen=True)
class Caption:
    image_id: str
    words: tuple[str, ...]
    phrases: tuple[Phrase, ...]
    where: str  # "<file>:<line>"


@dataclasses.dataclass
class ImageAnnotation:
    width: int
    height: int
    boxes: dict[str, list[list[float]]]  # chain id -> its boxes, XYXY 0-based pixels
    nobox: set[str]
    scene: set[str]

    def has_chain(self, chain_id: str) -> bool:
        return chain_id in self.boxes or chain_id in self.nobox or chain_id in self.scene

    def union_box(self, chain_id: str) -> list[float] | None:
        """The smallest box holding all of the chain's boxes, None without any."""
        boxes = self.boxes.get(chain_id)
        if not boxes:
            return None
        b = np.asarray(boxes, np.float64)
        return [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())]


def parse_caption(line: str, where: str, image_id: str) -> Caption:
    """One caption line: its words (markup removed) and its phrases; unclosed or malformed markup is an
    error naming `where`."""
    words: list[str] = []
    phrases: list[Phrase] = []
    open_tag: tuple[str, tuple[str, ...], int] | None = None
    for token in line.split():
        if open_tag is None and token.startswith("["):
            match = _TAG.match(token)
            if not match:
                raise Flickr30KDataError(f"{where}: {token!r} is not a phrase tag [/EN#<chain id>/<type>...")
            open_tag = (match.group(1), tuple(match.group(2).strip("/").split("/")), len(words))
            continue
        if open_tag is not None and token.startswith("[/EN#"):
            raise Flickr30KDataError(f"{where}: phrase [/EN#{open_tag[0]} ... does not close before "
                                     f"{token!r}")
        closes = open_tag is not None and token.endswith("]")
        words.append(token[:-1] if closes else token)
        if closes:
            chain_id, types, first = open_tag
            phrases.append(Phrase(chain_id, types, first, len(words) - first))
            open_tag = None
    if open_tag is not None:
        raise Flickr30KDataError(f"{where}: phrase [/EN#{open_tag[0]} ... does not close (no ']' before the "
                                 "end of the line)")
    return Caption(image_id, tuple(words), tuple(phrases), where)


def read_sentences(path: str | os.PathLike, image_id: str) -> list[Caption]:
    path = Path(path)
    if not path.is_file():
        raise Flickr30KDataError(f"sentence file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_caption(line, f"{path}:{n}", image_id) for n, line in enumerate(lines, 1) if line.strip()]


def read_annotation(path: str | os.PathLike) -> ImageAnnotation:
    """One annotation xml: size, boxes per chain id (1-based corners made 0-based, as the official reader
    does), the nobndbox and scene chain ids."""
    path = Path(path)
    if not path.is_file():
        raise Flickr30KDataError(f"annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise Flickr30KDataError(f"{path}: not an annotation xml with <size><width>/<height> "
                                 f"({exc})") from None
    ann = ImageAnnotation(width, height, {}, set(), set())
    for k, obj in enumerate(root.findall("object")):
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        if not names:
            raise Flickr30KDataError(f"{path}: object {k} has no <name> (chain id)")
        box = obj.find("bndbox")
        try:
            if box is not None:
                corners = [float(box.findtext(t)) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]
                for name in names:
                    ann.boxes.setdefault(name, []).append(corners)
                continue
            for tag, chains in (("nobndbox", ann.nobox), ("scene", ann.scene)):
                if int(obj.findtext(tag, "0")) > 0:
                    chains.update(names)
        except (TypeError, ValueError) as exc:
            raise Flickr30KDataError(f"{path}: object {k} (chain {names[0]}): bad number ({exc})") from None
    return ann


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise Flickr30KDataError(f"split file not found: {path}")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise Flickr30KDataError(f"{path}: no image ids")
    return ids


@dataclasses.dataclass(frozen=True)
class GroundedPhrase:
    """A phrase that is trained and scored: its caption, its place in it, its target (the union box)."""

    caption: int  # index into the data set's captions
    phrase: Phrase
    box: tuple[float, float, float, float]


def read_flickr30k(root: str | os.PathLike, split: str, limit: int = 0
                   ) -> tuple[list[Caption], dict[str, ImageAnnotation], list[GroundedPhrase]]:
    """The captions of `split`'s images (the first `limit` images, if > 0), their annotations, and the
    phrases with a box. A phrase whose chain the image's xml does not hold is an error naming the caption's
    file and line and the xml."""
    root = Path(root)
    image_ids = read_split(root, split)
    if limit > 0:
        image_ids = image_ids[:limit]
    captions: list[Caption] = []
    annotations: dict[str, ImageAnnotation] = {}
    grounded: list[GroundedPhrase] = []
    for image_id in image_ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        ann = annotations[image_id] = read_annotation(xml)
        for caption in read_sentences(root / "Sentences" / f"{image_id}.txt", image_id):
            for phrase in caption.phrases:
                if phrase.chain_id == "0":
                    continue
                if not ann.has_chain(phrase.chain_id):
                    raise Flickr30KDataError(f"{caption.where}: phrase /EN#{phrase.chain_id} is not an "
                                             f"entity of {xml}")
                box = ann.union_box(phrase.chain_id)
                if box is not None:
                    grounded.append(GroundedPhrase(len(captions), phrase, tuple(box)))
            captions.append(caption)
    return captions, annotations, grounded


def store_records(store: Any, image_ids: Sequence[str], source: str) -> dict[str, Any]:
    """Each image's record in the RoI store (keyed by the image id, the file stem): its boxes and, when
    the extraction kept them, the detector's scores (`object_conf`)."""
    from e2e_vl.data.roi_records import require_roi_records

    keys = require_roi_records(store, image_ids, source)
    return {i: store[keys[i]] for i in image_ids}


def store_boxes(records: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each image's boxes from its RoI store record (`store_records`)."""
    return {i: np.asarray(r.boxes, np.float32).reshape(-1, 4) for i, r in records.items()}


def gt_boxes(annotations: dict[str, ImageAnnotation]) -> dict[str, np.ndarray]:
    """Each image's annotated boxes, each once (a box of several chains is one candidate)."""
    out = {}
    for image_id, ann in annotations.items():
        unique = {tuple(b) for boxes in ann.boxes.values() for b in boxes}
        out[image_id] = np.asarray(sorted(unique), np.float32).reshape(-1, 4)
    return out


class Flickr30KDataset(Dataset):
    """Items: one caption with its image, as one sample carrying its grounded phrases (`phrase_tokens`:
    Bool [P, T], the word pieces of each phrase; `phrase_targets`: Float [P, K], 1 on the candidates
    overlapping the phrase's box with IoU >= 0.5). Captions without a grounded phrase are no item: they
    have nothing to train or score."""

    def __init__(self, captions: Sequence[Caption], annotations: dict[str, ImageAnnotation],
                 grounded: Sequence[GroundedPhrase], candidates: dict[str, np.ndarray],
                 image_dir: str | os.PathLike, tokenizer, transform: ResizeFlip, max_text_len: int = 80,
                 seed: int = 0):
        if not grounded:
            raise Flickr30KDataError("no phrase with a box to build a data set from")
        self.captions, self.annotations, self.candidate_boxes = list(captions), annotations, candidates
        self.image_dir, self.tokenizer, self.transform = Path(image_dir), tokenizer, transform
        self.max_text_len, self.seed, self.epoch = max_text_len, seed, 0
        by_caption: dict[int, list[int]] = {}
        for k, g in enumerate(grounded):
            by_caption.setdefault(g.caption, []).append(k)
        self.grounded, self.items = list(grounded), sorted(by_caption.items())
        missing = sorted({c.image_id for c in self.captions if not self.image_path(c.image_id).is_file()})
        if missing:
            raise Flickr30KDataError(f"{len(missing)} images are not under {self.image_dir} (e.g. "
                                     f"{missing[0]}.jpg)")

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def item_phrases(self, index: int) -> list[int]:
        """Indices into `self.grounded` of item `index`'s phrases, in the sample's order."""
        return self.items[index][1]

    def candidates(self, image_id: str) -> np.ndarray:
        """Float32 [K, 4] XYXY original pixels: the whole image, then the image's candidate boxes."""
        ann = self.annotations[image_id]
        whole = np.array([[0, 0, ann.width, ann.height]], np.float32)
        return np.concatenate([whole, self.candidate_boxes[image_id]])

    def _encode(self, caption: Caption, phrases: Sequence[Phrase]) -> tuple[list[int], torch.Tensor]:
        """`[CLS] caption [SEP]` (at most `max_text_len` word pieces) and each phrase's pieces [P, T]."""
        encoded = self.tokenizer(list(caption.words), is_split_into_words=True, add_special_tokens=False)
        pieces, word_ids = encoded["input_ids"][:self.max_text_len], encoded.word_ids()[:self.max_text_len]
        ids = [self.tokenizer.cls_token_id, *pieces, self.tokenizer.sep_token_id]
        mask = torch.zeros(len(phrases), len(ids), dtype=torch.bool)
        for p, phrase in enumerate(phrases):
            for t, w in enumerate(word_ids):
                mask[p, t + 1] = phrase.first_word <= w < phrase.first_word + phrase.num_words
        return ids, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        caption_index, phrase_ids = self.items[index]
        caption = self.captions[caption_index]
        image = load_image(str(self.image_path(caption.image_id)))
        ann = self.annotations[caption.image_id]
        if tuple(image.shape[:2]) != (ann.height, ann.width):
            raise Flickr30KDataError(f"{self.image_path(caption.image_id)} is {image.shape[1]}x"
                                     f"{image.shape[0]} but its annotation says {ann.width}x{ann.height}")
        original = torch.from_numpy(self.candidates(caption.image_id))
        out = self.transform(image, original, None, random.Random(f"{self.seed}/{self.epoch}/{index}"))
        phrases = [self.grounded[k] for k in phrase_ids]
        ids, mask = self._encode(caption, [g.phrase for g in phrases])
        targets = (box_iou(original.double(), torch.tensor([g.box for g in phrases], dtype=torch.float64))
                   >= POSITIVE_IOU).T.float()
        targets[:, 0] = 0.0  # the whole image is read, never a candidate
        return {"image": out.image, "boxes": out.boxes, "image_key": (caption.image_id, *out.image.shape[1:]),
                "image_id": caption.image_id, "input_ids": torch.tensor(ids),
                "token_type_ids": torch.zeros(len(ids), dtype=torch.long),
                "phrase_tokens": mask, "phrase_targets": targets}


class Flickr30KCollator:
    """`collate_samples`, plus the phrases of all samples flat: `phrase_sample` Long [P] (their sample),
    `phrase_tokens` Bool [P, T_max], `phrase_targets` Float [P, K_max] (padding: False / 0)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_samples(samples, self.pad_token_id)
        t_max, k_max = batch["input_ids"].shape[1], max(len(s["boxes"]) for s in samples)
        batch["phrase_sample"] = torch.cat([torch.full((len(s["phrase_tokens"]),), i, dtype=torch.long)
                                            for i, s in enumerate(samples)])
        batch["phrase_tokens"] = torch.cat([F.pad(s["phrase_tokens"],
                                                  (0, t_max - s["phrase_tokens"].shape[1]))
                                            for s in samples])
        batch["phrase_targets"] = torch.cat([F.pad(s["phrase_targets"],
                                                   (0, k_max - s["phrase_targets"].shape[1]))
                                             for s in samples])
        return batch
