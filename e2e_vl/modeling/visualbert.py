"""VisualBERT (Li et al. 2019) with the detector in the loop: transformers' `VisualBertModel` reads our
region features, so its gradients reach the detector. Registered as the architecture "visualbert".

Data path: images -> `RegionEncoder.encode_regions` (pixel masking, res5 features, object feature = box
geometry + appearance, made `visual_embedding_dim` wide) -> VisualBertModel (text tokens, then one token
per region: its visual projection + visual segment 1 + visual position 0, one joint LayerNorm) -> per-token,
per-region and pooled outputs -> the shared heads (`RegionEncoder.forward`).

The paper's two ablations are switches (MODEL.VISUALBERT):
- EARLY_FUSION False ("without early fusion"): the text alone runs through every transformer layer; the
  regions' embeddings join it in one extra layer on top (`additional_layer`, HF's `bypass_transformer`
  layout), so no layer but the last sees text and image together. Run by this module: transformers 5's
  own bypass path indexes its mask wrongly and returns the wrong variable.
- GROUNDED False ("without grounded pre-training": the paper pre-trained on COCO's captions without their
  images): every sample is read as text only, the detector is not run and no region token exists. It is
  meant for the pre-training stage (HEADS [mlm]; its loss is then "mlm_text"); fine-tuning loads that
  checkpoint with GROUNDED true, the parameters being the same.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import VisualBertConfig, VisualBertModel

from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.heads import HEADS, Encoded, HeadSpec, build_heads
from e2e_vl.modeling.hf import BERT_SHAPE_KEYS, bert_text_config, copy_bert_text_side, load_hf_checkpoint
from e2e_vl.modeling.hf_region_model import HFRegionModel
from e2e_vl.modeling.region_encoder import Body, ModelOptions, batch_has_images, check_region_width
from e2e_vl.modeling.registry import register_model


# MODEL.VISUALBERT: what only VisualBERT reads (the rest: MODEL.VL).
register_config("MODEL.VISUALBERT", {
    # Local Hugging Face folder of a VisualBERT (uclanlp/visualbert-* layout: config.json +
    # model.safetensors or pytorch_model.bin; a VisualBertModel or a model with a visual_bert.* body).
    # Empty: text side from MODEL.VL.BERT_PATH, visual parts new (or all random, BERT_RANDOM_INIT).
    "CHECKPOINT": "",
    # Width of the region feature VisualBERT projects (its visual_embedding_dim); 0 = the detector's res5
    # width, which a CHECKPOINT's must then equal. The object feature (box geometry + appearance, a new
    # layer) is made this wide: set to a CHECKPOINT's width, it adapts a detector of another width.
    "VISUAL_EMBEDDING_DIM": 0,
    # False = the paper's "without early fusion" ablation: the text runs through every layer alone and
    # the regions join in one extra layer on top (HF's bypass_transformer / additional_layer.* keys).
    "EARLY_FUSION": True,
    # False = the paper's "without grounded pre-training" ablation: the model reads the text only (the
    # detector is not run, no region tokens); pre-train with it, then fine-tune with True.
    "GROUNDED": True,
}, owner=__name__)



@register_model("visualbert")
class VisualBert(HFRegionModel):
    """VisualBERT trained end to end. The batch is `VLBert`'s (`e2e_vl.modeling.vlbert`); each sample's
    sequence is its text `[B, T]` followed by its image's regions `[B, K_max]` (box 0 the whole image),
    padding masked out; text-only samples have no valid region. `grounded` False: see the module."""

    body_name = "visual_bert"
    body_prefixes = ("visual_bert.",)
    folder_key = "MODEL.VISUALBERT.CHECKPOINT"
    model_type = "visual_bert"
    # A batch may give each sample a second image (`second_image_index`, NLVR2's pair format): its regions
    # follow the first image's in the one sequence, visual segment 0 for the first image, 1 for the second.
    reads_image_pairs = True

    def __init__(self, detector: GeneralizedRCNN, visual_bert: VisualBertModel,
                 options: ModelOptions = ModelOptions(), *, tokenizer: Any = None,
                 new_parameters: Sequence[str] = (), grounded: bool = True):
        region_heads = sorted(name for name in options.heads if name in HEADS and HEADS[name].reads_image)
        if not grounded and region_heads:
            raise ConfigError("MODEL.VISUALBERT.GROUNDED false reads no image, so the region heads "
                              f"{region_heads} cannot be trained; drop them from MODEL.VL.HEADS")
        super().__init__(detector, options, tokenizer=tokenizer, new_parameters=new_parameters)
        self.visual_bert = visual_bert
        self.grounded = grounded
        self.early_fusion = not visual_bert.config.bypass_transformer
        width = visual_bert.config.visual_embedding_dim
        self.init_object_embedding(width, object_dropout=options.object_dropout,
                                   appearance_norm=options.appearance_norm)
        self.init_masked_region_feature(width)
        spec = HeadSpec(visual_bert.config, visual_bert.embeddings.word_embeddings, options.num_answers,
                        options.num_mrc_classes, appearance_dim=self.appearance_dim)
        self.heads = build_heads(options.heads, spec)

    @classmethod
    def from_body(cls, cfg: CfgNode, detector: GeneralizedRCNN, body: Body,
                  options: ModelOptions) -> "VisualBert":
        return cls(detector, body.module, options, tokenizer=body.tokenizer,
                   new_parameters=body.new_parameters, grounded=cfg.MODEL.VISUALBERT.GROUNDED)

    @classmethod
    def build_transformer(cls, cfg: CfgNode, appearance_dim: int) -> tuple[VisualBertModel, list[str]]:
        """VisualBertModel per MODEL.VISUALBERT, and the names of its tensors that were left new although the
        rest came from a file. From CHECKPOINT: everything, strictly. Else from MODEL.VL.BERT_PATH's BERT:
        embeddings and encoder layers (visual segment and position tables copied from the text ones, as
        VisualBERT's special_visual_initialize), the pooler, visual projection and extra layer new; with
        BERT_RANDOM_INIT nothing is loaded."""
        v, vb = cfg.MODEL.VL, cfg.MODEL.VISUALBERT
        if vb.CHECKPOINT:
            config = VisualBertConfig.from_pretrained(vb.CHECKPOINT, local_files_only=True)
            width, asked = config.visual_embedding_dim, vb.VISUAL_EMBEDDING_DIM
            if asked and asked != width:
                raise ConfigError(f"'MODEL.VISUALBERT.VISUAL_EMBEDDING_DIM' {asked} differs from "
                                  f"{vb.CHECKPOINT}'s visual_embedding_dim {width} (its config.json); set 0")
            if not asked:  # set to the folder's width, the switch: the object embedding adapts the detector
                check_region_width(cls.folder_key, vb.CHECKPOINT, width, appearance_dim,
                                   fix=f"set MODEL.VISUALBERT.VISUAL_EMBEDDING_DIM {width} to let the (new) "
                                       "object embedding project the detector's features to it")
            config.bypass_transformer = not vb.EARLY_FUSION
            model = VisualBertModel(config)
            load_hf_checkpoint(model, vb.CHECKPOINT, "visual_bert.", "MODEL.VISUALBERT.CHECKPOINT")
            return model, []
        bert = bert_text_config(v.BERT_PATH)
        config = VisualBertConfig(
            **{k: getattr(bert, k) for k in BERT_SHAPE_KEYS}, pad_token_id=bert.pad_token_id,
            layer_norm_eps=bert.layer_norm_eps, num_hidden_layers=bert.num_hidden_layers,
            visual_embedding_dim=vb.VISUAL_EMBEDDING_DIM or appearance_dim,
            bypass_transformer=not vb.EARLY_FUSION, special_visual_initialize=True,
        )
        model = VisualBertModel(config)
        if v.BERT_RANDOM_INIT:
            return model, []
        loaded = copy_bert_text_side(model, v.BERT_PATH, config.num_hidden_layers)
        emb = model.embeddings
        with torch.no_grad():
            emb.visual_token_type_embeddings.weight.copy_(emb.token_type_embeddings.weight)
            emb.visual_position_embeddings.weight.copy_(emb.position_embeddings.weight)
        copied = {"embeddings.visual_token_type_embeddings.weight",
                  "embeddings.visual_position_embeddings.weight"}
        return model, sorted(set(model.state_dict()) - set(loaded) - copied)

    def enable_gradient_checkpointing(self) -> None:
        self.visual_bert.activation_checkpointing_enable()

    def encode(self, batch: dict[str, Any]) -> Encoded:
        device = self.visual_bert.device
        ids = batch["input_ids"].to(device)
        text_mask = batch["text_mask"].to(device).bool()
        token_types = batch["token_type_ids"].to(device)
        has_image = (batch["sample_image_index"].to(device) >= 0) & self.grounded
        visual, region_valid = None, torch.zeros(len(ids), 0, dtype=torch.bool, device=device)
        visual_types = None  # VisualBertModel's default: visual segment 1 for every region
        if self.grounded and batch_has_images(batch):
            objects, valid = self.encode_regions(batch)
            slot = batch["sample_image_index"].to(device).clamp(min=0)
            visual, region_valid = objects[slot], valid[slot] & has_image[:, None]
            if "second_image_index" in batch:
                second = batch["second_image_index"].to(device)
                visual = torch.cat([visual, objects[second]], dim=1)
                region_valid = torch.cat([region_valid, valid[second] & has_image[:, None]], dim=1)
                visual_types = torch.cat([torch.zeros_like(valid[slot]), torch.ones_like(valid[second])],
                                         dim=1).long()
        if self.early_fusion:
            out = self.visual_bert(input_ids=ids, attention_mask=text_mask.long(), token_type_ids=token_types,
                                   visual_embeds=visual, visual_attention_mask=region_valid.long(),
                                   visual_token_type_ids=visual_types)
            sequence, pooled = out.last_hidden_state, out.pooler_output
        else:
            sequence = self._late_fusion(ids, text_mask, token_types, visual, region_valid, visual_types)
            pooled = self.visual_bert.pooler(sequence)
        t_len = ids.shape[1]
        return Encoded(sequence[:, :t_len], sequence[:, t_len:], region_valid, has_image, pooled)

    def _late_fusion(self, ids: torch.Tensor, text_mask: torch.Tensor, token_types: torch.Tensor,
                     visual: torch.Tensor | None, region_valid: torch.Tensor,
                     visual_types: torch.Tensor | None = None) -> torch.Tensor:
        """"Without early fusion": every layer on the text alone, then one layer on text outputs + region
        embeddings. The embeddings are VisualBERT's own (text and regions share their LayerNorm)."""
        vb = self.visual_bert
        embedded = vb.embeddings(input_ids=ids, token_type_ids=token_types, visual_embeds=visual,
                                 visual_token_type_ids=visual_types)
        t_len = ids.shape[1]
        text = vb.encoder(embedded[:, :t_len],
                          attention_mask=_additive_mask(text_mask, embedded.dtype)).last_hidden_state
        joint = torch.cat([text, embedded[:, t_len:]], dim=1)
        mask = _additive_mask(torch.cat([text_mask, region_valid], dim=1), embedded.dtype)
        return vb.additional_layer(joint, mask)[0]


def _additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[B, L]` validity -> the `[B, 1, 1, L]` score offsets BERT-style layers add (0 or the dtype's
    minimum)."""
    return (~valid.bool())[:, None, None, :].to(dtype) * torch.finfo(dtype).min
