"""Joining a data set's images with the RoI store, checked once in the main process before training.

`require_roi_records` is the one check every task reader calls (VQA v2, pre-training captions, and any
reader of COCO-based data): it finds every image's record among the store's keys, or stops with how
many are missing, a few of them, and the extraction command that adds them. Image ids follow
`detector.image_sources` (COCO file names and json: the numeric id). Stores written before that rule
(COCO images keyed by file stem, `COCO_train2014_000000000856`) are still read: a data-set id that is
not a key is looked up under the stem keys that map to it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

from detector.image_sources import image_id_from_stem
from e2e_vl.data.catalog import DatasetError

logger = logging.getLogger(__name__)

EXTRACT_COMMAND = ("python tools/extract_rois.py --config-file <detector yaml> --weights <detector weights> "
                   "--input <image folders or COCO json> --output <the store>")
_EXAMPLES = 5


class MissingRoIRecordsError(DatasetError):
    """Images of a data set without a record in the RoI store."""


def open_roi_store(path: str | os.PathLike, key: str = "DATASETS.ROI_STORE"):
    """`RoIStore(path)`, or a DatasetError naming the config key when it is not an RoI store."""
    from detector.roi_store import RoIStore, RoIStoreError

    try:
        return RoIStore(path)
    except RoIStoreError as exc:
        raise DatasetError(f"{key}: {exc}; write it with {EXTRACT_COMMAND}") from None


def store_keys(store: Any) -> list[str]:
    """The image ids held by an `RoIStore` (keys only, no record is read) or by a mapping id -> record."""
    keys = store.ids() if hasattr(store, "ids") else list(store.keys())
    return [str(k) for k in keys]


def describe_store(store: Any) -> str:
    paths = getattr(store, "paths", None)
    return "the RoI store " + (", ".join(str(p) for p in paths) if paths else f"({type(store).__name__})")


def require_roi_records(store: Any, image_ids: Iterable[Any], dataset: str) -> dict[str, str]:
    """Map every image id of `dataset` (a name for messages, e.g. its file) to its key in `store`.

    Raises MissingRoIRecordsError with the count of images without a record, a few examples, a few of
    the store's keys (a different id scheme shows at a glance) and the extraction command that adds
    them (re-running it on an existing store only processes what is missing).
    """
    wanted = list(dict.fromkeys(str(i) for i in image_ids))
    keys = store_keys(store)
    present = set(keys)
    legacy: dict[str, str] = {}
    for key in keys:
        image_id = image_id_from_stem(key)
        if image_id != key:
            legacy.setdefault(image_id, key)
    found: dict[str, str] = {}
    missing: list[str] = []
    for image_id in wanted:
        key = image_id if image_id in present else legacy.get(image_id)
        if key is None:
            missing.append(image_id)
        else:
            found[image_id] = key
    if missing:
        sample = ", ".join(repr(k) for k in keys[:_EXAMPLES]) or "none: it is empty"
        raise MissingRoIRecordsError(
            f"{dataset}: {len(missing)} of {len(wanted)} images have no record in {describe_store(store)} "
            f"(e.g. image ids {', '.join(repr(m) for m in missing[:_EXAMPLES])}; the store's keys look like "
            f"{sample}). Extract their regions first: {EXTRACT_COMMAND}")
    aliased = sum(found[i] != i for i in found)
    if aliased:
        logger.info("%s: %d images found under file-stem keys of a store written before COCO images were "
                    "keyed by numeric id", dataset, aliased)
    return found

