"""The visual side every VL architecture shares: the detector in the loop, from a collated batch to one
object feature per region.

images -> `GeneralizedRCNN.prepare_batch` (normalised; padding and, with pixel masking, masked boxes
zeroed) -> res4 -> `GeneralizedRCNN.region_outputs` (our RoIAlign -> res5 -> mean) -> optional running
standardisation -> object embedding (geometry + appearance) -> optional learned feature for masked
regions. An architecture subclasses `RegionEncoder`, so the detector's keys stay `detector.<Detectron2
key>` in every model's state dict.

`RegionEncoder.build` is the one build sequence of every architecture: detector (MODEL.WEIGHTS) ->
transformer body (`build_body`: its pre-trained folder) -> the model and its heads (`from_body`) -> the
heads' pre-trained tensors -> released weights the architecture reads itself (`load_released_weights`) ->
whole-model start (MODEL.INIT_FROM, `e2e_vl.modeling.init_from`) -> device. An architecture overrides only
what differs (its body, its constructor's arguments); nothing about starting weights is written per
architecture.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from detector.checkpoint import CheckpointError, load_checkpoint
from detector.checkpoint.export import DETECTOR_KEY_PREFIX, TRAINED_PREFIXES
from detector.config import CfgNode, ConfigError
from detector.modeling import GeneralizedRCNN, build_detector
from e2e_vl.modeling.embeddings import ObjectFeatureEmbedding, RunningStandardize
from e2e_vl.modeling.heads import Encoded, check_heads, run_heads
from e2e_vl.modeling.hf import check_vocabulary, load_bert, load_pretrained_heads, load_tokenizer
from e2e_vl.modeling.init_from import InitReport, ReleaseState, init_model_weights

logger = logging.getLogger(__name__)

MASKING_MODES = ("pixel", "feature")
APPEARANCE_NORMS = ("none", "running")


def build_trained_detector(cfg: CfgNode) -> GeneralizedRCNN:
    """The detector of the detector keys, loaded from MODEL.WEIGHTS when set: the one weights policy of
    every model with a detector inside.

    The trunk and res5 make every region feature, so a hole there is an error; other missing or extra
    tensors (an RPN or attribute head the file lacks) are a warning."""
    detector = build_detector(cfg)
    if not cfg.MODEL.WEIGHTS:
        return detector
    report = load_checkpoint(detector, cfg.MODEL.WEIGHTS, strict=False)
    if any(k.startswith(DETECTOR_KEY_PREFIX + TRAINED_PREFIXES[0]) for k in report["unexpected"]):
        raise CheckpointError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} is a whole-model training checkpoint (keys detector.*, "
            "bert.*, heads.*), while MODEL.WEIGHTS holds the detector's weights: start from it with "
            "MODEL.INIT_FROM (or --eval-only MODEL.WEIGHTS to evaluate it as is)")
    used = [k for k in report["missing"] if k.startswith(TRAINED_PREFIXES)]
    if used:
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
    return detector


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """MODEL.VL's keys a model reads: heads and their sizes, region masking, the detector freeze, the object
    feature's dropout and appearance standardisation, loss weights."""

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


@dataclasses.dataclass
class Body:
    """An architecture's transformer as `build_body` made it: the module, its tokenizer, the names inside
    it left new although the rest came from a file (the optimiser treats them as new layers), and the
    folder whose pre-trained head tensors fill the heads ("" = MODEL.VL.BERT_PATH's BERT)."""

    module: nn.Module
    tokenizer: Any
    new_parameters: Sequence[str] = ()
    heads_folder: str = ""


def check_region_width(key: str, source: str, reads: int, appearance_dim: int, fix: str = "") -> None:
    """The one width check of every architecture: released weights that read `reads`-wide region features
    need a detector whose pooled res5 feature is that wide (`fix`: the switch that adapts it, if any)."""
    if reads != appearance_dim:
        raise ConfigError(f"'{key}' {source} reads {reads}-d region features; the detector's res5 gives "
                          f"{appearance_dim}-d: use the detector it was trained with (MODEL.RESNETS)"
                          + (f", or {fix}" if fix else ""))


