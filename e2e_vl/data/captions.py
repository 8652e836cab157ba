"""Pre-training data: image captions joined with the RoI store, and a text-only corpus.

Caption sources: COCO captions json (via pycocotools; image id = the COCO id) and Conceptual-Captions-style
TSV lines `image_path<TAB>caption` (image id = `detector.image_sources.image_id_from_path`: the COCO id
of a COCO file name, else the file stem), the ids the RoI extractor gives the same images. Each caption
is joined with its image's RoI record (`detector.roi_store.RoIStore`, or any mapping id -> RoIRecord) by
image id, checked when the data set is built (`e2e_vl.data.roi_records.require_roi_records`).

A sample (see `e2e_vl.data.collate`) gets: the resized (and possibly flipped) image, box 0 = the whole
image followed by the stored boxes (the highest-scoring ones that fit the sequence budget), whole-word
MLM masking of the caption, and masked-RoI-classification targets = the stored class distributions.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detector.image_sources import TAR_SEPARATOR, image_id_from_path
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.masking import mask_whole_words, select_masked_regions
from e2e_vl.data.roi_records import describe_store, require_roi_records
from e2e_vl.data.transforms import ResizeFlip


class CaptionDataError(DatasetError):
    """A caption file that cannot be read, or a caption that cannot be joined with its regions."""


@dataclasses.dataclass(frozen=True)
class Caption:
    image_id: str
    text: str
    path: str | None = None  # image file; None: use the RoI record's path
    source: str = ""  # "file:line" for error messages


def read_coco_captions(
    annotation_file: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> list[Caption]:
    """COCO captions json (`captions_train2017.json`): one Caption per annotation, in annotation id order.

    `image_root` (default: the json's folder) is joined with each image's `file_name`."""
    from pycocotools.coco import COCO

    path = os.fspath(annotation_file)
    if not os.path.isfile(path):
        raise CaptionDataError(f"caption file not found: {path}")
    try:
        coco = COCO(path)
    except Exception as exc:  # pycocotools raises assorted errors on bad files
        raise CaptionDataError(f"{path}: not a readable COCO captions json: {exc}") from None
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(path)
    captions = []
    for ann_id in sorted(coco.anns):
        ann = coco.anns[ann_id]
        if "caption" not in ann or "image_id" not in ann:
            raise CaptionDataError(f"{path}: annotation {ann_id} lacks 'caption' or 'image_id'")
        info = coco.imgs.get(ann["image_id"], {})
        image_path = os.path.join(root, info["file_name"]) if "file_name" in info else None
        captions.append(
            Caption(str(ann["image_id"]), ann["caption"].strip(), image_path, f"{path}:ann {ann_id}")
        )
    return captions


def read_tsv_captions(
    tsv_file: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> list[Caption]:
    """`image_path<TAB>caption` per line (Conceptual Captions style); relative paths are under
    `image_root`."""
    path = os.fspath(tsv_file)
    if not os.path.isfile(path):
        raise CaptionDataError(f"caption file not found: {path}")
    captions = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise CaptionDataError(f"{path}:{line_no}: expected 'image_path<TAB>caption', got {row!r}")
            image_path = row[0].strip()
            if image_root is not None and not os.path.isabs(image_path):
                image_path = os.path.join(os.fspath(image_root), image_path)
            image_id = image_id_from_path(image_path)
            captions.append(Caption(image_id, row[1].strip(), image_path, f"{path}:{line_no}"))
    return captions


def read_captions(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Caption]:
    """COCO json (`.json`) or TSV (anything else)."""
    if os.fspath(path).endswith(".json"):
        return read_coco_captions(path, image_root)
    return read_tsv_captions(path, image_root)


class CaptionPretrainDataset(Dataset):
    """Captions + regions -> VL-BERT pre-training samples (MLM with visual clues, masked RoI classification).

    Randomness (flip, masking) comes from a `random.Random` seeded by (seed, epoch, index): a sample is
    reproducible, which exact resume needs; call `set_epoch` to draw new masks each epoch.

    Image-text matching (`mismatch_prob` > 0): caption i is shown with another caption's image with that
    probability, drawn from its own stream seeded by (seed, epoch, index) (`image_index`), never with an
    image of the same id; such a sample has `itm_labels` 0 and neither masked words nor masked regions
    (VisualBERT, ViLBERT and LXMERT apply their masked-modelling losses to matched pairs only); matched
    samples have `itm_labels` 1.
    `image_loader(path) -> HxWx3 uint8` defaults to the RoI extractor's decoder, so images are read the
    way they were when the boxes were extracted.
    """

    def __init__(
        self,
        captions: Sequence[Caption],
        regions: Mapping[str, Any],
        tokenizer,
        transform: ResizeFlip,
        *,
        mlm_prob: float = 0.15,
        mrc_prob: float = 0.15,
        mrc_mask_frac: float = 0.9,
        max_seq_len: int = 64,
        max_text_len: int = 40,
        seed: int = 0,
        image_loader=None,
        check_regions: bool = True,
        mismatch_prob: float = 0.0,
    ):
        self.captions = list(captions)
        self.regions = regions
        self.tokenizer = tokenizer
        self.transform = transform
        self.mlm_prob, self.mrc_prob, self.mrc_mask_frac = mlm_prob, mrc_prob, mrc_mask_frac
        self.max_seq_len, self.max_text_len = max_seq_len, max_text_len
        if max_seq_len < max_text_len + 2:
            raise ValueError(
                f"max_seq_len ({max_seq_len}) must leave room for the whole-image box and [END] "
                f"after max_text_len ({max_text_len}) tokens"
            )
        self.seed = seed
        self.epoch = 0
        if not 0.0 <= mismatch_prob < 1.0:
            raise ValueError(f"mismatch_prob must be in [0, 1), got {mismatch_prob}")
        self.mismatch_prob = mismatch_prob
        if mismatch_prob > 0 and len({c.image_id for c in self.captions}) < 2:
            raise CaptionDataError(f"image-text matching needs captions of at least two images; "
                                   f"{_describe_sources(self.captions)} has {len(self.captions)} captions of "
                                   "one")
        if image_loader is None:
            from detector.image_sources import load_image as image_loader
        self.image_loader = image_loader
        self.special_ids = list(tokenizer.all_special_ids)
        self._keys: dict[str, str] = {}  # image id -> RoI store key, where they differ (older stores)
        if check_regions:
            self.check_regions()

    def check_regions(self) -> None:
        """Fail early, with the count and examples, if any caption's image has no RoI record or no file
        (found here, in the main process, rather than mid-run inside a DataLoader worker)."""
        files = _describe_sources(self.captions)
        keys = require_roi_records(self.regions, (c.image_id for c in self.captions), files)
        self._keys = {i: k for i, k in keys.items() if i != k}
        paths = dict.fromkeys(c.path.split(TAR_SEPARATOR, 1)[0] for c in self.captions if c.path)
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise CaptionDataError(
                f"{files}: {len(missing)} of {len(paths)} image files do not exist (e.g. "
                f"{', '.join(missing[:3])}); check DATASETS.CAPTIONS_IMAGE_DIR_TRAIN / _TEST")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def aspect_ratios(self) -> list[float]:
        """width / height of each caption's image (for `AspectRatioGroupedBatchSampler`)."""
        out = []
        for caption in self.captions:
            record = self._record(caption)
            out.append(record.width / record.height)
        return out

    def check_region_classes(self, num_classes: int, key: str = "MODEL.VL.NUM_MRC_CLASSES") -> None:
        """Fail before training if the stored class distributions (the masked-RoI targets) are not
        `num_classes` wide; one store comes from one detector, so the first caption's record speaks for
        all."""
        if not self.captions:
            return
        record = self._record(self.captions[0])
        if record.class_probs is None:
            raise CaptionDataError(f"{describe_store(self.regions)}: image {record.image_id!r} has no class "
                                   f"distributions, which masked RoI classification ({key}) needs")
        width = int(np.asarray(record.class_probs).shape[-1])
        if width != num_classes:
            raise CaptionDataError(
                f"{key} is {num_classes} but {describe_store(self.regions)} holds class distributions over "
                f"{width} classes (image {record.image_id!r}); set {key} {width} or use the store of a "
                f"{num_classes}-class detector")

    def _record(self, caption: Caption):
        try:
            return self.regions[self._keys.get(caption.image_id, caption.image_id)]
        except KeyError:
            raise CaptionDataError(_missing_message(caption)) from None

    def image_index(self, index: int) -> int:
        """The caption whose image caption `index` is shown with this epoch: `index` itself, or with
        probability `mismatch_prob` another caption's, of a different image id (deterministic in (seed,
        epoch, index): uniform draws until one differs, then the next such caption after the last draw)."""
        if self.mismatch_prob <= 0:
            return index
        rng = random.Random(f"itm/{self.seed}/{self.epoch}/{index}")
        if rng.random() >= self.mismatch_prob:
            return index
        own, n = self.captions[index].image_id, len(self.captions)
        for _ in range(16):
            other = rng.randrange(n)
            if self.captions[other].image_id != own:
                return other
        return next(k % n for k in range(other, other + n) if self.captions[k % n].image_id != own)

    def __getitem__(self, index: int) -> dict[str, Any]:
        caption = self.captions[index]
        shown = self.image_index(index)
        matched = shown == index
        image_caption = self.captions[shown]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        record = self._record(image_caption)
        image = self.image_loader(image_caption.path or record.path)
        if tuple(image.shape[:2]) != (record.height, record.width):
            raise CaptionDataError(
                f"image {image_caption.image_id!r} ({image_caption.path or record.path}) is "
                f"{image.shape[1]}x{image.shape[0]} "
                f"but its RoI record says {record.width}x{record.height}"
            )

        encoded = self.tokenizer(caption.text, truncation=True, max_length=self.max_text_len)
        budget = self.max_seq_len - len(encoded["input_ids"]) - 2  # whole-image box and [END]
        keep = _top_boxes(record, budget)
        whole = np.array([[0.0, 0.0, record.width, record.height]], dtype=np.float32)
        boxes = torch.from_numpy(np.concatenate([whole, np.asarray(record.boxes, np.float32)[keep]]))
        out = self.transform(image, boxes, caption.text, rng)
        if out.text != caption.text:  # flipped: the text changed ("left" <-> "right"), re-encode it
            encoded = self.tokenizer(out.text, truncation=True, max_length=self.max_text_len)
        ids, labels = _mask_words(self.tokenizer, self.special_ids, encoded, rng,
                                  self.mlm_prob if matched else 0.0)
        labelled, masked = select_masked_regions(
            len(boxes), rng=rng, prob=self.mrc_prob if matched else 0.0, mask_frac=self.mrc_mask_frac
        )
        sample = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "token_type_ids": torch.zeros(len(ids), dtype=torch.long),
            "mlm_labels": torch.tensor(labels, dtype=torch.long),
            "image": out.image,
            "boxes": out.boxes,
            "region_masked": masked,
            "image_id": image_caption.image_id,
            "itm_labels": int(matched),
        }
        if record.class_probs is not None:
            probs = torch.from_numpy(np.asarray(record.class_probs, dtype=np.float32)[keep])
            sample["mrc_targets"] = torch.cat([torch.zeros(1, probs.shape[1]), probs])
            sample["region_labelled"] = labelled
        return sample


