"""TASK pretrain: captions with masked words and regions (mixed 1:1 with text-only passages when
MODEL.VLBERT.PRETRAIN.TEXT_CORPUS is set); masked-word accuracy on PRETRAIN.VAL_CAPTIONS, if any."""
from __future__ import annotations

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.tasks import register_task


@register_task("pretrain", default_arch="vlbert", eval_key="MODEL.VLBERT.PRETRAIN.VAL_CAPTIONS")
def build_pretrain_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.captions import CaptionTextMix, build_pretrain_datasets, build_pretrain_val_dataset
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.pretrain import PretrainEvaluator

    tokenizer = model.tokenizer
    if not {"mlm", "mrc"} & set(model.heads):
        raise ConfigError(f"TASK pretrain needs a model with the head mlm or mrc, got {list(model.heads)}")
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = captions = None
    if not eval_only:
        captions, text = build_pretrain_datasets(cfg, tokenizer, seed=cfg.SEED)
        train_set = captions if text is None else CaptionTextMix(captions, text)
    val_set = build_pretrain_val_dataset(cfg, tokenizer)
    if "mrc" in model.heads:  # a mismatch would otherwise surface as a shape error at the first step
        for dataset in (captions, val_set):
            if dataset is not None:
                dataset.check_region_classes(cfg.MODEL.VLBERT.NUM_MRC_CLASSES)
    evaluate = None if val_set is None else PretrainEvaluator(
        val_set, collate, cfg.TEST.IMS_PER_BATCH, device, AMP_DTYPES[cfg.SOLVER.AMP.DTYPE],
        cfg.DATALOADER.NUM_WORKERS)
    metric = "mlm_accuracy" if "mlm" in model.heads else "mrc_accuracy"
    return TrainTask(train_set, collate, evaluate, metric=metric)
