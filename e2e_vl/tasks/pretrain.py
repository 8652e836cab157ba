"""TASK pretrain: captions with masked words and regions (mixed 1:1 with text-only passages when
DATASETS.TEXT_CORPUS is set, and with image questions when DATASETS.PRETRAIN_VQA is set); with the itm
head, MODEL.VL.PRETRAIN.MISMATCH_PROB of the captions are shown with another image. Masked-word
accuracy on DATASETS.TEST, if any.

Data sets `captions_train` and `captions_test` are the caption files DATASETS.CAPTIONS_TRAIN and
CAPTIONS_TEST under DATASETS.ROOT (`e2e_vl.data.captions`), joined with DATASETS.ROI_STORE. The objective
(masking rates, lengths, flips) is MODEL.VL.PRETRAIN's."""
from __future__ import annotations

import os

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

# Heads trained on caption-image pairs; a pre-training model needs one of them.
CAPTION_HEADS = ("mlm", "mrc", "itm", "mrc_kl", "obj_label", "feat_regression", "contrastive")
CAPTION_DATASETS = DatasetCatalog("caption")
# data set -> the DATASETS keys of its caption file and of the folder its image paths are relative to
CAPTION_FILES = {"captions_train": ("CAPTIONS_TRAIN", "CAPTIONS_IMAGE_DIR_TRAIN"),
                 "captions_test": ("CAPTIONS_TEST", "CAPTIONS_IMAGE_DIR_TEST")}

register_config("MODEL.VL", {
    # The pre-training objective (TASK pretrain); its data sets are named in DATASETS (TRAIN, TEST,
    # CAPTIONS_*, TEXT_CORPUS, PRETRAIN_VQA).
    "PRETRAIN": {
        "MLM_PROB": 0.15,  # per word, whole-word masking, 80% [MASK] / 10% random / 10% kept
        "MRC_PROB": 0.15,  # per region other than the whole image
        "MRC_MASK_FRAC": 0.9,  # of the chosen regions, masked (the rest are labelled but visible)
        "MAX_SEQ_LEN": 64,  # text + regions + [END]; regions with the lowest scores go first
        "MAX_TEXT_LEN": 40,
        "FLIP_PROB": 0.5,
        # With the itm head: the share of captions shown with another image (never their own).
        "MISMATCH_PROB": 0.5,
    },
}, owner=__name__)
register_config("DATASETS", {
    # Data set captions_train reads CAPTIONS_TRAIN, captions_test CAPTIONS_TEST, each a COCO captions .json
    # or an "image_path<TAB>caption" .tsv under ROOT whose image paths are relative to
    # CAPTIONS_IMAGE_DIR_TRAIN / _TEST (under ROOT; empty: a COCO json's own folder, a TSV's paths as
    # written); regions from ROI_STORE. Their own image folders, not IMAGE_DIR_*: a pre-training run may mix
    # in VQA v2 questions (PRETRAIN_VQA) whose COCO images lie there.
    "CAPTIONS_TRAIN": "",
    "CAPTIONS_TEST": "",
    "CAPTIONS_IMAGE_DIR_TRAIN": "",
    "CAPTIONS_IMAGE_DIR_TEST": "",
    # Optional text-only corpus (one passage per line, under ROOT): text-only MLM mixed 1:1 into the
    # caption batches (VL-BERT's).
    "TEXT_CORPUS": "",
    # Image questions mixed into the caption batches for the vqa head (LXMERT's image-QA task): a VQA
    # data set name (as DATASETS.TRAIN of TASK vqa: easy_vqa_train, vqa_v2_train, ...), one item of it
    # per caption; empty = none. PRETRAIN_VQA_LIMIT caps its questions (0 = all).
    "PRETRAIN_VQA": "",
    "PRETRAIN_VQA_LIMIT": 0,
}, owner=__name__)


