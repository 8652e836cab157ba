"""From DATASETS/TASK keys to the data sets, collate function and evaluator the loop needs."""
from __future__ import annotations

from pathlib import Path

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask

EASY_VQA = {"easy_vqa_train": "train", "easy_vqa_test": "test"}
EASY_VQA_REGIONS = {"easy_vqa_regions_train": "train", "easy_vqa_regions_test": "test"}
VQA_V2 = ("vqa_v2_train", "vqa_v2_val", "vqa_v2_test")


def _vqa_dataset(cfg: CfgNode, name: str, tokenizer, train: bool):
    d = cfg.DATASETS
    min_size = cfg.INPUT.MIN_SIZE_TRAIN[0] if train else cfg.INPUT.MIN_SIZE_TEST
    max_size = cfg.INPUT.MAX_SIZE_TRAIN if train else cfg.INPUT.MAX_SIZE_TEST
    per_item = cfg.DATALOADER.QUESTIONS_PER_IMAGE
    limit = d.TRAIN_LIMIT if train else d.TEST_LIMIT
    if name in EASY_VQA:
        from e2e_vl.data.easy_vqa import answer_vocab, build_easy_vqa

        ds = build_easy_vqa(EASY_VQA[name], tokenizer, min_size, max_size, d.MAX_QUESTION_TOKENS, per_item, limit)
        return ds, answer_vocab()
    if name in VQA_V2:
        from e2e_vl.data.roi_store import RoIStore
        from e2e_vl.data.vqa import CocoImageLoader, ImageQuestionsDataset, load_vqa_v2, read_answer_vocab

        for key in ("ANSWER_VOCAB", "ROI_STORE"):
            if not d[key]:
                raise ConfigError(f"'DATASETS.{key}' must be set for {name}")
        questions_key, ann_key, dir_key = (("QUESTIONS_TRAIN", "ANNOTATIONS_TRAIN", "IMAGE_DIR_TRAIN") if train
                                           else ("QUESTIONS_TEST", "ANNOTATIONS_TEST", "IMAGE_DIR_TEST"))
        root = Path(d.ROOT)
        vocab = read_answer_vocab(root / d.ANSWER_VOCAB)
        questions = load_vqa_v2(root / d[questions_key], (root / d[ann_key]) if d[ann_key] else None, vocab)
        if limit > 0:
            questions = questions[:limit]
        loader = CocoImageLoader(root / d[dir_key], RoIStore(root / d.ROI_STORE))
        ds = ImageQuestionsDataset(questions, loader, tokenizer, len(vocab), min_size, max_size,
                                   d.MAX_QUESTION_TOKENS, per_item)
        return ds, vocab
    raise ConfigError(f"unknown data set '{name}' in DATASETS; expected one of {[*EASY_VQA, *VQA_V2]}")


def _pretrain_task(cfg: CfgNode, tokenizer, device: torch.device, eval_only: bool) -> TrainTask:
    """Pre-training: captions with masked words and regions (mixed 1:1 with text-only passages when
    MODEL.VLBERT.PRETRAIN.TEXT_CORPUS is set); masked-word accuracy on PRETRAIN.VAL_CAPTIONS, if any."""
    from e2e_vl.data.captions import CaptionTextMix, build_pretrain_datasets, build_pretrain_val_dataset
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.evaluation.pretrain import PretrainEvaluator

    if not {"mlm", "mrc"} & set(cfg.MODEL.VLBERT.HEADS):
        raise ConfigError(f"TASK pretrain needs 'MODEL.VLBERT.HEADS' to include mlm or mrc, got "
                          f"{list(cfg.MODEL.VLBERT.HEADS)}")
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = None
    if not eval_only:
        captions, text = build_pretrain_datasets(cfg, tokenizer, seed=cfg.SEED)
        train_set = captions if text is None else CaptionTextMix(captions, text)
    val_set = build_pretrain_val_dataset(cfg, tokenizer)
    evaluate = None if val_set is None else PretrainEvaluator(
        val_set, collate, cfg.TEST.IMS_PER_BATCH, device, AMP_DTYPES[cfg.SOLVER.AMP.DTYPE],
        cfg.DATALOADER.NUM_WORKERS)
    metric = "mlm_accuracy" if "mlm" in cfg.MODEL.VLBERT.HEADS else "mrc_accuracy"
    return TrainTask(train_set, collate, evaluate, metric=metric)


