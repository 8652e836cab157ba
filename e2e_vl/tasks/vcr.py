"""TASK vcr: Visual Commonsense Reasoning from its released files (`e2e_vl.data.vcr`), VL-BERT's
per-choice head ("vcr"), Q->A / QA->R / Q->AR accuracy (`e2e_vl.evaluation.vcr`).

Data sets `vcr_train`, `vcr_val`, `vcr_test` are `<split>.jsonl` under DATASETS.ROOT; the images and
metadata files lie under DATASETS.IMAGE_DIR_TRAIN (training) / IMAGE_DIR_TEST (evaluation), relative to
the root. `vcr_test` has no labels: its evaluation writes the leaderboard file instead of accuracies."""
from __future__ import annotations

from pathlib import Path

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

VCR_DATASETS = DatasetCatalog("VCR")

# VCR's own keys: train.jsonl / val.jsonl / test.jsonl under DATASETS.ROOT, images and metadata json under
# DATASETS.IMAGE_DIR_TRAIN / IMAGE_DIR_TEST (vcr1images).
register_config("DATASETS.VCR", {
    # q2a (question -> answer) and/or qa2r (question + right answer -> rationale); both: one model for both,
    # and Q->AR accuracy from one evaluation.
    "SUBTASKS": ["q2a", "qa2r"],
    # Word pieces of question + answer (+ rationale) per sequence, special tokens not counted.
    "MAX_TEXT_LEN": 64,
    "FLIP_PROB": 0.0,  # training images mirrored (and "left"/"right" swapped in the text)
}, owner=__name__)


@VCR_DATASETS.register("vcr_train", "vcr_val", "vcr_test")
def _vcr(name: str, cfg: CfgNode, tokenizer, train: bool):
    from e2e_vl.data.transforms import ResizeFlip
    from e2e_vl.data.vcr import SUBTASKS, VCRDataset, read_vcr_jsonl

    d, v = cfg.DATASETS, cfg.DATASETS.VCR
    bad = [s for s in v.SUBTASKS if s not in SUBTASKS]
    if bad or not v.SUBTASKS:
        raise ConfigError(f"'DATASETS.VCR.SUBTASKS' must be some of {list(SUBTASKS)}, got {list(v.SUBTASKS)}")
    if v.MAX_TEXT_LEN < 2:
        raise ConfigError(f"'DATASETS.VCR.MAX_TEXT_LEN' must be >= 2, got {v.MAX_TEXT_LEN}")
    root = Path(d.ROOT)
    split = name.removeprefix("vcr_")
    path = root / f"{split}.jsonl"
    records = read_vcr_jsonl(path, labelled=split != "test")
    limit = d.TRAIN_LIMIT if train else d.TEST_LIMIT
    if limit > 0:
        records = records[:limit]
    if train:
        transform = ResizeFlip(list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, v.FLIP_PROB,
                               swap_text_sides=True)
    else:
        transform = ResizeFlip(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image_dir = root / (d.IMAGE_DIR_TRAIN if train else d.IMAGE_DIR_TEST)
    return VCRDataset(records, image_dir, tokenizer, transform, v.SUBTASKS, v.MAX_TEXT_LEN, source=str(path),
                      seed=cfg.SEED)


@register_task("vcr", default_arch="vlbert")
def build_vcr_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.data.vcr import SUBTASKS
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.vcr import VCREvaluator

    if "vcr" not in model.heads:
        raise ConfigError("TASK vcr needs a model with the vcr head (MODEL.VL.HEADS), got "
                          f"{list(model.heads)}")
    collate = VLCollator(pad_token_id=model.tokenizer.pad_token_id)
    train_set = None if eval_only else VCR_DATASETS.build("DATASETS.TRAIN", cfg.DATASETS.TRAIN, cfg,
                                                          model.tokenizer, True)
    evaluate = None
    if cfg.DATASETS.TEST:
        test_set = VCR_DATASETS.build("DATASETS.TEST", cfg.DATASETS.TEST, cfg, model.tokenizer, False)
        evaluate = VCREvaluator(test_set, collate, cfg.TEST.IMS_PER_BATCH, device,
                                AMP_DTYPES[cfg.SOLVER.AMP.DTYPE], cfg.OUTPUT_DIR,
                                cfg.DATASETS.TEST.removeprefix("vcr_"), cfg.DATALOADER.NUM_WORKERS)
    subtasks = list(cfg.DATASETS.VCR.SUBTASKS)
    metric = "q2ar_accuracy" if set(subtasks) == set(SUBTASKS) else f"{subtasks[0]}_accuracy"
    return TrainTask(train_set, collate, evaluate, metric=metric)
