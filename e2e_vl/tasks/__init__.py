"""Tasks by name (`TASK`): each module of this package registers one with `@register_task`, declaring the
architecture it trains by default, the key that names its evaluation data, and a builder that turns the
config and the built model into the `TrainTask` the loop runs (data sets, collate, evaluator, metric).
A new task is one module here: nothing else names it. Builders import their data modules when called,
so that looking a task up (before any config error is reported) stays cheap."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable

from detector.config import CfgNode, ConfigError, lookup

if TYPE_CHECKING:
    import torch

    from e2e_vl.engine.trainer import TrainTask
    from e2e_vl.modeling.registry import VLModel

TaskBuilder = Callable[[CfgNode, "VLModel", "torch.device", bool], "TrainTask"]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    default_arch: str  # used when MODEL.ARCH is empty
    eval_key: str  # the config key naming what --eval-only evaluates
    build: TaskBuilder

    def arch(self, cfg: CfgNode) -> str:
        return cfg.MODEL.ARCH or self.default_arch

    def check_eval_target(self, cfg: CfgNode) -> None:
        """--eval-only needs something to evaluate; say which key is empty before any work starts."""
        if not lookup(cfg, self.eval_key):
            raise ConfigError(f"--eval-only: nothing to evaluate: '{self.eval_key}' is empty (TASK "
                              f"{self.name}); set it")


TASKS: dict[str, Task] = {}


def register_task(name: str, default_arch: str,
                  eval_key: str = "DATASETS.TEST") -> Callable[[TaskBuilder], TaskBuilder]:
    def add(build: TaskBuilder) -> TaskBuilder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = Task(name, default_arch, eval_key, build)
        return build

    return add


def get_task(name: str) -> Task:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    if name not in TASKS:
        raise ConfigError(f"'TASK' must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
