"""TASK refcoco: RefCOCO+ referring expressions (`e2e_vl.data.refcoco`), a score per region from the `ref`
head (binary cross-entropy against IoU > 0.5 labels), grounding accuracy per split
(`e2e_vl.evaluation.refcoco`).

Data sets `<dataset>_<split>` read the refer layout under DATASETS.ROOT: refcoco+_train, refcoco+_val,
refcoco+_testA, refcoco+_testB, and refcoco+_val_testA_testB (the three evaluation splits at once, each
reported on its own). A dataset is one row of `REFER_DATASETS`."""
from __future__ import annotations

from pathlib import Path

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

# refer data set -> (split_by of its refs file, its splits; the first is the training split)
REFER_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "refcoco+": ("unc", ("train", "val", "testA", "testB")),
}
REFCOCO_DATASETS = DatasetCatalog("refer")

# RefCOCO+'s own keys (e2e_vl.data.refcoco): the refer layout under DATASETS.ROOT (refcoco+/refs(unc).p,
# refcoco+/instances.json) and the COCO images.
register_config("DATASETS.REFCOCO", {
    "IMAGE_DIR": "train2014",  # relative to DATASETS.ROOT; file names from instances.json
    # Candidate regions, concatenated in this order after the whole image: any of "gt" (the image's COCO
    # boxes), "detections" (DETECTIONS below), "roi_store" (DATASETS.ROI_STORE).
    "TRAIN_BOXES": ["gt"],
    "TEST_BOXES": ["gt"],
    # MAttNet's detections json (a list of {image_id, box: [x, y, w, h], ...}), under ROOT.
    "DETECTIONS": "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json",
    "FLIP_PROB": 0.5,  # training: mirror image and boxes, swap "left"/"right" in the sentence
    "MAX_TEXT_TOKENS": 40,  # word pieces of a referring sentence
}, owner=__name__)


def _names() -> list[str]:
    names = []
    for dataset, (_, splits) in REFER_DATASETS.items():
        names += [f"{dataset}_{s}" for s in splits] + [f"{dataset}_{'_'.join(splits[1:])}"]
    return names


@REFCOCO_DATASETS.register(*_names())
def _refer(name: str, cfg: CfgNode, tokenizer, train: bool):
    from e2e_vl.data.refcoco import build_refer_dataset
    from e2e_vl.data.transforms import ResizeFlip

    dataset, _, split_part = name.partition("_")
    d, r = cfg.DATASETS, cfg.DATASETS.REFCOCO
    root = Path(d.ROOT)
    transform = (ResizeFlip(list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, r.FLIP_PROB,
                            swap_text_sides=True)
                 if train else ResizeFlip(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST))
    return build_refer_dataset(
        root, dataset, REFER_DATASETS[dataset][0], split_part.split("_"), root / r.IMAGE_DIR,
        r.TRAIN_BOXES if train else r.TEST_BOXES, tokenizer, transform,
        detections=str(root / r.DETECTIONS) if r.DETECTIONS else "",
        roi_store=str(root / d.ROI_STORE) if d.ROI_STORE else "",
        max_text_tokens=r.MAX_TEXT_TOKENS, sentences_per_item=cfg.DATALOADER.QUESTIONS_PER_IMAGE,
        seed=cfg.SEED, limit=d.TRAIN_LIMIT if train else d.TEST_LIMIT)


def _check_config(cfg: CfgNode, eval_only: bool) -> None:
    """Names and region sources, checked before any file is read."""
    from e2e_vl.data.refcoco import REGION_SOURCES

    d = cfg.DATASETS
    for key, name in (("DATASETS.TRAIN", "" if eval_only else d.TRAIN), ("DATASETS.TEST", d.TEST)):
        if name:
            REFCOCO_DATASETS.check(key, name)
    for key in ("TRAIN_BOXES", "TEST_BOXES"):
        boxes = list(d.REFCOCO[key])
        if not boxes or set(boxes) - set(REGION_SOURCES):
            raise ConfigError(f"'DATASETS.REFCOCO.{key}' must list some of {sorted(REGION_SOURCES)}, got "
                              f"{boxes}")


@register_task("refcoco", default_arch="vlbert")
def build_refcoco_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.refcoco import RefCOCOEvaluator

    if "ref" not in model.heads:
        raise ConfigError("TASK refcoco needs a model with the ref head (MODEL.VL.HEADS), got "
                          f"{list(model.heads)}")
    _check_config(cfg, eval_only)
    tokenizer, d = model.tokenizer, cfg.DATASETS
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = None if eval_only else REFCOCO_DATASETS.build("DATASETS.TRAIN", d.TRAIN, cfg, tokenizer, True)
    evaluate = None
    if d.TEST:
        test_set = REFCOCO_DATASETS.build("DATASETS.TEST", d.TEST, cfg, tokenizer, False)
        out = Path(cfg.OUTPUT_DIR)
        evaluate = RefCOCOEvaluator(test_set, collate, cfg.TEST.IMS_PER_BATCH, device,
                                    AMP_DTYPES[cfg.SOLVER.AMP.DTYPE], out / f"{d.TEST}_predictions.json",
                                    out / f"{d.TEST}_metrics.json", cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate, evaluate, metric="accuracy")
