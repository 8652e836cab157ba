"""TASK flickr30k: the official Flickr30K Entities layout (Sentences/*.txt with [/EN#id/type words] markup,
Annotations/*.xml with boxes, nobndbox and scene objects, split files), candidates from an RoI store or the
annotation, phrase grounding, Recall@1/5/10 against the union of a chain's boxes and the upper bound, short
training runs through tools/train_net.py, and bad input named with its file and line before training."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from e2e_vl.data.flickr30k import (Flickr30KCollator, Flickr30KDataError, Flickr30KDataset, gt_boxes,
                                   parse_caption, read_annotation, read_flickr30k, store_boxes, store_records)
from e2e_vl.data.transforms import ResizeFlip
from e2e_vl.evaluation.flickr30k import Flickr30KEvaluator, recall_metrics
from tiny import FLICKR_H, FLICKR_OBJECTS, FLICKR_SENTENCES, FLICKR_W, write_flickr30k

REPO = Path(__file__).resolve().parents[1]
H, W = FLICKR_H, FLICKR_W


@pytest.fixture
def flickr_root(tmp_path):
    return write_flickr30k(tmp_path / "flickr30k")


def _dataset(root: Path, split: str, tokenizer, boxes: str = "roi_store") -> Flickr30KDataset:
    from detector.roi_store import RoIStore

    captions, annotations, grounded = read_flickr30k(root, split)
    candidates = (gt_boxes(annotations) if boxes == "gt"
                  else store_boxes(store_records(RoIStore(root / "rois"), sorted(annotations), split)))
    return Flickr30KDataset(captions, annotations, grounded, candidates, root / "flickr30k-images", tokenizer,
                            ResizeFlip(H, W))


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def test_markup_annotations_and_union_boxes_are_read_as_the_official_reader(flickr_root):
    caption = parse_caption(FLICKR_SENTENCES["1000"][0], "x:1", "1000")
    assert " ".join(caption.words) == "A man in a red shirt holds two cups in a kitchen ."
    assert [(p.chain_id, p.types, p.first_word, p.num_words) for p in caption.phrases] == [
        ("1", ("people",), 0, 2), ("2", ("clothing",), 3, 3), ("3", ("other",), 7, 2),
        ("4", ("scene",), 10, 2)]
    multi = parse_caption("[/EN#3/people/bodyparts her arm] .", "x:1", "1")
    assert multi.phrases[0].types == ("people", "bodyparts")
    ann = read_annotation(flickr_root / "Annotations/1000.xml")
    assert ann.boxes["3"] == [[29, 4, 39, 14], [41, 4, 51, 14]]  # 1-based corners made 0-based
    assert ann.union_box("3") == [29, 4, 51, 14]
    assert (ann.nobox, ann.scene, ann.union_box("5")) == ({"5"}, {"4"}, None)
    captions, _, grounded = read_flickr30k(flickr_root, "train")
    # chain 0 (notvisual), scene chain 4 and nobndbox chain 5 are not grounded
    assert [(g.caption, g.phrase.chain_id) for g in grounded] == [(0, "1"), (0, "2"), (0, "3"), (1, "1"),
                                                                  (2, "11"), (2, "12")]
    assert len(captions) == 3


def test_samples_and_batches_carry_each_phrase_s_pieces_and_targets(flickr_root, tokenizer):
    ds = _dataset(flickr_root, "val", tokenizer)
    sample = ds[1]  # "their tails are hidden by the dogs ." : only "the dogs" is grounded
    pieces = sample["input_ids"][sample["phrase_tokens"][0]]
    assert tokenizer.decode(pieces) == "the dogs"
    # candidates: whole image (never a target), union of chain 7, one part, the mat
    assert sample["phrase_targets"].tolist() == [[0.0, 1.0, 0.0, 0.0]]
    batch = Flickr30KCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["phrase_sample"].tolist() == [0, 0, 1]
    assert batch["phrase_tokens"].shape == (3, batch["input_ids"].shape[1])
    assert batch["phrase_targets"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]


# ---------------------------------------------------------------------------------------------------
# head and metrics
# ---------------------------------------------------------------------------------------------------
def test_phrase_head_scores_by_the_phrase_s_pieces_and_ignores_the_whole_image():
    from e2e_vl.modeling.heads import Encoded
    from e2e_vl.modeling.flickr30k_heads import PhraseGroundingHead

    head = PhraseGroundingHead(2, 2)
    with torch.no_grad():
        for layer in (head.query, head.key):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    text = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]])  # [CLS], two pieces of the phrase
    regions = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0]]])
    encoded = Encoded(text, regions, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    batch = {"phrase_sample": torch.tensor([0]), "phrase_tokens": torch.tensor([[False, True, False]]),
             "phrase_targets": torch.tensor([[0.0, 1.0, 0.0]])}
    out = head.outputs(encoded, batch)
    s = 2 / np.sqrt(2)  # piece (2, 0) against region (1, 0)
    assert out["phrase_logits"].tolist()[0] == [float("-inf"), pytest.approx(s), 0.0]
    # KL(one-hot || softmax([s, 0])) = -log softmax = log(1 + e^-s)
    assert out["losses"]["phrase"].item() == pytest.approx(float(np.log1p(np.exp(-s))), rel=1e-5)
    both = head.outputs(encoded, dict(batch, phrase_tokens=torch.tensor([[False, True, True]])))
    assert both["phrase_logits"].tolist()[0][1:] == pytest.approx([s / 2, s / 2])  # mean over the pieces


def test_recall_at_k_and_upper_bound_by_hand():
    # right at 1; right at 6 (within 10, not 5); right only at 11 (beyond 10); never right
    ranked = [[0.9, 0.1], [0.2, 0.3, 0.1, 0.2, 0.4, 0.7],
              [0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5], [0.4]]
    assert recall_metrics(ranked) == {"recall@1": 0.25, "recall@5": 0.25, "recall@10": 0.5,
                                      "upper_bound": 0.75, "num_phrases": 4.0}


class _Ranker(torch.nn.Module):
    """Gives each phrase, in batch order, the next row of `rows`."""

    def __init__(self, rows: list[list[float]]):
        super().__init__()
        self.rows = rows

    def forward(self, batch: dict) -> dict:
        n = len(batch["phrase_sample"])
        logits, self.rows = torch.tensor(self.rows[:n]), self.rows[n:]
        return {"phrase_logits": logits}


def test_evaluation_against_union_boxes_leaves_nobndbox_phrases_out(flickr_root, tokenizer, tmp_path):
    ds = _dataset(flickr_root, "val", tokenizer)
    inf = float("-inf")
    # candidates 1..3: union of chain 7 (right for the two chain-7 phrases), one part of it (IoU 0.375:
    # wrong), the mat (right for chain 8). Rankings: [union, part, mat]: hit at 1; [part, union, mat] for
    # the mat: hit at 3; [part, mat, union]: hit at 3. The nobndbox phrase "their tails" is not counted.
    rows = [[inf, 3.0, 2.0, 1.0], [inf, 2.0, 3.0, 1.0], [inf, 1.0, 3.0, 2.0]]
    evaluator = Flickr30KEvaluator(ds, Flickr30KCollator(tokenizer.pad_token_id), 4, torch.device("cpu"),
                                   output_dir=tmp_path, split="val")
    metrics = evaluator(_Ranker(rows))
    assert metrics == {"recall@1": pytest.approx(1 / 3), "recall@5": 1.0, "recall@10": 1.0,
                       "upper_bound": 1.0, "num_phrases": 3.0}
    written = json.loads((tmp_path / "flickr30k_val_predictions.json").read_text())
    assert [(r["chain_id"], r["phrase"]) for r in written] == [("7", "Two dogs"), ("8", "a mat"),
                                                               ("7", "the dogs")]
    assert written[0]["boxes"][0] == [0, 0, 40, 20] and written[0]["iou"][0] == pytest.approx(1.0)
    # with the annotation's own boxes as candidates no single box covers chain 7's union: upper bound 1/3
    gt = _dataset(flickr_root, "val", tokenizer, boxes="gt")
    metrics = Flickr30KEvaluator(gt, Flickr30KCollator(tokenizer.pad_token_id), 4, torch.device("cpu"))(
        _Ranker([[inf, 1.0, 2.0, 3.0]] * 3))
    assert (metrics["upper_bound"], metrics["recall@10"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))


# ---------------------------------------------------------------------------------------------------
# bad input: one error naming the file and the line
# ---------------------------------------------------------------------------------------------------
def test_unclosed_markup_is_named_with_its_line(tmp_path):
    bad = dict(FLICKR_SENTENCES, **{"1000": [FLICKR_SENTENCES["1000"][0],
                                             "[/EN#1/people The man drinks water ."]})
    root = write_flickr30k(tmp_path / "f", bad)
    with pytest.raises(Flickr30KDataError, match=r"Sentences[/\\]1000\.txt:2: phrase \[/EN#1 \.\.\. does not "
                                                  r"close \(no '\]' before the end of the line\)"):
        read_flickr30k(root, "train")


def test_a_phrase_whose_entity_the_xml_lacks_is_named_with_its_line(tmp_path):
    bad = dict(FLICKR_OBJECTS, **{"1001": [(["12"], (1, 20, 56, 40))]})  # chain 11 gone
    root = write_flickr30k(tmp_path / "f", objects=bad)
    with pytest.raises(Flickr30KDataError, match=r"1001\.txt:1: phrase /EN#11 is not an entity of .*"
                                                  r"Annotations[/\\]1001\.xml"):
        read_flickr30k(root, "train")


# ---------------------------------------------------------------------------------------------------
# tools/train_net.py
# ---------------------------------------------------------------------------------------------------
def _args(config: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config-file", str(REPO / "configs/flickr30k" / config), "--output-dir", str(out),
            "DATASETS.ROOT", str(root), *extra]


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny_lxmert.yaml"])
def test_short_training_run(flickr_root, tmp_path, train_net, config):
    out = tmp_path / "run"
    assert train_net.cli(_args(config, flickr_root, out)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/phrase"] for r in rows if "train/phrase" in r]
    assert len(losses) == 2 and all(np.isfinite(v) and v > 0 for v in losses)
    evals = [r for r in rows if "eval/recall@1" in r]
    assert len(evals) == 1 and evals[0]["eval/num_phrases"] == 3 and evals[0]["eval/upper_bound"] == 1.0
    written = json.loads((out / "flickr30k_val_metrics.json").read_text())
    assert written["recall@1"] == evals[0]["eval/recall@1"]


def test_bad_input_stops_train_net_before_training(tmp_path, train_net, capsys):
    bad = dict(FLICKR_SENTENCES, **{"1001": ["[/EN#11/animals A dog jumps ."]})
    root = write_flickr30k(tmp_path / "f", bad)
    out = tmp_path / "run"
    assert train_net.cli(_args("tiny.yaml", root, out)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "1001.txt:1: phrase [/EN#11 ... does not close" in err
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.jsonl").exists()


def test_paper_config_loads_with_visualbert_s_settings():
    from e2e_vl.config import load_train_cfg

    cfg = load_train_cfg(REPO / "configs/flickr30k/visualbert_base_e2e.yaml")
    assert (cfg.TASK, cfg.MODEL.ARCH, list(cfg.MODEL.VL.HEADS), cfg.DATASETS.FLICKR30K.TEST_BOXES) == (
        "flickr30k", "visualbert", ["phrase"], "roi_store")
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.CLIP_GRAD_NORM,
            cfg.DATASETS.FLICKR30K.MAX_TEXT_LEN) == (2e-5, 32, 5.0, 1.0, 126)


def test_box_source_errors_are_named_before_any_file_is_read(tmp_path):
    from e2e_vl.config import ConfigError, load_train_cfg
    from e2e_vl.tasks.flickr30k import _check_config

    cfg = load_train_cfg(REPO / "configs/flickr30k/tiny.yaml", ["DATASETS.FLICKR30K.TEST_BOXES", "proposals"])
    with pytest.raises(ConfigError, match=r"'DATASETS.FLICKR30K.TEST_BOXES' must be one of \['roi_store', "
                                          r"'gt'\], got 'proposals'"):
        _check_config(cfg, eval_only=False)


def test_an_image_of_another_size_than_its_annotation_is_named(flickr_root, tokenizer):
    ds = _dataset(flickr_root, "val", tokenizer)
    cv2.imwrite(str(flickr_root / "flickr30k-images/1002.jpg"), np.zeros((H + 8, W, 3), np.uint8))
    with pytest.raises(Flickr30KDataError,
                       match=rf"1002\.jpg is {W}x{H + 8} but its annotation says {W}x{H}"):
        ds[0]
