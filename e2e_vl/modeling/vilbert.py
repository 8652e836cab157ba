"""ViLBERT (Lu et al., NeurIPS 2019) with the detector in the loop: two streams joined by co-attention.

Data path (one call per arrow): images -> `RegionEncoder.region_appearance` (the detector in the loop, shared
with every architecture) -> ViLBERT's image embedding (feature + 5-d location, an [IMG] token first) ->
visual stream; text -> BERT's embeddings -> text stream (a transformers BERT); the co-attention layers join
the two at the connection points -> per-token, per-region and pooled outputs -> heads
(`RegionEncoder.forward`, shared). Registered as the architecture "vilbert".

`load_vilbert_weights` reads ViLBERT's released checkpoints (facebookresearch/vilbert-multi-task,
`pretrained_model.bin` / `multi_task_model.bin`) into this model, strictly and without full pickle.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer, BertOutput

from detector.checkpoint import CheckpointError, read_checkpoint
from detector.config import CfgNode, ConfigError
from e2e_vl.config import register_config
from detector.modeling import GeneralizedRCNN
from e2e_vl.modeling.heads import Encoded, HeadSpec, build_heads, check_heads
from e2e_vl.modeling.hf import modern_bert_names
from e2e_vl.modeling.region_encoder import (Body, ModelOptions, RegionEncoder, batch_has_images,
                                            check_region_width,
                                            pad_per_image)
from e2e_vl.modeling.registry import register_model

logger = logging.getLogger(__name__)

# The [IMG] token's location: the whole image (x1, y1, x2, y2, area, all normalised).
GLOBAL_LOCATION = (0.0, 0.0, 1.0, 1.0, 1.0)

# MODEL.VILBERT: what only ViLBERT reads (its visual stream, co-attention and released weights; the rest:
# MODEL.VL). Defaults: ViLBERT's reference configuration,
# vilbert-multi-task's bert_base_6layer_6conect.json.
def _check_vilbert_keys(cfg: CfgNode) -> None:
    weights = cfg.MODEL.VILBERT.WEIGHTS
    if weights and not os.path.isfile(weights):
        raise ConfigError(f"'MODEL.VILBERT.WEIGHTS' {weights} does not exist (a released ViLBERT file, "
                          "pretrained_model.bin or multi_task_model.bin)")
    if weights and cfg.MODEL.VILBERT.NEW_LAYERS_FROM_TEXT:
        raise ConfigError("'MODEL.VILBERT.NEW_LAYERS_FROM_TEXT' starts the layers that "
                          f"'MODEL.VILBERT.WEIGHTS' {weights} fills: set one of them")


register_config("MODEL.VILBERT", {
    # A ViLBERT checkpoint in the released layout (vilbert-multi-task pretrained_model.bin /
    # multi_task_model.bin: bert.*, cls.*, ...): loaded strictly over the whole two-stream encoder
    # (MODEL.VL.BERT_PATH must then hold the matching BERT's config and vocabulary). Empty = text
    # stream from MODEL.VL.BERT_PATH, visual stream and co-attention at random.
    "WEIGHTS": "",
    "V_HIDDEN_SIZE": 1024,
    "V_NUM_HIDDEN_LAYERS": 6,
    "V_NUM_ATTENTION_HEADS": 8,
    "V_INTERMEDIATE_SIZE": 1024,
    # Width and heads of the co-attention (each stream's queries over the other's keys and values).
    "BI_HIDDEN_SIZE": 1024,
    "BI_NUM_ATTENTION_HEADS": 8,
    # Connection points: co-attention layer i runs just before visual layer V_BIATTENTION_ID[i] and text
    # layer T_BIATTENTION_ID[i] (text layers before the first point see no image).
    "V_BIATTENTION_ID": [0, 1, 2, 3, 4, 5],
    "T_BIATTENTION_ID": [6, 7, 8, 9, 10, 11],
    "V_HIDDEN_DROPOUT_PROB": 0.1,
    "V_ATTENTION_PROBS_DROPOUT_PROB": 0.1,
    # Without WEIGHTS: start the visual stream and the co-attention as copies of the text stream's
    # pre-trained layers, not at random (`ViLBert.start_new_layers_from_text`), and train them at BERT's
    # rate. Needs both as wide as the text stream, with its heads and feed-forward width.
    "NEW_LAYERS_FROM_TEXT": False,
}, _check_vilbert_keys, owner=__name__)


@dataclasses.dataclass(frozen=True)
class ViLBertSizes:
    """The visual stream and the co-attention (ViLBERT's v_* and bi_* settings); the text stream's sizes
    are its BERT's. Defaults: the reference configuration `bert_base_6layer_6conect.json`."""

    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    t_biattention_id: tuple[int, ...] = (6, 7, 8, 9, 10, 11)
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_cfg(cls, node: CfgNode) -> "ViLBertSizes":
        """From MODEL.VILBERT (its keys are these fields, upper-cased)."""
        values = {f.name: node[f.name.upper()] for f in dataclasses.fields(cls)}
        values["v_biattention_id"] = tuple(values["v_biattention_id"])
        values["t_biattention_id"] = tuple(values["t_biattention_id"])
        return cls(**values)

    def check(self, num_text_layers: int) -> None:
        """The connection points must pair up, rise strictly and name existing layers; widths must split
        into their heads."""
        v_ids, t_ids = self.v_biattention_id, self.t_biattention_id
        if not v_ids or len(v_ids) != len(t_ids):
            raise ConfigError(f"MODEL.VILBERT.V_BIATTENTION_ID {list(v_ids)} and T_BIATTENTION_ID "
                              f"{list(t_ids)} must name the same number (>= 1) of connection points")
        for key, ids, layers in (("V_BIATTENTION_ID", v_ids, self.v_num_hidden_layers),
                                 ("T_BIATTENTION_ID", t_ids, num_text_layers)):
            if any(b <= a for a, b in zip(ids, ids[1:])) or ids[0] < 0 or ids[-1] >= layers:
                raise ConfigError(f"MODEL.VILBERT.{key} {list(ids)} must rise strictly within the stream's "
                                  f"{layers} layers (0..{layers - 1})")
        for key, width, heads in (("V_HIDDEN_SIZE", self.v_hidden_size, self.v_num_attention_heads),
                                  ("BI_HIDDEN_SIZE", self.bi_hidden_size, self.bi_num_attention_heads)):
            if width % heads:
                raise ConfigError(f"MODEL.VILBERT.{key} {width} is not a multiple of its {heads} "
                                  "attention heads")

    def visual_config(self, text: BertConfig) -> BertConfig:
        """A BERT config for the visual stream's layers (transformers' BertLayer, ViLBERT's key names)."""
        config = BertConfig(
            vocab_size=1, hidden_size=self.v_hidden_size, num_hidden_layers=self.v_num_hidden_layers,
            num_attention_heads=self.v_num_attention_heads, intermediate_size=self.v_intermediate_size,
            hidden_act=text.hidden_act, hidden_dropout_prob=self.v_hidden_dropout_prob,
            attention_probs_dropout_prob=self.v_attention_probs_dropout_prob,
            layer_norm_eps=text.layer_norm_eps, initializer_range=text.initializer_range,
        )
        config._attn_implementation = text._attn_implementation or "eager"
        return config


def box_locations(boxes: torch.Tensor, image_wh: torch.Tensor) -> torch.Tensor:
    """ViLBERT's 5-d region location `[R, 5]`: x1/W, y1/H, x2/W, y2/H and the box area over the image's."""
    wh = image_wh.to(boxes)
    corners = boxes / wh.repeat(1, 2)
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    return torch.cat([corners, area[:, None]], dim=1)


class ImageEmbeddings(nn.Module):
    """A visual token: LayerNorm(Linear(region feature) + Linear(5-d location)), then dropout."""

    def __init__(self, feature_size: int, config: BertConfig):
        super().__init__()
        self.features = nn.Linear(feature_size, config.hidden_size)
        self.location = nn.Linear(len(GLOBAL_LOCATION), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        location = self.location(locations.to(features.dtype))
        return self.dropout(self.LayerNorm(self.features(features) + location))


class CrossAttention(nn.Module):
    """Multi-head attention of one stream's queries over the other stream's keys and values, computed in
    the co-attention width (the streams' own widths may differ)."""

    def __init__(self, query_size: int, context_size: int, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(query_size, width)
        self.key = nn.Linear(context_size, width)
        self.value = nn.Linear(context_size, width)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
                ) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.query(hidden)), heads(self.key(context)), heads(self.value(context)),
            attn_mask=context_mask.to(hidden.dtype), dropout_p=self.dropout if self.training else 0.0)
        return attended.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)


