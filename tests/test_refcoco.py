"""TASK refcoco: RefCOCO+ in the refer layout, written here by code in the exact structure the refer API
reads (refcoco+/refs(unc).p, a plain pickle; refcoco+/instances.json; COCO-named train2014 images; MAttNet's
detections json; an RoI store): parsing, candidate regions, IoU labels, the flip, the head and its loss,
accuracy, a short training run and --eval-only through tools/train_net.py, and malformed inputs."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.roi_store import RoIRecord, RoIStoreWriter
from e2e_vl.data.catalog import DatasetError
from e2e_vl.data.refcoco import RefCOCODataError, RefCOCODataset, build_refer_dataset, region_labels
from e2e_vl.data.transforms import ResizeFlip

REPO = Path(__file__).resolve().parents[1]
W, H = 64, 48
# image id -> split of its refs, annotations {ann_id: [x, y, w, h]}, refs [(ref_id, ann_id, [sentences])]
IMAGES = {
    1: ("train", {11: [4, 8, 20, 30], 12: [36, 8, 24, 30]},
        [(101, 11, [["left", "red", "box"], ["the", "box", "on", "the", "left"]]),
         (102, 12, [["right", "box"]])]),
    2: ("train", {21: [0, 0, 30, 48], 22: [30, 10, 30, 30]}, [(201, 22, [["square", "on", "the", "right"]])]),
    3: ("val", {31: [10, 10, 20, 20], 32: [34, 10, 20, 20]},
        [(301, 31, [["left", "one"], ["green", "square"]])]),
    4: ("testA", {41: [5, 5, 25, 25], 42: [32, 16, 28, 28], 43: [0, 40, 8, 8]},
        [(401, 42, [["man", "on", "right"]])]),
    5: ("testB", {51: [2, 2, 60, 44], 52: [40, 20, 10, 10]},
        [(501, 52, [["small", "thing"]]), (502, 51, [["the", "big", "one"]])]),
}
COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]


def _file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def py2_pickle(obj) -> bytes:
    """`obj` (dicts, lists, str, int, float) as Python 2's cPickle writes it by default (protocol 0, str as
    the STRING opcode): the form of the refer API's refs files."""
    def enc(o) -> bytes:
        if isinstance(o, dict):
            return b"(d" + b"".join(enc(k) + enc(v) + b"s" for k, v in o.items())
        if isinstance(o, list):
            return b"(l" + b"".join(enc(x) + b"a" for x in o)
        if isinstance(o, str):
            return b"S" + repr(o).encode("ascii") + b"\n"
        if isinstance(o, int):
            return b"I%d\n" % o
        if isinstance(o, float):
            return b"F" + repr(o).encode("ascii") + b"\n"
        raise TypeError(type(o))

    return enc(obj) + b"."


def write_refer(root: Path, refs_hook=None) -> Path:
    """The refer layout under `root`: refcoco+/{refs(unc).p (a Python 2 pickle), instances.json,
    proposal/<dets>.json}, train2014/ images (64x48, a filled rectangle per annotation) and an RoI store
    `rois/` keyed by the numeric image id. `refs_hook(refs)` may corrupt the refs before they are pickled."""
    folder, images_dir = root / "refcoco+", root / "train2014"
    (folder / "proposal").mkdir(parents=True)
    images_dir.mkdir()
    images, anns, refs, dets, records = [], [], [], [], []
    sent_id = 0
    for image_id, (split, objects, image_refs) in IMAGES.items():
        image = np.full((H, W, 3), 255, np.uint8)
        for k, (ann_id, (x, y, w, h)) in enumerate(objects.items()):
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), COLOURS[k % 3], thickness=-1)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "area": float(w * h),
                         "iscrowd": 0, "bbox": [float(x), float(y), float(w), float(h)],
                         "segmentation": [[x, y, x + w, y, x + w, y + h]]})
            dets.append({"det_id": len(dets), "h5_id": len(dets), "box": [x + 1.0, y + 1.0, w - 1.0, h - 1.0],
                         "image_id": image_id, "category_id": 1, "category_name": "person", "score": 0.9})
        cv2.imwrite(str(images_dir / _file_name(image_id)), image)
        images.append({"id": image_id, "file_name": _file_name(image_id), "height": H, "width": W,
                       "license": 1, "coco_url": "", "flickr_url": "", "date_captured": ""})
        records.append(RoIRecord(str(image_id), _file_name(image_id), H, W,
                                 boxes=np.array([[0, 0, 16, 16], [16, 16, 48, 40]], np.float32)))
        for ref_id, ann_id, sentences in image_refs:
            sents = []
            for tokens in sentences:
                sent_id += 1
                sents.append({"tokens": tokens, "raw": " ".join(tokens).capitalize(), "sent_id": sent_id,
                              "sent": " ".join(tokens)})
            refs.append({"sent_ids": [s["sent_id"] for s in sents],
                         "file_name": f"{_file_name(image_id)[:-4]}_{ann_id}.jpg", "ann_id": ann_id,
                         "ref_id": ref_id, "image_id": image_id, "split": split, "sentences": sents,
                         "category_id": 1})
    if refs_hook is not None:
        refs_hook(refs)
    (folder / "refs(unc).p").write_bytes(py2_pickle(refs))
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns,
         "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}))
    (folder / "proposal" / "res101_coco_minus_refer_notime_dets.json").write_text(json.dumps(dets))
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(records)
    return root