class TextOnlyDataset(Dataset):
    """Text-only MLM samples (one passage per line of a text file), mixed into pre-training batches."""

    def __init__(
        self, lines: Sequence[str], tokenizer, *, mlm_prob: float = 0.15, max_len: int = 64, seed: int = 0
    ):
        self.lines = [line.strip() for line in lines if line.strip()]
        self.tokenizer = tokenizer
        self.mlm_prob = mlm_prob
        self.max_len = max_len
        self.seed = seed
        self.epoch = 0
        self.special_ids = list(tokenizer.all_special_ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer, **kwargs) -> "TextOnlyDataset":
        if not os.path.isfile(path):
            raise CaptionDataError(f"text corpus not found: {os.fspath(path)}")
        with open(path, encoding="utf-8") as f:
            return cls(f.readlines(), tokenizer, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"text/{self.seed}/{self.epoch}/{index}")
        encoded = self.tokenizer(self.lines[index], truncation=True, max_length=self.max_len)
        ids, labels = _mask_words(self.tokenizer, self.special_ids, encoded, rng, self.mlm_prob)
        return {
            "input_ids": torch.tensor(ids),
            "token_type_ids": torch.zeros(len(ids), dtype=torch.long),
            "mlm_labels": torch.tensor(labels),
        }


class PretrainMix(Dataset):
    """Item i = caption i mod Nc followed by item i mod N of each other data set (text-only passages:
    VL-BERT's 1:1 mix; image questions: LXMERT's image QA), list items flattened, so every training step
    pairs each image caption with the others while a batch still counts caption items; an epoch runs over
    the largest set and cycles the smaller ones."""

    def __init__(self, captions: CaptionPretrainDataset, *others: Dataset):
        sizes = [len(captions), *(len(o) for o in others)]
        if not others or 0 in sizes:
            raise CaptionDataError(f"cannot mix data sets of sizes {sizes} (captions first)")
        self.parts = (captions, *others)

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(p) for p in self.parts)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        samples: list[dict[str, Any]] = []
        for part in self.parts:
            item = part[index % len(part)]
            samples.extend(item if isinstance(item, list) else [item])
        return samples