class CrossOutput(nn.Module):
    """Back from the co-attention width to the stream's: dense -> dropout -> residual -> LayerNorm."""

    def __init__(self, width: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(attended)) + residual)


class CoAttentionBlock(nn.Module):
    """One stream's half of a co-attention layer: attend to the other stream, then the stream's own
    feed-forward (no self-attention in between, as in ViLBERT)."""

    def __init__(self, config: BertConfig, context_size: int, width: int, num_heads: int):
        super().__init__()
        self.cross = CrossAttention(config.hidden_size, context_size, width, num_heads,
                                    config.attention_probs_dropout_prob)
        self.cross_output = CrossOutput(width, config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
                ) -> torch.Tensor:
        attended = self.cross_output(self.cross(hidden, context, context_mask), hidden)
        return self.output(self.intermediate(attended), attended)


class CoAttentionLayer(nn.Module):
    """Both halves, each reading the other stream as it entered the layer."""

    def __init__(self, text: BertConfig, image: BertConfig, width: int, num_heads: int):
        super().__init__()
        self.text = CoAttentionBlock(text, image.hidden_size, width, num_heads)
        self.image = CoAttentionBlock(image, text.hidden_size, width, num_heads)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
                image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text(text, image, image_mask), self.image(image, text, text_mask)