@pytest.fixture
def refer_root(tmp_path):
    return write_refer(tmp_path / "coco")


def _build(root: Path, tokenizer, splits, boxes=("gt",), flip: float = 0.0, **kwargs) -> RefCOCODataset:
    return build_refer_dataset(root, "refcoco+", "unc", splits, root / "train2014", boxes, tokenizer,
                               ResizeFlip(H, W, flip_prob=flip, swap_text_sides=True),
                               detections=str(
                                   root / "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json"),
                               roi_store=str(root / "rois"), **kwargs)


def _decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist())


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def test_reader_gives_one_sample_per_sentence_with_its_referred_box(refer_root, tokenizer):
    train = _build(refer_root, tokenizer, ["train"], sentences_per_item=0)
    assert [(s.sent_id, s.ref_id, s.image_id, s.split) for s in train.sentences] == [
        (1, 101, 1, "train"), (2, 101, 1, "train"), (3, 102, 1, "train"), (4, 201, 2, "train")]
    assert train.sentences[1].text == "the box on the left"
    assert train.sentences[0].box == (4.0, 8.0, 24.0, 38.0)  # ann 11's [x, y, w, h] as XYXY
    assert [train.item_sentences(i) for i in range(len(train))] == [[0, 1, 2], [3]]  # one item per image
    short = _build(refer_root, tokenizer, ["train"], sentences_per_item=1, max_text_tokens=2)
    assert len(short) == 4  # one item per sentence
    assert _decode(tokenizer, short[1][0]["input_ids"]) == "[CLS] the box [SEP]"  # "the box on the left", cut
    every = _build(refer_root, tokenizer, ["val", "testA", "testB"])
    assert [s.split for s in every.sentences] == ["val", "val", "testA", "testB", "testB"]

    samples = train[0]
    assert len(samples) == 3
    assert _decode(tokenizer, samples[0]["input_ids"]) == "[CLS] left red box [SEP]"
    assert samples[0]["token_type_ids"].tolist() == [0] * 5
    # box 0 = the whole image, then the image's COCO boxes (64x48 is the test size: no resizing)
    torch.testing.assert_close(samples[0]["boxes"],
                               torch.tensor([[0, 0, 64, 48], [4, 8, 24, 38], [36, 8, 60, 38.]]))
    assert samples[0]["ref_labels"].tolist() == [0, 1, 0] and samples[2]["ref_labels"].tolist() == [0, 0, 1]
    assert samples[0]["image_key"] == (1, False, 48, 64) and samples[0]["image"].shape == (3, 48, 64)