def _top_boxes(record, budget: int) -> np.ndarray:
    """Indices of the stored boxes that fit `budget`, dropping the lowest-scoring first (order kept)."""
    num = record.num_boxes
    if budget >= num:
        return np.arange(num)
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    scores = record.object_conf if record.object_conf is not None and len(record.object_conf) == num else None
    if scores is None:
        return np.arange(budget)
    return np.sort(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:budget])


def _describe_sources(captions: Sequence[Caption]) -> str:
    """The caption files of `captions`, for messages."""
    return ", ".join(sorted({c.source.rsplit(":", 1)[0] for c in captions if c.source})) or "captions"


def _missing_message(caption: Caption) -> str:
    return (
        f"caption at {caption.source or '?'}: image id {caption.image_id!r} has no RoI record in the store "
        f"(extract its regions with tools/extract_rois.py, or drop the caption)"
    )


def _mask_words(tokenizer, special_ids: list[int], encoded, rng: random.Random,
                prob: float) -> tuple[list[int], list[int]]:
    """Whole-word masking of one tokenizer output: the text MLM of captions and text-only passages alike."""
    return mask_whole_words(encoded["input_ids"], encoded.word_ids(), mask_token_id=tokenizer.mask_token_id,
                            vocab_size=len(tokenizer), special_ids=special_ids, rng=rng, prob=prob)
