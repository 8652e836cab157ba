"""The training loop: `train` reads top to bottom; each part of a step (resume, forward/backward,
non-finite checks, logging, evaluation, checkpoints) is a helper below it with one job. The helpers change
only the `LoopState` they are handed; everything else of the run is fixed in `_Run` before the loop.

One optimiser step = GRAD_ACCUM_STEPS micro-batches (DDP gradient sync only on the last one), under
autocast when SOLVER.AMP.DTYPE asks for it (fp16 adds a gradient scaler), gradient clipping, an
AdamW step and a schedule step. Around it: periodic logging, evaluation and atomic checkpoints,
and `resume`, which restores every piece of state so the run continues as if never stopped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from detector.config import CfgNode, ConfigError
from e2e_vl import distributed as du
from e2e_vl.config import run_length_notes
from e2e_vl.engine.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from e2e_vl.engine.compile import compile_trunk_and_layers
from e2e_vl.engine.logger import MetricWriter, ProgressMeter
from e2e_vl.engine.optim import build_lr_scheduler, build_optimizer, freeze_params, lr_factor
from e2e_vl.engine.sampler import EpochLoader, ResumableBatchSampler

if TYPE_CHECKING:  # typing only: the engine does not import the models
    from e2e_vl.modeling.registry import VLModel

logger = logging.getLogger("e2e_vl.train")

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops before the bad gradients reach the weights."""


class ResumeError(RuntimeError):
    """--resume found checkpoints but none of them loads: refusing beats silently starting over."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: the step in flight was finished and checkpointed, then training stopped."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"saved {path}" if path is not None else "checkpoint saved by another process"
        super().__init__(f"interrupted by {name} after step {step}: {where}; continue with --resume")


class _StopRequest:
    """SIGINT/SIGTERM handlers that only note the signal; the loop stops at the next step boundary.

    A second signal gets the default behaviour back (Ctrl-C twice quits at once, without saving). Installed
    only in the main thread (Python's rule); elsewhere the signals keep their handlers.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            os.write(2, f"\n{signal.Signals(signum).name}: finishing the current step and saving a "
                        "checkpoint (send it again to stop at once, without saving)\n".encode())
        for sig, previous in self._previous.items():  # the next one acts as if we were not here
            signal.signal(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


@dataclass
class TrainTask:
    """What the loop needs from a task: data, how to batch it, and how to score the model."""

    train_set: Dataset
    collate_fn: Callable[[list], dict]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    metric: str = "accuracy"  # key of evaluate()'s result that selects model_best.pth (higher is better)


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside nested dicts/lists/tuples moved to `device` (non-blocking from pinned memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def steps_for(cfg: CfgNode, batches_per_epoch: int) -> int:
    """Total optimiser steps: MAX_EPOCHS converted with the epoch length, or MAX_ITER (the config allows only
    one of them > 0: e2e_vl.config.check_run_length)."""
    s = cfg.SOLVER
    if s.MAX_EPOCHS > 0:
        return max(1, math.ceil(s.MAX_EPOCHS * batches_per_epoch / s.GRAD_ACCUM_STEPS))
    return s.MAX_ITER


def train(cfg: CfgNode, model: VLModel, task: TrainTask, device: torch.device, resume: bool = False) -> dict:
    """Train `model` (already on `device`) per `cfg`; return the final evaluation metrics (may be empty)."""
    s = cfg.SOLVER
    rank, world = du.get_rank(), du.get_world_size()
    micro_batch = _micro_batch_size(s, world)
    amp_dtype = AMP_DTYPES[s.AMP.DTYPE]
    if s.GRADIENT_CHECKPOINTING:
        model.enable_gradient_checkpointing()
    if s.COMPILE:
        logger.info("SOLVER.COMPILE: torch.compile of %d modules (the trunk and the transformer layers)",
                    len(compile_trunk_and_layers(model)))

    # --- data, optimiser, schedule, scaler ----------------------------------------------------------
    frozen = freeze_params(model, list(s.FREEZE_PARAMS))
    if frozen:
        logger.info("SOLVER.FREEZE_PARAMS froze %d parameter tensors", frozen)
    sampler = ResumableBatchSampler(len(task.train_set), micro_batch, cfg.SEED, rank, world)
    data = EpochLoader(task.train_set, sampler, task.collate_fn, cfg.DATALOADER.NUM_WORKERS,
                       cfg.DATALOADER.PIN_MEMORY and device.type == "cuda")
    max_iter = steps_for(cfg, len(data))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, max_iter)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    parts = _Restorable(model, optimizer, scheduler, scaler, data)
    out_dir = Path(cfg.OUTPUT_DIR)
    checkpointer = Checkpointer(out_dir, s.CHECKPOINT_KEEP_LAST)
    state = _resume(checkpointer, parts, micro_batch * world, device) if resume else LoopState()

    writer = MetricWriter(out_dir, enabled=rank == 0, resumed_at=state.step if resume else None)
    run = _Run(cfg=cfg, task=task, parts=parts, train_model=_wrap_ddp(model, device, world),
               checkpointer=checkpointer, writer=writer, device=device, rank=rank, world=world,
               items_per_step=micro_batch * world, max_iter=max_iter)
    meter = ProgressMeter(state.step, max_iter)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    metrics: dict[str, float] = {}
    run.train_model.train()
    length_source, length_warnings = run_length_notes(cfg, max_iter)
    logger.info("training %d steps (%s): %d images/step (%d per micro-batch x %d accumulation x %d "
                "processes), %d micro-batches per epoch", max_iter, length_source, s.IMS_PER_BATCH,
                micro_batch, s.GRAD_ACCUM_STEPS, world, len(data))
    for warning in length_warnings:
        logger.warning("%s", warning)

    # --- the loop --------------------------------------------------------------------------------------
    stop = _StopRequest()  # SIGINT/SIGTERM: finish the step, save, stop
    try:
        while state.step < max_iter:
            result = _forward_backward(run, autocast, stop)
            scaler.unscale_(optimizer)
            grad_norm = _grad_norm(model, s.CLIP_GRAD_NORM)
            problem = _nonfinite_problem(run, state, result, grad_norm)
            if problem is not None:
                _skip_step(s, state, problem)
            else:
                scaler.step(optimizer)
                state.trained.update(n for n, p in model.named_parameters() if p.grad is not None)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            meter.add_images(result.num_images)

            if problem is None and (state.step % s.LOG_PERIOD == 0 or state.step == max_iter):
                _log_step(run, state, result, grad_norm, meter)
            if cfg.TEST.EVAL_PERIOD > 0 and state.step % cfg.TEST.EVAL_PERIOD == 0 and state.step < max_iter:
                _evaluate(run, state)
            if _checkpoint_due(run, state):
                _save(run, state)
            if result.stop:  # every process saw the same flag (it went through the all-reduce)
                saved = _checkpoint_due(run, state)  # then the step's checkpoint was just written
                path = checkpointer.directory / f"model_{state.step:07d}.pth" if saved else _save(run, state)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.step,
                                          path if rank == 0 else None)
        if task.evaluate is not None:
            metrics = _evaluate(run, state)
    finally:
        stop.restore()
        writer.close()
    return metrics


