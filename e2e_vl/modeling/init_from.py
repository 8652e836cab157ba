"""Starting a whole model from earlier weights (`MODEL.INIT_FROM`), the one path of every architecture.

Why one path: fine-tuning starts from a pre-trained model whichever architecture or code pre-trained it, and
the rules are the same: every tensor the model has comes from the file, the heads of other tasks are
dropped, the heads of the new task start fresh (or from the pre-training head VL-BERT's recipe starts them
from, `HEAD_INIT_FROM`) and every tensor not used is reported with its reason. Anything else is an error
naming the key: a tensor the model needs that the file lacks, one of another shape, one it does not know.

Sources: our own training checkpoints (`e2e_vl.engine.checkpoint`, `{"model": state}`) of the same
architecture and body size (another architecture or body size is one error naming both), and the released
files an architecture reads itself (`RegionEncoder.read_release`: VL-BERT's `.model` files,
`e2e_vl.modeling.vlbert_weights`), renamed into our key space first. Files are read with
`detector.checkpoint.load_data_file` (torch.load(weights_only=True) or the restricted unpickler), so a file
that names code is refused before anything runs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from detector.checkpoint import CheckpointError, load_data_file
from detector.checkpoint.export import DETECTOR_KEY_PREFIX, TRAINED_PREFIXES

logger = logging.getLogger(__name__)

HEAD_PREFIX = "heads."
DETECTOR_TRUNK = tuple(DETECTOR_KEY_PREFIX + p for p in TRAINED_PREFIXES)

# Heads of ours that start, when the file has no such head, from another head's tensors (our names), as
# VL-BERT's fine-tuning does (PARTIAL_PRETRAIN_PREFIX_CHANGES of its VQA, RefCOCO+ and VCR configs): the
# VQA classifier's transform from the MLM head's, the first Linear of the RefCOCO+ scorer and of VCR's
# regulariser from the masked-RoI head's. Entry: head -> (source head, source prefix, target prefix).
HEAD_INIT_FROM: dict[str, tuple[str, str, str]] = {
    "vqa": ("mlm", "transform.", "transform."),
    "ref": ("mrc", "dense.", "dense."),
    "vcr_objects": ("mrc", "dense.", "dense."),
}

# New heads whose fine-tuning starts one segment-embedding row as another (VL-BERT's VCR recipe,
# PARTIAL_PRETRAIN_SEGMB_INIT: pre-training never used segment B, so VCR's answers start from segment A's
# row). Entry: head -> (row, source row).
SEGMENT_ROW_FROM: dict[str, tuple[int, int]] = {"vcr": (1, 0)}
SEGMENT_KEY = "bert.embeddings.token_type_embeddings.weight"

# Tensors a checkpoint or the model may lack, by key prefix (pre-training-only parts): kept as built, or
# not used, and reported.
OPTIONAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("text_only_visual", "text-only visual vector (VL-BERT's aux_text_visual_embedding; text-only MLM only)"),
    ("masked_region_token", "masked-region token (pre-training only)"),
    ("masked_region_feature", "learned feature of masked regions (MASKING feature, pre-training only)"),
)


@dataclasses.dataclass
class InitReport:
    """What `init_from_state_dict` did: every model key filled, every one kept as built (`fresh`) and every
    checkpoint key not used, each with its reason."""

    source: str
    layout: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    fresh: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    unused: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def log(self) -> None:
        logger.info("MODEL.INIT_FROM %s (%s): %d tensors loaded", self.source, self.layout,
                    len(self.loaded))
        for reason, keys in self.fresh.items():
            logger.info("  kept as built (not in the file), %s: %d tensors: %s", reason, len(keys),
                        ", ".join(keys))
        for reason, keys in self.unused.items():
            logger.info("  not used, %s: %d tensors: %s", reason, len(keys), ", ".join(keys))
        for note in self.notes:
            logger.warning("MODEL.INIT_FROM %s: %s", self.source, note)


def add_reason(groups: dict[str, list[str]], reason: str, key: str) -> None:
    groups.setdefault(reason, []).append(key)


# ---------------------------------------------------------------------------------------------------------
# Our key space -> the model
# ---------------------------------------------------------------------------------------------------------
def _head_name(key: str) -> str | None:
    return key[len(HEAD_PREFIX):].split(".", 1)[0] if key.startswith(HEAD_PREFIX) else None


def _new_heads(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], heads: set[str],
               report: InitReport) -> dict[str, torch.Tensor]:
    """Tensors for the model's heads the file does not have at all: from HEAD_INIT_FROM's source head when the
    file has it, else nothing (they start fresh; both reported). A head the file has in part is left to the
    strict check."""
    take = {}
    for head in sorted(heads):
        prefix = f"{HEAD_PREFIX}{head}."
        keys = [k for k in own if k.startswith(prefix)]
        if any(k in state for k in keys):
            continue
        rule = HEAD_INIT_FROM.get(head)
        for key in keys:
            if rule is not None and key[len(prefix):].startswith(rule[2]):
                src = f"{HEAD_PREFIX}{rule[0]}.{rule[1]}{key[len(prefix) + len(rule[2]):]}"
                if src in state:
                    take[key] = state[src]
        reason = f"new '{head}' head" + (f" (its {rule[2]}* from the '{rule[0]}' head, VL-BERT's recipe)"
                                         if rule and take.keys() & set(keys) else "")
        for key in keys:
            if key not in take:
                add_reason(report.fresh, reason, key)
    return take


def _optional_missing(missing: list[str], own: Mapping[str, torch.Tensor], source: str, detector_loaded: bool,
                      report: InitReport) -> list[str]:
    """Report the missing model tensors a file may lack (detector parts VL training does not use, the whole
    detector when MODEL.WEIGHTS gave it, OPTIONAL_PREFIXES); return the others."""
    trunk = {k for k in own if k.startswith(DETECTOR_TRUNK)}
    from_weights = trunk if trunk and trunk <= set(missing) else set()
    if from_weights and not detector_loaded:
        raise CheckpointError(
            f"{source} holds no detector weights (a VL-BERT precomputed-feature variant?): its region "
            "features came from the Visual Genome detector, so set MODEL.WEIGHTS to that detector")
    if from_weights:
        report.notes.append("the file has no detector: the detector keeps MODEL.WEIGHTS")
    errors = []
    for key in missing:
        if key in from_weights:
            add_reason(report.fresh, "detector trunk and res5 from MODEL.WEIGHTS (the file has none)", key)
            continue
        if key.startswith(DETECTOR_KEY_PREFIX) and not key.startswith(DETECTOR_TRUNK):
            add_reason(report.fresh,
                       "detector parts VL training does not use (RPN, box predictor, attributes)", key)
            continue
        reason = next((why for prefix, why in OPTIONAL_PREFIXES if key.startswith(prefix)), None)
        if reason is None:
            errors.append(key)
        else:
            add_reason(report.fresh, reason, key)
    return errors


def init_from_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, layout: str,
                         detector_loaded: bool = False, origin: Mapping[str, str] | None = None,
                         unused: Mapping[str, list[str]] | None = None) -> InitReport:
    """Copy `state` (our key names) into `model`, strictly; see the module docstring for the rules.

    `detector_loaded`: the model's detector already holds trained weights (MODEL.WEIGHTS), so a file
    without detector tensors (VL-BERT's precomputed-feature variants) is acceptable. `origin` names the
    file's own key of each tensor, for messages."""
    origin = origin or {}
    report = InitReport(source=source, layout=layout, unused={k: list(v) for k, v in (unused or {}).items()})
    own = model.state_dict()
    model_heads = set(getattr(model, "heads", {}) or {})

    def named(key: str) -> str:
        return f"{key} (file: {origin[key]})" if origin.get(key, key) != key else key

    unexpected = []
    for key in (k for k in state if k not in own):
        head = _head_name(key)
        optional = next((why for prefix, why in OPTIONAL_PREFIXES if key.startswith(prefix)), None)
        if head is not None and head not in model_heads:
            add_reason(report.unused, f"head '{head}' is not in this model (MODEL.VL.HEADS)",
                 origin.get(key, key))
        elif optional is not None and head is None:
            add_reason(report.unused, f"{optional}, not in this model", origin.get(key, key))
        else:
            unexpected.append(named(key))
    take = {k: v for k, v in state.items() if k in own}
    take.update(_new_heads(own, state, model_heads, report))
    for head, (row, src) in SEGMENT_ROW_FROM.items():
        if head in model_heads and not any(_head_name(k) == head for k in take) and SEGMENT_KEY in take:
            take[SEGMENT_KEY] = take[SEGMENT_KEY].clone()
            take[SEGMENT_KEY][row] = take[SEGMENT_KEY][src]
            report.notes.append(f"new '{head}' head: segment embedding row {row} starts as row {src} "
                                "(VL-BERT's recipe)")
    wrong_shape = [f"{named(k)}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in take.items() if tuple(v.shape) != tuple(own[k].shape)]
    fresh = {k for keys in report.fresh.values() for k in keys}
    missing = [k for k in own if k not in take and k not in fresh]
    errors = _optional_missing(missing, own, source, detector_loaded, report)

    problems = []
    for title, items in (("wrong shape", wrong_shape), ("missing from the file", errors),
                         ("not in the model", unexpected)):
        if items:
            problems.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]))
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n" + "\n".join(problems))
    with torch.no_grad():
        for key, value in take.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
    report.loaded = sorted(take)
    return report


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReleaseState:
    """A released file renamed into our key space by the architecture that reads it: tensors under our keys,
    the layout's name, our key -> the file's key (for messages), the file's unused keys by reason, and notes
    on differences that only shift the features."""

    state: dict[str, torch.Tensor]
    layout: str
    origin: dict[str, str] = dataclasses.field(default_factory=dict)
    unused: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _architecture_of(state: Mapping[str, Any]) -> str | None:
    """The registered architecture whose body parts are all in `state` (the most specific one)."""
    from e2e_vl.modeling.registry import architecture_classes

    found = [(len(cls.body_prefixes), name) for name, cls in architecture_classes().items()
             if cls.body_prefixes and all(any(k.startswith(p) for k in state) for p in cls.body_prefixes)]
    return max(found)[1] if found else None


