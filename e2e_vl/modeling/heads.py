"""Task heads on a VL model's encoded sequence, each with its own loss, in one registry.

Pre-training: masked language modelling (tied to the word embeddings) and masked RoI classification.
Fine-tuning: the VQA answer classifier (shared by easy-VQA and VQA v2), a per-region scorer (RefCOCO+)
and a per-choice scorer (VCR). A head is one class: `HEADS[name].build(spec)` makes it, and its
`outputs(encoded, batch)` returns its logits and losses (or None when the batch has no inputs for it), so a
model's forward is one loop over its heads. Registration order is build and loss order.
The other architectures' pre-training objectives (itm, mrc_kl, obj_label, feat_regression, contrastive)
register from `e2e_vl.modeling.objectives`, which the package imports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.bert.modeling_bert import BertPooler, BertPredictionHeadTransform

from e2e_vl.data.collate import (
    BATCH_TARGETS,
    AnswerTargets,
    BatchTarget,
    GroupTargets,
    LabelledRegionTargets,
    RegionTargets,
    SampleTargets,
    TokenTargets,
)
from e2e_vl.data.masking import IGNORE_INDEX

# Targets more than one head reads (declared once, batched once).
MASKED_REGIONS = LabelledRegionTargets(flags="region_labelled", rows="mrc_targets")
IMAGE_TEXT_MATCH = SampleTargets("itm_labels", fill=-1)  # 1 matched, 0 another image's; -1 not a pair


@dataclasses.dataclass
class Encoded:
    """What heads read, whatever the architecture: the final hidden state of every text token `[B, T, h]`
    and region `[B, K, h]`, which regions exist, which samples have an image, and one pooled vector per
    sample `[B, h]` (the architecture's own summary: VL-BERT's [CLS] output, the pooler of VisualBERT and
    LXMERT; every architecture sets it, None is for hand-built inputs to heads that do not read it)."""

    text: torch.Tensor
    regions: torch.Tensor
    region_valid: torch.Tensor
    has_image: torch.Tensor
    pooled: torch.Tensor | None = None
    # Per-modality summaries for the contrastive loss (`text_summary`, `image_summary`): an architecture
    # with a summary of its own per stream (a two-stream pooler) sets them; None = the defaults below.
    text_pooled: torch.Tensor | None = None
    image_pooled: torch.Tensor | None = None
    # The unmasked appearance feature of every region `[B, K, C]`, detached: the RoI-feature regression
    # target, filled by `RegionEncoder.forward` only when a head asks for it (`Head.needs_appearance_target`).
    appearance_target: torch.Tensor | None = None

    def text_summary(self) -> torch.Tensor:
        """`[B, h]`: `text_pooled`, else the first text token's output ([CLS], as ALIGN pools its text)."""
        return self.text_pooled if self.text_pooled is not None else self.text[:, 0]

    def image_summary(self) -> torch.Tensor:
        """`[B, h]`: `image_pooled`, else the mean of the valid region outputs (zeros without regions).
        Why a mean: every architecture has region outputs, not all have an image token."""
        if self.image_pooled is not None:
            return self.image_pooled
        weights = self.region_valid.to(self.regions.dtype)[..., None]
        return (self.regions * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclasses.dataclass
class HeadSpec:
    """What a head may be built from: the text encoder's config and word embeddings, the width of the
    per-region outputs, and the sizes the task declares (answers, region classes)."""

    config: Any
    word_embeddings: nn.Embedding
    num_answers: int = 0
    num_mrc_classes: int = 0
    # Width of `Encoded.regions` where it is not the text's (two streams, as in ViLBERT); 0 = the text's.
    region_hidden_size: int = 0
    appearance_dim: int = 0  # width of the detector's region features (RoI-feature regression's output)
    # Width of `Encoded.pooled`, `text_pooled` and `image_pooled` where a model sets them to other than
    # the text's (ViLBERT's bi-attention width); 0 = the text's.
    pooled_hidden_size: int = 0

    @property
    def region_size(self) -> int:
        return self.region_hidden_size or self.config.hidden_size

    @property
    def pooled_size(self) -> int:
        return self.pooled_hidden_size or self.config.hidden_size


HEADS: dict[str, type["Head"]] = {}


def register_head(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        cls.name = name
        HEADS[name] = cls
        BATCH_TARGETS[name] = cls.targets  # what the collate builds for it
        return cls

    return add


def build_heads(names: Sequence[str], spec: HeadSpec) -> nn.ModuleDict:
    """The registered heads among `names`, in registration order; unknown names or a vqa head without
    answers are errors naming them (raised before any weights are loaded)."""
    check_heads(names, spec.num_answers)
    return nn.ModuleDict({name: cls.build(spec) for name, cls in HEADS.items() if name in names})


def check_heads(names: Sequence[str], num_answers: int) -> None:
    unknown = set(names) - set(HEADS)
    if unknown:
        raise ValueError(f"MODEL.VL.HEADS: unknown heads {sorted(unknown)}; expected some of "
                         f"{tuple(HEADS)}")
    if "vqa" in names and num_answers < 1:
        raise ValueError(f"MODEL.VL.NUM_ANSWERS must be >= 1 for the vqa head, got {num_answers}")


def run_heads(heads: Mapping[str, "Head"], encoded: Encoded, batch: dict[str, Any],
              loss_weights: Mapping[str, float]) -> dict[str, Any]:
    """Every head's outputs and losses, and "loss" = the weighted sum (a zero carrying the graph when the
    batch has no targets, as at inference). A batch with inputs for none of the heads is an error."""
    out: dict[str, Any] = {"losses": {}, "region_valid": encoded.region_valid}
    for head in heads.values():
        result = head.outputs(encoded, batch)
        if result is not None:
            out["losses"].update(result.pop("losses"))
            out.update(result)
    if not any(k.endswith("_logits") for k in out):
        raise ValueError(f"batch has inputs for none of the model's heads {list(heads)}; batch keys: "
                         f"{sorted(batch)}")
    out["loss"] = sum((loss_weights.get(k, 1.0) * v for k, v in out["losses"].items()),
                      encoded.text.sum() * 0.0)
    return out


class Head(nn.Module):
    name: str
    # True: the head reads `Encoded.appearance_target`, which costs a detector pass without masking.
    needs_appearance_target: bool = False
    # True: the head has nothing to learn from a model that reads no image (VisualBERT's GROUNDED false).
    reads_image: bool = False
    # Keys of the text encoder's checkpoint (under this prefix, or "bert." + it) that fill this head's
    # parameters of the same names (`e2e_vl.modeling.hf.load_pretrained_head_weights`); None = none.
    pretrained_prefix: str | None = None
    # The sample keys this head reads and how they are batched; `e2e_vl.data.collate` builds the batch
    # from these declarations, so a new head brings its targets with it.
    targets: tuple[BatchTarget, ...] = ()

    @classmethod
    def build(cls, spec: HeadSpec) -> "Head":
        raise NotImplementedError

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        """`{"<name>_logits": ..., "losses": {...}}` (and any extra outputs), or None without inputs."""
        raise NotImplementedError


@register_head("mlm")
class MLMHead(Head):
    """BERT's masked-LM head: transform (dense -> GELU -> LayerNorm), then the word embeddings as the
    output matrix (tied: same Parameter), plus a per-word bias.

    Names `transform.*` and `bias` match BERT's `cls.predictions.*`, so a checkpoint that has the
    pre-trained head (bert-base-uncased does, sentence-transformer exports don't) fills it.
    """

    targets = (TokenTargets("mlm_labels", fill=IGNORE_INDEX),)

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.word_embeddings = [word_embeddings]  # a list: not registered twice in the state dict
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    @classmethod
    def build(cls, spec: HeadSpec) -> "MLMHead":
        return cls(spec.config, spec.word_embeddings)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.word_embeddings[0].weight, self.bias)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Loss "mlm" over captions with an image, "mlm_text" over text-only samples (kept apart so that
        the mixed-in text corpus can be weighed on its own)."""
        if "mlm_labels" not in batch:
            return None
        labels = batch["mlm_labels"].to(encoded.text.device)
        target = labels != IGNORE_INDEX
        logits = self(encoded.text[target])
        labels = labels[target]
        with_image = encoded.has_image[:, None].expand_as(target)[target]
        out: dict[str, Any] = {"mlm_logits": logits, "mlm_labels": labels, "losses": {}}
        if bool(with_image.any()) or not bool((~encoded.has_image).any()):
            out["losses"]["mlm"] = masked_lm_loss(logits[with_image], labels[with_image])
        if bool((~encoded.has_image).any()):
            out["losses"]["mlm_text"] = masked_lm_loss(logits[~with_image], labels[~with_image])
        return out


@register_head("mrc")
class MRCHead(Head):
    """Masked RoI classification: Linear(h, h) -> GELU -> Linear(h, num_classes) (VL-BERT's MVRC head)."""

    targets = (MASKED_REGIONS,)

    reads_image = True

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.classifier = nn.Linear(hidden_size, num_classes)

    @classmethod
    def build(cls, spec: HeadSpec) -> "MRCHead":
        return cls(spec.region_size, spec.num_mrc_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.dense(hidden)))

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "region_labelled" not in batch:
            return None
        logits = self(encoded.regions[labelled_regions(encoded, batch)])
        targets = batch["mrc_targets"].to(logits.device).float()
        return {"mrc_logits": logits, "losses": {"mrc": soft_cross_entropy(logits, targets)}}


def labelled_regions(encoded: Encoded, batch: dict[str, Any]) -> torch.Tensor:
    """`[B, K]`: the regions chosen for a masked-region target (`region_labelled`) that exist; their
    row-major order is the order of `mrc_targets`' rows."""
    return batch["region_labelled"].to(encoded.regions.device).bool() & encoded.region_valid


@register_head("vqa")
class AnswerHead(Head):
    """VQA answer classifier on the [MASK] output: BERT transform -> Dropout -> Linear(h, num_answers).

    The head keeps a reference to the text encoder's word embeddings for `init_from_answer_words`, which
    the VQA task calls once the answer vocabulary is known."""

    targets = (AnswerTargets(targets="vqa_targets", position="answer_pos", labelled="vqa_labelled"),)

    def __init__(self, config, num_answers: int, word_embeddings: nn.Embedding, dropout: float = 0.1):
        super().__init__()
        self.num_answers = num_answers
        self.transform = BertPredictionHeadTransform(config)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, num_answers)
        self.word_embeddings = [word_embeddings]  # a list: not registered twice in the state dict

    @classmethod
    def build(cls, spec: HeadSpec) -> "AnswerHead":
        if spec.num_answers < 1:
            raise ValueError(f"the vqa head needs the number of answers (>= 1), got {spec.num_answers}")
        return cls(spec.config, spec.num_answers, spec.word_embeddings)

    def init_from_answer_words(self, answers: Sequence[str], tokenizer: Any) -> None:
        """Start the classifier as VL-BERT's CLASSIFIER_PRETRAINED does: row i of its weight = the mean of
        the word-piece embeddings (`tokenizer.tokenize`) of `answers[i]`, from the word table as it is now
        (after any checkpoint was loaded); bias 0, as VL-BERT initialises it.

        Why: the transform is the MLM head's and the MLM output layer is this word table, so each
        answer starts scored about as the masked-LM scores its words at the [MASK]. A ValueError when the
        word table is not as wide as the hidden state the classifier reads (no architecture here has
        that: every one reads its text stream, as wide as its word embeddings), when the number of
        answers is not the head's, or when an answer has no word pieces."""
        table = self.word_embeddings[0].weight.detach()
        if table.shape[1] != self.classifier.in_features:
            raise ValueError(f"the word embeddings are {table.shape[1]} wide but the vqa classifier reads "
                             f"{self.classifier.in_features}-d states")
        if len(answers) != self.num_answers:
            raise ValueError(f"{len(answers)} answers for a vqa head of {self.num_answers}")
        rows = []
        for answer in answers:
            ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(answer))
            if not ids:
                raise ValueError(f"answer {answer!r} has no word pieces")
            rows.append(table[torch.tensor(ids, device=table.device)].mean(0))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.stack(rows))
            self.classifier.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.transform(hidden)))

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "answer_pos" not in batch:
            return None
        pos = batch["answer_pos"].to(encoded.text.device)
        logits = self(encoded.text[torch.arange(len(pos), device=pos.device), pos])
        losses = {}
        if "vqa_targets" in batch:
            targets = batch["vqa_targets"].to(logits.device)
            labelled = batch.get("vqa_labelled")  # a batch mixing questions into other samples (pre-training)
            if labelled is None:  # every sample a question: no boolean index (it would wait on the device)
                losses["vqa"] = soft_bce_loss(logits, targets)
            else:
                use = labelled.to(logits.device)
                losses["vqa"] = soft_bce_loss(logits[use], targets[use])
        return {"vqa_logits": logits, "losses": losses}