def _regions_task(cfg: CfgNode, device: torch.device, eval_only: bool) -> TrainTask:
    """Detector-only region classification (the stand-in for the detector's own pre-training)."""
    from e2e_vl.data.collate import collate_region_samples
    from e2e_vl.data.easy_vqa import REGION_CLASSES, EasyVQARegions
    from e2e_vl.evaluation.regions import RegionEvaluator

    d = cfg.DATASETS
    for key, name in (("TRAIN", d.TRAIN), ("TEST", d.TEST)):
        if name and name not in EASY_VQA_REGIONS:
            raise ConfigError(f"'DATASETS.{key}' {name!r} is not a region data set; expected one of "
                              f"{list(EASY_VQA_REGIONS)}")
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(REGION_CLASSES):
        raise ConfigError(f"'MODEL.ROI_HEADS.NUM_CLASSES' must be {len(REGION_CLASSES)} (the easy-VQA "
                          f"colour-shape classes) for TASK regions, got {cfg.MODEL.ROI_HEADS.NUM_CLASSES}")
    train_set = None if eval_only else EasyVQARegions(EASY_VQA_REGIONS[d.TRAIN], cfg.INPUT.MIN_SIZE_TRAIN[0],
                                                      cfg.INPUT.MAX_SIZE_TRAIN, d.TRAIN_LIMIT)
    evaluate = None
    if d.TEST:
        test_set = EasyVQARegions(EASY_VQA_REGIONS[d.TEST], cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST,
                                  d.TEST_LIMIT)
        evaluate = RegionEvaluator(test_set, collate_region_samples, cfg.TEST.IMS_PER_BATCH, device,
                                   cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate_region_samples, evaluate, metric="region_accuracy")


def build_task(cfg: CfgNode, tokenizer, device: torch.device, eval_only: bool = False) -> TrainTask:
    """The task named by TASK. vqa: training items (images with their questions), VL-BERT collation, VQA
    accuracy; pretrain: see `_pretrain_task`; regions: see `_regions_task`."""
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.evaluation.vqa import VQAEvaluator

    if cfg.TASK == "pretrain":
        return _pretrain_task(cfg, tokenizer, device, eval_only)
    if cfg.TASK == "regions":
        return _regions_task(cfg, device, eval_only)
    if cfg.MODEL.VLBERT.NUM_ANSWERS < 1:
        raise ConfigError("'MODEL.VLBERT.NUM_ANSWERS' must be set for the VQA task")
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = None if eval_only else _vqa_dataset(cfg, cfg.DATASETS.TRAIN, tokenizer, train=True)[0]
    evaluate = None
    if cfg.DATASETS.TEST:
        test_set, answers = _vqa_dataset(cfg, cfg.DATASETS.TEST, tokenizer, train=False)
        if len(answers) != cfg.MODEL.VLBERT.NUM_ANSWERS:
            raise ConfigError(f"'MODEL.VLBERT.NUM_ANSWERS' is {cfg.MODEL.VLBERT.NUM_ANSWERS} but "
                              f"{cfg.DATASETS.TEST} has {len(answers)} answers")
        evaluate = VQAEvaluator(test_set, collate, cfg.TEST.IMS_PER_BATCH, device, AMP_DTYPES[cfg.SOLVER.AMP.DTYPE],
                                answers, Path(cfg.OUTPUT_DIR) / "predictions.json", cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate, evaluate, metric="accuracy")
