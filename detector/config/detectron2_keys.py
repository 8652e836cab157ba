"""The config keys of the Visual Genome detector that stock Detectron2 (v0.6) lacks, and the one function
that adds them to a Detectron2 config, so the YAML that tools/export_detector.py writes loads with
Detectron2's own `get_cfg().merge_from_file`:

    from detectron2.config import get_cfg
    from detector.config.detectron2_keys import add_vg_config, check_stock_detectron2

    cfg = get_cfg()
    add_vg_config(cfg)
    cfg.merge_from_file("vg_e2e.pth.yaml")
    check_stock_detectron2(cfg)  # stock Detectron2 builds the network only at the keys' stock values

The names are those of the Detectron2 ports of the VG model, where they mean what ours mean:
py-bottom-up-attention's `MODEL.CAFFE_MAXPOOL` (the stem's max-pool k3 s2 p0 ceil-mode) and
`MODEL.ROI_BOX_HEAD.RES5HALVE` (False: res5's first block keeps stride 1), and grid-feats-vqa's
`add_attribute_config` keys `MODEL.ATTRIBUTE_ON` and `MODEL.ROI_ATTRIBUTE_HEAD.{NUM_CLASSES, OBJ_EMBED_DIM,
FC_DIM}` (attributes without the "no attribute" row; class embedding width; hidden width). This module
imports nothing from Detectron2 or from this project, so its two functions can also be pasted as is.
"""
from __future__ import annotations

from typing import Any

# MODEL.* keys with their defaults, which are the values that give stock Detectron2's network.
VG_MODEL_KEYS: dict[str, Any] = {
    "CAFFE_MAXPOOL": False,
    "ATTRIBUTE_ON": False,
    "ROI_BOX_HEAD": {"RES5HALVE": True},
    "ROI_ATTRIBUTE_HEAD": {"NUM_CLASSES": 400, "OBJ_EMBED_DIM": 256, "FC_DIM": 512},
}


def add_vg_config(cfg: Any) -> Any:
    """Add the keys of VG_MODEL_KEYS that `cfg` (a Detectron2 / yacs CfgNode) lacks, at their defaults.

    Keys already there (py-bottom-up-attention's fork has CAFFE_MAXPOOL and RES5HALVE, grid-feats-vqa's
    `add_attribute_config` the attribute keys) keep their values, so it composes with either.
    """
    def fill(node: Any, keys: dict[str, Any]) -> None:
        for key, value in keys.items():
            if isinstance(value, dict):
                if key not in node:
                    node[key] = type(cfg)()
                fill(node[key], value)
            elif key not in node:
                node[key] = value

    fill(cfg.MODEL, VG_MODEL_KEYS)
    return cfg


def check_stock_detectron2(cfg: Any) -> None:
    """Raise ValueError naming the first VG key whose value stock Detectron2 would ignore.

    Stock Detectron2 reads none of these keys: with a non-default value it would build another network
    without a word (Detectron2's stem, a strided res5, no attribute head). Such a config needs a
    Detectron2 that implements them (py-bottom-up-attention's fork: CAFFE_MAXPOOL, RES5HALVE and its own
    attribute head) or this project's `detector.modeling.build_detector`.
    """
    def walk(node: Any, keys: dict[str, Any], prefix: str) -> None:
        for key, default in keys.items():
            if isinstance(default, dict):
                walk(node[key], default, f"{prefix}{key}.")
            elif key in ("CAFFE_MAXPOOL", "ATTRIBUTE_ON", "RES5HALVE") and node[key] != default:
                raise ValueError(f"{prefix}{key} is {node[key]!r}: stock Detectron2 ignores this key and "
                                 f"would build its own network ({prefix}{key} {default!r}); use a Detectron2 "
                                 "that implements it or this project's detector")

    walk(cfg.MODEL, VG_MODEL_KEYS, "MODEL.")