@register_head("ref")
class RegionScoreHead(Head):
    """RefCOCO+: a logit per region output, VL-BERT's final MLP Linear(h, h) -> GELU -> Dropout ->
    Linear(h, 1) (dropout 0, its RefCOCO+ setting; Xavier-uniform weights, zero biases, as it initialises
    them). Loss: binary cross-entropy against `ref_labels`, averaged over the batch's valid regions
    (padding and -1 labels left out)."""

    targets = (RegionTargets("ref_labels", fill=-1.0, dtype=torch.float32),)  # -1 = ignore

    reads_image = True

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, 1)
        for layer in (self.dense, self.classifier):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def build(cls, spec: HeadSpec) -> "RegionScoreHead":
        return cls(spec.region_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.act(self.dense(hidden)))).squeeze(-1)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if not encoded.region_valid.shape[1]:
            return None
        logits = self(encoded.regions)
        out: dict[str, Any] = {"ref_logits": logits, "losses": {}}
        if "ref_labels" in batch:
            labels = batch["ref_labels"].to(logits.device)
            if labels.shape != logits.shape:
                raise ValueError(f"ref_labels {tuple(labels.shape)} and region logits {tuple(logits.shape)} "
                                 "must match")
            use = (labels >= 0) & encoded.region_valid
            out["losses"]["ref"] = (F.binary_cross_entropy_with_logits(logits[use].float(),
                                                                       labels[use].float())
                                    if bool(use.any()) else logits.sum() * 0.0)
        return out


