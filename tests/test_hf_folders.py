"""Hugging Face folders are local files, checked before anything trains (issue 26, item 5): each bad folder
is one line naming the folder and what is wrong, exit 2, nothing trained; the width check is the one of
every architecture; a folder's own tokenizer is used; its unused tensors are reported at WARNING with its
path."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import LxmertConfig, LxmertForPreTraining, VisualBertConfig, VisualBertForPreTraining

from detector.config import ConfigError
from e2e_vl.config import load_train_cfg
from e2e_vl.modeling.hf import load_tokenizer
from e2e_vl.modeling.registry import build_model

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "easy_vqa" / "smoke.yaml")
WIDTH = 512  # the res5 width of the easy-VQA detector (configs/easy_vqa/base.yaml)
SIZES = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


def _lxmert(folder: Path, visual_feat_dim: int = WIDTH, vocab_size: int = 30522) -> str:
    LxmertForPreTraining(LxmertConfig(vocab_size=vocab_size, l_layers=1, r_layers=1, x_layers=1,
                                      visual_feat_dim=visual_feat_dim, num_qa_labels=3, num_object_labels=4,
                                      num_attr_labels=2, **SIZES)).save_pretrained(folder)
    return str(folder)


def _visualbert(folder: Path, visual_embedding_dim: int = WIDTH) -> str:
    VisualBertForPreTraining(VisualBertConfig(vocab_size=30522, num_hidden_layers=1,
                                              visual_embedding_dim=visual_embedding_dim, **SIZES)
                             ).save_pretrained(folder)
    return str(folder)


def _no_weights(folder: Path) -> str:
    _lxmert(folder)
    (folder / "model.safetensors").unlink()
    return str(folder)


ARCH_OF_KEY = {"MODEL.LXMERT.CHECKPOINT": "lxmert", "MODEL.VISUALBERT.CHECKPOINT": "visualbert"}
# (key, how the folder is made, extra overrides, what the one line says)
BAD_FOLDERS = {
    "missing": ("MODEL.LXMERT.CHECKPOINT", lambda p: str(p / "lxmert-bsae-uncased"), [],
                "lxmert-bsae-uncased: no such folder"),
    "no_weights": ("MODEL.LXMERT.CHECKPOINT", _no_weights, [], "no weights (model.safetensors"),
    "visualbert_folder_to_lxmert": ("MODEL.LXMERT.CHECKPOINT", _visualbert, [],
                                    "holds a 'visual_bert' model (config.json's model_type), not the "
                                    "'lxmert'"),
    "lxmert_folder_to_visualbert": ("MODEL.VISUALBERT.CHECKPOINT", _lxmert, [],
                                    "holds a 'lxmert' model (config.json's model_type), not the "
                                    "'visual_bert'"),
    "lxmert_width": ("MODEL.LXMERT.CHECKPOINT", lambda p: _lxmert(p, 2048), [],
                     "reads 2048-d region features; the detector's res5 gives 512-d"),
    "visualbert_width": ("MODEL.VISUALBERT.CHECKPOINT", lambda p: _visualbert(p, 2048), [],
                         "reads 2048-d region features; the detector's res5 gives 512-d"),
    "layers_disagree_with_keys": ("MODEL.LXMERT.CHECKPOINT", _lxmert, ["MODEL.LXMERT.X_LAYERS", "4"],
                                  "'MODEL.LXMERT.X_LAYERS' 4 differs from"),
    "bert_folder_missing": ("MODEL.VL.BERT_PATH", lambda p: str(p / "bert-base-uncsaed"), [],
                            "bert-base-uncsaed: not a local Hugging Face model folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_folder_is_one_line_and_exit_2_before_training(case, tmp_path, train_net, capsys):
    key, make, extra, says = BAD_FOLDERS[case]
    folder = make(tmp_path / "folder")
    out = tmp_path / "run"
    capsys.readouterr()
    code = train_net.cli(["--config-file", SMOKE, "--output-dir", str(out),
                          "MODEL.ARCH", ARCH_OF_KEY.get(key, "lxmert"), "MODEL.VL.BERT_RANDOM_INIT", "True",
                          key, folder, *extra])
    err = capsys.readouterr().err
    # besides the run's info log lines ("[hh:mm:ss r0] ..."): one line, the error
    lines = [line for line in err.strip().splitlines() if not re.match(r"\[\d\d:\d\d:\d\d r\d+\] ", line)]
    assert code == 2 and len(lines) == 1, err
    assert says in lines[0] and (folder in lines[0] or case == "layers_disagree_with_keys"), err
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("model_*.pth"))


def test_the_width_switch_lets_visualbert_s_object_embedding_adapt_another_detector(tmp_path):
    folder = _visualbert(tmp_path / "vb", 2048)
    cfg = load_train_cfg(SMOKE, ["MODEL.ARCH", "visualbert", "MODEL.VISUALBERT.CHECKPOINT", folder,
                                 "MODEL.VISUALBERT.VISUAL_EMBEDDING_DIM", "2048"])
    model = build_model(cfg, "visualbert")
    assert model.object_embedding.proj.out_features == 2048 and model.appearance_dim == WIDTH


def test_vilbert_released_weights_of_another_width_are_the_same_one_line_error(tmp_path):
    from e2e_vl.modeling.vilbert import load_vilbert_weights

    cfg = load_train_cfg(SMOKE, ["MODEL.ARCH", "vilbert", "MODEL.VL.BERT_RANDOM_INIT", "True"])
    model = build_model(cfg, "vilbert")
    torch.save({"bert.v_embeddings.image_embeddings.weight": torch.zeros(32, 2048)}, tmp_path / "vilbert.bin")
    with pytest.raises(ConfigError, match="'MODEL.VILBERT.WEIGHTS' .*vilbert.bin reads 2048-d region "
                                          "features; the detector's res5 gives 512-d"):
        load_vilbert_weights(model, tmp_path / "vilbert.bin")


def test_a_folder_s_own_tokenizer_is_used_and_its_unused_tensors_are_a_warning(tmp_path, caplog):
    tokenizer = load_tokenizer("")
    tokenizer.add_tokens(["[obj]"])
    folder = _lxmert(tmp_path / "lxmert", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)
    cfg = load_train_cfg(SMOKE, ["MODEL.ARCH", "lxmert", "MODEL.LXMERT.CHECKPOINT", folder,
                                 "MODEL.VL.HEADS", "['mlm', 'vqa']"])
    with caplog.at_level(logging.WARNING):
        model = build_model(cfg, "lxmert")
    assert "[obj]" in model.tokenizer.get_vocab()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and "tensors not used by this model" in r.getMessage()]
    assert len(warned) == 1 and folder in warned[0] and "answer_head." in warned[0], warned
    assert "cls.predictions.transform" not in warned[0]  # the mlm head took them


@pytest.mark.parametrize("name, arch, says", [
    ("lxmert_e2e", "lxmert", "'MODEL.LXMERT.CHECKPOINT' lxmert-base-uncased: no such folder"),
    ("visualbert_e2e", "visualbert", "'MODEL.VISUALBERT.CHECKPOINT' visualbert-vqa-coco-pre: no such folder"),
    ("vilbert_e2e", "vilbert", "'MODEL.VILBERT.WEIGHTS' pretrained_model.bin does not exist"),
])
def test_vqa_v2_configs_of_the_released_models_refuse_to_start_without_them(name, arch, says, tmp_path,
                                                                          train_net, capsys):
    """configs/vqa/<arch>_e2e.yaml name their architecture and its release; until the release is given, the
    run stops with one line instead of training the architecture from BERT alone."""
    config = REPO / "configs" / "vqa" / f"{name}.yaml"
    assert load_train_cfg(config, ["MODEL.VILBERT.WEIGHTS", ""]).MODEL.ARCH == arch
    code = train_net.cli(["--config-file", str(config), "--output-dir", str(tmp_path / "run"),
                          "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
