"""The detector's config keys: Detectron2's names and default values for the C4 R-CNN (extended with
the Visual Genome attribute head), the values this implementation supports, and the loaders.

A preset in configs/vg/ selects the released model; `e2e_vl.config` adds the training sections.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from detector.config.cfgnode import CfgNode, _deep_update, check_choices, load_config, lookup
from detector.config.detectron2_keys import VG_MODEL_KEYS


def _detector_defaults() -> dict:
    defaults = {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "DEVICE": "cpu",
            "WEIGHTS": "",
            "PIXEL_MEAN": [103.530, 116.280, 123.675],
            "PIXEL_STD": [1.0, 1.0, 1.0],
            "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
            "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
            "RESNETS": {
                "DEPTH": 50,
                "OUT_FEATURES": ["res4"],
                "NUM_GROUPS": 1,
                "NORM": "FrozenBN",
                "WIDTH_PER_GROUP": 64,
                "STRIDE_IN_1X1": True,
                "RES5_DILATION": 1,
                "RES2_OUT_CHANNELS": 256,
                "STEM_OUT_CHANNELS": 64,
            },
            "ANCHOR_GENERATOR": {
                "NAME": "DefaultAnchorGenerator",
                "SIZES": [[32, 64, 128, 256, 512]],
                "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
                "ANGLES": [[-90, 0, 90]],
                "OFFSET": 0.0,
            },
            "RPN": {
                "HEAD_NAME": "StandardRPNHead",
                "IN_FEATURES": ["res4"],
                "BOUNDARY_THRESH": -1,
                "IOU_THRESHOLDS": [0.3, 0.7],
                "IOU_LABELS": [0, -1, 1],
                "BATCH_SIZE_PER_IMAGE": 256,
                "POSITIVE_FRACTION": 0.5,
                "BBOX_REG_LOSS_TYPE": "smooth_l1",
                "BBOX_REG_LOSS_WEIGHT": 1.0,
                "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
                "SMOOTH_L1_BETA": 0.0,
                "LOSS_WEIGHT": 1.0,
                "PRE_NMS_TOPK_TRAIN": 12000,
                "PRE_NMS_TOPK_TEST": 6000,
                "POST_NMS_TOPK_TRAIN": 2000,
                "POST_NMS_TOPK_TEST": 1000,
                "NMS_THRESH": 0.7,
                "CONV_DIMS": [-1],
            },
            "ROI_HEADS": {
                "NAME": "Res5ROIHeads",
                "NUM_CLASSES": 80,
                "IN_FEATURES": ["res4"],
                "IOU_THRESHOLDS": [0.5],
                "IOU_LABELS": [0, 1],
                "BATCH_SIZE_PER_IMAGE": 512,
                "POSITIVE_FRACTION": 0.25,
                "SCORE_THRESH_TEST": 0.05,
                "NMS_THRESH_TEST": 0.5,
                "PROPOSAL_APPEND_GT": True,
            },
            "ROI_BOX_HEAD": {
                "NAME": "",
                "BBOX_REG_LOSS_TYPE": "smooth_l1",
                "BBOX_REG_LOSS_WEIGHT": 1.0,
                "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
                "SMOOTH_L1_BETA": 0.0,
                "POOLER_RESOLUTION": 14,
                "POOLER_SAMPLING_RATIO": 0,
                # ROIAlignV2 (aligned=True), ROIAlign (legacy, aligned=False) or ROIPool.
                "POOLER_TYPE": "ROIAlignV2",
                "CLS_AGNOSTIC_BBOX_REG": False,
            },
        },
        "INPUT": {
            "FORMAT": "BGR",
            "MIN_SIZE_TRAIN": [800],
            "MAX_SIZE_TRAIN": 1333,
            "MIN_SIZE_TEST": 800,
            "MAX_SIZE_TEST": 1333,
        },
        "TEST": {"DETECTIONS_PER_IMAGE": 100},
    }
    # The Visual Genome keys stock Detectron2 lacks (py-bottom-up-attention's and grid-feats-vqa's names):
    # MODEL.CAFFE_MAXPOOL, MODEL.ROI_BOX_HEAD.RES5HALVE, MODEL.ATTRIBUTE_ON, MODEL.ROI_ATTRIBUTE_HEAD.*.
    _deep_update(defaults["MODEL"], VG_MODEL_KEYS)
    return defaults


def get_cfg() -> CfgNode:
    """A fresh copy of the detector defaults."""
    return CfgNode(_detector_defaults())


# Detectron2 keys with one implementation here: a YAML may restate them, any other value fails.
_SINGLE = {
    "MODEL.META_ARCHITECTURE": (("GeneralizedRCNN",), "the only meta-architecture"),
    "MODEL.BACKBONE.NAME": (("build_resnet_backbone",), "ResNet C4; FPN is not implemented"),
    "MODEL.PROPOSAL_GENERATOR.NAME": (("RPN", "PrecomputedProposals"), "PrecomputedProposals: boxes given"),
    "MODEL.ANCHOR_GENERATOR.NAME": (("DefaultAnchorGenerator",), "rotated anchors are not implemented"),
    "MODEL.RPN.HEAD_NAME": (("StandardRPNHead",), "the only RPN head"),
    "MODEL.ROI_HEADS.NAME": (("Res5ROIHeads",), "C4"),
    "MODEL.ROI_BOX_HEAD.NAME": (("",), "Res5ROIHeads runs res5 as its box head"),
    "INPUT.FORMAT": (("BGR", "RGB"), ""),
}
# Keys that only Detectron2's detector training (RPN and box-regression losses, proposal sampling) or its
# rotated anchors read. This detector is trained only as a region classifier on given boxes, so they are
# accepted at Detectron2's default (its YAMLs load) and any other value is refused rather than ignored.
_UNTRAINED = (
    "MODEL.ANCHOR_GENERATOR.ANGLES",
    "MODEL.RPN.BOUNDARY_THRESH", "MODEL.RPN.IOU_THRESHOLDS", "MODEL.RPN.IOU_LABELS",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "MODEL.RPN.POSITIVE_FRACTION", "MODEL.RPN.BBOX_REG_LOSS_TYPE",
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "MODEL.RPN.SMOOTH_L1_BETA", "MODEL.RPN.LOSS_WEIGHT",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS", "MODEL.ROI_HEADS.IOU_LABELS", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION", "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA",
)


def _detector_choices() -> dict[str, tuple[tuple[Any, ...], str]]:
    defaults = get_cfg()
    why = "only read to train Detectron2's RPN / box regression, not done here"
    return {**_SINGLE, **{full: ((lookup(defaults, full),), why) for full in _UNTRAINED}}


DETECTOR_CHOICES = _detector_choices()


def validate_detector_cfg(cfg: CfgNode) -> None:
    """Refuse detector values this implementation does not support (see DETECTOR_CHOICES)."""
    check_choices(cfg, DETECTOR_CHOICES)


def load_cfg(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Detector defaults, merged with a YAML file and `KEY VALUE` overrides; validated, frozen."""
    return load_config(get_cfg(), path, overrides, validate_detector_cfg)
