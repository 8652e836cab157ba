"""TASK nlvr2: the official NLVR2 layout (json lines, `<split>-<set>-<pair>-img0/img1.png`, regions from an
RoI store), both pair formats (VisualBERT's joint sequence, LXMERT's two encodings), accuracy and
consistency as the official script computes them, the leaderboard's prediction file, short training runs
through tools/train_net.py, and bad input named with its file and line before training."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.roi_store import RoIRecord, RoIStoreWriter
from e2e_vl.data.nlvr2 import (NLVR2Collator, NLVR2DataError, NLVR2Dataset, find_images, read_nlvr2_jsonl,
                               sentence_key, store_boxes)
from e2e_vl.data.transforms import ResizeFlip
from e2e_vl.evaluation.nlvr2 import NLVR2Evaluator, nlvr2_metrics

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 56
# split -> [(identifier, sentence, label)]; two sentences per image set, as the official files have them
EXAMPLES = {
    "train": [("train-10-0-0", "The left image shows two dogs.", "True"),
              ("train-10-1-0", "The left image shows two dogs.", "False"),
              ("train-10-0-1", "One image has a red ball.", "False"),
              ("train-11-2-0", "There are exactly three cats.", "True")],
    "dev": [("dev-5-0-0", "Both images contain a bottle.", "True"),
            ("dev-5-1-0", "Both images contain a bottle.", "False"),
            ("dev-5-0-1", "The right image is empty.", "True")],
    "test1": [("test1-7-3-0", "A man holds a cup.", "False"), ("test1-7-2-0", "A man holds a cup.", "True")],
}


def _record_line(identifier: str, sentence: str, label: str) -> str:
    """One line as the official files write it (fields besides identifier, sentence, label ignored)."""
    return json.dumps({"validation": {"61": label}, "sentence": sentence, "left_url": "http://x/l.jpg",
                       "writer": "103", "label": label, "right_url": "http://x/r.jpg", "synset": "dog",
                       "query": "dogs1", "identifier": identifier, "extra_validations": {}})


def write_nlvr2(root: Path, examples=None, drop_from_store: tuple[str, ...] = ()) -> Path:
    """The official layout under `root`: <split>.json, images/train/<n>/ (numbered sub-folders, as the
    training images come) and images/<split>/, and an RoI store rois/ keyed by file stem."""
    examples = examples or EXAMPLES
    rng = np.random.default_rng(0)
    records = []
    for split, rows in examples.items():
        (root / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text("".join(_record_line(*r) + "\n" for r in rows))
        for identifier, _, _ in rows:
            pair = identifier.rsplit("-", 1)[0]
            folder = root / "images" / split / ("3" if split == "train" else "")
            folder.mkdir(parents=True, exist_ok=True)
            for side in ("img0", "img1"):
                stem = f"{pair}-{side}"
                image = np.full((H, W, 3), 230, np.uint8)
                cv2.rectangle(image, (4, 4), (30, 30), [int(c) for c in rng.integers(0, 255, 3)], -1)
                cv2.imwrite(str(folder / f"{stem}.png"), image)
                if stem not in drop_from_store and all(r.image_id != stem for r in records):
                    records.append(RoIRecord(stem, f"{stem}.png", H, W,
                                             boxes=np.array([[4, 4, 30, 30], [20, 10, 50, 36]], np.float32)))
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(records)
    return root


@pytest.fixture
def nlvr2_root(tmp_path):
    return write_nlvr2(tmp_path / "nlvr2")


def _dataset(root: Path, split: str, tokenizer, pair_format: str) -> NLVR2Dataset:
    from detector.roi_store import RoIStore

    examples = read_nlvr2_jsonl(root / f"{split}.json")
    boxes = store_boxes(RoIStore(root / "rois"), examples, f"{split}.json")
    return NLVR2Dataset(examples, find_images(root / "images", examples), boxes, tokenizer, ResizeFlip(H, W),
                        pair_format)


# ---------------------------------------------------------------------------------------------------
# reading and batching
# ---------------------------------------------------------------------------------------------------
def test_reader_names_both_images_as_the_official_repository_does(nlvr2_root):
    examples = read_nlvr2_jsonl(nlvr2_root / "train.json")
    assert [(e.identifier, e.label) for e in examples] == [("train-10-0-0", 1), ("train-10-1-0", 0),
                                                          ("train-10-0-1", 0), ("train-11-2-0", 1)]
    assert examples[2].images == ("train-10-0-img0", "train-10-0-img1")
    assert examples[1].where == f"{nlvr2_root / 'train.json'}:2"
    assert sentence_key("dev-850-3-1") == "dev-850--1"
    found = find_images(nlvr2_root / "images", examples)
    assert found["train-10-0-img1"] == nlvr2_root / "images/train/3/train-10-0-img1.png"


@pytest.mark.parametrize("pair_format", ["joint", "separate"])
def test_batches_of_both_pair_formats(nlvr2_root, tokenizer, pair_format):
    ds = _dataset(nlvr2_root, "dev", tokenizer, pair_format)
    collate = NLVR2Collator(pair_format, tokenizer.pad_token_id)
    batch = collate([ds[0], ds[1]])
    assert batch["nlvr2_labels"].tolist() == [1, 0]
    assert batch["images"].shape[0] == 4  # two examples, two images each
    assert [len(b) for b in batch["boxes"]] == [3, 3, 3, 3]  # whole image + the store's two boxes
    assert batch["boxes"][0][0].tolist() == [0, 0, W, H]
    if pair_format == "joint":  # one text row per example, its two images' slots
        assert batch["input_ids"].shape[0] == 2
        assert batch["sample_image_index"].tolist() == [0, 2]
        assert batch["second_image_index"].tolist() == [1, 3]
        assert tokenizer.decode(batch["input_ids"][0][batch["text_mask"][0]]) == \
            "[CLS] both images contain a bottle. [SEP]"
    else:  # the sentence with image 0, then with image 1
        assert batch["input_ids"].shape[0] == 4 and "second_image_index" not in batch
        assert batch["sample_image_index"].tolist() == [0, 1, 2, 3]
        assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    # the two sentences written for one image pair share its detector passes
    shared = collate([ds[0], ds[2]])
    assert shared["images"].shape[0] == 2 and shared["nlvr2_labels"].tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------
# heads and metrics
# ---------------------------------------------------------------------------------------------------
def test_pair_heads_shapes_and_loss_against_a_hand_computation():
    from e2e_vl.modeling.heads import Encoded
    from e2e_vl.modeling.nlvr2_heads import JointPairHead, SeparatePairHead

    def encoded(pooled: torch.Tensor) -> Encoded:
        b = len(pooled)
        return Encoded(torch.zeros(b, 1, 3), torch.zeros(b, 0, 3), torch.zeros(b, 0, dtype=torch.bool),
                       torch.ones(b, dtype=torch.bool), pooled)

    joint = JointPairHead(3).eval()
    with torch.no_grad():
        joint.classifier.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        joint.classifier.bias.zero_()
    out = joint.outputs(encoded(torch.tensor([[2.0, 0, 0], [0, 0, 0]])),
                        {"nlvr2_labels": torch.tensor([1, -1])})
    assert out["nlvr2_logits"].tolist() == [[2.0, 0.0], [0.0, 0.0]]
    # only the labelled example counts: -log softmax([2, 0])[1] = log(1 + e^2)
    assert out["losses"]["nlvr2"].item() == pytest.approx(float(np.log1p(np.exp(2.0))))

    pair = SeparatePairHead(3).eval()
    pooled = torch.arange(12.0).reshape(4, 3)  # two examples x two images
    logits = pair.outputs(encoded(pooled), {"nlvr2_labels": torch.tensor([0, 1])})["nlvr2_logits"]
    assert logits.shape == (2, 2)
    assert torch.allclose(logits, pair.logit_fc(torch.cat([pooled[0::2], pooled[1::2]], dim=1)))


def test_accuracy_and_consistency_as_the_official_script():
    labels = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": True,  # sentence dev-1--0
              "dev-1-0-1": False, "dev-1-3-1": True,  # sentence dev-1--1
              "dev-2-0-0": True}  # sentence dev-2--0
    predictions = {"dev-1-0-0": True, "dev-1-1-0": True, "dev-1-2-0": True,  # one wrong: not consistent
                   "dev-1-0-1": False, "dev-1-3-1": True, "dev-2-0-0": False}
    # 4 of 6 right; only sentence dev-1--1 has all of its examples right: 1 of 3
    assert nlvr2_metrics(predictions, labels) == {"accuracy": 4 / 6, "consistency": 1 / 3,
                                                  "num_examples": 6.0, "num_sentences": 3.0}
    with pytest.raises(ValueError, match="1 of 6 examples have no prediction"):
        nlvr2_metrics({k: v for k, v in predictions.items() if k != "dev-2-0-0"}, labels)


class _Constant(torch.nn.Module):
    """A model that answers `answer` for every example."""

    def __init__(self, answer: bool):
        super().__init__()
        self.answer = answer

    def forward(self, batch: dict) -> dict:
        n = len(batch["nlvr2_labels"])
        return {"nlvr2_logits": torch.tensor([[0.0, 1.0] if self.answer else [1.0, 0.0]] * n)}


def test_evaluator_writes_the_leaderboard_file(nlvr2_root, tokenizer, tmp_path):
    ds = _dataset(nlvr2_root, "test1", tokenizer, "separate")
    evaluator = NLVR2Evaluator(ds, NLVR2Collator("separate", tokenizer.pad_token_id), 1, torch.device("cpu"),
                               output_dir=tmp_path, split="test1")
    metrics = evaluator(_Constant(True))
    assert metrics == {"accuracy": 0.5, "consistency": 0.0, "num_examples": 2.0, "num_sentences": 1.0}
    # the official format: identifier,prediction per line, predictions spelt as the labels are
    assert (tmp_path / "nlvr2_test1_predictions.csv").read_text() == "test1-7-3-0,True\ntest1-7-2-0,True\n"
    assert json.loads((tmp_path / "nlvr2_test1_metrics.json").read_text()) == metrics


# ---------------------------------------------------------------------------------------------------
# bad input: one error naming the file and the line
# ---------------------------------------------------------------------------------------------------
def test_a_label_other_than_true_or_false_is_named_with_its_line(tmp_path):
    bad = dict(EXAMPLES, dev=[EXAMPLES["dev"][0], ("dev-5-1-0", "Both images contain a bottle.", "yes")])
    root = write_nlvr2(tmp_path / "nlvr2", bad)
    with pytest.raises(NLVR2DataError, match=r"dev\.json:2 \(dev-5-1-0\): label 'yes' is not \"True\" or "
                                              r"\"False\""):
        read_nlvr2_jsonl(root / "dev.json")


def test_an_image_missing_from_the_roi_store_is_named_with_its_line(tmp_path):
    from detector.roi_store import RoIStore

    root = write_nlvr2(tmp_path / "nlvr2", drop_from_store=("dev-5-0-img1",))
    examples = read_nlvr2_jsonl(root / "dev.json")
    with pytest.raises(NLVR2DataError, match=r"dev\.json:1 \(dev-5-0-0\): image dev-5-0-img1 has no record "
                                             r"in the RoI store .*extract_rois\.py"):
        store_boxes(RoIStore(root / "rois"), examples, "dev.json")


def test_an_image_file_missing_is_named_with_its_line(nlvr2_root):
    (nlvr2_root / "images/dev/dev-5-1-img0.png").unlink()
    examples = read_nlvr2_jsonl(nlvr2_root / "dev.json")
    with pytest.raises(NLVR2DataError, match=r"dev\.json:2 \(dev-5-1-0\): image dev-5-1-img0\.png is not "
                                             r"under"):
        find_images(nlvr2_root / "images", examples)


# ---------------------------------------------------------------------------------------------------
# tools/train_net.py
# ---------------------------------------------------------------------------------------------------
def _args(config: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config-file", str(REPO / "configs/nlvr2" / config), "--output-dir", str(out),
            "DATASETS.ROOT", str(root), *extra]


@pytest.mark.parametrize("config, head, eval_only", [("tiny.yaml", "nlvr2", True),
                                                     ("tiny_lxmert.yaml", "nlvr2_pair", False)])
def test_short_training_run_then_eval_only(nlvr2_root, tmp_path, train_net, capsys, config, head, eval_only):
    out = tmp_path / "run"
    args = _args(config, nlvr2_root, out)
    assert train_net.cli(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/nlvr2"] for r in rows if "train/nlvr2" in r]
    assert len(losses) == 2 and all(np.isfinite(v) and v > 0 for v in losses)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 1 and evals[0]["eval/num_examples"] == 3 and "eval/consistency" in evals[0]
    assert any(k.startswith(f"heads.{head}.") for k in torch.load(out / "model_0000002.pth",
                                                                    weights_only=True)["model"])
    trained = json.loads((out / "nlvr2_dev_metrics.json").read_text())
    assert trained["accuracy"] == evals[0]["eval/accuracy"]
    lines = (out / "nlvr2_dev_predictions.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [e[0] for e in EXAMPLES["dev"]]
    assert all(line.split(",")[1] in ("True", "False") for line in lines)
    if not eval_only:  # once is enough: the architectures share the evaluation
        return
    capsys.readouterr()
    assert train_net.cli(["--eval-only", *args]) == 0
    assert "nlvr2_dev accuracy: " in capsys.readouterr().out
    assert json.loads((out / "nlvr2_dev_metrics.json").read_text()) == trained


def test_bad_input_stops_train_net_before_training(tmp_path, train_net, capsys):
    root = write_nlvr2(tmp_path / "nlvr2", drop_from_store=("train-11-2-img0",))
    out = tmp_path / "run"
    assert train_net.cli(_args("tiny.yaml", root, out)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "train.json:4 (train-11-2-0): image train-11-2-img0 has no record" in err
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.jsonl").exists()


def test_the_joint_head_is_refused_for_an_architecture_without_image_pairs(nlvr2_root, tmp_path, train_net,
                                                                         capsys):
    args = _args("tiny_lxmert.yaml", nlvr2_root, tmp_path / "run", "MODEL.VL.HEADS", "['nlvr2']")
    assert train_net.cli(args) == 2
    err = capsys.readouterr().err
    assert "the nlvr2 head puts both images in one sequence, which MODEL.ARCH lxmert" in err


@pytest.mark.parametrize("early_fusion", ["True", "False"])
def test_visualbert_reads_both_images_of_a_pair_told_apart_by_segment(nlvr2_root, tokenizer, early_fusion):
    """Without the segments, swapping the two images would change nothing: VisualBERT's region tokens have
    no order of their own. Also without early fusion (the regions join in the extra layer on top)."""
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling import build_model

    cfg = load_train_cfg(REPO / "configs/nlvr2/tiny.yaml",
                         ["MODEL.DEVICE", "cpu", "MODEL.VISUALBERT.EARLY_FUSION", early_fusion])
    torch.manual_seed(0)
    model = build_model(cfg, "visualbert").eval()
    ds = _dataset(nlvr2_root, "dev", tokenizer, "joint")
    batch = NLVR2Collator("joint", tokenizer.pad_token_id)([ds[0]])
    swapped = dict(batch, sample_image_index=batch["second_image_index"],
                   second_image_index=batch["sample_image_index"])
    with torch.no_grad():
        encoded, other = model.encode(batch), model.encode(swapped)
    assert encoded.regions.shape[1] == 6 and bool(encoded.region_valid.all())  # 3 regions per image
    assert not torch.allclose(encoded.pooled, other.pooled, atol=1e-5)


def test_paper_configs_load_with_the_papers_settings():
    from e2e_vl.config import load_train_cfg

    vb = load_train_cfg(REPO / "configs/nlvr2/visualbert_base_e2e.yaml")
    lx = load_train_cfg(REPO / "configs/nlvr2/lxmert_base_e2e.yaml")
    assert (vb.TASK, vb.MODEL.ARCH, list(vb.MODEL.VL.HEADS), vb.MODEL.VISUALBERT.VISUAL_EMBEDDING_DIM) == (
        "nlvr2", "visualbert", ["nlvr2"], 1024)
    assert (vb.SOLVER.BASE_LR, vb.SOLVER.IMS_PER_BATCH, vb.SOLVER.MAX_EPOCHS, vb.SOLVER.CLIP_GRAD_NORM,
            vb.DATASETS.NLVR2.MAX_TEXT_LEN) == (2e-5, 64, 10.0, 1.0, 126)
    assert (lx.TASK, lx.MODEL.ARCH, list(lx.MODEL.VL.HEADS), lx.MODEL.VISUALBERT.CHECKPOINT) == (
        "nlvr2", "lxmert", ["nlvr2_pair"], "")
    assert (lx.SOLVER.BASE_LR, lx.SOLVER.IMS_PER_BATCH, lx.SOLVER.MAX_EPOCHS, lx.SOLVER.CLIP_GRAD_NORM,
            lx.DATASETS.NLVR2.MAX_TEXT_LEN) == (5e-5, 32, 4.0, 5.0, 18)


@pytest.mark.parametrize("arch, extra", [
    ("vlbert", []),
    ("vilbert", ["MODEL.VILBERT.V_HIDDEN_SIZE", "32", "MODEL.VILBERT.V_NUM_HIDDEN_LAYERS", "1",
                 "MODEL.VILBERT.V_NUM_ATTENTION_HEADS", "2", "MODEL.VILBERT.V_INTERMEDIATE_SIZE", "64",
                 "MODEL.VILBERT.BI_HIDDEN_SIZE", "32", "MODEL.VILBERT.BI_NUM_ATTENTION_HEADS", "2",
                 "MODEL.VILBERT.V_BIATTENTION_ID", "[0]", "MODEL.VILBERT.T_BIATTENTION_ID", "[1]"])])
def test_the_separate_pair_format_serves_the_other_architectures(nlvr2_root, tokenizer, arch, extra):
    """VL-BERT and ViLBERT read NLVR2 as LXMERT does: each image with the sentence, pooled outputs paired
    (ViLBERT's pooled vector is its bi-attention width, not its text width)."""
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling import build_model

    cfg = load_train_cfg(REPO / "configs/nlvr2/tiny.yaml",
                         ["MODEL.DEVICE", "cpu", "MODEL.VL.HEADS", "['nlvr2_pair']", *extra])
    model = build_model(cfg, arch)
    ds = _dataset(nlvr2_root, "dev", tokenizer, "separate")
    out = model(NLVR2Collator("separate", tokenizer.pad_token_id)([ds[0], ds[1]]))
    assert out["nlvr2_logits"].shape == (2, 2) and torch.isfinite(out["losses"]["nlvr2"])
    out["loss"].backward()
    assert model.heads["nlvr2_pair"].logit_fc[0].weight.grad is not None