def token_region_features(sample_objects: torch.Tensor, batch: dict[str, Any], text_len: int,
                          default_region: int = 0) -> torch.Tensor:
    """The object feature of the region each text token is grounded in, `[B, T, h]`, from the per-sample
    object features `[B, K, h]`: region `text_region_index[b, t]` (VCR's object references), or region
    `default_region` for every token when the batch has no such index (VL-BERT: 0, the whole image)."""
    index = batch.get("text_region_index")
    if index is None:
        return sample_objects[:, default_region:default_region + 1].expand(-1, text_len, -1)
    index = index.to(sample_objects.device)[..., None].expand(-1, -1, sample_objects.shape[-1])
    return sample_objects.gather(1, index)


def batch_has_images(batch: dict[str, Any]) -> bool:
    """Whether any sample of the batch has an image: `(sample_image_index >= 0).any()`, decided from the
    length of the per-image box list (host data: `collate_samples` makes an image slot only for a sample
    that refers to it), so that a GPU step does not wait on the device for it."""
    return len(batch.get("boxes") or ()) > 0


def check_text_region(batch: dict[str, Any], default_region: int) -> None:
    """A sample that has an image but no region `default_region` (when the batch grounds no word itself)
    is an error, not a padding feature. Decided from the box lists' lengths (host data: every image is
    some sample's), so a GPU step waits on the device only to name the samples of a failing batch."""
    if batch.get("text_region_index") is not None:
        return
    counts = [len(b) for b in batch["boxes"]]
    if all(n > default_region for n in counts):
        return
    per_sample = [counts[i] if i >= 0 else None for i in batch["sample_image_index"].tolist()]
    if any(n is not None and n <= default_region for n in per_sample):
        raise ValueError(f"MODEL.VLBERT.TEXT_REGION {default_region}: a sample of this batch has no region "
                         f"{default_region} (regions per sample: {per_sample})")


