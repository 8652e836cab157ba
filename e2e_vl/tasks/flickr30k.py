"""TASK flickr30k: Flickr30K Entities phrase grounding from its official files (`e2e_vl.data.flickr30k`),
the phrase head (`e2e_vl.modeling.flickr30k_heads`), Recall@1/5/10 and the upper bound per split
(`e2e_vl.evaluation.flickr30k`).

Data sets `flickr30k_train`, `flickr30k_val`, `flickr30k_test` are the image ids of `<split>.txt` under
DATASETS.ROOT, with `Sentences/` and `Annotations/` beside them; the images (`<id>.jpg`) lie under
DATASETS.IMAGE_DIR_TRAIN / IMAGE_DIR_TEST and the detector's boxes in DATASETS.ROI_STORE (relative to the
root)."""
from __future__ import annotations

from pathlib import Path

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

FLICKR30K_DATASETS = DatasetCatalog("Flickr30K Entities")

register_config("DATASETS.FLICKR30K", {
    # The candidate regions of training / evaluation: "roi_store" (the detector's boxes in
    # DATASETS.ROI_STORE, as VisualBERT used proposals) or "gt" (the annotation's own boxes).
    "TRAIN_BOXES": "roi_store",
    "TEST_BOXES": "roi_store",
    "MAX_TEXT_LEN": 80,  # word pieces of a caption, special tokens not counted
}, owner=__name__)


@FLICKR30K_DATASETS.register("flickr30k_train", "flickr30k_val", "flickr30k_test")
def _flickr30k(name: str, cfg: CfgNode, tokenizer, train: bool):
    from e2e_vl.data.flickr30k import Flickr30KDataset, gt_boxes, read_flickr30k, store_boxes, store_records
    from e2e_vl.data.roi_records import open_roi_store
    from e2e_vl.data.transforms import ResizeFlip

    d, f = cfg.DATASETS, cfg.DATASETS.FLICKR30K
    root = Path(d.ROOT)
    split = name.removeprefix("flickr30k_")
    captions, annotations, grounded = read_flickr30k(root, split, d.TRAIN_LIMIT if train else d.TEST_LIMIT)
    if (f.TRAIN_BOXES if train else f.TEST_BOXES) == "gt":
        candidates = gt_boxes(annotations)
    else:
        candidates = store_boxes(store_records(open_roi_store(root / d.ROI_STORE), sorted(annotations),
                                               f"{root / split}.txt (Flickr30K images)"))
    transform = (ResizeFlip(list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN) if train
                 else ResizeFlip(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST))
    image_dir = root / (d.IMAGE_DIR_TRAIN if train else d.IMAGE_DIR_TEST)
    return Flickr30KDataset(captions, annotations, grounded, candidates, image_dir, tokenizer, transform,
                            f.MAX_TEXT_LEN, cfg.SEED)


def _check_config(cfg: CfgNode, eval_only: bool) -> None:
    """Names, box sources and sizes, checked before any file is read."""
    from e2e_vl.data.flickr30k import BOX_SOURCES

    d, f = cfg.DATASETS, cfg.DATASETS.FLICKR30K
    for key, name in (("DATASETS.TRAIN", "" if eval_only else d.TRAIN), ("DATASETS.TEST", d.TEST)):
        if name:
            FLICKR30K_DATASETS.check(key, name)
    for key in ("TRAIN_BOXES", "TEST_BOXES"):
        if f[key] not in BOX_SOURCES:
            raise ConfigError(f"'DATASETS.FLICKR30K.{key}' must be one of {list(BOX_SOURCES)}, got "
                              f"{f[key]!r}")
        if f[key] == "roi_store" and not d.ROI_STORE:
            raise ConfigError(f"'DATASETS.FLICKR30K.{key}' roi_store needs DATASETS.ROI_STORE "
                              "(tools/extract_rois.py output); it is empty")
    if f.MAX_TEXT_LEN < 1:
        raise ConfigError(f"'DATASETS.FLICKR30K.MAX_TEXT_LEN' must be >= 1, got {f.MAX_TEXT_LEN}")


@register_task("flickr30k", default_arch="visualbert")
def build_flickr30k_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.flickr30k import Flickr30KCollator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.flickr30k import Flickr30KEvaluator

    if "phrase" not in model.heads:
        raise ConfigError("TASK flickr30k needs a model with the phrase head (MODEL.VL.HEADS), got "
                          f"{list(model.heads)}")
    _check_config(cfg, eval_only)
    d = cfg.DATASETS
    collate = Flickr30KCollator(model.tokenizer.pad_token_id)
    train_set = None if eval_only else FLICKR30K_DATASETS.build("DATASETS.TRAIN", d.TRAIN, cfg,
                                                                model.tokenizer, True)
    evaluate = None
    if d.TEST:
        test_set = FLICKR30K_DATASETS.build("DATASETS.TEST", d.TEST, cfg, model.tokenizer, False)
        evaluate = Flickr30KEvaluator(test_set, collate, cfg.TEST.IMS_PER_BATCH, device,
                                      AMP_DTYPES[cfg.SOLVER.AMP.DTYPE], cfg.OUTPUT_DIR,
                                      d.TEST.removeprefix("flickr30k_"), cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate, evaluate, metric="recall@1")
