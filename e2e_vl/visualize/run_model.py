"""A trained run's model, rebuilt from its folder: config.yaml says what was trained, model_best.pth (or
else the newest step checkpoint) holds the weights. The same rebuild as `train_net.py --eval-only` of a
run's checkpoint: the model built with MODEL.WEIGHTS cleared (the whole-model file is loaded instead) and
MODEL.INIT_FROM cleared (the run's weights replace every tensor)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from detector.config import CfgNode
from e2e_vl.config import ConfigError, load_train_cfg
from e2e_vl.engine.checkpoint import BEST_NAME


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), device: str = "cpu"
             ) -> tuple[CfgNode, nn.Module, str]:
    """(config, model in eval mode on `device`, the weights file read) of the run in `run_dir`."""
    from e2e_vl.engine.checkpoint import Checkpointer, load_weights_file
    from e2e_vl.modeling import build_model
    from e2e_vl.modeling.init_from import load_trained_model
    from e2e_vl.tasks import get_task

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: no config.yaml; is this a run folder (train_net.py's OUTPUT_DIR)?")
    # Cleared before the config is checked: the files they name are not read, so a run folder works from
    # any directory and after its detector file moved.
    cfg = load_train_cfg(run / "config.yaml",
                         ["MODEL.WEIGHTS", "", "MODEL.INIT_FROM", "", *overrides, "MODEL.DEVICE", device])
    model = build_model(cfg, get_task(cfg.TASK).arch(cfg))
    if (run / BEST_NAME).is_file():
        path = run / BEST_NAME
        state = load_weights_file(path, device)
    else:
        found = Checkpointer(str(run), 1).load_latest(torch.device(device))
        if found is None:
            raise ConfigError(f"{run}: neither {BEST_NAME} nor a step checkpoint")
        state, path = found
    load_trained_model(model, state["model"], str(path))
    return cfg, model.eval(), str(path)


def answer_names(cfg: CfgNode, model: nn.Module) -> list[str]:
    """The names of the vqa head's answers: the run's answer vocabulary (empty without a vqa head)."""
    if "vqa" not in model.heads:
        return []
    from e2e_vl.tasks.vqa import _dataset

    _, answers = _dataset(cfg, model.tokenizer, train=False)
    return list(answers)
