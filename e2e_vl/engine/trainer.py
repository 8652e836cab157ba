"""The training loop, in one function you can read top to bottom.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from detector.config import CfgNode, ConfigError
from e2e_vl import distributed as du
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
    """Total optimiser steps: MAX_EPOCHS (if > 0) converted with the epoch length, else MAX_ITER."""
    s = cfg.SOLVER
    if s.MAX_EPOCHS > 0:
        return max(1, math.ceil(s.MAX_EPOCHS * batches_per_epoch / s.GRAD_ACCUM_STEPS))
    return s.MAX_ITER


def train(cfg: CfgNode, model: VLModel, task: TrainTask, device: torch.device, resume: bool = False) -> dict:
    """Train `model` (already on `device`) per `cfg`; return the final evaluation metrics (may be empty)."""
    s = cfg.SOLVER
    rank, world = du.get_rank(), du.get_world_size()
    out_dir = Path(cfg.OUTPUT_DIR)
    micro_batch = s.IMS_PER_BATCH // (world * s.GRAD_ACCUM_STEPS)
    if micro_batch < 1 or s.IMS_PER_BATCH % (world * s.GRAD_ACCUM_STEPS):
        raise ConfigError(
            f"'SOLVER.IMS_PER_BATCH' ({s.IMS_PER_BATCH}) must be a multiple of processes ({world}) x "
            f"'SOLVER.GRAD_ACCUM_STEPS' ({s.GRAD_ACCUM_STEPS})"
        )
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
    checkpointer = Checkpointer(out_dir, s.CHECKPOINT_KEEP_LAST)
    step, best, skipped = 0, -math.inf, 0  # skipped: steps dropped for non-finite losses or gradients

    # --- resume: every rank restores everything (optimizer included) from the same file --------------
    if resume:
        found = checkpointer.load_latest(map_location=device) if rank == 0 else None
        unreadable = ([str(p) for _, p in checkpointer.step_checkpoints()] if rank == 0 and found is None
                      else [])
        path, unreadable = du.broadcast_object((str(found[1]) if found else None, unreadable))
        if unreadable:
            raise ResumeError(
                f"--resume: no checkpoint in {out_dir} can be read ({', '.join(unreadable)}); repair or move "
                f"{'it' if len(unreadable) == 1 else 'them'} away, or run without --resume to start over")
        if path is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", out_dir)
        else:
            state = found[0] if rank == 0 else torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            data.load_state_dict(_convert_position(state["data"], micro_batch * world))
            step, best = int(state["step"]), float(state["best_metric"])
            skipped = int(state.get("skipped_steps", 0))
            rng = state["rng"]
            if len(rng) != world:
                logger.warning("checkpoint was written by %d processes, now %d: RNG streams differ", len(rng),
                               world)
            restore_rng_state(rng[min(rank, len(rng) - 1)])
            logger.info("resumed from %s at step %d", path, step)

    ddp = world > 1
    train_model = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                find_unused_parameters=True)
        if ddp else model
    )

    def state_dict() -> dict:
        rngs = du.all_gather_objects(capture_rng_state())  # collective: every rank calls it
        return {
            "model": unwrap(train_model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
            "data": {**data.state_dict(), "items_per_step": micro_batch * world},
            "step": step, "best_metric": best, "skipped_steps": skipped, "config": cfg.dump(),
        }

    def save(path_kind: str) -> Path | None:
        state = state_dict()
        p = None
        if rank == 0:
            p = checkpointer.save(state, step) if path_kind == "step" else checkpointer.save_best(state)
            logger.info("saved %s", p)
        du.barrier()
        return p

    def evaluate() -> dict[str, float]:
        nonlocal best
        if task.evaluate is None:
            return {}
        metrics = task.evaluate(unwrap(train_model))
        train_model.train()
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        logger.info("eval at step %d: %s", step, "  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        if metrics.get(task.metric, -math.inf) > best:
            best = metrics[task.metric]
            save("best")
        return metrics

    writer = MetricWriter(out_dir, enabled=rank == 0, resumed_at=step if resume else None)
    meter = ProgressMeter(step, max_iter)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    metrics: dict[str, float] = {}
    train_model.train()
    logger.info("training %d steps: %d images/step (%d per micro-batch x %d accumulation x %d processes), "
                "%d micro-batches per epoch", max_iter, s.IMS_PER_BATCH, micro_batch, s.GRAD_ACCUM_STEPS,
                world, len(data))

    # --- the loop --------------------------------------------------------------------------------------
    stop = _StopRequest()  # SIGINT/SIGTERM: finish the step, save, stop
    try:
        while step < max_iter:
            loss_sums: dict[str, torch.Tensor] = {}
            bad: dict[str, float] | None = None
            n_images = 0
            for micro in range(s.GRAD_ACCUM_STEPS):
                batch = move_to_device(data.next(), device)
                n_images += int(batch["images"].shape[0])
                last = micro == s.GRAD_ACCUM_STEPS - 1
                sync = contextlib.nullcontext() if (last or not ddp) else train_model.no_sync()
                with sync:
                    with autocast:
                        out = train_model(batch)
                    loss = out["loss"].float()
                    scaler.scale(loss / s.GRAD_ACCUM_STEPS).backward()
                parts = {"loss": loss.detach(),
                         **{k: v.detach().float() for k, v in sorted(out["losses"].items())}}
                if bad is None and not all(torch.isfinite(v) for v in parts.values()):
                    bad = {k: v.item() for k, v in parts.items()}
                for k, v in parts.items():
                    loss_sums[k] = loss_sums.get(k, 0.0) + v

            # One collective per step: loss sums, image count, the "something went non-finite" flag and the
            # "a stop signal arrived" flag (so that every process stops after the same step).
            names = list(loss_sums)
            stats = torch.stack([*(torch.nan_to_num(loss_sums[k], nan=0.0, posinf=0.0, neginf=0.0)
                                   for k in names),
                                 torch.tensor(float(n_images), device=device),
                                 torch.tensor(float(bad is not None), device=device),
                                 torch.tensor(float(stop.signum is not None), device=device)])
            du.all_reduce_sum(stats)
            stop_flag = stats[-1].item() > 0
            scaler.unscale_(optimizer)
            grad_norm = _grad_norm(model, s.CLIP_GRAD_NORM)
            problem = None
            if stats[-2].item() > 0:
                where = ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else "on another process"
                problem = f"non-finite loss at step {step + 1}: {where}"
            elif not scaler.is_enabled() and not torch.isfinite(grad_norm):
                # fp16: the scaler skips by itself
                problem = (f"non-finite gradient at step {step + 1} (the losses are finite: "
                           f"{', '.join(f'{k}={loss_sums[k].item():.6g}' for k in names)}): grad norm "
                           f"{grad_norm.item()}, first in '{_first_nonfinite_grad(model)}'")
            if problem is not None:
                if skipped >= s.SKIP_NONFINITE_STEPS:
                    allowed = (f" (SOLVER.SKIP_NONFINITE_STEPS {s.SKIP_NONFINITE_STEPS} already skipped)"
                               if s.SKIP_NONFINITE_STEPS else "")
                    raise NonFiniteLossError(problem + allowed)
                skipped += 1  # the update is dropped; data and schedule move on as if the step had been taken
                logger.warning("%s: step skipped (%d of SOLVER.SKIP_NONFINITE_STEPS %d)", problem, skipped,
                               s.SKIP_NONFINITE_STEPS)
                scaler.update()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            meter.add_images(stats[-3].item())

            if problem is None and (step % s.LOG_PERIOD == 0 or step == max_iter):
                denom = s.GRAD_ACCUM_STEPS * world
                losses = {k: stats[i].item() / denom for i, k in enumerate(names)}
                scalars = meter.report(step, losses, s.BASE_LR * lr_factor(step, cfg, max_iter), device)
                if s.CLIP_GRAD_NORM > 0:
                    scalars["grad_norm"] = float(grad_norm)
                if skipped:
                    scalars["skipped_steps"] = skipped
                writer.write(step, {**{f"train/{k}": v for k, v in losses.items()}, **scalars})
            if cfg.TEST.EVAL_PERIOD > 0 and step % cfg.TEST.EVAL_PERIOD == 0 and step < max_iter:
                evaluate()
            if step % s.CHECKPOINT_PERIOD == 0 or step == max_iter:
                save("step")
            if stop_flag:  # every process saw the same flag (it went through the all-reduce)
                saved = step % s.CHECKPOINT_PERIOD == 0 or step == max_iter
                path = checkpointer.directory / f"model_{step:07d}.pth" if saved else save("step")
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, path if rank == 0 else None)
        if task.evaluate is not None:
            metrics = evaluate()
    finally:
        stop.restore()
        writer.close()
    return metrics


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
