"""The training engine with a tiny stand-in model: exact resume after SIGKILL, DDP (gloo), checkpoints,
NaN handling, optimiser groups, the resumable sampler.

This file is also the worker script the subprocess tests run (`python tests/test_engine.py ...`), so
the stand-in model lives here and nowhere in the library.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector.checkpoint import CheckpointError  # noqa: E402
from e2e_vl.config import get_train_cfg  # noqa: E402
from e2e_vl import distributed as du  # noqa: E402
from e2e_vl.engine.checkpoint import (  # noqa: E402
    Checkpointer, capture_rng_state, is_weights_file, load_checkpoint_file, load_weights_file,
    restore_rng_state)
from e2e_vl.engine.logger import setup_logging  # noqa: E402
from e2e_vl.engine.optim import build_optimizer, lr_factor  # noqa: E402
from e2e_vl.engine.sampler import EpochLoader, ResumableBatchSampler  # noqa: E402
from e2e_vl.engine.trainer import (  # noqa: E402
    NonFiniteLossError, ResumeError, TrainingInterrupted, TrainTask, train)


# ---------------------------------------------------------------------------------------------------
# Stand-in task: an "image" of 3x8x8 whose brightest channel is the answer; 3 questions per image.
# ---------------------------------------------------------------------------------------------------
class StandInData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(123)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        bright = torch.nn.functional.one_hot(self.labels, 3).float()[:, :, None, None]
        self.images = torch.rand(n, 3, 8, 8, generator=g) * 0.5 + bright

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "question": torch.tensor([1, 2, 3])}


def collate(items: list[dict]) -> dict:
    images = torch.stack([it["image"] for it in items])
    q = torch.cat([it["question"] for it in items])
    index = torch.arange(len(items)).repeat_interleave(3)
    targets = torch.nn.functional.one_hot(torch.stack([it["label"] for it in items]), 3).float()[index]
    return {"images": images, "question_ids": q, "sample_image_index": index, "vqa_targets": targets}


class StandInModel(nn.Module):
    """A detector-like conv, a question embedding, dropout (so the RNG matters) and an answer head."""

    def __init__(self, nan_at_call: int = -1, nan_grad_at_calls: tuple[int, ...] = ()):
        super().__init__()
        self.detector = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.question = nn.Embedding(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 3))
        self.nan_at_call, self.nan_grad_at_calls, self.calls = nan_at_call, nan_grad_at_calls, 0

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        feats = self.detector(batch["images"]).mean(dim=(2, 3))[batch["sample_image_index"]]
        if self.calls in self.nan_grad_at_calls:  # a finite loss whose gradient is NaN
            feats.register_hook(lambda g: g * float("nan"))
        logits = self.head(self.norm(feats + self.question(batch["question_ids"])))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["vqa_targets"]) * logits.shape[1]
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "losses": {"vqa": loss}, "vqa_logits": logits}

    @staticmethod
    def parameter_kind(name: str) -> str:
        return "detector" if name.startswith("detector.") else "bert"


def standin_cfg(out: Path, max_iter: int, extra: list[str] = ()):
    cfg = get_train_cfg()
    cfg.merge_from_list([
        "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", str(max_iter), "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.BASE_LR", "0.05", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.LOG_PERIOD", "1", "DATALOADER.NUM_WORKERS", "0", "SOLVER.DETECTOR_LR_MULT", "0.5",
        *extra,
    ])
    return cfg.freeze()


def accuracy(model: nn.Module, data: StandInData) -> dict:
    model.eval()
    with torch.no_grad():
        batch = collate([data[i] for i in range(len(data))])
        logits = model(batch)["vqa_logits"]
    return {"accuracy": (logits.argmax(1) == batch["vqa_targets"].argmax(1)).float().mean().item()}


def worker(argv: list[str]) -> None:
    """Entry point of the subprocess tests (also under torchrun)."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-iter", type=int, default=12)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--nan-at", type=int, default=-1)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--eval-sleep", type=float, default=0.0,
                   help="each evaluation touches OUT/evaluating, then sleeps")
    p.add_argument("opts", nargs="*")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    device = du.init_distributed("cpu")
    setup_logging(a.out, du.get_rank())
    cfg = standin_cfg(Path(a.out), a.max_iter, a.opts)
    torch.manual_seed(cfg.SEED)
    model = StandInModel(a.nan_at)
    if a.sleep:  # slow the steps down so the parent can kill the run mid-way
        model.register_forward_hook(lambda *_: time.sleep(a.sleep))
    data = StandInData()

    def evaluate(m: nn.Module) -> dict:
        if a.eval_sleep:  # lets the parent kill the run during an evaluation
            (Path(a.out) / "evaluating").touch()
            time.sleep(a.eval_sleep)
        return accuracy(m, data)

    try:
        train(cfg, model, TrainTask(data, collate, evaluate), device, resume=a.resume)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except ResumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    finally:
        du.cleanup()


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------
def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def _final_weights(out: Path) -> dict:
    steps = Checkpointer(out, 2).step_checkpoints()
    return load_checkpoint_file(steps[-1][1])["model"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_rng_state_restores_after_loading_onto_the_training_device(tmp_path, device):
    """--resume loads a checkpoint onto MODEL.DEVICE, so the stored RNG tensors arrive there; every
    generator (python, numpy, torch, cuda) must still restore and replay the same draws."""
    import random

    import numpy as np

    if device == "cuda":
        torch.zeros(1, device="cuda")  # initialise CUDA so its generator is captured too
    torch.save({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(),
                torch.rand(1, device=device).item())
    restore_rng_state(torch.load(tmp_path / "rng.pth", map_location=device, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(),
            torch.rand(1, device=device).item()) == expected


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    ref = _run(["--out", str(tmp_path / "ref"), "DATALOADER.NUM_WORKERS", "1"])
    assert ref.returncode == 0, ref.stderr
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--out", str(killed), "--sleep", "0.05",
                             "DATALOADER.NUM_WORKERS", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("model_0000004.pth")):
        time.sleep(0.01)
    time.sleep(0.07)  # somewhere inside a later step (possibly while writing model_0000006)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(killed.glob("model_0000012.pth")), "the run finished before it was killed"
    resumed = _run(["--out", str(killed), "--resume", "DATALOADER.NUM_WORKERS", "1"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigkill_during_evaluation_then_resume_is_bit_exact(tmp_path):
    flags = ["TEST.EVAL_PERIOD", "4"]
    ref = _run(["--out", str(tmp_path / "ref"), "--max-iter", "8", *flags])
    assert ref.returncode == 0, ref.stderr
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--out", str(killed), "--max-iter", "8",
                             "--eval-sleep", "30", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (killed / "evaluating").exists():
        time.sleep(0.01)
    assert (killed / "evaluating").exists(), "the run never reached its evaluation"
    proc.send_signal(signal.SIGKILL)  # inside the evaluation at step 4, before step 4's checkpoint
    proc.wait()
    assert sorted(p.name for p in killed.glob("*.pth")) == ["model_0000002.pth"]
    resumed = _run(["--out", str(killed), "--resume", "--max-iter", "8", *flags])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best_a, best_b = (load_weights_file(d / "model_best.pth") for d in (tmp_path / "ref", killed))
    assert best_a["step"] == best_b["step"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in a)


@pytest.mark.slow
def test_sigint_and_sigterm_save_a_checkpoint_that_resumes_exactly(tmp_path):
    ref = _run(["--out", str(tmp_path / "ref"), "DATALOADER.NUM_WORKERS", "1"])
    assert ref.returncode == 0, ref.stderr
    reference = _final_weights(tmp_path / "ref")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for sig, whole_group in ((signal.SIGINT, True), (signal.SIGTERM, False)):
        out = tmp_path / sig.name
        # CHECKPOINT_PERIOD 4: a stop after step 5 is saved only because of the signal.
        proc = subprocess.Popen([sys.executable, __file__, "--out", str(out), "--sleep", "0.1",
                                 "DATALOADER.NUM_WORKERS", "1", "SOLVER.CHECKPOINT_PERIOD", "4"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "model_0000004.pth").exists():
            time.sleep(0.01)
        time.sleep(0.05)  # inside step 5
        if whole_group:  # Ctrl-C in a terminal: the DataLoader worker gets it too
            os.killpg(proc.pid, sig)
        else:  # a cluster's scheduler: the main process
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err
        steps = [step for step, _ in Checkpointer(out, 2).step_checkpoints()]
        assert steps[-1] < 12 and steps[-1] > 4, (steps, err)
        assert f"interrupted by {sig.name} after step {steps[-1]}: saved" in err
        assert f"model_{steps[-1]:07d}.pth; continue with --resume" in err
        assert "Traceback" not in err, err
        resumed = _run(["--out", str(out), "--resume", "DATALOADER.NUM_WORKERS", "1",
                        "SOLVER.CHECKPOINT_PERIOD", "4"])
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed from {out / f'model_{steps[-1]:07d}.pth'}" in resumed.stderr
        final = load_checkpoint_file(out / "model_0000012.pth")["model"]
        assert final.keys() == reference.keys()
        for k in reference:
            assert torch.equal(reference[k], final[k]), (sig.name, k)


@pytest.mark.slow
def test_two_process_gloo_trains_checkpoints_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__]
    whole = subprocess.run(torchrun + ["--out", str(tmp_path / "whole"), "--max-iter", "6"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = subprocess.run(torchrun + ["--out", str(tmp_path / "parts"), "--max-iter", "6",
                                       "SOLVER.CHECKPOINT_PERIOD", "4"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    # Pretend the run died after step 4: drop the final checkpoint, then resume on two processes.
    (tmp_path / "parts" / "model_0000006.pth").unlink()
    second = subprocess.run(torchrun + ["--out", str(tmp_path / "parts"), "--max-iter", "6", "--resume"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "model_0000004.pth" in second.stderr
    state = load_checkpoint_file(tmp_path / "parts" / "model_0000006.pth")
    assert len(state["rng"]) == 2 and state["step"] == 6
    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "parts")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _rank_process(out: Path, rank: int) -> int | None:
    """pid of the torchrun worker of `rank` training into `out` (Linux /proc), or None."""
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and str(out) in (entry / "cmdline").read_bytes().decode(errors="replace")
                    and f"\0RANK={rank}\0"
                        in "\0" + (entry / "environ").read_bytes().decode(errors="replace")):
                return int(entry.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, "--max-iter", "12",
                "SOLVER.CHECKPOINT_PERIOD", "4"]
    whole = subprocess.run(torchrun + ["--out", str(tmp_path / "whole")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun + ["--out", str(out), "--sleep", "0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "model_0000004.pth").exists():
        time.sleep(0.01)
    rank1 = _rank_process(out, 1)
    assert rank1 is not None, "rank 1 not found"
    # only one process is told: the flag reaches the other through the all-reduce
    os.kill(rank1, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    steps = [step for step, _ in Checkpointer(out, 2).step_checkpoints()]
    assert 4 < steps[-1] < 12, (steps, err[-3000:])
    saved = f"interrupted by SIGTERM after step {steps[-1]}: saved {out / f'model_{steps[-1]:07d}.pth'}"
    assert saved in err and f"after step {steps[-1]}: checkpoint saved by another process" in err, err[-3000:]
    resumed = subprocess.run(torchrun + ["--out", str(out), "--resume"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final_weights(tmp_path / "whole"), _final_weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=3)
    base = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "data": {}, "rng": [], "step": 0}
    ck.save({**base, "step": 2}, 2)
    path4 = ck.save({**base, "step": 4}, 4)
    path4.write_bytes(path4.read_bytes()[:-50])
    with caplog.at_level(logging.WARNING):
        state, path = ck.load_latest()
    assert state["step"] == 2 and path.name == "model_0000002.pth"
    assert "skipping unreadable checkpoint" in caplog.text and "model_0000004.pth" in caplog.text


def test_resume_refuses_when_no_checkpoint_can_be_read(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_0000004.pth").write_bytes(b"half a checkpoint")  # e.g. cut short by a full disk
    r = _run(["--out", str(out), "--resume"])
    assert r.returncode == 2, r.stderr
    assert ("no checkpoint in" in r.stderr and "model_0000004.pth" in r.stderr
            and "without --resume" in r.stderr)
    assert not (out / "model_0000002.pth").exists()  # nothing trained, nothing overwritten
    # An empty folder is a first launch: --resume starts at step 0 (cluster jobs always pass --resume).
    fresh = _run(["--out", str(tmp_path / "fresh"), "--resume", "--max-iter", "2"])
    assert fresh.returncode == 0, fresh.stderr
    assert "starting from step 0" in fresh.stderr and (tmp_path / "fresh" / "model_0000002.pth").exists()
    # Asked to start over (no --resume): trains, and overwrites the damaged file when it gets there.
    over = _run(["--out", str(out), "--max-iter", "4"])
    assert over.returncode == 0, over.stderr
    assert load_checkpoint_file(out / "model_0000004.pth")["step"] == 4


def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
    import json

    out = tmp_path / "run"
    assert _run(["--out", str(out), "TEST.EVAL_PERIOD", "4"]).returncode == 0
    whole = (out / "metrics.jsonl").read_text().splitlines()
    # As if killed after logging step 11 (and half a line) but before its checkpoint: resume from step 10.
    (out / "model_0000012.pth").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train/lo')
    r = _run(["--out", str(out), "--resume", "TEST.EVAL_PERIOD", "4"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [d["step"] for d in lines if "train/loss" in d]
    assert train_steps == list(range(1, 13))
    assert [d["step"] for d in lines if "eval/accuracy" in d] == [4, 8, 12]
    assert len(lines) == len(whole)


def test_keep_last_k_and_no_temporary_files_left(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    base = {"model": {}, "optimizer": {}, "scheduler": {}, "data": {}, "rng": []}
    for step in (1, 2, 3, 4):
        ck.save({**base, "step": step}, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000003.pth", "model_0000004.pth"]


def test_nan_loss_stops_with_step_and_losses(tmp_path):
    r = _run(["--out", str(tmp_path), "--nan-at", "3"])
    assert r.returncode == 3
    assert "non-finite loss at step 3: loss=nan, vqa=nan" in r.stderr
    # nothing after step 2 was saved, and the step-2 checkpoint has finite weights
    state = load_checkpoint_file(tmp_path / "model_0000002.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "model_0000004.pth").exists()


def _train_in_process(out: Path, max_iter: int, extra: list[str] = (), resume: bool = False,
                      **model_kw) -> None:
    torch.manual_seed(0)
    data = StandInData()
    train(standin_cfg(out, max_iter, list(extra)), StandInModel(**model_kw), TrainTask(data, collate),
          torch.device("cpu"), resume=resume)


def test_nan_gradient_with_a_finite_loss_stops_naming_the_step_and_parameter(tmp_path):
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite gradient at step 3 \(the losses are finite: loss="
                                                 r".*grad norm nan, first in 'detector.0.weight'"):
        _train_in_process(tmp_path, 4, nan_grad_at_calls=(3,))
    assert load_checkpoint_file(tmp_path / "model_0000002.pth")["step"] == 2  # finite, loads
    assert not (tmp_path / "model_0000004.pth").exists()


def test_skip_nonfinite_steps_drops_the_update_up_to_the_configured_count(tmp_path, caplog):
    once = tmp_path / "once"
    with caplog.at_level(logging.WARNING, logger="e2e_vl.train"):
        _train_in_process(once, 3, ["SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.SKIP_NONFINITE_STEPS", "1"],
                          nan_grad_at_calls=(3,))
    assert "non-finite gradient at step 3" in caplog.text
    assert "step skipped (1 of SOLVER.SKIP_NONFINITE_STEPS 1)" in caplog.text
    before, after = (load_checkpoint_file(once / f"model_000000{i}.pth") for i in (2, 3))
    assert after["step"] == 3 and after["skipped_steps"] == 1
    # the update was dropped
    assert all(torch.equal(before["model"][k], v) for k, v in after["model"].items())
    # A second bad step beyond the allowance stops the run, naming it (a NaN loss counts the same way).
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss at step 5: .*SKIP_NONFINITE_STEPS 1 already "):
        _train_in_process(tmp_path / "twice", 6, ["SOLVER.SKIP_NONFINITE_STEPS", "1"],
                          nan_grad_at_calls=(3,), nan_at_call=5)


def test_non_finite_weights_are_refused_on_save_and_on_load(tmp_path, caplog):
    from e2e_vl.engine.checkpoint import NonFiniteWeightsError

    ck = Checkpointer(tmp_path, keep_last=3)
    base = {"optimizer": {}, "scheduler": {}, "data": {}, "rng": [], "step": 2}
    ck.save({**base, "model": {"w": torch.ones(3)}}, 2)
    poisoned = {**base, "model": {"w": torch.ones(3), "head.bias": torch.tensor([1.0, float("inf")])},
                "step": 4}
    with pytest.raises(NonFiniteWeightsError,
                       match=r"model_0000004.pth: model tensor 'head.bias' holds 1 non-finite"):
        ck.save(poisoned, 4)
    with pytest.raises(NonFiniteWeightsError, match="model_best.pth: model tensor 'head.bias'"):
        ck.save_best(poisoned)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000002.pth"]
    torch.save(poisoned, tmp_path / "model_0000004.pth")  # written by something else
    with pytest.raises(NonFiniteWeightsError, match="model_0000004.pth: model tensor 'head.bias'"):
        load_checkpoint_file(tmp_path / "model_0000004.pth")
    with caplog.at_level(logging.WARNING):
        state, path = ck.load_latest()  # resume takes the last good one and says why
    assert path.name == "model_0000002.pth" and "'head.bias' holds 1 non-finite" in caplog.text


def test_checkpoints_record_the_parameters_an_update_reached(tmp_path):
    """What tools/export_detector.py keeps over --base-weights: parameters with a gradient, across resumes."""
    frozen = ["SOLVER.FREEZE_PARAMS", "['^norm\\.']"]
    _train_in_process(tmp_path, 2, frozen)
    reached = ["detector.0.bias", "detector.0.weight", "head.1.bias", "head.1.weight", "question.weight"]
    assert load_checkpoint_file(tmp_path / "model_0000002.pth")["trained_parameters"] == reached
    _train_in_process(tmp_path, 4, frozen, resume=True)
    assert load_checkpoint_file(tmp_path / "model_0000004.pth")["trained_parameters"] == reached


def test_a_checkpoint_failing_its_crc_check_is_not_resumed_from(tmp_path, caplog, damage_zip):
    ck = Checkpointer(tmp_path, keep_last=3)
    base = {"optimizer": {}, "scheduler": {}, "data": {}, "rng": []}
    ck.save({**base, "model": {"w": torch.ones(4096)}, "step": 2}, 2)
    ck.save({**base, "model": {"w": torch.full((4096,), 2.0)}, "step": 4}, 4)
    damage_zip(tmp_path / "model_0000004.pth", tmp_path / "model_0000004.pth")
    with pytest.raises(CheckpointError, match=r"model_0000004.pth: damaged torch checkpoint .*fails its CRC"):
        load_checkpoint_file(tmp_path / "model_0000004.pth")
    with caplog.at_level(logging.WARNING):
        state, path = ck.load_latest()
    assert path.name == "model_0000002.pth" and "fails its CRC check" in caplog.text


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_failed_checkpoint_write_keeps_the_previous_one_and_names_the_file(tmp_path, monkeypatch, fault):
    import errno

    from detector import atomic
    from e2e_vl.engine import checkpoint as ckpt_module
    from e2e_vl.engine.checkpoint import CheckpointWriteError

    real_save, real_open, calls = torch.save, open, []

    def full_disk_save(obj, f):  # the second checkpoint runs out of space half-way
        calls.append(f)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    def read_only_open(path, mode="r", *args, **kw):  # the folder turned read-only after the first one
        if "w" in mode and Path(path).name.startswith(".model_0000004"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kw)

    if fault == "disk_full":
        monkeypatch.setattr(ckpt_module.torch, "save", full_disk_save)
    else:
        monkeypatch.setattr(atomic, "open", read_only_open, raising=False)  # the one atomic write
    reason = "No space left on device" if fault == "disk_full" else "Read-only file system"
    with pytest.raises(CheckpointWriteError,
                       match=f"cannot write checkpoint {tmp_path / 'model_0000004.pth'}: {reason}"):
        _train_in_process(tmp_path, 6)
    assert sorted(p.name for p in tmp_path.glob("*.pth*")) == ["model_0000002.pth"]  # no temporary file left
    assert load_checkpoint_file(tmp_path / "model_0000002.pth")["step"] == 2


def test_hostile_checkpoint_for_resume_is_refused_and_runs_nothing(tmp_path, caplog):
    from tiny import write_hostile_checkpoint  # here: this file's worker runs need none of tiny's imports

    marker = tmp_path / "pwned"
    write_hostile_checkpoint(tmp_path / "model_0000004.pth", marker)
    with caplog.at_level(logging.WARNING), pytest.raises(ResumeError,
                                                         match="no checkpoint in .* can be read"):
        _train_in_process(tmp_path, 6, resume=True)
    assert "model_0000004.pth: refused by torch.load(weights_only=True)" in caplog.text
    assert "weights_only=False" not in caplog.text and not marker.exists()


def test_in_process_training_learns_and_writes_logs(tmp_path):
    cfg = standin_cfg(tmp_path, 30, ["SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "10"])
    torch.manual_seed(0)
    model, data = StandInModel(), StandInData()
    before = accuracy(model, data)["accuracy"]
    metrics = train(cfg, model, TrainTask(data, collate, lambda m: accuracy(m, data)), torch.device("cpu"))
    assert metrics["accuracy"] > max(0.8, before)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 30 and '"eval/accuracy"' in lines[-1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "model_best.pth").exists() and (tmp_path / "model_0000030.pth").exists()


def test_param_groups_no_decay_and_detector_lr_mult(tmp_path):
    cfg = standin_cfg(tmp_path, 10, ["SOLVER.WEIGHT_DECAY", "0.01"])
    opt = build_optimizer(StandInModel(), cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"detector/decay", "detector/no_decay", "bert/decay", "bert/no_decay"}
    assert by_name["detector/decay"]["lr"] == pytest.approx(0.025) and by_name["bert/decay"]["lr"] == 0.05
    assert by_name["bert/no_decay"]["weight_decay"] == 0.0 and by_name["bert/decay"]["weight_decay"] == 0.01
    # LayerNorm weight/bias and all biases are in the no-decay group
    assert sum(p.numel() for p in by_name["bert/no_decay"]["params"]) == 8 + 8 + 3


def test_freeze_params_leaves_matching_parameters_out(tmp_path):
    from e2e_vl.config import ConfigError
    from e2e_vl.engine.optim import freeze_params

    model = StandInModel()
    assert freeze_params(model, [r"^detector\."]) == 2
    opt = build_optimizer(model, standin_cfg(tmp_path, 10))
    assert {g["name"] for g in opt.param_groups} == {"bert/decay", "bert/no_decay"}
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze_params(model, ["nothing_like_this"])


def test_lr_schedule_warmup_then_linear_and_cosine(tmp_path):
    cfg = standin_cfg(tmp_path, 10, ["SOLVER.WARMUP_ITERS", "4", "SOLVER.WARMUP_FACTOR", "0.1"])
    assert lr_factor(0, cfg, 10) == pytest.approx(0.1) and lr_factor(2, cfg, 10) == pytest.approx(0.55)
    assert (lr_factor(4, cfg, 10) == 1.0 and lr_factor(7, cfg, 10) == pytest.approx(0.5)
            and lr_factor(10, cfg, 10) == 0)
    cos = standin_cfg(tmp_path, 10, ["SOLVER.WARMUP_ITERS", "0", "SOLVER.LR_SCHEDULER", "cosine"])
    assert lr_factor(5, cos, 10) == pytest.approx(0.5) and lr_factor(10, cos, 10) == pytest.approx(0.0)


def test_sampler_shards_are_disjoint_and_resume_continues_the_same_order():
    ranks = [list(ResumableBatchSampler(50, 4, seed=7, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == 48
    s = ResumableBatchSampler(50, 4, seed=7, rank=1, world_size=2)
    s.set_position(0, 2)
    assert list(s) == ranks[1][2:]
    s.set_position(1, 0)
    assert list(s) != ranks[1]  # a new permutation each epoch

    loader = EpochLoader(list(range(10)), ResumableBatchSampler(10, 3, seed=1), collate_fn=list)
    stream = [loader.next() for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    again = EpochLoader(list(range(10)), ResumableBatchSampler(10, 3, seed=1), collate_fn=list)
    again.load_state_dict({"epoch": 1, "batch_in_epoch": 1})
    assert [again.next() for _ in range(3)] == stream[4:7]


if __name__ == "__main__":
    worker(sys.argv[1:])


def test_model_best_holds_the_weights_only_not_a_second_full_copy(tmp_path):
    """model_best.pth is for evaluating and fine-tuning: weights, step, metric and config, without the
    optimiser state that only the resumable step checkpoints need (AdamW's two moments: 2x the weights)."""
    from e2e_vl.engine.checkpoint import BEST_KEYS

    cfg = standin_cfg(tmp_path, 4, ["SOLVER.CHECKPOINT_PERIOD", "4"])
    torch.manual_seed(0)
    model, data = StandInModel(), StandInData()
    train(cfg, model, TrainTask(data, collate, lambda m: accuracy(m, data)), torch.device("cpu"))
    best_path, last_path = tmp_path / "model_best.pth", tmp_path / "model_0000004.pth"
    best, last = torch.load(best_path, weights_only=True), load_checkpoint_file(last_path)
    assert sorted(best) == sorted(BEST_KEYS) and best["step"] == last["step"] == 4
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    moments = sum(t.numel() * t.element_size() for s in last["optimizer"]["state"].values()
                  for t in s.values() if torch.is_tensor(t) and t.numel() > 1)
    assert moments > 0 and last_path.stat().st_size - best_path.stat().st_size >= moments
    with pytest.raises(ValueError, match="missing"):  # never resumed from
        load_checkpoint_file(best_path)
    assert load_weights_file(best_path)["step"] == 4  # what --eval-only MODEL.WEIGHTS model_best.pth reads
    assert is_weights_file(best_path) and not is_weights_file(REPO / "README.md")


def test_solver_compile_compiles_the_model_before_its_first_step(tmp_path, monkeypatch):
    import e2e_vl.engine.trainer as trainer

    seen = []

    def record(model):
        seen.append((type(model).__name__, model.calls))  # calls: forward passes so far
        return ["detector.backbone"]

    monkeypatch.setattr(trainer, "compile_trunk_and_layers", record)
    _train_in_process(tmp_path / "off", 1)
    assert seen == []
    _train_in_process(tmp_path / "on", 1, ["SOLVER.COMPILE", "True"])
    assert seen == [("StandInModel", 0)]
