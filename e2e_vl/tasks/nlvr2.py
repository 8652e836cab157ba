"""TASK nlvr2: NLVR2 from its official files (`e2e_vl.data.nlvr2`), true/false for a sentence about a pair
of images, accuracy and consistency per split and the leaderboard's prediction file
(`e2e_vl.evaluation.nlvr2`).

Data sets `nlvr2_train`, `nlvr2_dev`, `nlvr2_test1` are `<split>.json` under DATASETS.ROOT; the images lie
under DATASETS.IMAGE_DIR_TRAIN (training) / IMAGE_DIR_TEST (evaluation) and their regions in
DATASETS.ROI_STORE (all relative to the root). The
pair format follows the model's head (MODEL.VL.HEADS, `e2e_vl.modeling.nlvr2_heads`): "nlvr2" is
VisualBERT's joint sequence (an architecture that reads image pairs), "nlvr2_pair" LXMERT's two encodings
(any architecture)."""
from __future__ import annotations

from pathlib import Path

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

NLVR2_DATASETS = DatasetCatalog("NLVR2")
HEAD_FORMATS = {"nlvr2": "joint", "nlvr2_pair": "separate"}

# NLVR2's own keys; the files and folders are DATASETS' (the images are found by file name at any depth
# below IMAGE_DIR_TRAIN / IMAGE_DIR_TEST: the official training images come in numbered sub-folders).
register_config("DATASETS.NLVR2", {
    "MAX_TEXT_LEN": 40,  # word pieces of a sentence, special tokens not counted
}, owner=__name__)


@NLVR2_DATASETS.register("nlvr2_train", "nlvr2_dev", "nlvr2_test1")
def _nlvr2(name: str, cfg: CfgNode, tokenizer, train: bool, pair_format: str):
    from e2e_vl.data.nlvr2 import NLVR2DataError, NLVR2Dataset, find_images, read_nlvr2_jsonl, store_boxes
    from e2e_vl.data.roi_records import open_roi_store
    from e2e_vl.data.transforms import ResizeFlip

    d, n = cfg.DATASETS, cfg.DATASETS.NLVR2
    root = Path(d.ROOT)
    path = root / f"{name.removeprefix('nlvr2_')}.json"
    examples = read_nlvr2_jsonl(path)
    limit = d.TRAIN_LIMIT if train else d.TEST_LIMIT
    if limit > 0:
        examples = examples[:limit]
    if not d.ROI_STORE:
        raise NLVR2DataError("TASK nlvr2 reads its regions from DATASETS.ROI_STORE (tools/extract_rois.py "
                             "output); it is empty")
    boxes = store_boxes(open_roi_store(root / d.ROI_STORE), examples, str(path))
    images = find_images(root / (d.IMAGE_DIR_TRAIN if train else d.IMAGE_DIR_TEST), examples)
    transform = (ResizeFlip(list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN) if train
                 else ResizeFlip(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST))
    return NLVR2Dataset(examples, images, boxes, tokenizer, transform, pair_format, n.MAX_TEXT_LEN, cfg.SEED)


def pair_format(model, arch: str) -> str:
    """The pair format of the model's NLVR2 head, or a ConfigError saying what is wrong."""
    heads = [h for h in HEAD_FORMATS if h in model.heads]
    if len(heads) != 1:
        raise ConfigError(f"TASK nlvr2 needs exactly one of the heads {list(HEAD_FORMATS)} (MODEL.VL.HEADS), "
                          f"got {list(model.heads)}")
    if heads[0] == "nlvr2" and not getattr(model, "reads_image_pairs", False):
        raise ConfigError(f"MODEL.VL.HEADS: the nlvr2 head puts both images in one sequence, which "
                          f"MODEL.ARCH {arch} does not read; use the nlvr2_pair head (each image encoded "
                          "with the sentence)")
    return HEAD_FORMATS[heads[0]]


@register_task("nlvr2", default_arch="visualbert")
def build_nlvr2_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.nlvr2 import NLVR2Collator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.nlvr2 import NLVR2Evaluator

    d = cfg.DATASETS
    for key, name in (("DATASETS.TRAIN", "" if eval_only else d.TRAIN), ("DATASETS.TEST", d.TEST)):
        if name:
            NLVR2_DATASETS.check(key, name)
    if d.NLVR2.MAX_TEXT_LEN < 1:
        raise ConfigError(f"'DATASETS.NLVR2.MAX_TEXT_LEN' must be >= 1, got {d.NLVR2.MAX_TEXT_LEN}")
    fmt = pair_format(model, getattr(model, "arch", "") or cfg.MODEL.ARCH)
    collate = NLVR2Collator(fmt, pad_token_id=model.tokenizer.pad_token_id)
    train_set = None if eval_only else NLVR2_DATASETS.build("DATASETS.TRAIN", d.TRAIN, cfg, model.tokenizer,
                                                            True, fmt)
    evaluate = None
    if d.TEST:
        test_set = NLVR2_DATASETS.build("DATASETS.TEST", d.TEST, cfg, model.tokenizer, False, fmt)
        evaluate = NLVR2Evaluator(test_set, collate, cfg.TEST.IMS_PER_BATCH, device,
                                  AMP_DTYPES[cfg.SOLVER.AMP.DTYPE], cfg.OUTPUT_DIR,
                                  d.TEST.removeprefix("nlvr2_"), cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate, evaluate, metric="accuracy")
