"""LXMERT (Tan & Bansal 2019) with the detector in the loop: transformers' `LxmertModel` (language,
object-relationship and cross-modality encoders) reads our region features and boxes, so its gradients
reach the detector. Registered as the architecture "lxmert".

Data path: images -> `RegionEncoder.region_appearance` (pixel masking, the detector's pooled res5 feature
of every box, optionally standardised) -> LxmertModel with the boxes as LXMERT's position input, the
corners normalised by the image size (x1/W, y1/H, x2/W, y2/H) -> language output (per token), vision
output (per region), pooled output (LXMERT's pooler on the language [CLS]) -> the shared heads. LXMERT
encodes geometry itself, so no object embedding is added: the feature width is the detector's (LXMERT's
released weights expect 2048, the width of the VG R101-C4 detector's res5).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import BertConfig, LxmertConfig, LxmertModel

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.heads import Encoded, HeadSpec, build_heads
from e2e_vl.modeling.hf import BERT_SHAPE_KEYS, bert_text_config, copy_bert_text_side, load_hf_checkpoint
from e2e_vl.modeling.hf_region_model import HFRegionModel
from e2e_vl.modeling.region_encoder import ModelOptions, batch_has_images, check_region_width, pad_per_image
from e2e_vl.modeling.registry import register_model

# LXMERT's object-relationship and cross-modality depths, used when no checkpoint says otherwise.
DEFAULT_R_LAYERS = 5
DEFAULT_X_LAYERS = 5
LAYER_KEYS = ("L_LAYERS", "R_LAYERS", "X_LAYERS")
# LxmertConfig has no layer_norm_eps: its LayerNorms use 1e-12 throughout, and so do the heads here.
LXMERT_LAYER_NORM_EPS = 1e-12

# MODEL.LXMERT: what only LXMERT reads (the rest: MODEL.VL).
register_config("MODEL.LXMERT", {
    # Local Hugging Face folder of an LXMERT (unc-nlp/lxmert-base-uncased layout; a LxmertModel or a model
    # with an lxmert.* body). Empty: language layers from MODEL.VL.BERT_PATH, the rest new.
    "CHECKPOINT": "",
    # Layers of the language, object-relationship and cross-modality encoders. 0 = the checkpoint's;
    # without one, L = the BERT folder's layer count and R = X = 5 (LXMERT's). Set with a checkpoint, they
    # must match it.
    "L_LAYERS": 0,
    "R_LAYERS": 0,
    "X_LAYERS": 0,
}, owner=__name__)


@register_model("lxmert")
class Lxmert(HFRegionModel):
    """LXMERT trained end to end. The batch is `VLBert`'s (`e2e_vl.modeling.vlbert`). Text-only samples get
    all-zero regions that their attention mask hides; a batch without images gets one such region, since
    the cross-modality layers need a visual sequence."""

    body_name = "lxmert"
    body_prefixes = ("lxmert.",)
    folder_key = "MODEL.LXMERT.CHECKPOINT"
    model_type = "lxmert"

    def __init__(self, detector: GeneralizedRCNN, lxmert: LxmertModel, options: ModelOptions = ModelOptions(),
                 *, tokenizer: Any = None, new_parameters: Sequence[str] = ()):
        super().__init__(detector, options, tokenizer=tokenizer, new_parameters=new_parameters)
        config = lxmert.config
        if config.visual_feat_dim != self.appearance_dim or config.visual_pos_dim != 4:
            raise ValueError(f"LXMERT reads {config.visual_feat_dim}-d features and "
                             f"{config.visual_pos_dim}-d positions; the detector gives "
                             f"{self.appearance_dim}-d features and 4-d boxes")
        self.lxmert = lxmert
        self.init_appearance_norm(options.appearance_norm)
        self.init_masked_region_feature(self.appearance_dim)
        head_config = BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                                 hidden_act=config.hidden_act, layer_norm_eps=LXMERT_LAYER_NORM_EPS)
        spec = HeadSpec(head_config, lxmert.embeddings.word_embeddings, options.num_answers,
                        options.num_mrc_classes, appearance_dim=self.appearance_dim)
        self.heads = build_heads(options.heads, spec)

    @classmethod
    def build_transformer(cls, cfg: CfgNode, appearance_dim: int) -> tuple[LxmertModel, list[str]]:
        """LxmertModel per MODEL.LXMERT, and the names of its tensors left new although others came from a
        file. From CHECKPOINT: everything, strictly (its depths; set ones must match). Else from
        MODEL.VL.BERT_PATH's BERT: embeddings and the first L_LAYERS layers as the language encoder (L = all
        of BERT's by default), the object-relationship and cross-modality encoders and the pooler new; with
        BERT_RANDOM_INIT nothing is loaded."""
        v, lx = cfg.MODEL.VL, cfg.MODEL.LXMERT
        if lx.CHECKPOINT:
            config = LxmertConfig.from_pretrained(lx.CHECKPOINT, local_files_only=True)
            have = dict(zip(LAYER_KEYS, (config.l_layers, config.r_layers, config.x_layers)))
            for key, value in have.items():
                if lx[key] and lx[key] != value:
                    raise ConfigError(f"'MODEL.LXMERT.{key}' {lx[key]} differs from {lx.CHECKPOINT}'s "
                                      f"{value} (its config.json); set 0")
            check_region_width(cls.folder_key, lx.CHECKPOINT, config.visual_feat_dim, appearance_dim)
            model = LxmertModel(config)
            load_hf_checkpoint(model, lx.CHECKPOINT, "lxmert.", "MODEL.LXMERT.CHECKPOINT")
            return model, []
        bert = bert_text_config(v.BERT_PATH)
        config = LxmertConfig(
            **{k: getattr(bert, k) for k in BERT_SHAPE_KEYS}, l_layers=lx.L_LAYERS or bert.num_hidden_layers,
            r_layers=lx.R_LAYERS or DEFAULT_R_LAYERS, x_layers=lx.X_LAYERS or DEFAULT_X_LAYERS,
            visual_feat_dim=appearance_dim, visual_pos_dim=4, pad_token_id=bert.pad_token_id,
        )
        model = LxmertModel(config)
        if v.BERT_RANDOM_INIT:
            return model, []
        loaded = copy_bert_text_side(model, v.BERT_PATH, config.l_layers)
        return model, sorted(set(model.state_dict()) - set(loaded))

    def enable_gradient_checkpointing(self) -> None:
        raise ConfigError("SOLVER.GRADIENT_CHECKPOINTING: transformers' LxmertModel does not support it")

    def region_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: features `[N, K_max, C]` (masked regions replaced under feature masking), LXMERT's
        normalised corners `[N, K_max, 4]`, validity `[N, K_max]`."""
        appearance, boxes, image_wh, counts = self.region_appearance(batch)
        features, valid = pad_per_image(self.mask_region_features(appearance, batch), counts)
        positions, _ = pad_per_image(boxes / image_wh.repeat(1, 2).to(boxes.dtype), counts)
        return features, positions, valid

    def encode(self, batch: dict[str, Any]) -> Encoded:
        device = self.lxmert.device
        ids = batch["input_ids"].to(device)
        image_index = batch["sample_image_index"].to(device)
        has_image = image_index >= 0
        any_image = batch_has_images(batch)
        if any_image:
            features, positions, valid = self.region_inputs(batch)
            slot = image_index.clamp(min=0)
            keep = has_image[:, None, None]  # text-only samples see zeros, not another sample's image
            features = torch.where(keep, features[slot], 0.0)
            positions = torch.where(keep, positions[slot], 0.0)
            region_valid = valid[slot] & has_image[:, None]
        else:
            features = torch.zeros(len(ids), 1, self.appearance_dim, device=device)
            positions = torch.zeros(len(ids), 1, 4, device=device)
            region_valid = torch.zeros(len(ids), 1, dtype=torch.bool, device=device)
        out = self.lxmert(
            input_ids=ids, visual_feats=features, visual_pos=positions,
            attention_mask=batch["text_mask"].to(device).long(), visual_attention_mask=region_valid.long(),
            token_type_ids=batch["token_type_ids"].to(device),
        )
        k_len = region_valid.shape[1] if any_image else 0
        return Encoded(out.language_output, out.vision_output[:, :k_len], region_valid[:, :k_len], has_image,
                       out.pooled_output)
