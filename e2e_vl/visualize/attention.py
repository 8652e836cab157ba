"""Attention from words to regions, read from any of the four architectures, and one call that answers a
question about an image with everything a picture of it needs (`explain`).

The probabilities are recomputed from the query and key projections that forward hooks record
(softmax(q k^T / sqrt(d)) per head), so they are the same whether a layer runs eager attention or fused
SDPA, and no model code changes. That holds for one sample at a time with nothing padded (every key is
real), which `explain` guarantees; models keep dropout off in eval mode.

Where the words meet the regions (`attention_sites`): VL-BERT and VisualBERT (single-stream) - every
layer's joint self-attention, text tokens first and regions next; LXMERT - each cross-modality layer's
language->vision attention (its first call: the same module then runs vision->language); ViLBERT - each
co-attention layer's text->image attention, whose keys start with the [IMG] token.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from e2e_vl.data.collate import collate_samples


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention module where words attend to regions: `module.query` / `module.key` are the Linear
    projections; `region_start`: where the regions begin among its keys when text keys come first
    (single-stream: the text length, added at run time) or the fixed offset in the image stream."""

    name: str
    module: nn.Module
    num_heads: int
    joint: bool  # keys = text then regions (self-attention); else keys = the image stream
    region_offset: int = 0  # image stream: keys before the first region ([IMG] in ViLBERT)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The word->region attention modules of `model`, in layer order (see the module docstring)."""
    arch = getattr(model, "arch", "")
    if arch == "vlbert":
        heads = model.bert.config.num_attention_heads
        return [AttentionSite(f"layer{i}", layer.attention.self, heads, True)
                for i, layer in enumerate(model.bert.encoder.layer)]
    if arch == "visualbert":
        heads = model.visual_bert.config.num_attention_heads
        if not model.early_fusion:
            extra = model.visual_bert.additional_layer
            return [AttentionSite("additional_layer", extra.attention.self, heads, True)]
        return [AttentionSite(f"layer{i}", layer.attention.self, heads, True)
                for i, layer in enumerate(model.visual_bert.encoder.layer)]
    if arch == "lxmert":
        return [AttentionSite(f"x_layer{i}", layer.visual_attention.att,
                              layer.visual_attention.att.num_attention_heads, False)
                for i, layer in enumerate(model.lxmert.encoder.x_layers)]
    if arch == "vilbert":
        return [AttentionSite(f"co_layer{i}", layer.text.cross, layer.text.cross.num_heads, False,
                              region_offset=1)
                for i, layer in enumerate(model.co_layers)]
    raise ValueError(f"no word->region attention is known for architecture {arch!r}")


@contextlib.contextmanager
def record_projections(sites: Sequence[AttentionSite]) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Record each site's first query and key projection outputs of the forward pass run inside."""
    found: list[dict[str, torch.Tensor]] = [{} for _ in sites]
    handles = []
    for slot, site in zip(found, sites):
        for part in ("query", "key"):
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor, slot=slot, part=part) -> None:
                slot.setdefault(part, out.detach().float())
            handles.append(getattr(site.module, part).register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[1, Lq, H*d]`, `[1, Lk, H*d]` -> `[H, Lq, Lk]` scaled dot-product attention probabilities."""
    q = query[0].view(query.shape[1], num_heads, -1).transpose(0, 1)
    k = key[0].view(key.shape[1], num_heads, -1).transpose(0, 1)
    return torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)


def word_region_attention(site: AttentionSite, probs: torch.Tensor, text_len: int, num_regions: int
                          ) -> np.ndarray:
    """`[H, T, K + 1]`: each text token's attention to each region, and in the last column the rest of its
    attention (text tokens, [END], [IMG]), so every row sums to one."""
    start = text_len if site.joint else site.region_offset
    words = probs[:, :text_len]
    regions = words[..., start:start + num_regions]
    rest = (1.0 - regions.sum(-1, keepdim=True)).clamp(min=0.0)  # cross-attention: 0 up to rounding
    return torch.cat([regions, rest], dim=-1).numpy()


@dataclasses.dataclass
class Explanation:
    """What a model made of one image and one text: its tokens, the answers it ranks highest (empty
    without a vqa head), and per site the word->region attention `[H, T, K + 1]` (`word_region_attention`)."""

    tokens: list[str]
    answers: list[tuple[str, float]]
    attention: dict[str, np.ndarray]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "answers": [{"answer": a, "probability": p} for a, p in self.answers],
                "attention": {name: a.tolist() for name, a in self.attention.items()}}


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """How a run encodes its questions (DATASETS.MAX_QUESTION_TOKENS, DATASETS.ANSWER_SEGMENT): the
    text must reach the model as it was trained."""

    max_tokens: int = 16
    answer_segment: int = 1

    @classmethod
    def from_cfg(cls, cfg: Any) -> "TextLayout":
        return cls(cfg.DATASETS.MAX_QUESTION_TOKENS, cfg.DATASETS.ANSWER_SEGMENT)


def text_sample(model: nn.Module, text: str, layout: TextLayout = TextLayout()) -> dict[str, Any]:
    """The text part of a sample: VQA's `[CLS] question [SEP] [MASK] [SEP]` layout when the model has a
    vqa head (the answer is read at the [MASK]), else `[CLS] caption [SEP]`."""
    from e2e_vl.data.vqa import encode_vqa_text

    tokenizer = model.tokenizer
    if "vqa" in model.heads:
        return encode_vqa_text(tokenizer, text, layout.max_tokens, layout.answer_segment)
    ids = tokenizer(text, add_special_tokens=True, truncation=True,
                    max_length=layout.max_tokens + 2)["input_ids"]
    return {"input_ids": torch.tensor(ids), "token_type_ids": torch.zeros(len(ids), dtype=torch.long)}


@torch.no_grad()
def explain(model: nn.Module, image: torch.Tensor, boxes: torch.Tensor, text: str,
            answer_names: Sequence[str] = (), top_k: int = 5, layout: TextLayout = TextLayout()
            ) -> Explanation:
    """Run `model` (eval mode) on one resized image `[3, h, w]` with its boxes `[K, 4]` (resized-image
    pixels, box 0 the whole image) and one question or caption; the top-k answers (with `answer_names`
    for the vqa head's classes) and every site's word->region attention. The function a page calls."""
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"boxes: expected a non-empty [K, 4] tensor, got shape {tuple(boxes.shape)}")
    was_training = model.training
    model.eval()
    sample = {"image": image, "boxes": boxes.float(), **text_sample(model, text, layout)}
    batch = collate_samples([sample], model.tokenizer.pad_token_id)
    sites = attention_sites(model)
    try:
        with record_projections(sites) as found:
            out = model(batch)
    finally:
        model.train(was_training)
    ids = sample["input_ids"]
    text_len, num_regions = len(ids), len(boxes)
    attention = {}
    for site, proj in zip(sites, found):
        if "query" not in proj:
            raise RuntimeError(f"attention site {site.name} did not run")
        probs = attention_probabilities(proj["query"], proj["key"], site.num_heads)
        attention[site.name] = word_region_attention(site, probs, text_len, num_regions)
    answers: list[tuple[str, float]] = []
    if "vqa_logits" in out:
        p = torch.sigmoid(out["vqa_logits"][0].float())  # the vqa head is trained with binary cross-entropy
        values, index = p.topk(min(top_k, len(p)))
        names = list(answer_names) or [f"answer{i}" for i in range(len(p))]
        answers = [(names[i], float(v)) for v, i in zip(values.tolist(), index.tolist())]
    return Explanation(model.tokenizer.convert_ids_to_tokens(ids.tolist()), answers, attention)
