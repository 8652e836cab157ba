"""The architecture "region_classifier": the detector alone (`detector.modeling.region_classifier`),
default of TASK regions."""
from __future__ import annotations

from detector.config import CfgNode
from detector.modeling.region_classifier import RegionClassifier
from e2e_vl.modeling.region_encoder import build_trained_detector
from e2e_vl.modeling.registry import register_model


@register_model("region_classifier")
def build_region_classifier(cfg: CfgNode) -> RegionClassifier:
    return RegionClassifier(build_trained_detector(cfg))
