"""VL-BERT with the detector in the loop: one module from pixels to task losses.

Data path (one call per arrow): images -> `RegionEncoder.encode_regions` (the detector in the loop, shared
with every architecture) -> sequence embeddings -> transformers' BertModel -> `encode`'s outputs -> heads
(each with its loss; `RegionEncoder.forward`, shared).
Registered as the architecture "vlbert"; built by the shared sequence `RegionEncoder.build`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import BertModel

from detector.config import CfgNode
from e2e_vl.config import register_config
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.embeddings import VisualLayerNorms
from e2e_vl.modeling.heads import Encoded, HeadSpec, build_heads, check_heads
from e2e_vl.modeling.hf import extend_token_types
from e2e_vl.modeling.init_from import ReleaseState
from e2e_vl.modeling.region_encoder import (Body, ModelOptions, RegionEncoder, batch_has_images,
                                            check_text_region,
                                            token_region_features)
from e2e_vl.modeling.registry import register_model
from e2e_vl.modeling.vlbert_weights import is_vlbert_release, read_vlbert_release

REGION_SEGMENT = 2

# MODEL.VLBERT: what only VL-BERT reads (the options every architecture reads: MODEL.VL).
register_config("MODEL.VLBERT", {
    # Initial gammas of the visual LayerNorms of text tokens and of region tokens (VL-BERT's
    # visual_scale_text_init / visual_scale_object_init; 0 = that visual term starts switched off).
    "VISUAL_SCALE_TEXT_INIT": 0.0,
    "VISUAL_SCALE_OBJECT_INIT": 0.0,
    # The region whose object feature is added to every text token when the data grounds no word in a
    # region (VCR's text_region_index does, and wins): 0 = the whole image (VL-BERT). Every sample with
    # an image must have this region, or the step stops naming it.
    "TEXT_REGION": 0,
}, owner=__name__)


@register_model("vlbert")
class VLBert(RegionEncoder):
    """VL-BERT (Su et al., ICLR 2020) trained end to end with a Detectron2-architecture Fast R-CNN.

    Sequence of a sample: `[CLS] text-A [SEP] (text-B [SEP]) RoI_0 ... RoI_K [END]`, RoI_0 the whole
    image. Input of an element = token embedding ([IMG] for regions, a learned [MASK]-region embedding
    for masked regions, [END]) + visual embedding (text: LayerNorm(object feature of RoI_0, or of the
    region `text_region_index` grounds the token in); regions:
    LayerNorm(own object feature); [END]: none) + segment (A 0, B 1, regions and [END] 2) + position (text
    0..T-1, all regions T, [END] T+1). A text-only sample has no regions and takes a learned vector as
    its visual feature. Padding sits after [END]; attention covers every real element.

    Batch (from `e2e_vl.data.collate.VLCollator`; B samples, N distinct images, T text length):
        images            [N, 3, H, W]  uint8 or float 0..255 in the detector's channel order, resized,
                                        zero-padded bottom/right (normalised here, on the device)
        image_sizes       Long [N, 2]   (h, w) of each image inside the padding
        boxes             list of N Float [K_i, 4]  resized-image pixels, box 0 = whole image
        region_masked     optional list of N Bool [K_i]: regions hidden from the model (pixels zeroed
                                        before the backbone, or features replaced; see `masking`)
        sample_image_index Long [B]     image slot of each sample, -1 = text-only; several samples may
                                        share a slot, the detector then runs once for all of them
        input_ids, token_type_ids  Long [B, T];  text_mask Bool [B, T]
        text_region_index optional Long [B, T]: region whose feature each text token takes (default 0)
        mlm_labels        optional Long [B, T], -100 = not a target
        region_labelled   optional Bool [B, K_max]; mrc_targets Float [M, C] for its True entries
                                        (row-major order over samples, then regions)
        answer_pos        optional Long [B]: index of the answer [MASK] token; vqa_targets optional
                                        Float [B, A] soft scores; vqa_labelled optional Bool [B]: the
                                        samples the vqa loss covers (questions among captions)
        itm_labels        optional Long [B]: 1 caption with its own image, 0 with another's, -1 neither
        ref_labels        optional Float [B, K_max] region targets, -1 = ignore
        object_labels     optional Long [B, K_max] region classes (VCR's regulariser), -1 = ignore
        choice_labels     optional Long [B / n]: VCR, samples grouped in consecutive runs of n choices
                                        (-1: the group's answer is unknown)
    Output dict: "loss" (weighted sum), "losses" (name -> scalar), and per head "mlm_logits" [M, V] with
    "mlm_labels" [M], "mrc_logits" [M, C], "vqa_logits" [B, A], "ref_logits" [B, K_max] (with
    "region_valid"), "vcr_logits" [B / n, n], "vcr_objects_logits" [M, 81].

    Deliberate differences from VL-BERT:
    - The visual module is a Detectron2-architecture Fast R-CNN (`detector/`), held as `self.detector`
      so state-dict keys are `detector.<Detectron2 key>`; its RPN and box predictor are kept for export
      but frozen (not used here).
    - [IMG], [END] and the [MASK]-region token are separate learned embeddings, not vocabulary entries,
      so the tokenizer and the MLM output vocabulary are BERT's unchanged.
    - Segment embedding rows 0 and 1 come from BERT, row 2 (regions) is initialised from row 0.
    - Samples of one image share one detector pass when nothing is masked (VL-BERT recomputed the CNN
      for every question); masking stays per image, so samples with masked regions get their own slot.
    """

    def __init__(
        self,
        detector: GeneralizedRCNN,
        bert: BertModel,
        *,
        heads: Sequence[str] = ("mlm", "mrc"),
        num_answers: int = 0,
        num_mrc_classes: int = 1601,
        masking: str = "pixel",
        freeze_detector: bool = False,
        object_dropout: float = 0.1,
        loss_weights: dict[str, float] | None = None,
        sep_token_id: int | None = None,
        mask_token_id: int | None = None,
        tokenizer: Any = None,
        visual_scale_text_init: float = 0.0,
        visual_scale_object_init: float = 0.0,
        appearance_norm: str = "none",
        text_region: int = 0,
    ):
        check_heads(heads, num_answers)
        if text_region < 0:
            raise ValueError(f"MODEL.VLBERT.TEXT_REGION: expected a region index >= 0, got {text_region}")
        super().__init__(detector, masking=masking, freeze_detector=freeze_detector)
        self.text_region = text_region
        self.bert = bert
        self.tokenizer = tokenizer
        config = bert.config
        hidden = config.hidden_size
        self.loss_weights = dict(loss_weights or {})
        extend_token_types(bert, 3)
        self.init_object_embedding(hidden, object_dropout=object_dropout, appearance_norm=appearance_norm)
        self.visual_norms = VisualLayerNorms(hidden, eps=config.layer_norm_eps,
                                             text_scale_init=visual_scale_text_init,
                                             object_scale_init=visual_scale_object_init)
        words = bert.embeddings.word_embeddings.weight.detach()
        std = config.initializer_range
        self.img_token = nn.Parameter(torch.randn(hidden) * std)
        self.end_token = nn.Parameter(torch.randn(hidden) * std)
        self.masked_region_token = nn.Parameter(torch.randn(hidden) * std)
        self.text_only_visual = nn.Parameter(torch.randn(hidden) * std)
        self.init_masked_region_feature(hidden)
        # [END] starts at BERT's [SEP], the masked region at [MASK]; [IMG] keeps its random start.
        with torch.no_grad():
            for param, token_id in ((self.end_token, sep_token_id),
                                    (self.masked_region_token, mask_token_id)):
                if token_id is not None:
                    param.copy_(words[token_id])
        self.heads = build_heads(heads, HeadSpec(config, bert.embeddings.word_embeddings, num_answers,
                                                 num_mrc_classes, appearance_dim=self.appearance_dim))

    body_prefixes = ("bert.", "visual_norms.")

    # -- building (the sequence: RegionEncoder.build) -------------------------------------------------------
    @classmethod
    def from_body(cls, cfg: CfgNode, detector: GeneralizedRCNN, body: Body,
                  options: ModelOptions) -> "VLBert":
        """BERT and its tokenizer from MODEL.VL.BERT_PATH (the default `build_body`); MODEL.VLBERT's keys."""
        own, tokenizer = cfg.MODEL.VLBERT, body.tokenizer
        return cls(detector, body.module, heads=options.heads, num_answers=options.num_answers,
                   num_mrc_classes=options.num_mrc_classes, masking=options.masking,
                   freeze_detector=options.freeze_detector, object_dropout=options.object_dropout,
                   loss_weights=dict(options.loss_weights), sep_token_id=tokenizer.sep_token_id,
                   mask_token_id=tokenizer.mask_token_id, tokenizer=tokenizer,
                   visual_scale_text_init=own.VISUAL_SCALE_TEXT_INIT,
                   visual_scale_object_init=own.VISUAL_SCALE_OBJECT_INIT,
                   appearance_norm=options.appearance_norm, text_region=own.TEXT_REGION)

    @classmethod
    def reads_release(cls, obj: Any) -> bool:
        return is_vlbert_release(obj)

    def read_release(self, obj: Any, source: str) -> ReleaseState | None:
        """VL-BERT's released `.model` files (e2e_vl.modeling.vlbert_weights)."""
        return read_vlbert_release(self, obj, source)

    # -- parameter groups for the engine ------------------------------------------------------------------
    @staticmethod
    def parameter_kind(name: str) -> str:
        """'detector' (detector.*), 'bert' (the pre-trained encoder, bert.*) or 'head' (everything new)."""
        return "bert" if name.startswith("bert.") else RegionEncoder.parameter_kind(name)

    def enable_gradient_checkpointing(self) -> None:
        self.bert.gradient_checkpointing_enable()

    # -- sequence -----------------------------------------------------------------------------------------
    def embed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Embeddings, segments, positions and mask of the full sequences, plus where each text token and
        region landed (`text_index` [B, T], `region_index` [B, K_max]) and region validity."""
        device = self.bert.device
        ids = batch["input_ids"].to(device)
        text_mask = batch["text_mask"].to(device).bool()
        segments_text = batch["token_type_ids"].to(device)
        image_index = batch["sample_image_index"].to(device)
        bsz, t_len = ids.shape
        has_image = image_index >= 0
        hidden = self.bert.config.hidden_size
        words = self.bert.embeddings.word_embeddings(ids)

        if batch_has_images(batch):
            check_text_region(batch, self.text_region)
            objects, valid = self.encode_regions(batch)  # [N, K, h], [N, K]
            slot = image_index.clamp(min=0)
            sample_objects = objects[slot]  # [B, K, h]
            region_valid = valid[slot] & has_image[:, None]
            text_visual = torch.where(
                has_image[:, None, None],
                token_region_features(sample_objects, batch, t_len, self.text_region),
                self.text_only_visual.to(words.dtype),
            )
            region_word = self.img_token.to(words.dtype).expand(bsz, objects.shape[1], hidden)
            masked = batch.get("region_masked")
            if masked is not None:
                flags = _pad_flags(masked, objects.shape[1], device)[slot] & region_valid
                region_word = torch.where(
                    flags[..., None], self.masked_region_token.to(words.dtype), region_word
                )
            regions = region_word + self.visual_norms.region(sample_objects)
        else:
            region_valid = torch.zeros(bsz, 0, dtype=torch.bool, device=device)
            text_visual = self.text_only_visual.to(words.dtype).expand(bsz, t_len, hidden)
            regions = words.new_zeros((bsz, 0, hidden))
        k_len = region_valid.shape[1]
        text = words + self.visual_norms.text(text_visual)
        end = self.end_token.to(words.dtype).expand(bsz, 1, hidden)

        lengths = text_mask.sum(1)
        src_embeds = torch.cat([text, regions, end], dim=1)
        src_valid = torch.cat([text_mask, region_valid, has_image[:, None]], dim=1)
        src_segments = torch.cat(
            [segments_text, segments_text.new_full((bsz, k_len + 1), REGION_SEGMENT)], dim=1
        )
        src_positions = torch.cat(
            [
                torch.arange(t_len, device=device).expand(bsz, t_len),
                lengths[:, None].expand(bsz, k_len),
                (lengths + 1)[:, None],
            ],
            dim=1,
        )
        # Stable sort puts the valid elements first, in order: the compact layout with padding at the end.
        full_order = torch.argsort((~src_valid).to(torch.int8), dim=1, stable=True)
        where = torch.argsort(full_order, dim=1)  # source element -> its place in the compact sequence
        seq_len = int(src_valid.sum(1).max())
        order = full_order[:, :seq_len]
        return {
            "inputs_embeds": src_embeds.gather(1, order[..., None].expand(-1, -1, hidden)),
            "token_type_ids": src_segments.gather(1, order),
            "position_ids": src_positions.gather(1, order),
            "attention_mask": src_valid.gather(1, order),
            "text_index": where[:, :t_len].clamp(max=seq_len - 1),
            "region_index": where[:, t_len : t_len + k_len].clamp(max=seq_len - 1),
            "region_valid": region_valid,
        }

    # -- encoder ---------------------------------------------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> Encoded:
        """BERT over the compact sequence, read back per text token and region; pooled = the [CLS] output
        (VL-BERT has no pooler layer)."""
        emb = self.embed(batch)
        hidden = self.bert(
            inputs_embeds=emb["inputs_embeds"],
            attention_mask=emb["attention_mask"].long(),
            token_type_ids=emb["token_type_ids"],
            position_ids=emb["position_ids"],
        ).last_hidden_state
        size = hidden.shape[-1]
        text_out = hidden.gather(1, emb["text_index"][..., None].expand(-1, -1, size))
        region_out = hidden.gather(1, emb["region_index"][..., None].expand(-1, -1, size))
        has_image = batch["sample_image_index"].to(hidden.device) >= 0
        return Encoded(text_out, region_out, emb["region_valid"], has_image, pooled=text_out[:, 0])


def _pad_flags(flags: Sequence[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(flags), length, dtype=torch.bool, device=device)
    for i, f in enumerate(flags):
        out[i, : len(f)] = f.to(device).bool()
    return out
