"""One way to start every architecture (issue 26): a few steps of TASK pretrain through tools/train_net.py,
then a fine-tuning start from that checkpoint (MODEL.INIT_FROM) equal to it in every shared tensor, and
--eval-only of the run's checkpoint rebuilding the run's model from its config.yaml and reproducing its final
metrics; for each registered architecture. A checkpoint of another architecture or body size is one error
naming both; the old key MODEL.VLBERT.INIT_FROM is the config library's "did you mean" error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import CAPTION_CLASSES, write_caption_data
from detector.checkpoint import CheckpointError
from e2e_vl.config import ConfigError, get_train_cfg, load_train_cfg
from e2e_vl.modeling.registry import architectures, build_model

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "easy_vqa" / "smoke.yaml")
ARCHS = ["vlbert", "visualbert", "lxmert", "vilbert"]
# Small bodies: a random-weight MiniLM-shaped BERT, one LXMERT layer of each kind (smoke.yaml: the rest).
MODEL_KEYS = ["MODEL.VL.BERT_RANDOM_INIT", "True", "MODEL.LXMERT.L_LAYERS", "1"]


def _data_keys(root: Path) -> list[str]:
    """What the pre-training run and its evaluation read besides the model (not MODEL.*)."""
    return ["TASK", "pretrain", "DATASETS.ROOT", str(root), "DATASETS.ROI_STORE", "rois",
            "DATASETS.TRAIN", "captions_train", "DATASETS.TEST", "captions_test",
            "DATASETS.CAPTIONS_TRAIN", "train.json", "DATASETS.CAPTIONS_TEST", "val.json",
            "DATASETS.TRAIN_LIMIT", "0", "DATASETS.TEST_LIMIT", "0",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "TEST.IMS_PER_BATCH", "2"]


def _pretrain_keys(arch: str) -> list[str]:
    return ["MODEL.ARCH", arch, *MODEL_KEYS, "MODEL.VL.HEADS", "['mlm', 'mrc']",
            "MODEL.VL.NUM_MRC_CLASSES", str(CAPTION_CLASSES), "MODEL.VL.PRETRAIN.MLM_PROB", "0.4",
            "MODEL.VL.PRETRAIN.MRC_PROB", "0.6"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    write_caption_data(root)
    return root


def _main(train_net, argv: list[str]) -> dict:
    return train_net.main(train_net.build_parser().parse_args(argv))


def _finetune_cfg(arch: str, init_from: str, *extra: str):
    return load_train_cfg(SMOKE, ["MODEL.ARCH", arch, *MODEL_KEYS, "MODEL.VL.HEADS", "['vqa']",
                                  "MODEL.INIT_FROM", init_from, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_pretrain_then_finetune_start_and_eval_only_for_every_architecture(arch, captions, tmp_path,
                                                                          train_net):
    assert sorted(ARCHS) == sorted(set(architectures()) - {"region_classifier"})  # a new one joins here
    run = tmp_path / "pretrain"
    final = _main(train_net, ["--config-file", SMOKE, "--output-dir", str(run), *_data_keys(captions),
                              *_pretrain_keys(arch)])
    checkpoint = run / "model_0000002.pth"
    assert "eval/mlm_accuracy" in final or "mlm_accuracy" in final, final

    # Fine-tuning start: the body and the shared heads are the checkpoint's, the new task's head is fresh.
    saved = torch.load(checkpoint, weights_only=True)["model"]
    model = build_model(_finetune_cfg(arch, str(checkpoint)), arch)
    own = model.state_dict()
    shared = saved.keys() & own.keys()
    assert any(k.startswith("detector.") for k in shared) and any(k.startswith(model.body_prefixes)
                                                                   for k in shared)
    assert [k for k in shared if not torch.equal(own[k], saved[k])] == []
    report = model.init_report
    assert any(r.startswith("new 'vqa' head") for r in report.fresh)
    assert any("head 'mrc' is not in this model" in r for r in report.unused)

    # --eval-only of the run's checkpoint: architecture, body sizes and heads from its config.yaml.
    evaluated = _main(train_net, ["--eval-only", "--config-file", SMOKE, "--output-dir",
                                  str(tmp_path / "eval"), *_data_keys(captions),
                                  "MODEL.WEIGHTS", str(checkpoint)])
    assert evaluated == pytest.approx(final)

    # Another architecture's start from it: one error naming both.
    other = ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)]
    with pytest.raises(CheckpointError, match=f"is a checkpoint of {arch}, this model is {other}"):
        build_model(_finetune_cfg(other, str(checkpoint)), other)


@pytest.mark.slow
def test_eval_only_key_that_disagrees_with_the_run_is_one_line_and_another_body_size_one_error(
        captions, tmp_path, train_net, capsys):
    run = tmp_path / "pretrain"
    _main(train_net, ["--config-file", SMOKE, "--output-dir", str(run), *_data_keys(captions),
                      *_pretrain_keys("lxmert")])
    checkpoint = str(run / "model_0000002.pth")
    capsys.readouterr()
    code = train_net.cli(["--eval-only", "--config-file", SMOKE, "--output-dir", str(tmp_path / "eval"),
                          *_data_keys(captions), "MODEL.WEIGHTS", checkpoint, "MODEL.LXMERT.R_LAYERS", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'MODEL.LXMERT.R_LAYERS' is 2 but the run that wrote it had 1" in err

    with pytest.raises(CheckpointError, match=r"holds a lxmert body of another size than this model's "
                                              r"\(\d+ tensors of another shape, \d+ missing"):
        build_model(_finetune_cfg("lxmert", checkpoint, "MODEL.LXMERT.R_LAYERS", "2"), "lxmert")
    # --eval-only of a start whose task head would be untrained is refused, not scored under its name.
    code = train_net.cli(["--eval-only", "--config-file", SMOKE, "--output-dir", str(tmp_path / "eval2"),
                          "MODEL.ARCH", "lxmert", *MODEL_KEYS, "MODEL.VL.NUM_MRC_CLASSES",
                          str(CAPTION_CLASSES), "MODEL.INIT_FROM", checkpoint])
    err = capsys.readouterr().err
    assert code == 2 and "has no trained weights for this task's heads (new 'vqa' head" in err


def test_old_init_from_key_is_the_usual_did_you_mean_error():  # rename-script: keep old keys
    with pytest.raises(ConfigError, match=r"unknown config key 'MODEL.VLBERT.INIT_FROM'; did you mean "
                                          r"'MODEL.INIT_FROM'\?"):
        load_train_cfg(None, ["MODEL.VLBERT.INIT_FROM", "x.pth"])
    with pytest.raises(ConfigError, match=r"'MODEL.VLBERT.HEADS'; did you mean 'MODEL.VL.HEADS'\?"):
        get_train_cfg().merge_from_dict({"MODEL": {"VLBERT": {"HEADS": ["vqa"]}}}, source="a.yaml")
