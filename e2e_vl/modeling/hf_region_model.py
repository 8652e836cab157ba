"""What the architectures built around one Hugging Face transformer share (VisualBERT, LXMERT): their body
from a released local folder (checked before anything is read: `hf.check_hf_folder`) or from
MODEL.VL.BERT_PATH's BERT, the folder's own tokenizer when it has one, parameter kinds that tell the layers a
checkpoint filled from the new ones, and the report of the folder's tensors no part of the model uses. The
build sequence itself is `RegionEncoder.build`."""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Sequence

from torch import nn

from detector.config import CfgNode, lookup
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.hf import check_hf_folder, hf_tensor_names, has_tokenizer, load_tokenizer
from e2e_vl.modeling.region_encoder import Body, ModelOptions, RegionEncoder

logger = logging.getLogger(__name__)

# The MLM head's tensors in a released folder (BERT's pre-training layout), which `load_pretrained_heads`
# puts into an "mlm" head; the decoder is tied to the word embeddings.
MLM_HEAD_USED = ("cls.predictions.transform.", "cls.predictions.bias", "cls.predictions.decoder.weight")

BodyBuilder = Callable[[CfgNode, int], tuple[nn.Module, list[str]]]


class HFRegionModel(RegionEncoder):
    """A RegionEncoder whose transformer is one Hugging Face model held as `self.<body_name>`.

    A subclass names its body attribute (`body_name`), the key of its released folder (`folder_key`) and
    that folder's config.json `model_type`, and builds the transformer (`build_transformer`).
    `new_parameters`: names inside the body that kept their initial values although the rest came from a
    file (the visual parts when only BERT's text side was loaded); the optimiser treats them as new layers."""

    body_name: ClassVar[str]
    folder_key: ClassVar[str]
    model_type: ClassVar[str]

    def __init__(self, detector: GeneralizedRCNN, options: ModelOptions, *, tokenizer: Any = None,
                 new_parameters: Sequence[str] = ()):
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

    # -- building (the sequence: RegionEncoder.build) -------------------------------------------------------
    @classmethod
    def build_transformer(cls, cfg: CfgNode, appearance_dim: int) -> tuple[nn.Module, list[str]]:
        """The transformer per the architecture's keys, and the names of its tensors left new."""
        raise NotImplementedError

    @classmethod
    def build_body(cls, cfg: CfgNode, appearance_dim: int) -> Body:
        """The released folder (if set) checked first; the tokenizer is the folder's own when it has one,
        else MODEL.VL.BERT_PATH's (the released VisualBERT and LXMERT folders use bert-base-uncased's)."""
        folder = lookup(cfg, cls.folder_key)
        if folder:
            check_hf_folder(folder, cls.folder_key, cls.model_type)
        tokenizer = load_tokenizer(folder if folder and has_tokenizer(folder) else cfg.MODEL.VL.BERT_PATH)
        module, new = cls.build_transformer(cfg, appearance_dim)
        return Body(module, tokenizer, new, heads_folder=folder)

    @classmethod
    def from_body(cls, cfg: CfgNode, detector: GeneralizedRCNN, body: Body,
                  options: ModelOptions) -> "HFRegionModel":
        return cls(detector, body.module, options, tokenizer=body.tokenizer,
                   new_parameters=body.new_parameters)

    def load_released_weights(self, cfg: CfgNode) -> None:
        """Nothing more to load (the folder filled the body); report, at WARNING with the folder's path, its
        tensors that no part of this model uses (pre-training and task heads)."""
        folder = lookup(cfg, self.folder_key)
        if not folder:
            return
        prefix = f"{self.body_name}."
        used = (prefix, *(MLM_HEAD_USED if "mlm" in self.heads else ()))
        names = hf_tensor_names(folder, self.folder_key)
        if not any(n.startswith(prefix) for n in names):  # a bare base-model save: all of it is the body
            return
        unused = sorted(n for n in names if not n.startswith(used))
        if unused:
            logger.warning("%s %s: %d tensors not used by this model (heads it does not have): %s",
                           self.folder_key, folder, len(unused), ", ".join(unused))