@dataclass
class LoopState:
    """What the loop changes as it goes (and a checkpoint saves besides the objects' own states)."""

    step: int = 0
    best: float = -math.inf  # the best evaluation of TrainTask.metric so far (model_best.pth holds it)
    skipped: int = 0  # steps dropped for non-finite losses or gradients
    # Names of the parameters an update reached (had a gradient): tools/export_detector.py never replaces
    # them with --base-weights.
    trained: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Restorable:
    """The objects whose state a checkpoint holds and --resume restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    data: EpochLoader


@dataclass(frozen=True)
class _Run:
    """The fixed parts of one run that the loop's helpers share; built once before the loop."""

    cfg: CfgNode
    task: TrainTask
    parts: _Restorable
    train_model: nn.Module  # parts.model, wrapped in DDP when there are several processes
    checkpointer: Checkpointer
    writer: MetricWriter
    device: torch.device
    rank: int
    world: int
    items_per_step: int  # micro-batch x processes: what one micro-batch step consumes of an epoch
    max_iter: int


@dataclass(frozen=True)
class _StepResult:
    """One optimiser step's micro-batches, summed over the processes by a single all-reduce."""

    names: list[str]  # loss names, in the order of `stats`
    stats: torch.Tensor  # [loss sums..., images, non-finite flag, stop flag]
    local_sums: dict[str, torch.Tensor]  # this process's loss sums (for the non-finite-gradient message)
    bad: dict[str, float] | None  # this process's first non-finite losses, if any

    @property
    def num_images(self) -> float:
        return self.stats[-3].item()

    @property
    def nonfinite(self) -> bool:
        return self.stats[-2].item() > 0

    @property
    def stop(self) -> bool:
        return self.stats[-1].item() > 0