def check_same_body(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """One error naming both when `state` (one of our checkpoints) is of another architecture than `model`,
    or of the same one with a body of another size (a different BERT folder, layer count or width)."""
    arch, prefixes = model.arch, type(model).body_prefixes
    other = _architecture_of(state)
    if other != arch:
        what = other or "no known architecture"
        raise CheckpointError(f"MODEL.INIT_FROM {source} is a checkpoint of {what}, this model is {arch}: "
                              f"start from a {arch} checkpoint, or set MODEL.ARCH to the file's")
    own = model.state_dict()
    body = [k for k in own if k.startswith(prefixes)]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in body
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in body if k not in state]
    extra = [k for k in state if k.startswith(prefixes) and k not in own]
    if wrong or missing or extra:
        example = (wrong or [f"{k} missing from the file" for k in missing]
                   or [f"{k} not in the model" for k in extra])[0]
        raise CheckpointError(
            f"MODEL.INIT_FROM {source} holds a {arch} body of another size than this model's ({len(wrong)} "
            f"tensors of another shape, {len(missing)} missing, {len(extra)} extra; e.g. {example}): set the "
            "body's keys (MODEL.VL.BERT_PATH, the architecture's MODEL.* sizes and folder) as the run that "
            "wrote it did (its config.yaml)")