@CAPTION_DATASETS.register(*CAPTION_FILES)
def _captions(name: str, cfg: CfgNode, tokenizer, train: bool, mismatch_prob: float = 0.0):
    """The caption file of `name`. As DATASETS.TRAIN: the INPUT training sizes, flips and masks drawn anew
    each epoch from SEED; as DATASETS.TEST: the test size, unflipped, masks of seed 0 at epoch 0, so every
    evaluation scores the same words and regions. `mismatch_prob`: image-text matching's share of captions
    shown with another image."""
    from e2e_vl.data.captions import CaptionPretrainDataset, read_captions
    from e2e_vl.data.roi_records import open_roi_store
    from e2e_vl.data.transforms import ResizeFlip

    d, p = cfg.DATASETS, cfg.MODEL.VL.PRETRAIN
    file_key, dir_key = CAPTION_FILES[name]
    if not d[file_key]:
        raise ConfigError(f"'DATASETS.{file_key}' is empty: {name} needs a COCO captions json or an "
                          "image_path<TAB>caption TSV file")
    if not d.ROI_STORE:
        raise ConfigError(f"'DATASETS.ROI_STORE' is empty: {name} needs the regions of tools/extract_rois.py")
    image_dir = _under_root(cfg, d[dir_key]) if d[dir_key] else None  # None: the reader's own default
    captions = read_captions(_under_root(cfg, d[file_key]), image_dir)
    limit = d.TRAIN_LIMIT if train else d.TEST_LIMIT
    captions = captions[:limit] if limit else captions
    if train:
        transform = ResizeFlip(list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN,
                               flip_prob=p.FLIP_PROB, swap_text_sides=True)
    else:
        transform = ResizeFlip(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return CaptionPretrainDataset(
        captions, open_roi_store(_under_root(cfg, d.ROI_STORE)), tokenizer, transform, mlm_prob=p.MLM_PROB,
        mrc_prob=p.MRC_PROB, mrc_mask_frac=p.MRC_MASK_FRAC, max_seq_len=p.MAX_SEQ_LEN,
        max_text_len=p.MAX_TEXT_LEN, seed=cfg.SEED if train else 0, mismatch_prob=mismatch_prob)


def _under_root(cfg: CfgNode, path: str) -> str:
    """`path` under DATASETS.ROOT (an absolute path as it is)."""
    return os.path.join(cfg.DATASETS.ROOT, path)


def _check_config(cfg: CfgNode, eval_only: bool) -> None:
    """Data set names, checked before any file is read."""
    from e2e_vl.tasks.vqa import VQA_DATASETS

    d = cfg.DATASETS
    if not eval_only:
        CAPTION_DATASETS.check("DATASETS.TRAIN", d.TRAIN)
    if d.TEST:
        CAPTION_DATASETS.check("DATASETS.TEST", d.TEST)
    if d.PRETRAIN_VQA and not eval_only:
        VQA_DATASETS.check("DATASETS.PRETRAIN_VQA", d.PRETRAIN_VQA)


@register_task("pretrain", default_arch="vlbert")
def build_pretrain_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.captions import PretrainMix, TextOnlyDataset
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.pretrain import PretrainEvaluator

    tokenizer, d, p = model.tokenizer, cfg.DATASETS, cfg.MODEL.VL.PRETRAIN
    if not set(CAPTION_HEADS) & set(model.heads):
        raise ConfigError(f"TASK pretrain needs a model with one of the heads {list(CAPTION_HEADS)}, "
                          f"got {list(model.heads)}")
    if ("vqa" in model.heads) != bool(d.PRETRAIN_VQA):
        raise ConfigError("TASK pretrain: the vqa head and 'DATASETS.PRETRAIN_VQA' go together (image QA as "
                          f"a pre-training task); got heads {list(model.heads)} and PRETRAIN_VQA "
                          f"{d.PRETRAIN_VQA!r}")
    _check_config(cfg, eval_only)
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = captions = None
    if not eval_only:
        mismatch = p.MISMATCH_PROB if "itm" in model.heads else 0.0
        captions = CAPTION_DATASETS.build("DATASETS.TRAIN", d.TRAIN, cfg, tokenizer, True, mismatch)
        text = TextOnlyDataset.from_file(_under_root(cfg, d.TEXT_CORPUS), tokenizer, mlm_prob=p.MLM_PROB,
                                         max_len=p.MAX_SEQ_LEN, seed=cfg.SEED) if d.TEXT_CORPUS else None
        others = [part for part in (text, _questions(cfg, model)) if part is not None]
        train_set = PretrainMix(captions, *others) if others else captions
    val_set = CAPTION_DATASETS.build("DATASETS.TEST", d.TEST, cfg, tokenizer, False) if d.TEST else None
    if "mrc" in model.heads:  # a mismatch would otherwise surface as a shape error at the first step
        for dataset in (captions, val_set):
            if dataset is not None:
                dataset.check_region_classes(cfg.MODEL.VL.NUM_MRC_CLASSES)
    evaluate = None if val_set is None else PretrainEvaluator(
        val_set, collate, cfg.TEST.IMS_PER_BATCH, device, AMP_DTYPES[cfg.SOLVER.AMP.DTYPE],
        cfg.DATALOADER.NUM_WORKERS)
    metric = "mlm_accuracy" if "mlm" in model.heads else "mrc_accuracy"
    return TrainTask(train_set, collate, evaluate, metric=metric)


def _questions(cfg: CfgNode, model):
    """DATASETS.PRETRAIN_VQA's training questions (None when unset), checked against the vqa head's
    answers."""
    from e2e_vl.tasks.vqa import VQA_DATASETS

    d = cfg.DATASETS
    if not d.PRETRAIN_VQA:
        return None
    sizes = (cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN)
    questions, answers = VQA_DATASETS.build("DATASETS.PRETRAIN_VQA", d.PRETRAIN_VQA, cfg, model.tokenizer,
                                            True, sizes, d.PRETRAIN_VQA_LIMIT)
    if len(answers) != model.heads["vqa"].num_answers:
        raise ConfigError(f"the vqa head has {model.heads['vqa'].num_answers} answers "
                          f"(MODEL.VL.NUM_ANSWERS) but DATASETS.PRETRAIN_VQA {d.PRETRAIN_VQA} has "
                          f"{len(answers)}")
    return questions
