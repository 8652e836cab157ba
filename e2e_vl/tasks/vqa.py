"""TASK vqa: images with their questions, VL-BERT collation, the answer head's BCE loss, VQA accuracy
(`e2e_vl.evaluation.vqa`) and the evaluation server's results file
(`OUTPUT_DIR/<DATASETS.TEST>_results.json`). Data sets: easy-VQA (embedded) and VQA v2 (files under
DATASETS.ROOT)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from e2e_vl.data.catalog import DatasetCatalog
from e2e_vl.tasks import register_task

logger = logging.getLogger(__name__)
VQA_DATASETS = DatasetCatalog("VQA")


def _check_vqa_keys(cfg: CfgNode) -> None:
    if cfg.DATASETS.ANSWER_SEGMENT not in (0, 1):  # 2 is the regions' segment
        raise ConfigError(f"'DATASETS.ANSWER_SEGMENT' must be 0 or 1, got {cfg.DATASETS.ANSWER_SEGMENT}")


register_config("MODEL.VL", {
    # TASK vqa, when training starts: each row of the vqa head's classifier = the mean word-piece
    # embedding of its answer (from the word table after BERT_PATH / INIT_FROM), bias 0; VL-BERT's
    # CLASSIFIER_PRETRAINED, on in its VQA configs. It replaces a classifier INIT_FROM brought, as
    # VL-BERT's did; --resume loads the checkpoint's over it. False: the Linear's random start.
    "VQA_CLASSIFIER_FROM_WORDS": False,
}, owner=__name__)
register_config("DATASETS", {
    # VQA v2: the question/annotation json files under DATASETS.ROOT (empty for easy-VQA).
    "QUESTIONS_TRAIN": "",
    "ANNOTATIONS_TRAIN": "",
    "QUESTIONS_TEST": "",
    "ANNOTATIONS_TEST": "",
    # The second split of vqa_v2_trainval (val2014: VL-BERT trains its test-dev / test-std runs on
    # train2014 + val2014), beside the *_TRAIN keys' split; no other data set reads them.
    "QUESTIONS_VAL": "",
    "ANNOTATIONS_VAL": "",
    "IMAGE_DIR_VAL": "",
    "ANSWER_VOCAB": "",
    "MAX_QUESTION_TOKENS": 16,
    # Segment of the VQA text's `[MASK] [SEP]` (the question's is 0): VL-BERT's 1, which its released
    # VQA models were fine-tuned with. The easy-VQA demo keeps the 0 its seed table was measured with.
    "ANSWER_SEGMENT": 1,
}, _check_vqa_keys, owner=__name__)


@VQA_DATASETS.register("easy_vqa_train", "easy_vqa_train_balanced", "easy_vqa_test")
def _easy_vqa(name: str, cfg: CfgNode, tokenizer, train: bool, sizes: tuple[int, int], limit: int):
    """easy-VQA as generated; `easy_vqa_train_balanced` without the colour yes/no language prior
    (`e2e_vl.data.easy_vqa.balance_colour_existence`)."""
    from e2e_vl.data.easy_vqa import answer_vocab, build_easy_vqa

    d = cfg.DATASETS
    split = "train" if name.startswith("easy_vqa_train") else "test"
    ds = build_easy_vqa(split, tokenizer, *sizes, d.MAX_QUESTION_TOKENS, cfg.DATALOADER.QUESTIONS_PER_IMAGE,
                        limit, balanced=name.endswith("_balanced"), answer_segment=d.ANSWER_SEGMENT)
    return ds, answer_vocab()


# The keys naming one official split's files under DATASETS.ROOT: questions, annotations, image folder.
TRAIN_KEYS = ("QUESTIONS_TRAIN", "ANNOTATIONS_TRAIN", "IMAGE_DIR_TRAIN")
VAL_KEYS = ("QUESTIONS_VAL", "ANNOTATIONS_VAL", "IMAGE_DIR_VAL")
TEST_KEYS = ("QUESTIONS_TEST", "ANNOTATIONS_TEST", "IMAGE_DIR_TEST")


@VQA_DATASETS.register("vqa_v2_train", "vqa_v2_val", "vqa_v2_test")
def _vqa_v2(name: str, cfg: CfgNode, tokenizer, train: bool, sizes: tuple[int, int], limit: int):
    """The official VQA v2 files under DATASETS.ROOT: the *_TRAIN keys' split for training, the *_TEST
    keys' for evaluation. Without an annotations file (test-dev / test-std) the evaluation only writes
    the results file."""
    if train:
        stray = [k for k in VAL_KEYS if cfg.DATASETS[k]]
        if stray:
            raise ConfigError(f"'DATASETS.{stray[0]}' is set but {name} does not read it: the *_VAL keys are "
                              "the second split of vqa_v2_trainval (set DATASETS.TRAIN vqa_v2_trainval, or "
                              "clear them)")
    return _vqa_v2_splits(name, cfg, tokenizer, train, sizes, limit, [TRAIN_KEYS if train else TEST_KEYS])


@VQA_DATASETS.register("vqa_v2_trainval")
def _vqa_v2_trainval(name: str, cfg: CfgNode, tokenizer, train: bool, sizes: tuple[int, int], limit: int):
    """VL-BERT's training set for test-dev / test-std submissions (its TRAIN_IMAGE_SET
    'train2014+val2014'): the *_TRAIN keys' split and the *_VAL keys' split together, each with its own
    image folder, no question or image id in both. A training set only."""
    if not train:
        raise ConfigError(f"{name} is a training set (train2014 + val2014): evaluate on vqa_v2_val or "
                          "vqa_v2_test (the *_TEST keys)")
    return _vqa_v2_splits(name, cfg, tokenizer, train, sizes, limit, [TRAIN_KEYS, VAL_KEYS])


def _vqa_v2_splits(name: str, cfg: CfgNode, tokenizer, train: bool, sizes: tuple[int, int], limit: int,
                   split_keys: list[tuple[str, str, str]]):
    """The data set of the splits `split_keys` names (questions, annotations, image folder keys). Every
    question's image must have a file in its split's folder and a record in DATASETS.ROI_STORE, checked
    here, before training."""
    from e2e_vl.data.roi_records import open_roi_store
    from e2e_vl.data.vqa import (ImageQuestionsDataset, SplitImageLoader, VQASplit, join_splits, load_vqa_v2,
                                 read_answer_vocab)

    d = cfg.DATASETS
    required = ["ANSWER_VOCAB", "ROI_STORE"]
    for questions_key, ann_key, dir_key in split_keys:
        required += [questions_key, dir_key] + ([ann_key] if train else [])
    for key in required:
        if not d[key]:
            raise ConfigError(f"'DATASETS.{key}' must be set for {name}")
    root = Path(d.ROOT)
    vocab = read_answer_vocab(root / d.ANSWER_VOCAB)
    splits = [VQASplit(root / d[q], root / d[i],
                       load_vqa_v2(root / d[q], (root / d[a]) if d[a] else None, vocab))
              for q, a, i in split_keys]
    questions = join_splits(splits)
    if limit > 0:
        if not train and not d[split_keys[0][1]] and limit < len(questions):
            logger.warning("%s: TEST_LIMIT %d of %d questions: the results file is not a complete submission",
                           name, limit, len(questions))
        questions = questions[:limit]
    loader = SplitImageLoader(splits, questions, open_roi_store(root / d.ROI_STORE))
    ds = ImageQuestionsDataset(questions, loader, tokenizer, len(vocab), *sizes, d.MAX_QUESTION_TOKENS,
                               cfg.DATALOADER.QUESTIONS_PER_IMAGE, d.ANSWER_SEGMENT)
    return ds, vocab


def _dataset(cfg: CfgNode, tokenizer, train: bool):
    key, name = ("DATASETS.TRAIN", cfg.DATASETS.TRAIN) if train else ("DATASETS.TEST", cfg.DATASETS.TEST)
    sizes = ((cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN) if train
             else (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST))
    limit = cfg.DATASETS.TRAIN_LIMIT if train else cfg.DATASETS.TEST_LIMIT
    return VQA_DATASETS.build(key, name, cfg, tokenizer, train, sizes, limit)


def _check_answer_count(num_answers: int, dataset: str, answers: list[str]) -> None:
    if len(answers) != num_answers:
        raise ConfigError(f"the model's vqa head has {num_answers} answers (MODEL.VL.NUM_ANSWERS) "
                          f"but {dataset} has {len(answers)}")


@register_task("vqa", default_arch="vlbert")
def build_vqa_task(cfg: CfgNode, model, device: torch.device, eval_only: bool):
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.engine.trainer import AMP_DTYPES, TrainTask
    from e2e_vl.evaluation.vqa import VQAEvaluator

    if "vqa" not in model.heads:
        raise ConfigError(f"TASK vqa needs a model with the vqa head, got {list(model.heads)}")
    tokenizer, head = model.tokenizer, model.heads["vqa"]
    collate = VLCollator(pad_token_id=tokenizer.pad_token_id)
    train_set = None
    if not eval_only:
        train_set, answers = _dataset(cfg, tokenizer, train=True)
        _check_answer_count(head.num_answers, cfg.DATASETS.TRAIN, answers)
        if cfg.MODEL.VL.VQA_CLASSIFIER_FROM_WORDS:
            try:
                head.init_from_answer_words(answers, tokenizer)
            except ValueError as exc:
                raise ConfigError(f"'MODEL.VL.VQA_CLASSIFIER_FROM_WORDS': {exc}") from None
            logger.info("vqa classifier: %d rows from the answers' word embeddings", len(answers))
    evaluate = None
    if cfg.DATASETS.TEST:
        test_set, answers = _dataset(cfg, tokenizer, train=False)
        _check_answer_count(head.num_answers, cfg.DATASETS.TEST, answers)
        evaluate = VQAEvaluator(test_set, collate, cfg.TEST.IMS_PER_BATCH, device,
                                AMP_DTYPES[cfg.SOLVER.AMP.DTYPE], answers,
                                Path(cfg.OUTPUT_DIR) / f"{cfg.DATASETS.TEST}_results.json",
                                cfg.DATALOADER.NUM_WORKERS)
    return TrainTask(train_set, collate, evaluate, metric="accuracy")
