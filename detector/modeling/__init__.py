"""Detector modules with Detectron2's names: ResNet backbone, RPN, Res5 RoI heads, GeneralizedRCNN."""
from detector.modeling.rcnn import GeneralizedRCNN, build_detector

__all__ = ["GeneralizedRCNN", "build_detector"]