@register_head("vcr")
class ChoiceScoreHead(Head):
    """VCR, VL-BERT's "1fc" classifier: BERT's pooler (Linear(h, h) -> tanh on [CLS]) -> Dropout ->
    Linear(h, 1), one logit per choice; the choices of a question are consecutive samples, and
    `choice_labels` holds one label per question (-1: unknown, no loss).

    Loss: VL-BERT's (CLASSIFIER_SIGMOID, positive weight 1): binary cross-entropy of every choice's logit
    against 1 for the right choice and 0 for the others, averaged over the choices of the labelled
    questions. The pooler starts from the text encoder's pre-trained one (`pretrained_prefix`), as
    VL-BERT's did; the classifier from Xavier-uniform weights and a zero bias, as VL-BERT's."""

    targets = (GroupTargets("choice_label", batch_key="choice_labels"),)

    pretrained_prefix = "pooler."

    def __init__(self, config, dropout: float = 0.1):
        super().__init__()
        self.pooler = BertPooler(config)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, 1)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def build(cls, spec: HeadSpec) -> "ChoiceScoreHead":
        return cls(spec.config)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Text outputs `[B, T, h]` -> one logit per sample `[B]`."""
        return self.classifier(self.dropout(self.pooler(text))).squeeze(-1)

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "choice_labels" not in batch:
            return None
        labels = batch["choice_labels"].to(encoded.text.device)
        scores = self(encoded.text)
        if not len(labels) or scores.shape[0] % len(labels):
            raise ValueError(f"VCR batch of {scores.shape[0]} samples does not split into {len(labels)} "
                             "questions")
        logits = scores.view(len(labels), -1)
        known = labels >= 0
        losses = {"vcr": choice_bce_loss(logits[known], labels[known])} if bool(known.any()) else {}
        return {"vcr_logits": logits, "losses": losses}


@register_head("vcr_objects")
class ObjectClassHead(MRCHead):
    """VCR's region-classification regulariser (VL-BERT's `cnn_loss_reg`, on in its VCR configs): the
    MVRC head's shape, Linear(h, h) -> GELU -> Linear(h, 81), on every region output of every choice
    sequence, cross-entropy against the region's COCO class (`object_labels`; the whole image is class 0,
    background; -1 = ignore), so the grounded regions keep saying what they are."""

    targets = (RegionTargets("object_labels", fill=-1, dtype=torch.long),)  # -1 = ignore

    @classmethod
    def build(cls, spec: HeadSpec) -> "ObjectClassHead":
        from e2e_vl.data.vcr import COCO_CLASSES

        return cls(spec.region_size, len(COCO_CLASSES))

    def outputs(self, encoded: Encoded, batch: dict[str, Any]) -> dict[str, Any] | None:
        if "object_labels" not in batch:
            return None
        labels = batch["object_labels"].to(encoded.regions.device)
        if labels.shape != encoded.region_valid.shape:
            raise ValueError(f"object_labels {tuple(labels.shape)} do not match the regions "
                             f"{tuple(encoded.region_valid.shape)}")
        use = (labels >= 0) & encoded.region_valid
        logits = self(encoded.regions[use])
        loss = F.cross_entropy(logits.float(), labels[use]) if bool(use.any()) else logits.sum() * 0.0
        return {"vcr_objects_logits": logits, "losses": {"vcr_objects": loss}}


def choice_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """VL-BERT's VCR loss: mean binary cross-entropy of `[Q, n]` choice logits against one-hot `labels`."""
    target = F.one_hot(labels, logits.shape[1]).to(torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(t * log_softmax(z)).sum(-1), averaged over rows; 0 (keeping the graph) when there are no rows."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must match")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled positions (logits `[M, V]`, labels `[M]`); 0 when M == 0."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def soft_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on soft answer scores, summed over answers and averaged over questions.

    This equals VL-BERT's element mean multiplied by the number of answers."""
    if logits.shape != targets.shape:
        raise ValueError(f"answer logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must match")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return (
        F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]
    )
