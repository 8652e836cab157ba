"""TASK pretrain through tools/train_net.py: COCO captions + an LMDB RoI store + a text corpus, MLM and
masked RoI classification on the small easy-VQA-sized model, checkpoints, --resume, held-out metrics."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from e2e_vl.config import ConfigError, load_train_cfg
from tiny import CAPTION_CLASSES, write_caption_data

REPO = Path(__file__).resolve().parents[1]


def _overrides(root: Path, out: Path, max_iter: int) -> list[str]:
    return [
        "--config-file", str(REPO / "configs" / "easy_vqa" / "base.yaml"), "--output-dir", str(out),
        "TASK", "pretrain", "MODEL.WEIGHTS", "", "MODEL.VL.HEADS", "['mlm', 'mrc']",
        "MODEL.VL.NUM_MRC_CLASSES", str(CAPTION_CLASSES), "MODEL.VL.BERT_RANDOM_INIT", "True",
        "DATASETS.ROOT", str(root), "DATASETS.ROI_STORE", "rois",
        "DATASETS.TRAIN", "captions_train", "DATASETS.TEST", "captions_test", "DATASETS.CAPTIONS_TRAIN",
        "train.json", "DATASETS.CAPTIONS_TEST", "val.json", "DATASETS.TEXT_CORPUS", "text.txt",
        "MODEL.VL.PRETRAIN.MLM_PROB", "0.4", "MODEL.VL.PRETRAIN.MRC_PROB", "0.6",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.CHECKPOINT_KEEP_LAST", "3", "SOLVER.LOG_PERIOD", "1",
        "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "2",
    ]


@pytest.mark.slow
def test_pretrain_runs_checkpoints_resumes_exactly_and_evaluates(tmp_path, train_net, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    write_caption_data(root)
    args = _overrides(root, out, max_iter=4)
    assert train_net.cli(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 4
    for row in train_rows:  # captions (mlm, mrc) and text-only passages (mlm_text) in every step
        for key in ("train/loss", "train/mlm", "train/mrc", "train/mlm_text"):
            assert np.isfinite(row[key]) and row[key] > 0, row
    evals = [r for r in rows if "eval/mlm_accuracy" in r]
    assert len(evals) == 1 and evals[0]["eval/num_captions"] == 2
    assert 0.0 <= evals[0]["eval/mlm_accuracy"] <= 1.0 and 0.0 <= evals[0]["eval/mrc_accuracy"] <= 1.0
    assert np.isfinite(evals[0]["eval/mlm_loss"]) and np.isfinite(evals[0]["eval/mrc_loss"])
    assert (out / "model_0000002.pth").exists() and (out / "model_best.pth").exists()
    final = torch.load(out / "model_0000004.pth", weights_only=True)
    assert final["data"]["epoch"] == 1  # 4 items (captions paired with passages), 2 per step: 2 epochs
    start = torch.load(out / "model_0000002.pth", weights_only=True)["model"]
    changed = [k for k in start if not torch.equal(start[k], final["model"][k])]
    assert any(k.startswith("detector.") for k in changed) and any(k.startswith("heads.mrc") for k in changed)

    # As after a crash at step 3: --resume continues from step 2, through the epoch boundary (new masks),
    # to the same weights as the uninterrupted run.
    (out / "model_0000004.pth").unlink()
    assert train_net.cli(["--resume", *args]) == 0
    assert "model_0000002.pth at step 2" in (out / "log.txt").read_text()
    again = torch.load(out / "model_0000004.pth", weights_only=True)["model"]
    assert again.keys() == final["model"].keys()
    assert all(torch.equal(again[k], final["model"][k]) for k in again)

    capsys.readouterr()
    assert train_net.cli(["--eval-only", *args]) == 0
    assert "mlm_accuracy:" in capsys.readouterr().out


def test_pretrain_config_validates_and_needs_pretraining_heads(tmp_path):
    config = REPO / "configs" / "pretrain" / "vlbert_base_cc.yaml"
    cfg = load_train_cfg(config)
    assert cfg.TASK == "pretrain" and list(cfg.MODEL.VL.HEADS) == ["mlm", "mrc"]
    from e2e_vl.tasks import get_task

    vqa_model = SimpleNamespace(tokenizer=None, heads={"vqa": None})  # the task asks the model for its heads
    with pytest.raises(ConfigError, match="TASK pretrain needs a model with one of the heads"):
        get_task("pretrain").build(cfg, vqa_model, torch.device("cpu"), False)


def test_epoch_loader_sets_the_data_set_epoch_so_masks_change():
    from torch.utils.data import Dataset

    from e2e_vl.engine.sampler import EpochLoader, ResumableBatchSampler

    class EpochTagged(Dataset):
        epoch = -1

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> int:
            return self.epoch

    loader = EpochLoader(EpochTagged(), ResumableBatchSampler(4, 2, seed=0), collate_fn=list)
    assert [loader.next() for _ in range(5)] == [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]]
    loader.load_state_dict({"epoch": 1, "batch_in_epoch": 1})  # as on resume
    assert loader.next() == [1, 1]


def _refused_before_training(tmp_path: Path, train_net, *extra: str) -> tuple[Path, str]:
    """Run 2 steps on the caption fixture with `extra` overrides; the run must stop with exit 2 before
    training. Returns the data root and the run's log."""
    root, out = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    write_caption_data(root)
    assert train_net.cli([*_overrides(root, out, max_iter=2), *extra]) == 2
    log = (out / "log.txt").read_text()
    assert not list(out.glob("model_*.pth")) and "training 2 steps" not in log
    return root, log


def test_mrc_class_count_differing_from_the_roi_store_fails_before_training(tmp_path, train_net):
    root, log = _refused_before_training(tmp_path, train_net, "MODEL.VL.NUM_MRC_CLASSES", "7")
    assert (f"MODEL.VL.NUM_MRC_CLASSES is 7 but the RoI store {root / 'rois'} holds class distributions "
            f"over {CAPTION_CLASSES} classes" in log)


@pytest.mark.parametrize("key,name", [("DATASETS.TRAIN", "captions_val"), ("DATASETS.TEST", "easy_vqa_test")])
def test_an_unknown_data_set_name_fails_naming_the_key_and_the_known_names(key, name):
    """Names are checked before any file is read (the config's caption files do not exist here)."""
    import re

    from e2e_vl.tasks import get_task

    cfg = load_train_cfg(REPO / "configs" / "pretrain" / "vlbert_base_cc.yaml", [key, name])
    model = SimpleNamespace(tokenizer=None, heads={"mlm": None, "mrc": None})
    expected = (f"'{key}' {name!r} is not a caption data set; "
                "expected one of ['captions_train', 'captions_test']")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        get_task("pretrain").build(cfg, model, torch.device("cpu"), False)


def test_a_missing_caption_file_fails_before_training_naming_the_file(tmp_path, train_net):
    root, log = _refused_before_training(tmp_path, train_net, "DATASETS.CAPTIONS_TRAIN",
                                         "captions_train2017.json")
    assert f"caption file not found: {root / 'captions_train2017.json'}" in log
