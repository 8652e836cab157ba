"""What the architectures built around one Hugging Face transformer share (VisualBERT, LXMERT): the
options every architecture reads from MODEL.VL, parameter kinds that tell the layers a
checkpoint filled from the new ones, and the builder steps (detector, tokenizer, transformer, heads, the
MLM head's pre-trained weights)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Sequence

from torch import nn

from detector.config import CfgNode
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.heads import check_heads
from e2e_vl.modeling.hf import check_vocabulary, load_pretrained_heads, load_tokenizer
from e2e_vl.modeling.region_encoder import RegionEncoder, build_trained_detector


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """MODEL.VL's keys: heads and their sizes, region masking, the detector
    freeze, the object feature's dropout and appearance standardisation, loss weights."""

    heads: Sequence[str] = ("vqa",)
    num_answers: int = 0
    num_mrc_classes: int = 1601
    masking: str = "pixel"
    freeze_detector: bool = False
    object_dropout: float = 0.1
    appearance_norm: str = "none"
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: CfgNode) -> "ModelOptions":
        v = cfg.MODEL.VL
        return cls(tuple(v.HEADS), v.NUM_ANSWERS, v.NUM_MRC_CLASSES, v.MASKING, v.FREEZE_DETECTOR,
                   v.OBJECT_DROPOUT, v.APPEARANCE_NORM,
                   {k.lower(): float(w) for k, w in v.LOSS_WEIGHTS.items()})


class HFRegionModel(RegionEncoder):
    """A RegionEncoder whose transformer is one Hugging Face model held as `self.<body_name>`.

    `new_parameters`: names inside the body that kept their initial values although the rest came from a
    file (the visual parts when only BERT's text side was loaded); the optimiser treats them as new layers."""

    body_name: ClassVar[str]

    def __init__(self, detector: GeneralizedRCNN, options: ModelOptions, *, tokenizer: Any = None,
                 new_parameters: Sequence[str] = ()):
        check_heads(options.heads, options.num_answers)
        super().__init__(detector, masking=options.masking, freeze_detector=options.freeze_detector)
        self.tokenizer = tokenizer
        self.loss_weights = dict(options.loss_weights)
        self.new_parameters = frozenset(f"{self.body_name}.{name}" for name in new_parameters)

    def parameter_kind(self, name: str) -> str:
        """'bert' for the transformer (pre-trained or random), 'head' for its layers a text-only checkpoint
        did not fill and for everything added around it, 'detector' for the detector."""
        if name.startswith(f"{self.body_name}.") and name not in self.new_parameters:
            return "bert"
        return RegionEncoder.parameter_kind(name)


BodyBuilder = Callable[[CfgNode, int], tuple[nn.Module, list[str]]]


def build_hf_region_model(cfg: CfgNode, detector: GeneralizedRCNN | None, cls: type[HFRegionModel],
                          build_body: BodyBuilder, checkpoint: str, **extra: Any) -> HFRegionModel:
    """`cls` per `cfg`: heads checked first, the detector (MODEL.WEIGHTS), the tokenizer of
    MODEL.VL.BERT_PATH (released VisualBERT and LXMERT folders are used with BERT's uncased one),
    `build_body(cfg, appearance_dim)` -> (transformer, new parameter names), then the heads' pre-trained
    weights from `checkpoint` or BERT (`hf.load_pretrained_heads`)."""
    options = ModelOptions.from_cfg(cfg)
    check_heads(options.heads, options.num_answers)
    detector = detector if detector is not None else build_trained_detector(cfg)
    tokenizer = load_tokenizer(cfg.MODEL.VL.BERT_PATH)
    body, new = build_body(cfg, detector.roi_heads.out_channels)
    check_vocabulary(tokenizer, body.config.vocab_size)
    model = cls(detector, body, options, tokenizer=tokenizer, new_parameters=new, **extra)
    load_pretrained_heads(model.heads, checkpoint, cfg.MODEL.VL)
    return model