def _micro_batch_size(s: CfgNode, world: int) -> int:
    """Images per micro-batch and process; refuses an IMS_PER_BATCH that does not divide evenly."""
    micro_batch = s.IMS_PER_BATCH // (world * s.GRAD_ACCUM_STEPS)
    if micro_batch < 1 or s.IMS_PER_BATCH % (world * s.GRAD_ACCUM_STEPS):
        raise ConfigError(
            f"'SOLVER.IMS_PER_BATCH' ({s.IMS_PER_BATCH}) must be a multiple of processes ({world}) x "
            f"'SOLVER.GRAD_ACCUM_STEPS' ({s.GRAD_ACCUM_STEPS})"
        )
    return micro_batch


def _wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _resume(checkpointer: Checkpointer, parts: _Restorable, items_per_step: int,
            device: torch.device) -> LoopState:
    """Every rank restores everything (optimizer included) from the newest readable checkpoint (rank 0
    picks it); a fresh LoopState when there is none yet; ResumeError when none of them can be read."""
    rank, world = du.get_rank(), du.get_world_size()
    found = checkpointer.load_latest(map_location=device) if rank == 0 else None
    unreadable = ([str(p) for _, p in checkpointer.step_checkpoints()] if rank == 0 and found is None
                  else [])
    path, unreadable = du.broadcast_object((str(found[1]) if found else None, unreadable))
    if unreadable:
        raise ResumeError(
            f"--resume: no checkpoint in {checkpointer.directory} can be read ({', '.join(unreadable)}); "
            f"repair or move {'it' if len(unreadable) == 1 else 'them'} away, or run without --resume to "
            "start over")
    if path is None:
        logger.info("--resume: no checkpoint in %s yet, starting from step 0", checkpointer.directory)
        return LoopState()
    saved = found[0] if rank == 0 else torch.load(path, map_location=device, weights_only=True)
    parts.model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    parts.scaler.load_state_dict(saved["scaler"])
    parts.data.load_state_dict(_convert_position(saved["data"], items_per_step))
    # A checkpoint without the trained-parameter record (older versions): every trainable parameter may
    # have moved.
    trained = saved.get("trained_parameters",
                        [n for n, q in parts.model.named_parameters() if q.requires_grad])
    state = LoopState(step=int(saved["step"]), best=float(saved["best_metric"]),
                      skipped=int(saved.get("skipped_steps", 0)), trained=set(trained))
    rng = saved["rng"]
    if len(rng) != world:
        logger.warning("checkpoint was written by %d processes, now %d: RNG streams differ", len(rng), world)
    restore_rng_state(rng[min(rank, len(rng) - 1)])
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def _forward_backward(run: _Run, autocast: torch.autocast, stop: _StopRequest) -> _StepResult:
    """GRAD_ACCUM_STEPS micro-batches forward and backward (DDP syncs gradients on the last one only),
    then one collective for the loss sums, image count, "something went non-finite" and "a stop signal
    arrived" (so that every process stops after the same step)."""
    s, device = run.cfg.SOLVER, run.device
    loss_sums: dict[str, torch.Tensor] = {}
    bad: dict[str, float] | None = None
    n_images = 0
    for micro in range(s.GRAD_ACCUM_STEPS):
        batch = move_to_device(run.parts.data.next(), device)
        n_images += int(batch["images"].shape[0])
        last = micro == s.GRAD_ACCUM_STEPS - 1
        sync = contextlib.nullcontext() if (last or run.world == 1) else run.train_model.no_sync()
        with sync:
            with autocast:
                out = run.train_model(batch)
            loss = out["loss"].float()
            run.parts.scaler.scale(loss / s.GRAD_ACCUM_STEPS).backward()
        parts = {"loss": loss.detach(), **{k: v.detach().float() for k, v in sorted(out["losses"].items())}}
        if bad is None and not all(torch.isfinite(v) for v in parts.values()):
            bad = {k: v.item() for k, v in parts.items()}
        for k, v in parts.items():
            loss_sums[k] = loss_sums.get(k, 0.0) + v
    names = list(loss_sums)
    stats = torch.stack([*(torch.nan_to_num(loss_sums[k], nan=0.0, posinf=0.0, neginf=0.0) for k in names),
                         torch.tensor(float(n_images), device=device),
                         torch.tensor(float(bad is not None), device=device),
                         torch.tensor(float(stop.signum is not None), device=device)])
    du.all_reduce_sum(stats)
    return _StepResult(names, stats, loss_sums, bad)


def _nonfinite_problem(run: _Run, state: LoopState, result: _StepResult,
                       grad_norm: torch.Tensor) -> str | None:
    """What went non-finite in this step (on any process), or None. Under fp16 the scaler skips
    non-finite gradients by itself, so only losses count there."""
    if result.nonfinite:
        where = ", ".join(f"{k}={v}" for k, v in result.bad.items()) if result.bad else "on another process"
        return f"non-finite loss at step {state.step + 1}: {where}"
    if not run.parts.scaler.is_enabled() and not torch.isfinite(grad_norm):
        sums = ", ".join(f"{k}={result.local_sums[k].item():.6g}" for k in result.names)
        return (f"non-finite gradient at step {state.step + 1} (the losses are finite: {sums}): grad norm "
                f"{grad_norm.item()}, first in '{_first_nonfinite_grad(run.parts.model)}'")
    return None


