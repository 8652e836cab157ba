"""The detector alone, trained to classify labelled boxes: a stand-in for its own pre-training.

VL-BERT starts from a Fast R-CNN pre-trained on Visual Genome. Where such weights are out of reach (the
embedded easy-VQA demo downloads nothing), `TASK: regions` trains the same detector on boxes with known
classes, with Fast R-CNN's classification loss on its own box predictor; `tools/export_detector.py`
then writes the run's detector as a checkpoint for `MODEL.WEIGHTS` of the VL-BERT run.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn import functional as F

from detector.config import ConfigError
from detector.modeling.rcnn import GeneralizedRCNN


class RegionClassifier(nn.Module):
    """Batch: images (zero-padded, 0..255), image_sizes, boxes (list of [K_i, 4] in resized-image pixels),
    region_labels Long [sum K_i] (class index, -1 = ignore). Output: "loss", "losses" {"cls"},
    "class_logits" [sum K_i, C + 1] and "region_labels". The RPN, box regression and attribute head get
    no gradient and stay frozen; keys are `detector.<Detectron2 key>`, as in the VL models, so the run
    exports like theirs."""

    def __init__(self, detector: GeneralizedRCNN):
        super().__init__()
        self.detector = detector
        if detector.proposal_generator is not None:
            detector.proposal_generator.requires_grad_(False)
        predictor = detector.roi_heads.box_predictor
        for name, param in predictor.named_parameters():
            param.requires_grad_(name.startswith("cls_score."))

    # No text side and one head ("cls"); the members a training engine asks of every model.
    tokenizer = None

    @property
    def heads(self) -> dict[str, nn.Module]:
        return {"cls": self.detector.roi_heads.box_predictor}

    @staticmethod
    def parameter_kind(name: str) -> str:
        return "detector"

    def enable_gradient_checkpointing(self) -> None:
        raise ConfigError("'SOLVER.GRADIENT_CHECKPOINTING' is on but the region classifier does not support "
                          "it")

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = next(self.detector.parameters()).device
        boxes = [b.to(device).float() for b in batch["boxes"]]
        res4 = self.detector.features(self.detector.prepare_batch(batch["images"], batch["image_sizes"]))
        logits = self.detector.region_outputs(res4, boxes)["class_logits"]
        labels = batch["region_labels"].to(device)
        num_classes = logits.shape[1] - 1
        if bool(((labels < -1) | (labels >= num_classes)).any()):
            raise ValueError(f"region_labels must lie in [-1, {num_classes - 1}] "
                             f"(MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}), got values "
                             f"{sorted(set(labels.tolist()))}")
        used = labels >= 0
        loss = F.cross_entropy(logits[used].float(), labels[used]) if bool(used.any()) else logits.sum() * 0.0
        return {"loss": loss, "losses": {"cls": loss}, "class_logits": logits, "region_labels": labels}
