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
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.heads import HEADS, Encoded, HeadSpec, build_heads
from e2e_vl.modeling.hf import BERT_SHAPE_KEYS, bert_text_config, copy_bert_text_side, load_hf_checkpoint
from e2e_vl.modeling.hf_region_model import HFRegionModel, ModelOptions, build_hf_region_model
from e2e_vl.modeling.region_encoder import batch_has_images
from e2e_vl.modeling.registry import register_model



class VisualBert(HFRegionModel):
    """VisualBERT trained end to end. The batch is `VLBert`'s (`e2e_vl.modeling.vlbert`); each sample's
    sequence is its text `[B, T]` followed by its image's regions `[B, K_max]` (box 0 the whole image),
    padding masked out; text-only samples have no valid region. `grounded` False: see the module."""

    body_name = "visual_bert"

    def __init__(self, detector: GeneralizedRCNN, visual_bert: VisualBertModel,
                 options: ModelOptions = ModelOptions(), *, tokenizer: Any = None,
                 new_parameters: Sequence[str] = (), grounded: bool = True):
        region_heads = sorted(name for name in options.heads if name in HEADS and HEADS[name].reads_image)
        if not grounded and region_heads:
            raise ConfigError("MODEL.VISUALBERT.GROUNDED false reads no image, so the region heads "
                              f"{region_heads} cannot be trained; drop them from MODEL.VLBERT.HEADS")
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

    def enable_gradient_checkpointing(self) -> None:
        self.visual_bert.activation_checkpointing_enable()

    def encode(self, batch: dict[str, Any]) -> Encoded:
        device = self.visual_bert.device
        ids = batch["input_ids"].to(device)
        text_mask = batch["text_mask"].to(device).bool()
        token_types = batch["token_type_ids"].to(device)
        has_image = (batch["sample_image_index"].to(device) >= 0) & self.grounded
        visual, region_valid = None, torch.zeros(len(ids), 0, dtype=torch.bool, device=device)
        if self.grounded and batch_has_images(batch):
            objects, valid = self.encode_regions(batch)
            slot = batch["sample_image_index"].to(device).clamp(min=0)
            visual, region_valid = objects[slot], valid[slot] & has_image[:, None]
        if self.early_fusion:
            out = self.visual_bert(input_ids=ids, attention_mask=text_mask.long(), token_type_ids=token_types,
                                   visual_embeds=visual, visual_attention_mask=region_valid.long())
            sequence, pooled = out.last_hidden_state, out.pooler_output
        else:
            sequence = self._late_fusion(ids, text_mask, token_types, visual, region_valid)
            pooled = self.visual_bert.pooler(sequence)
        t_len = ids.shape[1]
        return Encoded(sequence[:, :t_len], sequence[:, t_len:], region_valid, has_image, pooled)

    def _late_fusion(self, ids: torch.Tensor, text_mask: torch.Tensor, token_types: torch.Tensor,
                     visual: torch.Tensor | None, region_valid: torch.Tensor) -> torch.Tensor:
        """"Without early fusion": every layer on the text alone, then one layer on text outputs + region
        embeddings. The embeddings are VisualBERT's own (text and regions share their LayerNorm)."""
        vb = self.visual_bert
        embedded = vb.embeddings(input_ids=ids, token_type_ids=token_types, visual_embeds=visual)
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


def build_visualbert_transformer(cfg: CfgNode, appearance_dim: int) -> tuple[VisualBertModel, list[str]]:
    """VisualBertModel per MODEL.VISUALBERT, and the names of its tensors that were left new although the
    rest came from a file. From CHECKPOINT: everything, strictly. Else from MODEL.VLBERT.BERT_PATH's BERT:
    embeddings and encoder layers (visual segment and position tables copied from the text ones, as
    VisualBERT's special_visual_initialize), the pooler, visual projection and extra layer new; with
    BERT_RANDOM_INIT nothing is loaded."""
    v, vb = cfg.MODEL.VLBERT, cfg.MODEL.VISUALBERT
    if vb.CHECKPOINT:
        config = VisualBertConfig.from_pretrained(vb.CHECKPOINT)
        if vb.VISUAL_EMBEDDING_DIM and vb.VISUAL_EMBEDDING_DIM != config.visual_embedding_dim:
            raise ConfigError(f"'MODEL.VISUALBERT.VISUAL_EMBEDDING_DIM' {vb.VISUAL_EMBEDDING_DIM} differs "
                              f"from {vb.CHECKPOINT}'s visual_embedding_dim {config.visual_embedding_dim}; "
                              "set 0")
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


@register_model("visualbert")
def build_visualbert(cfg: CfgNode, detector: GeneralizedRCNN | None = None) -> VisualBert:
    """VisualBERT per `cfg` (detector keys, MODEL.VLBERT's shared keys, MODEL.VISUALBERT)."""
    vb = cfg.MODEL.VISUALBERT
    return build_hf_region_model(cfg, detector, VisualBert, build_visualbert_transformer, vb.CHECKPOINT,
                                 grounded=vb.GROUNDED)
