"""VL-BERT's released checkpoints (jackroos/VL-BERT `.model` files: pre-trained base/large, end-to-end or
precomputed-feature, and its VQA / RefCOCO+ / VCR fine-tuning runs) as a start of the vlbert architecture
(`MODEL.INIT_FROM`): renamed into our key space (`convert_vlbert_state_dict`), after which the one generic
step of every architecture (`e2e_vl.modeling.init_from`) copies, drops, starts fresh and reports.

VL-BERT's layout, read from its module tree (`ResNetVLBERT*` modules, `common/fast_rcnn.py`,
`common/visual_linguistic_bert.py`; key lists of the base checkpoints in `tests/data/vlbert/`): a
`torch.save` dict whose `state_dict` holds the DataParallel-wrapped model (`module.` prefix):
- `image_feature_extractor.backbone.*`: torchvision ResNet names (conv1, bn1, layer1-3, downsample) of the
  trunk up to res4; `roi_head_feature_extractor.*` is res5, stored a second time as `head.0.*` (their
  head is Sequential(res5, pool, flatten)); `obj_downsample.1` the object projection (geometry first);
- `object_linguistic_embeddings` ([IMG]), `object_mask_word_embedding` (masked region),
  `aux_text_visual_embedding` (text-only visual vector), `vlbert.end_embedding` ([END]), all 1 x hidden;
- `vlbert.{word,position,token_type}_embeddings`, `embedding_LayerNorm`, `encoder.layer.N.*` (the names of
  transformers' BERT), `visual_ln_text` / `visual_ln_object` (our visual LayerNorms);
- heads (`THEIR_HEADS`): `vlbert.mlm_head.predictions.*` (decoder tied to the word embeddings),
  `vlbert.mvrc_head.*` (1601 classes, background first as in the Caffe detector's softmax; ours has it
  last), each task's `final_mlp`; VCR wraps the transformer (`vlbert._module.*`), adds a pooler and the CNN
  regulariser `cnn_loss_reg`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import torch
from torch import nn

from detector.checkpoint import CheckpointError
from detector.checkpoint.export import DETECTOR_KEY_PREFIX
from detector.checkpoint.formats import move_first_row_last
from e2e_vl.modeling.init_from import DETECTOR_TRUNK, HEAD_PREFIX, ReleaseState, add_reason


@dataclasses.dataclass(frozen=True)
class TheirHead:
    """One of VL-BERT's heads and where it goes in our head `head`: `keys` maps their key prefixes to
    prefixes under `heads.<head>.`; the layout is recognised when every key of `signature` is present and
    none of `absent`. `background_first`: their prefixes whose rows are classes in the Caffe order
    (background first)."""

    head: str
    what: str
    keys: Mapping[str, str]
    signature: tuple[str, ...]
    absent: tuple[str, ...] = ()
    background_first: tuple[str, ...] = ()

    def present(self, sd: Mapping[str, Any]) -> bool:
        return all(k in sd for k in self.signature) and not any(k in sd for k in self.absent)


# VL-BERT's heads, by our head name (first match wins). A head of theirs without an entry is reported unused
# (THEIR_UNUSED) and ours starts fresh; a new entry is all a new mapping needs.
THEIR_HEADS: tuple[TheirHead, ...] = (
    TheirHead("mlm", "pre-training masked-LM head",
              {"vlbert.mlm_head.predictions.transform.": "transform.",
               "vlbert.mlm_head.predictions.bias": "bias"},
              signature=("vlbert.mlm_head.predictions.bias",)),
    TheirHead("mrc", "pre-training masked-RoI classification head",
              {"vlbert.mvrc_head.transform.dense.": "dense.",
               "vlbert.mvrc_head.region_cls_pred.": "classifier."},
              signature=("vlbert.mvrc_head.region_cls_pred.weight",),
              background_first=("vlbert.mvrc_head.region_cls_pred.",)),
    TheirHead("vqa", "VQA answer classifier (CLASSIFIER_TYPE mlm: BERT transform -> Dropout -> Linear)",
              {"final_mlp.0.": "transform.", "final_mlp.2.": "classifier."},
              signature=("final_mlp.0.LayerNorm.weight", "final_mlp.2.weight")),
    TheirHead("ref", "RefCOCO+ region scorer (Linear -> GELU -> Dropout -> Linear(h, 1))",
              {"final_mlp.0.dense.": "dense.", "final_mlp.2.": "classifier."},
              signature=("final_mlp.0.dense.weight", "final_mlp.2.weight"),
              absent=("final_mlp.0.LayerNorm.weight",)),
    TheirHead("vcr", "VCR choice scorer (CLASSIFIER_TYPE 1fc on the pooled [CLS])",
              {"vlbert.pooler.": "pooler.", "final_mlp.1.": "classifier."},
              signature=("vlbert.pooler.dense.weight", "final_mlp.1.weight")),
    TheirHead("vcr_objects", "VCR's 81-class region-classification regulariser (CNN_LOSS_TOP)",
              {"cnn_loss_reg.0.dense.": "dense.", "cnn_loss_reg.2.": "classifier."},
              signature=("cnn_loss_reg.2.weight",)),
)

# Tensors of VL-BERT files that we recognise and do not use, by key prefix (after `module.` is dropped).
THEIR_UNUSED: tuple[tuple[str, str], ...] = (
    ("vlbert.pooler.", "BERT pooler of a file without VCR's classifier (only the VCR head reads it)"),
    ("vlbert.relationsip_head.",
     "sentence-image relationship head (VL-BERT's released runs train without it)"),
    ("object_mask_visual_embedding.", "2048-d masked-region appearance of VL-BERT's feature-level masking "
                                      "(precomputed variants); here masked regions have their pixels zeroed"),
    ("image_feature_extractor.regularizing_predictor.", "VCR's region-classification regulariser on the raw "
                                                        "CNN features (CNN_LOSS_TOP false)"),
    ("final_mlp.",
     "task head of a fine-tuned VL-BERT of a classifier type with no counterpart (see THEIR_HEADS)"),
)

# Architectures of VL-BERT that ours does not have: refused, naming the key.
THEIR_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("vlbert.visual_1x1_", "visual_size != hidden_size (an extra Linear after the object projection)"),
    ("vlbert.visual_scale_", "visual_ln false (a scalar visual scale instead of the visual LayerNorms)"),
    ("image_feature_extractor.object_embed.", "IMAGE_SEMANTIC (a class embedding in the object feature)"),
    ("vlbert.special_word_embeddings.", "word_embedding_frozen (a second table for the first 1000 words)"),
)

# ---------------------------------------------------------------------------------------------------------
# VL-BERT's names -> ours
# ---------------------------------------------------------------------------------------------------------
_RESNET_BLOCK = re.compile(
    r"^(\d+)\.(conv(\d)\.weight|bn(\d)\.(.+)|downsample\.0\.weight|downsample\.1\.(.+))$")


def _resnet_block_key(rest: str) -> str | None:
    """`<i>.conv2.weight` / `<i>.bn2.running_var` / `<i>.downsample.1.bias` (torchvision) -> Detectron2's
    `<i>.conv2.weight` / `<i>.conv2.norm.running_var` / `<i>.shortcut.norm.bias`."""
    m = _RESNET_BLOCK.match(rest)
    if m is None:
        return None
    block, _, conv, bn, bn_param, down_param = m.groups()
    if conv:
        return f"{block}.conv{conv}.weight"
    if bn:
        return f"{block}.conv{bn}.norm.{bn_param}"
    if down_param:
        return f"{block}.shortcut.norm.{down_param}"
    return f"{block}.shortcut.weight"


def _detector_key(key: str) -> str | None:
    """Our `detector.*` key of a VL-BERT `image_feature_extractor.*` ResNet key, or None."""
    backbone = "image_feature_extractor.backbone."
    res5 = "image_feature_extractor.roi_head_feature_extractor."
    if key.startswith(res5):
        rest = _resnet_block_key(key[len(res5):])
        return None if rest is None else f"{DETECTOR_KEY_PREFIX}roi_heads.res5.{rest}"
    if not key.startswith(backbone):
        return None
    rest = key[len(backbone):]
    if rest == "conv1.weight":
        return f"{DETECTOR_KEY_PREFIX}backbone.stem.conv1.weight"
    if rest.startswith("bn1."):
        return f"{DETECTOR_KEY_PREFIX}backbone.stem.conv1.norm.{rest[len('bn1.'):]}"
    m = re.match(r"^layer(\d)\.(.+)$", rest)
    block = _resnet_block_key(m.group(2)) if m else None
    return None if block is None else f"{DETECTOR_KEY_PREFIX}backbone.res{int(m.group(1)) + 1}.{block}"


def _one_row(t: torch.Tensor) -> torch.Tensor:
    """A 1 x hidden nn.Embedding table -> our hidden-size vector (refused if it has more rows)."""
    return t[0] if t.dim() == 2 and t.shape[0] == 1 else t


# Plain renames, their prefix -> ours (`transform` reshapes the tensor).
_RENAMES: tuple[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None], ...] = (
    ("vlbert.word_embeddings.", "bert.embeddings.word_embeddings.", None),
    ("vlbert.position_embeddings.", "bert.embeddings.position_embeddings.", None),
    ("vlbert.token_type_embeddings.", "bert.embeddings.token_type_embeddings.", None),
    ("vlbert.embedding_LayerNorm.", "bert.embeddings.LayerNorm.", None),
    ("vlbert.encoder.", "bert.encoder.", None),
    ("vlbert.visual_ln_text.", "visual_norms.text.", None),
    ("vlbert.visual_ln_object.", "visual_norms.region.", None),
    ("image_feature_extractor.obj_downsample.1.", "object_embedding.proj.", None),
    ("vlbert.end_embedding.weight", "end_token", _one_row),
    ("object_linguistic_embeddings.weight", "img_token", _one_row),
    ("object_mask_word_embedding.weight", "masked_region_token", _one_row),
    ("aux_text_visual_embedding.weight", "text_only_visual", _one_row),
)

# Second names of one tensor in VL-BERT's module tree: (alias prefix, the prefix it repeats, reason).
_ALIASES: tuple[tuple[str, str, str], ...] = (
    ("image_feature_extractor.head.0.", "image_feature_extractor.roi_head_feature_extractor.",
     "res5 stored a second time (VL-BERT's head = Sequential(res5, pool))"),
    ("vlbert.mlm_head.predictions.decoder.weight", "vlbert.word_embeddings.weight",
     "MLM decoder, tied to the word embeddings"),
)


def normalise_vlbert_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's `module.` and VCR's TimeDistributed `vlbert._module.` wrapper from every key."""
    out = {}
    for key, value in sd.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[key.replace("vlbert._module.", "vlbert.", 1) if key.startswith("vlbert._module.")
            else key] = value
    return out