def test_region_sources_detections_store_and_gt_in_the_order_given(refer_root, tokenizer):
    ds = _build(refer_root, tokenizer, ["val"], boxes=("detections", "gt", "roi_store"))
    cands = ds.candidates(3)
    expected = [[0, 0, 64, 48],
                [11, 11, 30, 30], [35, 11, 54, 30],  # detections [x+1, y+1, w-1, h-1] as XYXY
                [10, 10, 30, 30], [34, 10, 54, 30],  # COCO boxes
                [0, 0, 16, 16], [16, 16, 48, 40]]  # RoI store
    np.testing.assert_allclose(cands, np.array(expected, np.float32))
    # IoU(det [11,11,30,30], ann 31 [10,10,30,30]) = 361/400 > 0.5; the store's first box: 36/400
    assert ds[0][0]["ref_labels"].tolist() == [0, 1, 0, 1, 0, 0, 0]


def test_a_store_keyed_by_coco_file_stems_is_read_by_numeric_id(refer_root, tokenizer):
    import shutil

    shutil.rmtree(refer_root / "rois")
    with RoIStoreWriter(refer_root / "rois", {"fingerprint": "test"}) as writer:  # before the image-id rule
        writer.write_batch([RoIRecord(_file_name(3)[:-4], _file_name(3), H, W,
                                      boxes=np.array([[1, 2, 3, 4]], np.float32))])
    ds = _build(refer_root, tokenizer, ["val"], boxes=("roi_store",))
    np.testing.assert_allclose(ds.candidates(3), np.array([[0, 0, 64, 48], [1, 2, 3, 4]], np.float32))


def test_iou_labels_are_strictly_above_one_half():
    target = (0.0, 0.0, 20.0, 10.0)
    cands = torch.tensor([[0, 0, 10, 10], [0, 0, 11, 10], [0, 0, 20, 10], [30, 30, 40, 40], [0, 0, 40, 10.]])
    # IoUs: 100/200 = 0.5 (not a positive), 110/200 = 0.55, 1, 0, 200/400 = 0.5
    assert region_labels(cands, target).tolist() == [0, 1, 1, 0, 0]


def test_flip_mirrors_image_and_boxes_and_swaps_left_and_right(refer_root, tokenizer):
    plain = _build(refer_root, tokenizer, ["train"], sentences_per_item=0)[0]
    flipped = _build(refer_root, tokenizer, ["train"], flip=1.0, sentences_per_item=0)[0]
    assert [_decode(tokenizer, s["input_ids"]) for s in flipped] == [
        "[CLS] right red box [SEP]", "[CLS] the box on the right [SEP]", "[CLS] left box [SEP]"]
    assert torch.equal(flipped[0]["image"], plain[0]["image"].flip(-1))
    torch.testing.assert_close(flipped[0]["boxes"],
                               torch.tensor([[0, 0, 64, 48], [40, 8, 60, 38], [4, 8, 28, 38.]]))
    assert [s["ref_labels"].tolist() for s in flipped] == [s["ref_labels"].tolist() for s in plain]
    # never shares a detector pass with the unflipped image
    assert flipped[0]["image_key"] == (1, True, 48, 64)