class Pooler(nn.Module):
    """A stream's first token -> Linear to the co-attention width -> ReLU."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(hidden[:, 0]))


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool `[B, L]` -> `[B, 1, 1, L]`: 0 where a key may be attended, the dtype's minimum elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(
        ~valid, torch.finfo(dtype).min)[:, None, None, :]


# Parts of the model that ViLBERT's checkpoints hold; a released checkpoint must fill every tensor of them.
STREAM_PARTS = ("bert", "image_embeddings", "image_layers", "co_layers", "text_pooler", "image_pooler")


@register_model("vilbert")
class ViLBert(RegionEncoder):
    """ViLBERT (two streams, co-attention) trained end to end with the detector in the loop.

    Text stream: a transformers BERT (`self.bert`), [CLS] text [SEP] ... as the task encodes it. Visual
    stream: `[IMG] region_0 ... region_K-1`, each token LayerNorm(Linear(feature) + Linear(location)) with
    the 5-d location (x1/W, y1/H, x2/W, y2/H, area); [IMG] is the mean feature of the image's regions at the
    whole-image location. Co-attention layer i runs before text layer `t_biattention_id[i]` and visual
    layer `v_biattention_id[i]`; in it each stream's queries attend to the other stream's keys and values,
    then each stream has its own feed-forward. Pooled outputs: each stream's first token -> Linear -> ReLU,
    combined by element-wise product (ViLBERT's "mul" fusion).

    Outputs (`encode`): text `[B, T, h]`, regions `[B, K, v_hidden]` (region k = the batch's box k; [IMG]
    is only pooled), pooled `[B, bi_hidden]`. Heads are the shared ones: the VQA head reads the answer
    [MASK] token of the text stream, which sees the image through the co-attention layers.

    Deliberate differences from ViLBERT:
    - The regions include the batch's box 0 (the whole image, as every architecture here gets it), so
      [IMG]'s mean runs over it too.
    - A sample without an image keeps [IMG] only, with a zero feature: the text stream then attends to
      that one token (ViLBERT never sees text without an image).
    - Feature masking replaces a masked region's feature by a learned vector that starts at zero (ViLBERT
      zeroes it); pixel masking, the default, zeroes the box's pixels before the backbone.
    """

    def __init__(
        self,
        detector: GeneralizedRCNN,
        bert: BertModel,
        sizes: ViLBertSizes = ViLBertSizes(),
        options: ModelOptions = ModelOptions(),
        *,
        tokenizer: Any = None,
    ):
        check_heads(options.heads, options.num_answers)
        sizes.check(bert.config.num_hidden_layers)
        super().__init__(detector, masking=options.masking, freeze_detector=options.freeze_detector)
        text = bert.config
        image = sizes.visual_config(text)
        self.bert = bert
        self.tokenizer = tokenizer
        self.loss_weights = dict(options.loss_weights)
        self.connections = list(zip(sizes.t_biattention_id, sizes.v_biattention_id))
        self.image_embeddings = ImageEmbeddings(self.appearance_dim, image)
        self.sizes = sizes
        self.image_layers = nn.ModuleList(BertLayer(image) for _ in range(sizes.v_num_hidden_layers))
        self.co_layers = nn.ModuleList(
            CoAttentionLayer(text, image, sizes.bi_hidden_size, sizes.bi_num_attention_heads)
            for _ in self.connections)
        self.text_pooler = Pooler(text.hidden_size, sizes.bi_hidden_size)
        self.image_pooler = Pooler(image.hidden_size, sizes.bi_hidden_size)
        for name in STREAM_PARTS[1:]:  # all but the text stream: the new layers
            getattr(self, name).apply(lambda m: _init_bert_style(m, text.initializer_range))
        self.init_appearance_norm(options.appearance_norm)
        self.init_masked_region_feature(self.appearance_dim)
        spec = HeadSpec(text, bert.embeddings.word_embeddings, options.num_answers, options.num_mrc_classes,
                        region_hidden_size=image.hidden_size, appearance_dim=self.appearance_dim,
                        pooled_hidden_size=sizes.bi_hidden_size)
        self.heads = build_heads(options.heads, spec)
        # True once a ViLBERT checkpoint filled the visual stream and co-attention: then they train at
        # BERT's rate.
        self.streams_pretrained = False
        # True once `start_new_layers_from_text` filled the visual layers and the co-attention.
        self.layers_from_text = False
        self.gradient_checkpointing = False

    body_prefixes = tuple(f"{part}." for part in STREAM_PARTS)

    # -- building (the sequence: RegionEncoder.build) -------------------------------------------------------
    @classmethod
    def from_body(cls, cfg: CfgNode, detector: GeneralizedRCNN, body: Body,
                  options: ModelOptions) -> "ViLBert":
        """The text stream and its tokenizer from MODEL.VL.BERT_PATH (the default `build_body`); the visual
        stream and co-attention per MODEL.VILBERT."""
        return cls(detector, body.module, ViLBertSizes.from_cfg(cfg.MODEL.VILBERT), options,
                   tokenizer=body.tokenizer)

    def load_released_weights(self, cfg: CfgNode) -> None:
        """MODEL.VILBERT.WEIGHTS, when set: the whole two-stream encoder (and the MLM head)."""
        if cfg.MODEL.VILBERT.WEIGHTS:
            load_vilbert_weights(self, cfg.MODEL.VILBERT.WEIGHTS)
        elif cfg.MODEL.VILBERT.NEW_LAYERS_FROM_TEXT:
            self.start_new_layers_from_text()

    def start_new_layers_from_text(self) -> None:
        """Visual layer i <- text layer i; the co-attention layer before text layer t <- text layer t, on both
        sides: its queries, keys and values from the layer's self-attention, its output projection and
        LayerNorm from the attention's, its feed-forward from the layer's.

        Why: the co-attention otherwise starts from random and has to learn from nothing which word matches
        which region; copied from pre-trained attention, its query-key product starts as one that scores
        similar tokens high (docs/results.md, "The architectures on easy-VQA"). A ConfigError names the
        MODEL.VILBERT key whose size differs from the text stream's."""
        text, sizes = self.bert.config, self.sizes
        for key, ours, wanted in (
                ("V_HIDDEN_SIZE", sizes.v_hidden_size, text.hidden_size),
                ("BI_HIDDEN_SIZE", sizes.bi_hidden_size, text.hidden_size),
                ("V_NUM_ATTENTION_HEADS", sizes.v_num_attention_heads, text.num_attention_heads),
                ("BI_NUM_ATTENTION_HEADS", sizes.bi_num_attention_heads, text.num_attention_heads),
                ("V_INTERMEDIATE_SIZE", sizes.v_intermediate_size, text.intermediate_size)):
            if ours != wanted:
                raise ConfigError(f"MODEL.VILBERT.NEW_LAYERS_FROM_TEXT copies the text stream's layers: "
                                  f"'MODEL.VILBERT.{key}' must be its {wanted}, got {ours}")
        if sizes.v_num_hidden_layers > text.num_hidden_layers:
            raise ConfigError(f"MODEL.VILBERT.NEW_LAYERS_FROM_TEXT: 'MODEL.VILBERT.V_NUM_HIDDEN_LAYERS' "
                              f"{sizes.v_num_hidden_layers} is more than the text stream's "
                              f"{text.num_hidden_layers} layers")
        text_layers = self.bert.encoder.layer
        for layer, source in zip(self.image_layers, text_layers):
            layer.load_state_dict(source.state_dict())
        for co_layer, (t, _) in zip(self.co_layers, self.connections):
            source = text_layers[t]
            for block in (co_layer.text, co_layer.image):
                block.cross.load_state_dict(source.attention.self.state_dict())
                block.cross_output.load_state_dict(source.attention.output.state_dict())
                block.intermediate.load_state_dict(source.intermediate.state_dict())
                block.output.load_state_dict(source.output.state_dict())
        self.layers_from_text = True
        logger.info("MODEL.VILBERT.NEW_LAYERS_FROM_TEXT: %d visual and %d co-attention layers start from the "
                    "text stream's", len(self.image_layers), len(self.co_layers))

    # -- parameter groups for the engine ------------------------------------------------------------------
    def parameter_kind(self, name: str) -> str:
        """'detector'; 'bert' for the text stream, for the rest of the two-stream encoder when it came
        from a ViLBERT checkpoint, and for the visual layers and co-attention when they started from the
        text stream's; 'head' otherwise (new layers)."""
        part = name.split(".", 1)[0]
        if (part == "bert" or (part in STREAM_PARTS and self.streams_pretrained)
                or (part in ("image_layers", "co_layers") and self.layers_from_text)):
            return "bert"
        return RegionEncoder.parameter_kind(name)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def _layer(self, layer: nn.Module, *args: torch.Tensor) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    # -- visual tokens ------------------------------------------------------------------------------------
    def image_tokens(self, batch: dict[str, Any], has_image: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded visual tokens of every sample `[B, 1 + K_max, v_hidden]` ([IMG] first) and which are
        real `[B, 1 + K_max]` ([IMG] always is)."""
        device = has_image.device
        global_location = torch.tensor(GLOBAL_LOCATION, device=device)
        if not batch_has_images(batch):
            empty = self.image_embeddings(torch.zeros(1, 1, self.appearance_dim, device=device),
                                          global_location.view(1, 1, -1))
            return empty.expand(len(has_image), 1, -1), has_image.new_ones(len(has_image), 1)
        appearance, boxes, image_wh, counts = self.region_appearance(batch)
        features, valid = pad_per_image(self.mask_region_features(appearance, batch), counts)
        locations, _ = pad_per_image(box_locations(boxes, image_wh), counts)
        mean = features.sum(1) / valid.sum(1).clamp(min=1)[:, None].to(features.dtype)  # padding rows: 0
        features = torch.cat([mean[:, None], features], dim=1)
        locations = torch.cat([global_location.expand(len(counts), 1, -1), locations], dim=1)
        valid = torch.cat([valid.new_ones(len(counts), 1), valid], dim=1)
        slot = batch["sample_image_index"].to(device).clamp(min=0)
        # A sample without an image: [IMG] with a zero feature, nothing else.
        features = torch.where(has_image[:, None, None], features[slot], features.new_zeros(()))
        tokens = self.image_embeddings(features, locations[slot])
        return tokens, valid[slot] & (has_image[:, None] | (torch.arange(valid.shape[1], device=device) == 0))

    # -- encoder ------------------------------------------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> Encoded:
        device = self.bert.device
        text_valid = batch["text_mask"].to(device).bool()
        has_image = batch["sample_image_index"].to(device) >= 0
        text = self.bert.embeddings(input_ids=batch["input_ids"].to(device),
                                    token_type_ids=batch["token_type_ids"].to(device))
        image, image_valid = self.image_tokens(batch, has_image)
        text_mask, image_mask = additive_mask(text_valid, text.dtype), additive_mask(image_valid, image.dtype)
        start_t = start_v = 0
        for co_layer, (end_t, end_v) in zip(self.co_layers, self.connections):
            for layer in self.bert.encoder.layer[start_t:end_t]:
                text = self._layer(layer, text, text_mask)
            for layer in self.image_layers[start_v:end_v]:
                image = self._layer(layer, image, image_mask)
            text, image = self._layer(co_layer, text, text_mask, image, image_mask)
            start_t, start_v = end_t, end_v
        for layer in self.bert.encoder.layer[start_t:]:
            text = self._layer(layer, text, text_mask)
        for layer in self.image_layers[start_v:]:
            image = self._layer(layer, image, image_mask)
        text_pooled, image_pooled = self.text_pooler(text), self.image_pooler(image)
        return Encoded(text, image[:, 1:], image_valid[:, 1:], has_image, pooled=text_pooled * image_pooled,
                       text_pooled=text_pooled, image_pooled=image_pooled)


def _init_bert_style(module: nn.Module, std: float) -> None:
    """BERT's initialisation for the new layers: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- ViLBERT's released checkpoints ------------------------------------------------------------------------
# Our key prefix -> the released one. The text embeddings and layers keep their names (both are BERT modules
# of the same layout); the MLM head's transform and bias are BERT's cls.predictions.*.
_PREFIXES = (
    ("bert.", "bert."),
    ("image_embeddings.features.", "bert.v_embeddings.image_embeddings."),
    ("image_embeddings.location.", "bert.v_embeddings.image_location_embeddings."),
    ("image_embeddings.LayerNorm.", "bert.v_embeddings.LayerNorm."),
    ("image_layers.", "bert.encoder.v_layer."),
    ("text_pooler.", "bert.t_pooler."),
    ("image_pooler.", "bert.v_pooler."),
    ("heads.mlm.", "cls.predictions."),
)
# Inside a connection layer (released: bert.encoder.c_layer.N.*). ViLBERT's "1" is the visual side and "2"
# the text side: text queries (query2) attend to visual keys and values (key1, value1), and the reverse.
_CO_LAYER_NAMES = {
    "text.cross.query": "biattention.query2", "text.cross.key": "biattention.key1",
    "text.cross.value": "biattention.value1", "text.cross_output.dense": "biOutput.dense2",
    "text.cross_output.LayerNorm": "biOutput.LayerNorm2", "text.intermediate.dense": "t_intermediate.dense",
    "text.output.dense": "t_output.dense", "text.output.LayerNorm": "t_output.LayerNorm",
    "image.cross.query": "biattention.query1", "image.cross.key": "biattention.key2",
    "image.cross.value": "biattention.value2", "image.cross_output.dense": "biOutput.dense1",
    "image.cross_output.LayerNorm": "biOutput.LayerNorm1", "image.intermediate.dense": "v_intermediate.dense",
    "image.output.dense": "v_output.dense", "image.output.LayerNorm": "v_output.LayerNorm",
}
# Released encoder tensors this model has no use for: the multi-task model's task-token embedding, and the
# connection layers' q_dense1 / q_dense2, which ViLBERT creates but its forward never reads. Any other
# released bert.* tensor without a place here means another architecture, an error.
_UNUSED_ENCODER_KEYS = re.compile(
    r"bert\.embeddings\.task_embeddings\.|bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.")
# The MLM decoder is the word-embedding matrix (tied), loaded as bert.embeddings.word_embeddings.weight.
TIED_KEYS = ("cls.predictions.decoder.weight",)
_MAX_LISTED = 20


def released_name(ours: str) -> str:
    """The released ViLBERT key of one of our two-stream encoder (or MLM head) tensors."""
    match = re.fullmatch(r"co_layers\.(\d+)\.(.+)\.(weight|bias)", ours)
    if match:
        return f"bert.encoder.c_layer.{match[1]}.{_CO_LAYER_NAMES[match[2]]}.{match[3]}"
    for prefix, released in _PREFIXES:
        if ours.startswith(prefix):
            return released + ours[len(prefix):]
    raise KeyError(f"{ours} is not a tensor of ViLBERT's encoder")


def load_vilbert_weights(model: ViLBert, path: str | os.PathLike) -> dict[str, list[str]]:
    """Fill the two-stream encoder (and the MLM head, when the model has one and the file has
    cls.predictions.*) from a released ViLBERT checkpoint; returns the file's tensors left unused.

    Strict: every tensor of the encoder must come from the file with its shape, and every released bert.*
    tensor must have a place here (bar the known unused ones); otherwise a CheckpointError names them by
    their released names. Read with torch.load(weights_only=True) or the restricted unpickler, never full
    pickle. Tensors with no place here (pre-training and task heads: cls.bi_seq_relationship,
    cls.imagePredictions.*, vil_prediction.* ...) are logged and returned as "unmapped"."""
    path = os.fspath(path)
    state = modern_bert_names(read_checkpoint(path)[0])  # ViLBERT's own loader accepts gamma/beta too
    features = state.get(released_name("image_embeddings.features.weight"))
    if features is not None and features.dim() == 2:
        check_region_width("MODEL.VILBERT.WEIGHTS", path, features.shape[1], model.appearance_dim)
    modules: dict[str, nn.Module] = {part: getattr(model, part) for part in STREAM_PARTS}
    if "mlm" in model.heads and any(k.startswith("cls.predictions.") for k in state):
        modules["heads.mlm"] = model.heads["mlm"]
    own = {f"{prefix}.{k}": t for prefix, module in modules.items() for k, t in module.state_dict().items()}
    expected = {released_name(k): k for k in own}
    rest = sorted(set(state) - set(expected))
    problems = {
        "missing from the checkpoint": [f"{r} (ours: {o})" for r, o in expected.items() if r not in state],
        "wrong shape": [f"{r}: checkpoint {tuple(state[r].shape)} vs model {tuple(own[o].shape)}"
                        for r, o in expected.items() if r in state and state[r].shape != own[o].shape],
        "without a place in this model": [k for k in rest
                                          if k.startswith("bert.") and not _UNUSED_ENCODER_KEYS.match(k)],
    }
    listed = [f"  {title} ({len(keys)}): " + ", ".join(keys[:_MAX_LISTED])
              + (" ..." if len(keys) > _MAX_LISTED else "") for title, keys in problems.items() if keys]
    if listed:
        raise CheckpointError(f"{path} does not fit this ViLBERT (MODEL.VILBERT sizes, the BERT of "
                              "MODEL.VL.BERT_PATH, the detector's feature width):\n" + "\n".join(listed))
    with torch.no_grad():
        for released, ours in expected.items():
            own[ours].copy_(state[released].to(own[ours].dtype))
    model.streams_pretrained = True
    unmapped = [k for k in rest if k not in TIED_KEYS]
    if unmapped:
        logger.warning("%s: %d ViLBERT tensors have no place in this model and were skipped: %s",
                       path, len(unmapped), ", ".join(unmapped))
    return {"unmapped": unmapped}