def is_vlbert_layout(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("vlbert.", "module.vlbert.")) for k in sd)


def convert_vlbert_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple[
        dict[str, torch.Tensor], dict[str, str], dict[str, list[str]]]:
    """VL-BERT's state dict -> (tensors under our keys, our key -> their key, their unused keys by reason).

    Heads VL-BERT's file has are renamed into `heads.<name>.` whether or not the model has them, so that
    the generic step can drop or reuse them (HEAD_INIT_FROM). Raises CheckpointError for an architecture we
    do not have and for keys that fit no known name, listing them."""
    sd = normalise_vlbert_keys(sd)
    refused = [f"{k} ({why})" for k in sd for prefix, why in THEIR_UNSUPPORTED if k.startswith(prefix)]
    rows = sd.get("object_linguistic_embeddings.weight")
    if rows is not None and rows.shape[0] != 1:
        refused.append(f"object_linguistic_embeddings.weight {tuple(rows.shape)} (object_word_embed_mode 1: "
                       "a word per object class; ours has one [IMG] token)")
    if refused:
        raise CheckpointError(f"{source}: a VL-BERT variant this model cannot reproduce:\n    "
                              + "\n    ".join(refused))
    ours: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unused: dict[str, list[str]] = {}
    unknown: list[str] = []

    def put(our_key: str, their_key: str, value: torch.Tensor) -> None:
        ours[our_key], origin[our_key] = value, their_key

    heads = [h for h in THEIR_HEADS if h.present(sd)]
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            add_reason(unused, "BatchNorm step counters (FrozenBN keeps none)", key)
            continue
        alias = next(((a, b, why) for a, b, why in _ALIASES if key.startswith(a)), None)
        if alias is not None:
            original = alias[1] + key[len(alias[0]):]
            if original not in sd or not torch.equal(sd[original], value):
                raise CheckpointError(f"{source}: {key} should repeat {original} ({alias[2]}) but "
                                      f"{'it is absent' if original not in sd else 'the two differ'}")
            add_reason(unused, alias[2], key)
            continue
        detector_key = _detector_key(key)
        if detector_key is not None:
            put(detector_key, key, value)
            continue
        rename = next(((a, b, f) for a, b, f in _RENAMES if key.startswith(a)), None)
        if rename is not None:
            put(rename[1] + key[len(rename[0]):], key, rename[2](value) if rename[2] else value)
            continue
        head = next(((h, p) for h in heads for p in h.keys if key.startswith(p)), None)
        if head is not None:
            their_head, prefix = head
            if any(key.startswith(p) for p in their_head.background_first):
                value = move_first_row_last(value)
            put(f"{HEAD_PREFIX}{their_head.head}.{their_head.keys[prefix]}{key[len(prefix):]}", key, value)
            continue
        reason = next((why for prefix, why in THEIR_UNUSED if key.startswith(prefix)), None)
        if reason is None:
            unknown.append(f"{key} {tuple(value.shape)}")
        else:
            add_reason(unused, reason, key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors fit no name of VL-BERT's layout known "
                              "here:\n    " + "\n    ".join(unknown[:20]))
    return ours, origin, unused


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def _architecture_checks(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                         origin: Mapping[str, str]) -> list[str]:
    """Errors for a BERT of another size or options without a VL-BERT counterpart; notes for differences
    that only shift the features (e.g. the stem's max-pool)."""
    notes = []
    bert = getattr(model, "bert", None)
    if bert is not None:
        layers = {int(m.group(1)) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
        words = state.get("bert.embeddings.word_embeddings.weight")
        have = (bert.config.num_hidden_layers, bert.config.hidden_size)
        got = (max(layers) + 1 if layers else have[0], words.shape[1] if words is not None else have[1])
        if got != have:
            raise CheckpointError(
                f"{source}: a BERT of {got[0]} layers x {got[1]} hidden, the model's is {have[0]} x "
                f"{have[1]}; set MODEL.VL.BERT_PATH to the matching BERT folder (bert-base-uncased: 12 x "
                "768, bert-large-uncased: 24 x 1024)")
    if origin and getattr(model, "appearance_norm", None) is not None:
        raise CheckpointError(f"{source}: MODEL.VL.APPEARANCE_NORM 'running' has no counterpart in "
                              "VL-BERT's weights (its object projection reads the raw pooled features); set "
                              "it to none")
    stem = getattr(getattr(getattr(model, "detector", None), "backbone", None), "stem", None)
    if (origin and any(k.startswith(DETECTOR_TRUNK) for k in state)
        and getattr(stem, "caffe_maxpool", False)):
        notes.append("VL-BERT ran its ResNet with a padded max-pool stem (MODEL.CAFFE_MAXPOOL false); "
                     "this model's is Caffe's (true), which shifts res4 by a pixel")
    return notes


def is_vlbert_release(obj: Any) -> bool:
    """A VL-BERT release: a dict whose `state_dict` has vlbert.* keys."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
            and is_vlbert_layout(obj["state_dict"]))


def read_vlbert_release(model: nn.Module, obj: Any, source: str) -> ReleaseState | None:
    """A VL-BERT release `obj` (read from `source`) in our key space, checked against `model` (BERT size,
    options without a VL-BERT counterpart); None when `obj` is no VL-BERT release."""
    if not is_vlbert_release(obj):
        return None
    tensors = {k: v for k, v in obj["state_dict"].items() if isinstance(v, torch.Tensor)}
    ours, origin, unused = convert_vlbert_state_dict(tensors, source=source)
    notes = _architecture_checks(model, ours, source, origin)
    return ReleaseState(ours, "VL-BERT checkpoint", origin, unused, notes)
