"""Configuration: a validated tree of YAML keys in Detectron2's naming.

Every key must exist in the defaults: an unknown or mistyped key is an error that names the key, the
file it came from and the closest valid key (Detectron2/yacs fail too, but without a suggestion).
Values are type-checked against the default. A YAML file may name `_BASE_` files (relative to itself)
that are merged first.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable

import yaml

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class CfgNode(dict):
    """A dict with attribute access whose keys are fixed by its defaults.

    `new_allowed` nodes accept keys that are not in the defaults (for free-form sections).
    """

    def __init__(self, init: dict | None = None, new_allowed: bool = False):
        super().__init__()
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_new_allowed", new_allowed)
        for key, value in (init or {}).items():
            self[key] = CfgNode(value) if isinstance(value, dict) and not isinstance(value, CfgNode) else value

    # attribute access -------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'{_did_you_mean(name, self.keys())}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise ConfigError(f"config is frozen; cannot set '{name}'")
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise ConfigError(f"config is frozen; cannot set '{key}'")
        super().__setitem__(key, value)

    def __deepcopy__(self, memo: dict) -> "CfgNode":
        out = CfgNode(new_allowed=self._new_allowed)
        for key, value in self.items():
            dict.__setitem__(out, key, copy.deepcopy(value, memo))
        return out

    def __reduce__(self):
        return (_rebuild, (self.to_dict(), self._new_allowed))

    # life cycle ---------------------------------------------------------------------------------------
    def clone(self) -> "CfgNode":
        return copy.deepcopy(self)

    def freeze(self, frozen: bool = True) -> "CfgNode":
        object.__setattr__(self, "_frozen", frozen)
        for value in self.values():
            if isinstance(value, CfgNode):
                value.freeze(frozen)
        return self

    def is_frozen(self) -> bool:
        return self._frozen

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, CfgNode) else copy.deepcopy(v)) for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    # merging ------------------------------------------------------------------------------------------
    def merge_from_file(self, path: str | os.PathLike) -> "CfgNode":
        """Merge a YAML file (and its `_BASE_` chain) into this config."""
        self.merge_from_dict(load_yaml_with_base(path), source=str(path))
        return self

    def merge_from_dict(self, other: dict, source: str = "<dict>", prefix: str = "") -> "CfgNode":
        if self._frozen:
            raise ConfigError("config is frozen; clone() it before merging")
        if not isinstance(other, dict):
            raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(other).__name__}")
        for key, value in other.items():
            full = f"{prefix}{key}"
            if key == BASE_KEY:
                continue
            if key not in self:
                if self._new_allowed:
                    self[key] = CfgNode(value) if isinstance(value, dict) else value
                    continue
                raise ConfigError(f"{source}: unknown config key '{full}'{_did_you_mean(key, self.keys(), prefix)}")
            current = self[key]
            if isinstance(current, CfgNode):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{full}' is a section; expected a mapping, got {value!r}")
                current.merge_from_dict(value, source, prefix=full + ".")
            else:
                self[key] = _check_type(full, current, value, source)
        return self

    def merge_from_list(self, pairs: Iterable[str]) -> "CfgNode":
        """Merge command-line overrides `["MODEL.DEVICE", "cpu", "SOLVER.BASE_LR", "1e-4"]`."""
        pairs = list(pairs)
        if len(pairs) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number of items: {pairs}")
        for full, text in zip(pairs[0::2], pairs[1::2]):
            try:
                value = yaml.safe_load(text) if isinstance(text, str) else text
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {full}: cannot parse value {text!r}: {exc}") from None
            nested: Any = value
            for part in reversed(full.split(".")):
                nested = {part: nested}
            self.merge_from_dict(nested, source="command line")
        return self


def _rebuild(d: dict, new_allowed: bool) -> CfgNode:
    return CfgNode(d, new_allowed=new_allowed)


def _did_you_mean(key: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _check_type(full: str, default: Any, value: Any, source: str) -> Any:
    """Return `value` converted to the default's type, or raise naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    else:
        return value
    raise ConfigError(
        f"{source}: '{full}' expects {type(default).__name__} (default {default!r}), got {type(value).__name__} {value!r}"
    )


def load_yaml_with_base(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict:
    """Read a YAML file, merging the files named by `_BASE_` (relative paths are relative to it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"{path}: circular {BASE_KEY} chain: {' -> '.join(_seen + (real,))}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        _deep_update(merged, load_yaml_with_base(base_path, _seen + (real,)))
    _deep_update(merged, data)
    return merged


def check_choices(cfg: CfgNode, choices: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    """Raise ConfigError naming the first key (dotted path) whose value is not one of its declared choices.

    `choices` maps a key to (allowed values, why); the why ends up in the message, so a user who set a
    Detectron2 value this project does not implement learns what is supported instead of being ignored.
    """
    for full, (allowed, why) in choices.items():
        value: Any = cfg
        for part in full.split("."):
            value = value[part]
        if value not in allowed:
            expected = repr(allowed[0]) if len(allowed) == 1 else f"one of {list(allowed)}"
            raise ConfigError(f"'{full}' must be {expected}{f' ({why})' if why else ''}, got {value!r}")


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


# ----------------------------------------------------------------------------------------------------
# Detector defaults: Detectron2's key names and default values for the C4 R-CNN, extended with the
# Visual Genome attribute head. A preset in configs/vg/ selects the released model.
# ----------------------------------------------------------------------------------------------------
def _detector_defaults() -> dict:
    return {
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
                # "basic": Detectron2's stem (max-pool k3 s2 p1); "caffe": k3 s2 p0 ceil_mode (VG weights).
                "STEM_TYPE": "basic",
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
                # Res5ROIHeads: False keeps res5's first block at stride 1 (py-bottom-up-attention's VG model).
                "RES5HALVE": True,
            },
            # Visual Genome attribute head (py-bottom-up-attention's Detectron2 extension).
            "ATTRIBUTE_ON": False,
            "ROI_ATTRIBUTE_HEAD": {
                "NUM_ATTRIBUTES": 400,
                "EMBED_DIM": 256,
                "HIDDEN_DIM": 512,
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
    defaults = CfgNode(_detector_defaults())
    untrained = {}
    for full in _UNTRAINED:
        value: Any = defaults
        for part in full.split("."):
            value = value[part]
        untrained[full] = ((value,), "only read to train Detectron2's RPN / box regression, not done here")
    return {**_SINGLE, **untrained}


DETECTOR_CHOICES = _detector_choices()


def validate_detector_cfg(cfg: CfgNode) -> None:
    """Refuse detector values this implementation does not support (see DETECTOR_CHOICES)."""
    check_choices(cfg, DETECTOR_CHOICES)


def get_cfg() -> CfgNode:
    """A fresh copy of the detector defaults."""
    return CfgNode(_detector_defaults())


def load_cfg(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Defaults, merged with a YAML file and `KEY VALUE` overrides; validated, frozen."""
    cfg = get_cfg()
    if path:
        cfg.merge_from_file(path)
    cfg.merge_from_list(list(overrides))
    validate_detector_cfg(cfg)
    return cfg.freeze()
