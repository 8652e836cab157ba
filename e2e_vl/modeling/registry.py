"""Architectures by name: `MODEL.ARCH` (or the task's default) -> a builder registered with
`@register_model(name)`: a `RegionEncoder` subclass (its `build` is the one build sequence; the class
learns its name as `arch`) or a plain builder function. A new architecture is one module in
`e2e_vl/modeling/` plus a config: every module of this package is imported before a look-up, so registering
(and `e2e_vl.config.register_config` for keys of its own) is all a new file has to do.

`VLModel` is what the engine and the tasks may rely on beyond `nn.Module`; they ask nothing else of a
model (no hasattr probing)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from detector.config import CfgNode, ConfigError


class VLModel(Protocol):
    # The text side's tokenizer (None for a model without text); tasks encode their text with it.
    tokenizer: Any
    # The heads the model computes, by name (`e2e_vl.modeling.heads.HEADS`); tasks check theirs are here.
    heads: Mapping[str, nn.Module]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """"loss", "losses" (name -> scalar) and each head's outputs ("<head>_logits", ...)."""

    def parameter_kind(self, name: str) -> str:
        """'detector', 'bert' (a pre-trained encoder) or 'head' (new layers): the optimiser's groups."""

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory (SOLVER.GRADIENT_CHECKPOINTING); raise ConfigError if unsupported."""


# Checked with hasattr, not a runtime_checkable isinstance: from Python 3.12 that looks members up
# statically, which misses the submodules nn.Module keeps in `_modules` (a ModuleDict `heads`).
_VLMODEL_MEMBERS = (*VLModel.__annotations__, *(n for n in vars(VLModel) if not n.startswith("_")))

ModelBuilder = Callable[[CfgNode], nn.Module]
MODELS: dict[str, ModelBuilder] = {}
_CLASSES: dict[str, type] = {}


def register_model(name: str) -> Callable[[Any], Any]:
    """Register a builder function, or a class with a `build(cfg)` classmethod (which then gets `arch`)."""
    def add(builder: Any) -> Any:
        if name in MODELS:
            raise ValueError(f"architecture {name!r} is registered twice")
        if isinstance(builder, type):
            builder.arch = name
            _CLASSES[name] = builder
            MODELS[name] = builder.build
        else:
            MODELS[name] = builder
        return builder

    return add


def architecture_classes() -> dict[str, type]:
    """The registered architectures that are classes (`RegionEncoder` subclasses), by name."""
    _import_architectures()
    return dict(_CLASSES)


def _import_architectures() -> None:
    package = importlib.import_module("e2e_vl.modeling")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"e2e_vl.modeling.{module.name}")


def architectures() -> list[str]:
    """The names of every registered architecture (all modules of this package imported first)."""
    _import_architectures()
    return sorted(MODELS)


def build_model(cfg: CfgNode, arch: str) -> nn.Module:
    """The registered architecture `arch` built from `cfg`, on MODEL.DEVICE, in train mode."""
    _import_architectures()
    if arch not in MODELS:
        raise ConfigError(f"'MODEL.ARCH' {arch!r} is not a registered architecture; expected one of "
                          f"{sorted(MODELS)}")
    model = MODELS[arch](cfg)
    missing = [name for name in _VLMODEL_MEMBERS if not hasattr(model, name)]
    if missing:
        raise TypeError(f"architecture {arch!r} built a {type(model).__name__}, which lacks VLModel's "
                        f"members {missing}")
    return model.to(torch.device(cfg.MODEL.DEVICE)).train()