def _skip_step(s: CfgNode, state: LoopState, problem: str) -> None:
    """Count a dropped update (data and schedule move on as if it had been taken), or raise
    NonFiniteLossError once SOLVER.SKIP_NONFINITE_STEPS are used up."""
    if state.skipped >= s.SKIP_NONFINITE_STEPS:
        allowed = (f" (SOLVER.SKIP_NONFINITE_STEPS {s.SKIP_NONFINITE_STEPS} already skipped)"
                   if s.SKIP_NONFINITE_STEPS else "")
        raise NonFiniteLossError(problem + allowed)
    state.skipped += 1
    logger.warning("%s: step skipped (%d of SOLVER.SKIP_NONFINITE_STEPS %d)", problem, state.skipped,
                   s.SKIP_NONFINITE_STEPS)


def _log_step(run: _Run, state: LoopState, result: _StepResult, grad_norm: torch.Tensor,
              meter: ProgressMeter) -> None:
    """The step's mean losses, learning rate, speed (and grad norm, skipped steps) to the log and metrics."""
    s = run.cfg.SOLVER
    denom = s.GRAD_ACCUM_STEPS * run.world
    losses = {k: result.stats[i].item() / denom for i, k in enumerate(result.names)}
    scalars = meter.report(state.step, losses, s.BASE_LR * lr_factor(state.step, run.cfg, run.max_iter),
                           run.device)
    if s.CLIP_GRAD_NORM > 0:
        scalars["grad_norm"] = float(grad_norm)
    if state.skipped:
        scalars["skipped_steps"] = state.skipped
    run.writer.write(state.step, {**{f"train/{k}": v for k, v in losses.items()}, **scalars})


def _evaluate(run: _Run, state: LoopState) -> dict[str, float]:
    """Score the model and record the metrics; a new best TrainTask.metric updates `state.best` and is
    saved as model_best.pth. Empty without an evaluation."""
    if run.task.evaluate is None:
        return {}
    metrics = run.task.evaluate(unwrap(run.train_model))
    run.train_model.train()
    run.writer.write(state.step, {f"eval/{k}": v for k, v in metrics.items()})
    logger.info("eval at step %d: %s", state.step, "  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    if metrics.get(run.task.metric, -math.inf) > state.best:
        state.best = metrics[run.task.metric]
        _save(run, state, best=True)
    return metrics


def _checkpoint_due(run: _Run, state: LoopState) -> bool:
    return state.step % run.cfg.SOLVER.CHECKPOINT_PERIOD == 0 or state.step == run.max_iter


def _save(run: _Run, state: LoopState, best: bool = False) -> Path | None:
    """Checkpoint everything (model_<step>.pth, or model_best.pth); collective: every rank calls it, rank 0
    writes. Returns the path on rank 0."""
    p = run.parts
    rngs = du.all_gather_objects(capture_rng_state())
    checkpoint = {
        "model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(), "rng": rngs,
        "data": {**p.data.state_dict(), "items_per_step": run.items_per_step},
        "step": state.step, "best_metric": state.best, "skipped_steps": state.skipped,
        "config": run.cfg.dump(), "trained_parameters": sorted(state.trained),
    }
    path = None
    if run.rank == 0:
        ckpt = run.checkpointer
        path = ckpt.save_best(checkpoint) if best else ckpt.save(checkpoint, state.step)
        logger.info("saved %s", path)
    du.barrier()
    return path


def _grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """Total gradient norm (clipped to `clip` when > 0); NaN/inf when any gradient is non-finite."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    if not params:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def _first_nonfinite_grad(model: nn.Module) -> str:
    """Name of the first parameter whose gradient holds a NaN or inf (for the error message)."""
    bad = (n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all())
    return next(bad, "?")


def _convert_position(data_state: dict, items_per_step: int) -> dict:
    """Map a saved data position onto this run's step size (differs when the process count changed)."""
    saved = int(data_state.get("items_per_step", items_per_step))
    if saved == items_per_step:
        return data_state
    consumed = int(data_state["batch_in_epoch"]) * saved
    logger.warning("resuming with %d items per step instead of %d: continuing at item %d of the epoch",
                   items_per_step, saved, consumed)
    return {"epoch": data_state["epoch"], "batch_in_epoch": consumed // items_per_step}