def read_init_state(model: nn.Module, path: str | os.PathLike) -> ReleaseState:
    """The tensors of `path` in our key space, checked against `model`'s architecture: one of our training
    checkpoints (`{"model": ...}`) or a release `model`'s architecture reads."""
    from e2e_vl.modeling.registry import architecture_classes

    source = os.fspath(path)
    obj = load_data_file(source)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state = {k: v for k, v in obj["model"].items() if isinstance(v, torch.Tensor)}
        check_same_body(model, state, source)
        return ReleaseState(state, f"e2e-vl {model.arch} checkpoint")
    release = model.read_release(obj, source)
    if release is not None:
        return release
    owner = next((name for name, cls in architecture_classes().items() if cls.reads_release(obj)), None)
    if owner is not None:
        raise CheckpointError(f"MODEL.INIT_FROM {source} is a release of {owner}, this model is "
                              f"{model.arch}: set MODEL.ARCH {owner}, or start {model.arch} from its own "
                              "checkpoint")
    keys = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"MODEL.INIT_FROM {source}: neither an e2e-vl training checkpoint (a dict with "
                          f"'model') nor a release any architecture reads; found {keys}")


def init_model_weights(model: nn.Module, path: str | os.PathLike, *,
                       detector_loaded: bool = False) -> InitReport:
    """Start `model` from the file at `path` (MODEL.INIT_FROM); log and return the report."""
    source = os.fspath(path)
    release = read_init_state(model, source)
    report = init_from_state_dict(model, release.state, source=source, layout=release.layout,
                                  detector_loaded=detector_loaded, origin=release.origin,
                                  unused=release.unused)
    report.notes.extend(release.notes)
    report.log()
    return report


def load_trained_model(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a whole training checkpoint into `model` exactly (--eval-only): every tensor, nothing else; a
    misfit is one CheckpointError with the counts and a first example, not a dump of every tensor."""
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [f"{k} missing from the file" for k in own if k not in state]
    extra = [f"{k} not in the model" for k in state if k not in own]
    if wrong or missing or extra:
        raise CheckpointError(
            f"{source} does not fit the model built from the config ({len(wrong)} tensors of another shape, "
            f"{len(missing)} missing, {len(extra)} extra; e.g. {(wrong + missing + extra)[0]}): evaluate it "
            "with the MODEL keys of the run that wrote it (its config.yaml beside the file)")
    model.load_state_dict(state)
