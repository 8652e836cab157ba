"""tools/train_net.py end to end: config errors, the demo's two stages for real on a few images (stage 1
classifies regions and exports its detector; stage 2 starts from it, its loss falls, the checkpoint
resumes bit-exactly, --eval-only scores it), non-finite losses."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from demo_stages import REPO, run_script, stage1_detector
from tiny import write_hostile_checkpoint


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_script("tools/train_net.py", *args, timeout=timeout)


@pytest.mark.parametrize("args,expected", [
    (["OUTPUT_DIR", "runs/a", "--output-dir", "runs/b"],
     "--output-dir runs/b and the override OUTPUT_DIR runs/a disagree; give one of them"),
    (["SOLVER.BASE_LRR", "1e-4"], "unknown config key 'SOLVER.BASE_LRR'; did you mean 'SOLVER.BASE_LR'?"),
    (["SOLVER.MAX_ITER", "many"], "'SOLVER.MAX_ITER' expects int"),
    (["--config-file", "no/such/config.yaml"], "config file not found: no/such/config.yaml"),
    (["SOLVER.AMP.DTYPE", "fp8"], "'SOLVER.AMP.DTYPE' must be one of ['none', 'bf16', 'fp16'], got 'fp8'"),
])
def test_config_errors_are_one_clear_line(args, expected):
    r = _run(*args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("config error:") and expected in r.stderr


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("_BASE_: " + str(REPO / "configs" / "easy_vqa" / "e2e.yaml")
                   + "\nSOLVER:\n  MAX_ITERS: 3\n")
    r = _run("--config-file", str(cfg))
    assert r.returncode == 2 and str(cfg) in r.stderr and "SOLVER.MAX_ITERS" in r.stderr


@pytest.mark.parametrize("args,key", [
    (["MODEL.WEIGHTS", "", "DATASETS.TEST", ""], "DATASETS.TEST"),
    (["--config-file", str(REPO / "configs" / "easy_vqa" / "detector.yaml"), "DATASETS.TEST", ""],
     "DATASETS.TEST"),
    (["--config-file", str(REPO / "configs" / "pretrain" / "vlbert_base_cc.yaml"),
      "DATASETS.TEST", ""], "DATASETS.TEST"),
])
def test_eval_only_with_nothing_to_evaluate_fails_before_work_starts(tmp_path, args, key):
    out = tmp_path / "run"
    r = _run("--eval-only", "--output-dir", str(out), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert f"--eval-only: nothing to evaluate: '{key}' is empty" in r.stderr
    assert not out.exists()  # no run folder, no records


def test_eval_only_keeps_the_training_config_and_writes_its_own(tmp_path):
    out = tmp_path / "run"
    small = ["--config-file", str(REPO / "configs" / "easy_vqa" / "detector.yaml"), "--output-dir", str(out),
             "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
             "DATASETS.TRAIN_LIMIT", "4", "DATASETS.TEST_LIMIT", "4", "DATALOADER.NUM_WORKERS", "0"]
    r = _run(*small)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = (out / "config.yaml").read_text()
    assert "TEST_LIMIT: 4" in trained
    r = _run("--eval-only", *small, "DATASETS.TEST_LIMIT", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "region_accuracy:" in r.stdout
    assert (out / "config.yaml").read_text() == trained  # still says how the weights were trained
    assert "TEST_LIMIT: 3" in (out / "eval_config.yaml").read_text()
    record = json.loads((out / "eval_metrics.json").read_text())
    assert record["task"] == "regions" and record["data"] == "easy_vqa_regions_test"
    assert Path(record["weights"]).parent == out  # the run's newest checkpoint
    assert set(record["metrics"]) >= {"region_accuracy"}


def test_truncated_weights_and_missing_images_are_one_line_naming_the_file(tmp_path):
    from detector.image_sources import ImageError, load_image

    torch.save({"model": {"w": torch.zeros(5000)}}, tmp_path / "ok.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "ok.pth").read_bytes()[:3000])
    r = _run("--eval-only", "--config-file", str(REPO / "configs" / "easy_vqa" / "detector.yaml"),
             "--output-dir", str(tmp_path / "run"), "MODEL.WEIGHTS", str(cut), "DATASETS.TEST_LIMIT", "2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and f"{cut}: truncated or damaged torch checkpoint" in r.stderr
    assert f"{cut}: truncated" in (tmp_path / "run" / "log.txt").read_text()  # logged too
    with pytest.raises(ImageError, match=f"cannot read file {tmp_path / 'nowhere.jpg'}: No such file"):
        load_image(str(tmp_path / "nowhere.jpg"))


def test_hostile_checkpoint_as_eval_only_weights_is_refused_and_runs_nothing(tmp_path, train_net):
    hostile, marker, out = tmp_path / "hostile.pth", tmp_path / "pwned", tmp_path / "run"
    write_hostile_checkpoint(hostile, marker)
    config = REPO / "configs" / "easy_vqa" / "detector.yaml"
    assert train_net.cli(["--eval-only", "--config-file", str(config), "--output-dir", str(out),
                          "MODEL.WEIGHTS", str(hostile), "DATASETS.TEST_LIMIT", "2"]) == 2
    log = (out / "log.txt").read_text()
    assert (f"error: {hostile}: refused by torch.load(weights_only=True): it contains objects other than "
            "tensors and plain data (Unsupported global: GLOBAL eval was not an allowed global by default); "
            "nothing in it was run") in log
    assert "weights_only=False" not in log and not marker.exists()  # no advice to load it unsafely


SMOKE = [  # the demo config on ~4 easy-VQA images, a few small steps at a high learning rate
    "DATASETS.TRAIN_LIMIT", "30", "DATASETS.TEST_LIMIT", "20", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "2e-4", "SOLVER.WARMUP_ITERS", "2", "SOLVER.LOG_PERIOD", "1",
    "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "6", "SOLVER.CHECKPOINT_KEEP_LAST", "3",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.mark.slow(minutes=2)
def test_demo_config_smoke_run_learns_resumes_exactly_and_evaluates(tmp_path):
    weights = stage1_detector(tmp_path)
    stage1 = torch.load(weights, weights_only=True)["model"]
    out = tmp_path / "run"
    smoke = [*SMOKE, "MODEL.WEIGHTS", str(weights)]
    r = _run("--output-dir", str(out), *smoke)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert "easy_vqa_test accuracy:" in r.stdout
    assert (out / "config.yaml").exists() and (out / "model_best.pth").exists()

    # Resume from step 6 (as after a crash): the final weights equal the uninterrupted run's.
    final = torch.load(out / "model_0000012.pth", weights_only=True)["model"]
    first = torch.load(out / "model_0000006.pth", weights_only=True)["model"]
    # Stage 2 started from stage 1's detector: the box predictor (no loss reaches it) is still stage 1's.
    assert torch.equal(first["detector.roi_heads.box_predictor.cls_score.weight"],
                       stage1["roi_heads.box_predictor.cls_score.weight"])
    (out / "model_0000012.pth").unlink()
    r2 = _run("--output-dir", str(out), "--resume", *smoke)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed from" in r2.stderr and "model_0000006.pth" in r2.stderr
    assert "config keys changed" not in r2.stderr  # the same config: nothing to warn about
    again = torch.load(out / "model_0000012.pth", weights_only=True)["model"]
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)

    r3 = _run("--output-dir", str(out), "--eval-only", *smoke)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "easy_vqa_test accuracy:" in r3.stdout


def test_cli_exits_non_zero_on_a_non_finite_loss(monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from e2e_vl.engine.trainer import NonFiniteLossError

    def boom(args):
        raise NonFiniteLossError("non-finite loss at step 7: loss=nan, vqa=nan")

    monkeypatch.setattr(train_net, "main", boom)
    assert train_net.cli([]) == 3
    assert "non-finite loss at step 7: loss=nan, vqa=nan" in capsys.readouterr().err


def test_cli_refuses_an_unreadable_resume(monkeypatch, capsys, caplog):
    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from e2e_vl.engine.trainer import ResumeError

    def unreadable(args):
        raise ResumeError("--resume: no checkpoint in runs/x can be read (runs/x/model_0000006.pth); ...")

    monkeypatch.setattr(train_net, "main", unreadable)
    assert train_net.cli(["--resume"]) == 2
    assert "runs/x/model_0000006.pth" in caplog.text


def test_cli_reports_an_interrupted_run_and_exits_128_plus_the_signal(monkeypatch, caplog):
    import signal
    from pathlib import Path

    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from e2e_vl.engine.trainer import TrainingInterrupted

    def interrupted(args):
        raise TrainingInterrupted(signal.SIGTERM, 7, Path("runs/x/model_0000007.pth"))

    monkeypatch.setattr(train_net, "main", interrupted)
    assert train_net.cli([]) == 128 + signal.SIGTERM
    assert ("interrupted by SIGTERM after step 7: saved runs/x/model_0000007.pth; continue with --resume"
            in caplog.text)


@pytest.mark.slow
def test_demo_model_trains_on_two_processes_and_resumes(tmp_path):
    """The real VL-BERT + detector under DDP (torchrun, gloo): both ranks train, the checkpoint of the
    run resumed at step 6 on two processes ends where the uninterrupted run did."""
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
                str(REPO / "tools" / "train_net.py")]
    smoke = [*SMOKE, "MODEL.WEIGHTS", ""]  # the demo model, its detector randomly initialised

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        return subprocess.run([sys.executable, *torchrun, *args], capture_output=True, text=True, env=env,
                              timeout=600)

    out = tmp_path / "run"
    r = run("--output-dir", str(out), *smoke)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(1 per micro-batch x 1 accumulation x 2 processes)" in r.stderr, r.stderr[-3000:]
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert "easy_vqa_test accuracy:" in r.stdout
    final = torch.load(out / "model_0000012.pth", weights_only=True)
    assert len(final["rng"]) == 2  # one RNG state per rank
    (out / "model_0000012.pth").unlink()
    r2 = run("--output-dir", str(out), "--resume", *smoke)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed from" in r2.stderr and "model_0000006.pth" in r2.stderr
    again = torch.load(out / "model_0000012.pth", weights_only=True)["model"]
    for key, value in final["model"].items():
        torch.testing.assert_close(again[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("error,line", [
    ("checkpoint", "cannot write checkpoint runs/x/model_0000008.pth: No space left on device"),
    ("read_only", "error: cannot write or read runs/x/log.txt: Read-only file system"),
])
def test_cli_reports_a_full_or_read_only_output_dir_in_one_line(monkeypatch, capsys, caplog, error, line):
    import errno

    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from e2e_vl.engine.checkpoint import CheckpointWriteError

    def fail(args):
        if error == "checkpoint":
            raise CheckpointWriteError(f"{line} (older checkpoints are kept as they were)")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "runs/x/log.txt")

    monkeypatch.setattr(train_net, "main", fail)
    assert train_net.cli([]) == 2
    assert line in caplog.text and "Traceback" not in capsys.readouterr().err


def test_an_image_error_from_a_dataloader_worker_is_one_line_without_its_traceback(monkeypatch, capsys,
                                                                                   caplog):
    from torch._utils import ExceptionWrapper

    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from detector.image_sources import ImageError

    def worker_failed(args):  # what torch re-raises in the main process when a worker's read fails
        try:
            raise ImageError("cannot read file imgs/gone.jpg: No such file or directory")
        except ImageError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr(train_net, "main", worker_failed)
    assert train_net.cli([]) == 2
    assert "error: cannot read file imgs/gone.jpg: No such file or directory" in caplog.text
    assert "Traceback" not in caplog.text and "Traceback" not in capsys.readouterr().err


def test_resume_lists_the_config_keys_changed_since_the_run_began():
    """A resumed run with another config is another run: --resume names every key that changed."""
    import yaml

    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from e2e_vl.config import load_train_cfg

    began = load_train_cfg(REPO / "configs" / "easy_vqa" / "e2e.yaml", ["MODEL.WEIGHTS", ""])
    saved = yaml.safe_load(began.dump())
    assert train_net.config_changes(saved, yaml.safe_load(began.dump())) == []
    now = load_train_cfg(REPO / "configs" / "easy_vqa" / "e2e.yaml",
                         ["MODEL.WEIGHTS", "", "DATASETS.ANSWER_SEGMENT", "1", "SOLVER.MAX_ITER", "2000"])
    assert train_net.config_changes(saved, yaml.safe_load(now.dump())) == [
        "DATASETS.ANSWER_SEGMENT: 0 -> 1", "SOLVER.MAX_ITER: 1500 -> 2000"]
    del saved["SEED"]
    missing = train_net.config_changes(saved, yaml.safe_load(began.dump()))
    assert missing == [f"SEED: '<absent>' -> {began.SEED}"]


def test_cuda_asked_on_a_machine_without_it_is_one_line_with_the_fix(tmp_path, train_net, monkeypatch,
                                                                      capsys):
    """The paper configs set MODEL.DEVICE cuda: on a CPU-only machine one line, exit 2, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert train_net.cli(["--config-file", str(REPO / "configs" / "vcr" / "vlbert_base_e2e.yaml"),
                          "--output-dir", str(out), "MODEL.WEIGHTS", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("config error: 'MODEL.DEVICE' is 'cuda' but this machine has no CUDA device")
    assert err.rstrip().endswith("add MODEL.DEVICE cpu to the command")
    assert not out.exists()


def test_autocast_on_a_cpu_warns_once_at_start_with_the_measured_slowdown(tmp_path, train_net, monkeypatch):
    import e2e_vl.engine.amp as amp
    import e2e_vl.engine.trainer as trainer

    assert amp.measure_autocast_slowdown(torch.bfloat16, repeats=1) > 0
    assert amp.cpu_autocast_warning("bf16", 1.1) is None  # too little to mention
    monkeypatch.setattr(amp, "measure_autocast_slowdown", lambda dtype: 15.0)
    monkeypatch.setattr(trainer, "train", lambda *args, **kwargs: {})  # the warning comes before training
    assert train_net.cli(["--config-file", str(REPO / "configs" / "easy_vqa" / "smoke.yaml"), "--output-dir",
                          str(tmp_path / "run"), "SOLVER.AMP.DTYPE", "bf16"]) == 0
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    warned = [line.split("] ", 1)[-1] for line in log if "SOLVER.AMP.DTYPE" in line]
    assert warned == ["SOLVER.AMP.DTYPE bf16 on the CPU: a matrix product ran 15.0x slower under bf16 "
                      "autocast than in fp32 on this machine (no native bf16); SOLVER.AMP.DTYPE none trains "
                      "faster here"]


def test_a_failed_eval_only_leaves_the_last_good_evaluation_files(tmp_path):
    """An --eval-only that fails (here on damaged weights) must not leave eval_config.yaml pointing at what
    failed beside the last good eval_metrics.json: both are written only after a successful evaluation."""
    from detector.atomic import atomic_write

    out = tmp_path / "run"
    out.mkdir()
    good = {"eval_config.yaml": "MODEL:\n  WEIGHTS: good.pth\n", "eval_metrics.json": '{"metrics": {"a": 1}}'}
    for name, text in good.items():
        (out / name).write_text(text)
    torch.save({"model": {"w": torch.zeros(5000)}}, tmp_path / "ok.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "ok.pth").read_bytes()[:3000])
    r = _run("--eval-only", "--config-file", str(REPO / "configs" / "easy_vqa" / "detector.yaml"),
             "--output-dir", str(out), "MODEL.WEIGHTS", str(cut), "DATASETS.TEST_LIMIT", "2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert {name: (out / name).read_text() for name in good} == good
    assert sorted(p.name for p in out.iterdir()) == ["eval_config.yaml", "eval_metrics.json", "log.txt"]

    def fails_half_way(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):  # the shared atomic write: the old file stays, no temporary file is left
        atomic_write(out / "eval_metrics.json", fails_half_way)
    assert sorted(p.name for p in out.iterdir()) == ["eval_config.yaml", "eval_metrics.json", "log.txt"]
    assert (out / "eval_metrics.json").read_text() == good["eval_metrics.json"]
