"""Training engine: the loop, checkpoints and exact resume, distributed set-up, logging, optimiser."""
from e2e_vl.engine.checkpoint import Checkpointer
from e2e_vl.engine.trainer import NonFiniteLossError, TrainTask, train

__all__ = ["Checkpointer", "NonFiniteLossError", "TrainTask", "train"]
