"""SOLVER.COMPILE: `torch.compile` of the parts of a training step where the time goes, the detector's
trunk and every transformer layer, each compiled in place (`nn.Module.compile`), so parameter names,
checkpoints, DDP and gradient checkpointing see the same modules as without it.

Parts rather than the whole model: the glue between them (per-image box lists, the sequence assembly,
the heads' label selection) is data-dependent and would break a whole-model graph into many small ones."""
from __future__ import annotations

import re

from torch import nn

LAYER_LISTS = re.compile(r"(^|\.)(\w+_)?layers?$")  # HF encoder.layer, LXMERT x_layers, ViLBERT co_layers


def compile_trunk_and_layers(model: nn.Module) -> list[str]:
    """Compile `model.detector.backbone` and each member of every layer list outside the detector;
    returns the names of the compiled modules (for the log)."""
    names = ["detector.backbone"]
    model.detector.backbone.compile()
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and LAYER_LISTS.search(name)
                and not name.startswith("detector.")):
            for i, layer in enumerate(module):
                layer.compile()
                names.append(f"{name}.{i}")
    return names
