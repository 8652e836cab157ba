"""TASK regions: detector-only classification of labelled boxes (the stand-in for the detector's own
pre-training), trained by the architecture region_classifier."""
from __future__ import annotations

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

REGION_DATASETS = DatasetCatalog("region")


@REGION_DATASETS.register("easy_vqa_regions_train", "easy_vqa_regions_test")
def _easy_vqa_regions(name: str, sizes: tuple[int, int], limit: int):
    from e2e_vl.data.easy_vqa import EasyVQARegions

    return EasyVQARegions(name.rpartition("_")[2], *sizes, limit)


@register_task("regions", default_arch="region_classifier")
def build_regions_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.collate import collate_region_samples
    from e2e_vl.data.easy_vqa import REGION_CLASSES
    from e2e_vl.engine.trainer import TrainTask
    from e2e_vl.evaluation.regions import RegionEvaluator

    d = cfg.DATASETS
    for key, name in (("DATASETS.TRAIN", d.TRAIN), ("DATASETS.TEST", d.TEST)):
        if name:
            REGION_DATASETS.check(key, name)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(REGION_CLASSES):
        raise ConfigError(f"'MODEL.ROI_HEADS.NUM_CLASSES' must be {len(REGION_CLASSES)} (the easy-VQA "
                          f"colour-shape classes) for TASK regions, got {cfg.MODEL.ROI_HEADS.NUM_CLASSES}")
    train_set = None if eval_only else REGION_DATASETS.build(
        "DATASETS.TRAIN", d.TRAIN, (cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN), d.TRAIN_LIMIT)
    evaluate = None
    if d.TEST:
        test_set = REGION_DATASETS.build("DATASETS.TEST", d.TEST,
                                         (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST), d.TEST_LIMIT)
        evaluate = RegionEvaluator(test_set, collate_region_samples, cfg.TEST.IMS_PER_BATCH, device,
                                   [*REGION_CLASSES, "background"], cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate_region_samples, evaluate, metric="region_accuracy")