# ---------------------------------------------------------------------------------------------------
# head, loss, accuracy
# ---------------------------------------------------------------------------------------------------
def test_region_head_and_loss_against_a_hand_computation():
    from e2e_vl.modeling.heads import HEADS, Encoded

    head = HEADS["ref"](hidden_size=2)
    assert [type(m).__name__ for m in (head.dense, head.act, head.dropout, head.classifier)] == [
        "Linear", "GELU", "Dropout", "Linear"]
    with torch.no_grad():
        head.dense.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.dense.bias.copy_(torch.tensor([0.0, -1.0]))
        head.classifier.weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.classifier.bias.copy_(torch.tensor([0.5]))
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], [[-1.0, 1.0], [9.0, 9.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, -1.0]])  # -1: padding / ignored

    def gelu(x: float) -> float:
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    def logit(h: list[float]) -> float:
        a, b = gelu(h[0]), gelu(2 * h[1] - 1)
        return a - b + 0.5

    expected = [[logit(h) for h in row] for row in regions.tolist()]
    out = head.eval().outputs(Encoded(torch.zeros(2, 1, 2), regions, valid, torch.ones(2, dtype=torch.bool)),
                              {"ref_labels": labels})
    torch.testing.assert_close(out["ref_logits"], torch.tensor(expected))

    def bce(z: float, y: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    used = [(expected[0][0], 1.0), (expected[0][1], 0.0), (expected[1][0], 0.0)]
    assert out["losses"]["ref"].item() == pytest.approx(sum(bce(z, y) for z, y in used) / 3, rel=1e-5)


class _Picker(torch.nn.Module):
    """Scores one chosen region per sample (in data set order) above the others."""

    def __init__(self, picks: list[int]):
        super().__init__()
        self.picks = list(picks)

    def forward(self, batch: dict) -> dict:
        counts = [len(batch["boxes"][slot]) for slot in batch["sample_image_index"].tolist()]
        logits = torch.full((len(counts), max(counts)), -5.0)
        valid = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
        for row in range(len(counts)):
            logits[row, self.picks.pop(0)] = 5.0
        logits[~valid] = 50.0  # padding must never be chosen
        return {"ref_logits": logits, "region_valid": valid}


def test_evaluation_reproduces_a_hand_computed_accuracy(refer_root, tokenizer, tmp_path):
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.evaluation.refcoco import RefCOCOEvaluator

    ds = _build(refer_root, tokenizer, ["val", "testA", "testB"])
    # candidates: whole image, then the image's COCO boxes (image 4 has three, so the batch of its sentence
    # and 5001 pads 5001's regions, which must not be picked). Picks per sentence, in data set order:
    # val 3001 ann 31 (right), 3002 ann 32 (wrong: IoU 0); testA ann 42 (right); testB: the whole image
    # for the small ann 52 (IoU 100/3072, wrong) and for the big ann 51 (IoU 2640/3072, right).
    evaluator = RefCOCOEvaluator(ds, VLCollator(tokenizer.pad_token_id), 2, torch.device("cpu"),
                                 predictions_path=tmp_path / "pred.json",
                                 metrics_path=tmp_path / "metrics.json")
    metrics = evaluator(_Picker([1, 2, 2, 0, 0]))
    assert metrics == {"num_sentences": 5.0, "accuracy": 0.6, "accuracy/testA": 1.0, "accuracy/testB": 0.5,
                       "accuracy/val": 0.5}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    rows = json.loads((tmp_path / "pred.json").read_text())
    assert [(r["sent_id"], r["ref_id"], r["split"], r["correct"]) for r in rows] == [
        (5, 301, "val", True), (6, 301, "val", False), (7, 401, "testA", True), (8, 501, "testB", False),
        (9, 502, "testB", True)]
    assert rows[1]["box"] == [34, 10, 20, 20] and rows[4]["iou"] == pytest.approx(2640 / 3072)


# ---------------------------------------------------------------------------------------------------
# malformed inputs: named errors when the data set is built
# ---------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_code_running_refs_pickle_is_refused_and_runs_nothing(tmp_path, tokenizer, protocol):
    root = write_refer(tmp_path / "coco")
    marker = tmp_path / "pwned"
    refs = pickle.loads((root / "refcoco+/refs(unc).p").read_bytes(), encoding="latin1")
    refs[0]["category_id"] = _Evil(str(marker))
    (root / "refcoco+/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=protocol))
    with pytest.raises(RefCOCODataError,
                       match=r"refs\(unc\)\.p: refusing to load '(__builtin__|builtins).eval'"):
        _build(root, tokenizer, ["train"])
    assert not marker.exists()


def test_a_refs_pickle_with_numpy_arrays_is_refused(tmp_path, tokenizer):
    root = write_refer(tmp_path / "coco")
    refs = pickle.loads((root / "refcoco+/refs(unc).p").read_bytes(), encoding="latin1")
    refs[0]["bbox"] = np.zeros(4)
    (root / "refcoco+/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(RefCOCODataError, match="refusing to load 'numpy"):
        _build(root, tokenizer, ["train"])


def _drop_split(refs):
    del refs[2]["split"]


def _point_at_missing_ann(refs):
    refs[2]["ann_id"] = 999


def _drop_tokens(refs):
    del refs[0]["sentences"][1]["tokens"]


@pytest.mark.parametrize("hook, message", [
    (_drop_split, r"refs\(unc\)\.p: ref #2 \(ref_id 201\): missing key 'split'"),
    (_point_at_missing_ann,
     r"refs\(unc\)\.p: ref_id 201: ann_id 999 is not an annotation of .*instances\.json"),
    (_drop_tokens, r"ref #0 \(ref_id 101\): sentences\[1\]: missing key 'tokens'"),
])
def test_malformed_refs_are_named(tmp_path, tokenizer, hook, message):
    root = write_refer(tmp_path / "coco", hook)
    with pytest.raises(RefCOCODataError, match=message):
        _build(root, tokenizer, ["train"])


def test_missing_regions_and_images_are_counted_with_examples(refer_root, tokenizer):
    import shutil

    from detector.roi_store import RoIStore

    keep = [r for r in RoIStore(refer_root / "rois") if r.image_id in ("1", "4")]
    shutil.rmtree(refer_root / "rois")
    with RoIStoreWriter(refer_root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(keep)
    with pytest.raises(DatasetError, match=r"2 of 3 images have no record in the RoI store .*rois "
                                           r"\(e\.g\. image ids '3', '5'; the store's keys look like '1', "
                                           r"'4'\)\. Extract their regions first: python "
                                           r"tools/extract_rois\.py"):
        _build(refer_root, tokenizer, ["val", "testA", "testB"], boxes=("roi_store",))
    dets = refer_root / "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json"
    dets.write_text(json.dumps([d for d in json.loads(dets.read_text()) if d["image_id"] != 2]))
    with pytest.raises(RefCOCODataError,
                       match=r"1 of 2 images have no detections in .*dets\.json \(e\.g\. image_id 2\)"):
        _build(refer_root, tokenizer, ["train"], boxes=("detections",))
    (refer_root / "train2014" / _file_name(5)).unlink()
    with pytest.raises(RefCOCODataError,
                       match=r"1 of 3 images have no file in .*train2014 \(e\.g\. image_id 5\)"):
        _build(refer_root, tokenizer, ["val", "testA", "testB"])


def test_unknown_split_and_bad_detection_record_are_named(refer_root, tokenizer):
    with pytest.raises(RefCOCODataError, match=r"no sentences in split\(s\) \['test'\]; the file has splits "
                                        r"\['testA', 'testB', 'train', 'val'\]"):
        _build(refer_root, tokenizer, ["test"])
    dets = refer_root / "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json"
    rows = json.loads(dets.read_text())
    del rows[3]["box"]
    dets.write_text(json.dumps(rows))
    with pytest.raises(RefCOCODataError, match=r"dets\.json: detection #3 \(det_id 3\): missing key 'box'"):
        _build(refer_root, tokenizer, ["train"], boxes=("detections",))
    dets.unlink()
    with pytest.raises(RefCOCODataError,
                       match=r"detections file not found: .*dets\.json \(DATASETS\.REFCOCO\.DETECTIONS"):
        _build(refer_root, tokenizer, ["train"], boxes=("detections",))
    with pytest.raises(DatasetError, match=r"DATASETS\.ROI_STORE: RoI store not found: .*nowhere"):
        build_refer_dataset(refer_root, "refcoco+", "unc", ["train"], refer_root / "train2014", ["roi_store"],
                            tokenizer, ResizeFlip(H, W), roi_store=str(refer_root / "nowhere"))


# ---------------------------------------------------------------------------------------------------
# tools/train_net.py
# ---------------------------------------------------------------------------------------------------
def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config-file", str(REPO / "configs/refcoco/tiny.yaml"), "--output-dir", str(out),
            "DATASETS.ROOT", str(root), *extra]


def test_short_training_run_then_eval_only(refer_root, tmp_path, train_net, capsys):
    out = tmp_path / "run"
    args = _args(refer_root, out, "DATASETS.REFCOCO.TRAIN_BOXES", "['detections', 'gt']")
    assert train_net.cli(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/ref"] for r in rows if "train/ref" in r]
    assert len(losses) == 2 and all(np.isfinite(v) and v > 0 for v in losses)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 1 and evals[0]["eval/num_sentences"] == 5
    assert {"eval/accuracy/val", "eval/accuracy/testA", "eval/accuracy/testB"} <= set(evals[0])
    start = torch.load(out / "model_0000002.pth", weights_only=True)["model"]
    assert any(k.startswith("heads.ref.") for k in start)
    metrics_file = out / "refcoco+_val_testA_testB_metrics.json"
    trained = json.loads(metrics_file.read_text())
    assert trained["accuracy"] == evals[0]["eval/accuracy"]
    assert len(json.loads((out / "refcoco+_val_testA_testB_predictions.json").read_text())) == 5
    metrics_file.unlink()

    capsys.readouterr()
    assert train_net.cli(["--eval-only", *args]) == 0
    printed = capsys.readouterr().out
    assert "refcoco+_val_testA_testB accuracy: " in printed and "(5 sentences); by type: testA " in printed
    assert json.loads(metrics_file.read_text()) == trained  # the same weights score the same


def test_a_bad_ref_stops_train_net_before_training(tmp_path, train_net, capsys):
    root = write_refer(tmp_path / "coco", _point_at_missing_ann)
    out = tmp_path / "run"
    assert train_net.cli(_args(root, out)) == 2
    assert ("error: " in (err := capsys.readouterr().err)
            and "ref_id 201: ann_id 999 is not an annotation of" in err)
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.jsonl").exists()


def test_paper_configs_load_and_task_config_errors_are_named(tmp_path):
    from types import SimpleNamespace

    from e2e_vl.config import ConfigError, load_train_cfg
    from e2e_vl.tasks import get_task

    base = load_train_cfg(REPO / "configs/refcoco/vlbert_base_e2e.yaml")
    large = load_train_cfg(REPO / "configs/refcoco/vlbert_large_e2e.yaml")
    # VL-BERT: 32 sentences per step, 8e-7 x 32, 20 epochs, detections (+ gt in training)
    for cfg in (base, large):
        assert cfg.TASK == "refcoco" and list(cfg.MODEL.VL.HEADS) == ["ref"]
        assert cfg.SOLVER.IMS_PER_BATCH == 32 and cfg.SOLVER.BASE_LR == pytest.approx(8e-7 * 32)
        assert cfg.SOLVER.MAX_EPOCHS == 20 and cfg.DATALOADER.QUESTIONS_PER_IMAGE == 1
        assert list(cfg.DATASETS.REFCOCO.TRAIN_BOXES) == ["detections", "gt"]
        assert list(cfg.DATASETS.REFCOCO.TEST_BOXES) == ["detections"]
    assert (base.SOLVER.GRAD_ACCUM_STEPS, large.SOLVER.GRAD_ACCUM_STEPS) == (2, 4)

    task = get_task("refcoco")
    ref_model = SimpleNamespace(tokenizer=None, heads={"ref": None})
    bad_boxes = load_train_cfg(REPO / "configs/refcoco/tiny.yaml",
                               ["DATASETS.REFCOCO.TEST_BOXES", "['proposal']"])
    with pytest.raises(ConfigError,
                       match=r"'DATASETS.REFCOCO.TEST_BOXES' must list some of \['detections', 'gt', "
                                          r"'roi_store'\], got \['proposal'\]"):
        task.build(bad_boxes, ref_model, torch.device("cpu"), False)
    bad_name = load_train_cfg(REPO / "configs/refcoco/tiny.yaml", ["DATASETS.TEST", "refcoco+_test"])
    with pytest.raises(ConfigError, match=r"'DATASETS.TEST' 'refcoco\+_test' is not a refer data set"):
        task.build(bad_name, ref_model, torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="TASK refcoco needs a model with the ref head"):
        task.build(base, SimpleNamespace(tokenizer=None, heads={"vqa": None}), torch.device("cpu"), False)


def test_an_image_of_another_size_than_instances_json_says_is_named(refer_root, tokenizer):
    cv2.imwrite(str(refer_root / "train2014" / _file_name(2)), np.zeros((20, 30, 3), np.uint8))
    ds = _build(refer_root, tokenizer, ["train"], sentences_per_item=0)
    with pytest.raises(RefCOCODataError,
                       match=r"COCO_train2014_000000000002\.jpg is 30x20 but .*instances\.json says "
                                               r"64x48 for image_id 2"):
        ds[1]