class RegionEncoder(nn.Module):
    """Base class of the VL architectures: the detector in the loop, and the path from the encoder's
    outputs to the losses that every architecture shares (`forward` = `encode` -> heads -> weighted loss).

    A subclass implements `encode(batch) -> Encoded` and builds `self.heads` (`heads.build_heads`) and
    `self.loss_weights`. `__init__` takes the detector; `init_object_embedding` (geometry + appearance ->
    one feature per region), `init_appearance_norm` and `init_masked_region_feature`, called by the
    subclass where it wants them (VL-BERT: after its text encoder, so that initial values and parameter
    order stay those of its existing runs), add the rest. The RPN and box predictor get no gradient here
    (no loss reaches them; they are kept for export), so optimisers and DDP ignore them."""

    heads: nn.ModuleDict
    loss_weights: dict[str, float]
    # The registered name (set by `register_model`), named in errors about starting weights.
    arch: ClassVar[str] = ""
    # Key prefixes of the transformer body's tensors: what a start from another checkpoint must match in
    # shape, and how a checkpoint's architecture is recognised (all of them present).
    body_prefixes: ClassVar[tuple[str, ...]] = ()
    # The report of MODEL.INIT_FROM when the model was started from it (None otherwise).
    init_report: InitReport | None = None

    # -- the one build sequence --------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: CfgNode, detector: GeneralizedRCNN | None = None) -> "RegionEncoder":
        """The model of `cfg` on MODEL.DEVICE, in train mode (see the module docstring for the order)."""
        options = ModelOptions.from_cfg(cfg)
        check_heads(options.heads, options.num_answers)
        detector_loaded = detector is not None or bool(cfg.MODEL.WEIGHTS)
        detector = detector if detector is not None else build_trained_detector(cfg)
        body = cls.build_body(cfg, detector.roi_heads.out_channels)
        check_vocabulary(body.tokenizer, body.module.config.vocab_size)
        model = cls.from_body(cfg, detector, body, options)
        load_pretrained_heads(model.heads, body.heads_folder, cfg.MODEL.VL)
        model.load_released_weights(cfg)
        if cfg.MODEL.INIT_FROM:
            model.init_report = init_model_weights(model, cfg.MODEL.INIT_FROM,
                                                   detector_loaded=detector_loaded)
        return model.to(torch.device(cfg.MODEL.DEVICE)).train()

    @classmethod
    def build_body(cls, cfg: CfgNode, appearance_dim: int) -> Body:
        """The transformer; default: BERT and its tokenizer from MODEL.VL.BERT_PATH (empty: the embedded
        MiniLM), random weights with MODEL.VL.BERT_RANDOM_INIT."""
        v = cfg.MODEL.VL
        return Body(load_bert(v.BERT_PATH, random_init=v.BERT_RANDOM_INIT), load_tokenizer(v.BERT_PATH))

    @classmethod
    def from_body(cls, cfg: CfgNode, detector: GeneralizedRCNN, body: Body,
                  options: ModelOptions) -> "RegionEncoder":
        """The model around `detector` and `body`, its heads built (the architecture's constructor call)."""
        raise NotImplementedError

    def load_released_weights(self, cfg: CfgNode) -> None:
        """Weights the architecture reads itself after its heads exist (ViLBERT's release); default none."""

    @classmethod
    def reads_release(cls, obj: Any) -> bool:
        """Whether `obj` (a file's loaded contents) is a release this architecture reads (MODEL.INIT_FROM)."""
        return False

    def read_release(self, obj: Any, source: str) -> ReleaseState | None:
        """A release of this architecture in our key space (MODEL.INIT_FROM); None if `obj` is none."""
        return None

    def __init__(self, detector: GeneralizedRCNN, *, masking: str = "pixel", freeze_detector: bool = False):
        super().__init__()
        if masking not in MASKING_MODES:
            raise ValueError(f"MODEL.VL.MASKING: expected one of {MASKING_MODES}, got {masking!r}")
        self.detector = detector
        self.masking = masking
        self.freeze_detector = freeze_detector
        self.object_embedding: ObjectFeatureEmbedding | None = None
        self.appearance_norm: RunningStandardize | None = None
        self.masked_region_feature: nn.Parameter | None = None
        for part in (detector.proposal_generator, detector.roi_heads.box_predictor):
            if part is not None:
                part.requires_grad_(False)
        if freeze_detector:
            detector.requires_grad_(False)

    @property
    def appearance_dim(self) -> int:
        """Width of the detector's pooled region features (res5 output channels)."""
        return self.detector.roi_heads.out_channels

    def init_object_embedding(self, hidden: int, *, object_dropout: float, appearance_norm: str) -> None:
        self.object_embedding = ObjectFeatureEmbedding(hidden, appearance_dim=self.appearance_dim,
                                                       dropout=object_dropout)
        self.init_appearance_norm(appearance_norm)

    def init_appearance_norm(self, appearance_norm: str) -> None:
        if appearance_norm not in APPEARANCE_NORMS:
            raise ValueError(
                f"MODEL.VL.APPEARANCE_NORM: expected one of {APPEARANCE_NORMS}, got {appearance_norm!r}"
            )
        self.appearance_norm = (RunningStandardize(self.appearance_dim) if appearance_norm == "running"
                                else None)

    def init_masked_region_feature(self, width: int) -> None:
        """The learned feature of masked regions (feature masking only), `width` wide: it replaces the
        region's object feature (or its appearance, for architectures without an object embedding).
        Separate from `init_object_embedding` so an architecture can create it after its own parameters:
        parameter order is the order of the optimiser's saved state."""
        self.masked_region_feature = nn.Parameter(torch.zeros(width)) if self.masking == "feature" else None

    @staticmethod
    def parameter_kind(name: str) -> str:
        """'detector' for the detector's parameters, 'head' for everything an architecture adds."""
        return "detector" if name.startswith(DETECTOR_KEY_PREFIX) else "head"

    # -- encoder outputs -> heads -> losses ----------------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> Encoded:
        """Per-token, per-region and pooled outputs of the batch (see `heads.Encoded`)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """"loss" (weighted sum), "losses" (name -> scalar), "region_valid" and each head's outputs."""
        encoded = self.encode(batch)
        wanted = any(h.needs_appearance_target for h in self.heads.values())
        if wanted and "region_labelled" in batch and "images" in batch:
            encoded.appearance_target = self.appearance_targets(batch)
        return run_heads(self.heads, encoded, batch, self.loss_weights)

    @torch.no_grad()
    def appearance_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """The appearance feature of every region of every sample as the detector gives it without masking,
        `[B, K_max, C]` (zeros for text-only samples and padding): a second detector pass without gradient
        on the unmasked images, standardised with the current running statistics (not updating them)."""
        norm = self.appearance_norm
        was_training = norm is not None and norm.training
        if norm is not None:
            norm.eval()
        try:
            appearance, _, _, counts = self.region_appearance({k: v for k, v in batch.items()
                                                               if k != "region_masked"})
        finally:
            if was_training:
                norm.train()
        padded, _ = pad_per_image(appearance, counts)
        index = batch["sample_image_index"].to(padded.device)
        return torch.where((index >= 0)[:, None, None], padded[index.clamp(min=0)], 0.0)

    # -- regions -------------------------------------------------------------------------------------------
    def backbone_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The normalised image tensor the backbone sees; with pixel masking the masked boxes are zero."""
        masked = batch.get("region_masked") if self.masking == "pixel" else None
        masked_boxes = None if masked is None else [
            boxes[flags.to(boxes.device).bool()] for boxes, flags in zip(batch["boxes"], masked)]
        return self.detector.prepare_batch(batch["images"], batch["image_sizes"], masked_boxes)

    def region_appearance(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The detector's pooled feature of every region of every image, flat over images: appearance
        `[R, C]` (standardised when APPEARANCE_NORM is running), boxes `[R, 4]` (resized-image pixels),
        the (w, h) of each region's image `[R, 2]`, and the number of regions per image (host ints, from
        the box lists' lengths, so that padding per image never waits on the device)."""
        boxes = [b.to(self.detector.device).float() for b in batch["boxes"]]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_detector):
            res4 = self.detector.features(self.backbone_input(batch))
            appearance = self.detector.region_outputs(res4, boxes, scores=False)["features"]
        if self.appearance_norm is not None:
            appearance = self.appearance_norm(appearance)
        counts = [len(b) for b in boxes]
        wh = batch["image_sizes"].to(appearance.device).flip(1)
        image_wh = torch.cat([wh[i:i + 1].expand(n, 2) for i, n in enumerate(counts)])
        return appearance, torch.cat(boxes), image_wh, counts

    def mask_region_features(self, features: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Flat per-region features with the masked regions' rows replaced by the learned masked-region
        feature (feature masking; with pixel masking the pixels were already zeroed)."""
        masked = batch.get("region_masked")
        if self.masked_region_feature is None or masked is None:
            return features
        flat = torch.cat([m.to(features.device) for m in masked]).bool()
        return torch.where(flat[:, None], self.masked_region_feature.to(features.dtype), features)

    def encode_regions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Object features of every region, padded per image: `[N, K_max, hidden]`, and the validity
        `[N, K_max]`."""
        appearance, boxes, image_wh, counts = self.region_appearance(batch)
        objects = self.mask_region_features(self.object_embedding(appearance, boxes, image_wh), batch)
        return pad_per_image(objects, counts)


def pad_per_image(flat: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of all images `[R, D]` -> `[N, K_max, D]` zero-padded, and the validity `[N, K_max]`. The
    sizes are host ints: no device value decides a shape, so nothing here waits on the device."""
    rows = flat.split(list(counts))
    valid = [torch.ones(len(r), dtype=torch.bool, device=flat.device) for r in rows]
    return pad_sequence(list(rows), batch_first=True), pad_sequence(valid, batch_first=True)
