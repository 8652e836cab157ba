"""TASK pretrain: captions with masked words and regions (mixed 1:1 with text-only passages when
MODEL.VLBERT.PRETRAIN.TEXT_CORPUS is set, and with image questions when PRETRAIN.VQA_DATASET is set);
with the itm head, PRETRAIN.MISMATCH_PROB of the captions are shown with another image. Masked-word
accuracy on PRETRAIN.VAL_CAPTIONS, if any."""
from __future__ import annotations

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.tasks import register_task

# Heads trained on caption-image pairs; a pre-training model needs one of them.
CAPTION_HEADS = ("mlm", "mrc", "itm", "mrc_kl", "obj_label", "feat_regression", "contrastive")


@register_task("pretrain", default_arch="vlbert", eval_key="MODEL.VLBERT.PRETRAIN.VAL_CAPTIONS")
def build_pretrain_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.captions import PretrainMix, build_pretrain_datasets, build_pretrain_val_dataset
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.pretrain import PretrainEvaluator

    tokenizer = model.tokenizer
    p = cfg.MODEL.VLBERT.PRETRAIN
    if not set(CAPTION_HEADS) & set(model.heads):
        raise ConfigError(f"TASK pretrain needs a model with one of the heads {list(CAPTION_HEADS)}, got {list(model.heads)}")
    if ("vqa" in model.heads) != bool(p.VQA_DATASET):
        raise ConfigError("TASK pretrain: the vqa head and 'MODEL.VLBERT.PRETRAIN.VQA_DATASET' go together (image QA "
                          f"as a pre-training task); got heads {list(model.heads)} and VQA_DATASET {p.VQA_DATASET!r}")
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = captions = None
    if not eval_only:
        mismatch = p.MISMATCH_PROB if "itm" in model.heads else 0.0
        captions, text = build_pretrain_datasets(cfg, tokenizer, seed=cfg.SEED, mismatch_prob=mismatch)
        others = [part for part in (text, _questions(cfg, model)) if part is not None]
        train_set = PretrainMix(captions, *others) if others else captions
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


def _questions(cfg: CfgNode, model):
    """PRETRAIN.VQA_DATASET's training questions (None when unset), checked against the vqa head's answers."""
    from e2e_vl.tasks.vqa import VQA_DATASETS

    p = cfg.MODEL.VLBERT.PRETRAIN
    if not p.VQA_DATASET:
        return None
    sizes = (cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN)
    questions, answers = VQA_DATASETS.build("MODEL.VLBERT.PRETRAIN.VQA_DATASET", p.VQA_DATASET, cfg, model.tokenizer,
                                            True, sizes, p.VQA_LIMIT)
    if len(answers) != model.heads["vqa"].num_answers:
        raise ConfigError(f"the vqa head has {model.heads['vqa'].num_answers} answers (MODEL.VLBERT.NUM_ANSWERS) but "
                          f"MODEL.VLBERT.PRETRAIN.VQA_DATASET {p.VQA_DATASET} has {len(answers)}")
    return questions
