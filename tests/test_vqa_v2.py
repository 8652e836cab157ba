"""VQA v2 from its official files: one image id from extraction to training (COCO file names -> numeric
ids), the RoI-record check before training, the official accuracy (answer normalisation cases with
hand-computed accuracies) and the evaluation server's results file for a split without annotations."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector import image_sources as sources
from detector.checkpoint import save_checkpoint
from detector.config import ConfigError, load_cfg
from detector.modeling import build_detector
from detector.roi_store import RoIRecord, RoIStore, RoIStoreWriter
from e2e_vl.data.roi_records import MissingRoIRecordsError, require_roi_records
from e2e_vl.data.vqa import CocoImageLoader, Question, load_vqa_v2
from e2e_vl.data.vqa_answers import answer_accuracy, normalize_answer
from e2e_vl.evaluation.vqa import ResultsFormatError, check_results, vqa_metrics, write_results

REPO = Path(__file__).resolve().parents[1]
DETECTOR = REPO / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"
_spec = importlib.util.spec_from_file_location("_tool_extract_rois", REPO / "tools" / "extract_rois.py")
extract_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extract_tool)

# The official answer processing, case by case: (annotators' answers, prediction, answer type, accuracy
# worked out by hand). Accuracy = mean over the 10 annotators left out in turn of min(1, matches among
# the other 9 / 3): m matching answers give (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10, i.e.
# 0.3, 0.6, 0.9, 1.0 for m = 1, 2, 3, >= 4. Answers are normalised only when the 10 are not all equal.
CASES = [
    (["Yes!"] * 4 + ["yes"] * 6, "yes", "yes/no", 1.0),  # "!" -> space, lower case: all ten are "yes"
    (["Yes!"] * 10, "yes", "yes/no", 0.0),  # unanimous: compared as written, "yes" != "Yes!"
    (["yes"] + ["no"] * 9, "yes", "yes/no", 0.3),  # the 10-choose-9 averaging, m = 1
    (["1,000", "1000"] + ["thousand"] * 8, "1,000", "number", 0.6),  # digit-group comma removed, m = 2
    (["3.5", "3.5", "3.5."] + ["4"] * 7, "3.5", "number", 0.9),  # decimal point kept, final period dropped
    (["2:50"] + ["250"] * 9, "2:50", "number", 0.3),  # colons are kept
    (["two", "two", "2"] + ["three"] * 7, "Three.", "number", 1.0),  # number words -> digits, m = 7
    (["none", "none"] + ["1"] * 8, "0", "number", 0.6),  # "none" counts as 0
    (["two"] * 10, "2", "number", 0.0),  # unanimous "two" is not normalised: "2" misses
    (["t-shirt"] * 3 + ["shirt"] * 7, "t shirt", "other", 0.9),  # "-" between letters -> space
    (["girl's", "girl's"] + ["girls"] * 8, "girl's", "other", 0.6),  # apostrophes are kept
    (["a dog", "a dog", "the dog"] + ["dogs"] * 7, "an dog", "other", 0.9),  # articles dropped
    (["dont", "dont", "don't"] + ["no"] * 7, "dont", "other", 0.9),  # "dont" -> "don't"
    (["couldn'tve", "couldnt've"] + ["no"] * 8, "couldn't've", "other", 0.6),  # one apostrophe restored
    (["blue\t"] * 10, " blue ", "other", 1.0),  # tabs, newlines and outer spaces go first
]
# By hand from the table: yes/no (1.0 + 0 + 0.3) / 3, number (0.6 + 0.9 + 0.3 + 1.0 + 0.6 + 0) / 6,
# other (0.9 + 0.6 + 0.9 + 0.9 + 0.6 + 1.0) / 6, overall 9.6 / 15; the server reports 100x, 2 decimals.
EXPECTED_PERCENT = {"accuracy": 64.0, "accuracy/yes/no": 43.33, "accuracy/number": 56.67,
                    "accuracy/other": 81.67}


def _official_files(root: Path, subtype: str,
                    items: list[tuple[int, int, str, list[str] | None, str]]) -> None:
    """Questions (and, where answers are given, annotations) json of one split in VQA v2's layout.
    items: (question_id, image_id, question, the 10 answers or None, answer_type)."""
    info = {"description": "generated for the tests", "version": "2.0", "year": 2017}
    licence = {"name": "test", "url": ""}
    questions = {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": licence,
                 "data_subtype": subtype,
                 "questions": [{"image_id": img, "question": q, "question_id": qid}
                               for qid, img, q, _, _ in items]}
    (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(questions))
    if items[0][3] is None:
        return
    annotations = [{"question_type": "what is", "multiple_choice_answer": answers[0], "image_id": img,
                    "answer_type": kind, "question_id": qid,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(answers)]}
                   for qid, img, _, answers, kind in items]
    (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(
        {"info": info, "license": licence, "data_subtype": subtype, "data_type": "mscoco",
         "annotations": annotations}))


def test_coco_file_names_give_the_numeric_image_id():
    assert sources.image_id_from_path("train2014/COCO_train2014_000000000856.jpg") == "856"
    assert sources.image_id_from_path("COCO_val2014_000000581929.jpg") == "581929"
    assert sources.image_id_from_path("test2015/COCO_test2015_000000000001.png") == "1"
    assert sources.image_id_from_path("val2017/000000000139.jpg") == "139"  # COCO 2017
    for other in ("im000.png", "000000001.jpg", "COCO_train2014_856.jpg", "coco_train2014_000000000856.jpg",
                  "2345.jpg"):
        assert sources.image_id_from_path(other) == Path(other).stem  # anything else keeps its stem


def test_caption_and_boxes_from_readers_use_the_same_ids(tmp_path):
    from e2e_vl.data.captions import read_tsv_captions
    from e2e_vl.data.catalog import DatasetError
    from e2e_vl.data.roi_records import open_roi_store

    (tmp_path / "cc.tsv").write_text("train2014/COCO_train2014_000000000856.jpg\ta cat\n"
                                     "imgs/cat 1.jpg\ta dog\n")
    assert [c.image_id for c in read_tsv_captions(tmp_path / "cc.tsv")] == ["856", "cat 1"]
    record = RoIRecord("x", "", 10, 10, boxes=np.zeros((1, 4), np.float32))
    item = sources.ImageItem("42", str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"))
    assert extract_tool.stored_boxes({"42": record}, item) is record
    # a stem-keyed store
    assert extract_tool.stored_boxes({"COCO_val2014_000000000042": record}, item) is record
    assert extract_tool.stored_boxes({"7": record}, item) is None
    with pytest.raises(DatasetError, match=r"DATASETS.ROI_STORE: RoI store not found: .*nowhere"):
        open_roi_store(tmp_path / "nowhere")


def test_official_normalisation_cases_give_the_hand_computed_accuracies():
    for answers, prediction, _, expected in CASES:
        assert answer_accuracy(prediction, answers) == pytest.approx(expected), (answers, prediction)
    # Through the reader (official json layout) and the evaluator's summary, as the server reports it.
    questions = [Question(i, "1", "q", answer_type=kind, answers=tuple(answers))
                 for i, (answers, _, kind, _) in enumerate(CASES)]
    vocab = [prediction for _, prediction, _, _ in CASES]
    metrics = vqa_metrics(questions, {i: i for i in range(len(CASES))}, vocab)
    assert metrics["num_questions"] == len(CASES)
    assert {k: round(100 * v, 2) for k, v in metrics.items() if k.startswith("accuracy")} == EXPECTED_PERCENT
    assert normalize_answer("Two dogs.") == "2 dogs" and normalize_answer("100,978") == "100978"
    assert normalize_answer("left - right") == "left right"  # a "-" next to a space is removed, not spaced


def test_reader_keeps_the_annotators_answers_and_names_bad_records(tmp_path):
    from e2e_vl.data.catalog import DatasetError

    items = [(10 + i, 1, "what?", answers, kind) for i, (answers, _, kind, _) in enumerate(CASES)]
    _official_files(tmp_path, "val2014", items)
    questions = load_vqa_v2(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
                            tmp_path / "v2_mscoco_val2014_annotations.json", ["yes", "2", "don't"])
    assert [q.answers for q in questions] == [tuple(c[0]) for c in CASES]
    assert questions[0].scores == {0: 1.0} and questions[12].scores == {2: pytest.approx(0.9)}
    ann = json.loads((tmp_path / "v2_mscoco_val2014_annotations.json").read_text())
    del ann["annotations"][3]["answers"][5]["answer"]
    (tmp_path / "bad.json").write_text(json.dumps(ann))
    where = r"bad.json: annotations\[3\] \(question_id 13\): answers\[5\]"
    with pytest.raises(DatasetError, match=where + ": has no 'answer'"):
        load_vqa_v2(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "bad.json", ["yes"])


def test_results_are_checked_against_the_server_format(tmp_path):
    good = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}]
    write_results(tmp_path / "results.json", good, [2, 1])
    with pytest.raises(ResultsFormatError):  # refused before writing: the previous file stays whole
        write_results(tmp_path / "results.json", good[:1], [2, 1])
    assert json.loads((tmp_path / "results.json").read_text()) == good
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    bad = {
        "must be a list": {"question_id": 1, "answer": "yes"},
        "question_id must be an int": [{"question_id": "1", "answer": "yes"}],
        "answer a str": [{"question_id": 1, "answer": 2}],
        r"must be \{'question_id': int": [{"question_id": 1, "answer": "yes", "score": 1.0}],
        "question_id 1 is answered twice": [{"question_id": 1, "answer": "yes"}] * 2,
        r"1 missing \(e.g. \[2\]\), 0 not in": [{"question_id": 1, "answer": "yes"}],
    }
    for message, results in bad.items():
        with pytest.raises(ResultsFormatError, match=message):
            check_results(results, [1] if "twice" in message or "str" in message else [1, 2])
    with pytest.raises(ResultsFormatError, match="question_id must be an int"):
        check_results([{"question_id": True, "answer": "yes"}], [1])


def test_missing_records_are_counted_with_examples_and_the_fix():
    record = RoIRecord("x", "", 10, 10, boxes=np.zeros((1, 4), np.float32))
    with pytest.raises(MissingRoIRecordsError) as info:
        require_roi_records({"1": record, "2": record}, [1, 2, 3, 4, 4, 5, 6, 7, 8, 9], "q.json")
    message = str(info.value)
    assert message.startswith("q.json: 7 of 9 images have no record in the RoI store")
    assert "'3', '4', '5', '6', '7'" in message and "'8'" not in message  # a few examples, not all
    assert "keys look like '1', '2'" in message and "tools/extract_rois.py" in message
    # A store written before numeric COCO ids (stem keys) is still read, record for record.
    old = {"COCO_val2014_000000000042": record, "7": record}
    assert require_roi_records(old, ["42", 7], "q.json") == {"42": "COCO_val2014_000000000042", "7": "7"}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    save_checkpoint(build_detector(load_cfg(DETECTOR)), path)
    return path


def _extract(weights: Path, inputs: list[Path], output: Path) -> int:
    return extract_tool.main(["--config-file", str(DETECTOR), "--weights", str(weights), "--input",
                              *map(str, inputs), "--output", str(output), "--device", "cpu", "--no-progress",
                              "--num-workers", "0", "--min-boxes", "2", "--max-boxes", "4"])


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    small = np.random.default_rng(seed).integers(0, 255, (4, 5, 3), np.uint8)
    cv2.imwrite(str(path), cv2.resize(small, (80, 64), interpolation=cv2.INTER_CUBIC))


def test_two_files_with_one_image_id_stop_extraction(tmp_path, tiny_weights, caplog):
    _image(tmp_path / "train2014" / "COCO_train2014_000000000007.jpg", 0)
    _image(tmp_path / "extra" / "000000000007.jpg", 1)  # COCO 2017 name of the same id
    assert _extract(tiny_weights, [tmp_path / "train2014", tmp_path / "extra"], tmp_path / "rois") == 2
    assert "two files have image id '7'" in caplog.text
    assert "COCO_train2014_000000000007.jpg" in caplog.text and "extra/000000000007.jpg" in caplog.text
    assert not (tmp_path / "rois").exists()  # stopped before writing anything


def test_store_keyed_by_file_stem_is_read_but_not_resumed(tmp_path, tiny_weights, monkeypatch, caplog):
    _image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", 2)
    with monkeypatch.context() as m:  # the extractor as it was: file stems as keys
        m.setattr(sources, "image_id_from_path", lambda path: Path(path).stem)
        assert _extract(tiny_weights, [tmp_path / "val2014"], tmp_path / "rois") == 0
    with RoIStore(tmp_path / "rois") as store:
        assert store.ids() == ["COCO_val2014_000000000042"]
        image, boxes = CocoImageLoader(tmp_path / "val2014", store, [42], "q.json")(42)
        np.testing.assert_array_equal(boxes[1:], store["COCO_val2014_000000000042"].boxes)
    assert _extract(tiny_weights, [tmp_path / "val2014"], tmp_path / "rois") == 2
    assert "keyed by COCO file stem (e.g. 'COCO_val2014_000000000042')" in caplog.text


TRAIN = [(8560, 856, "what color is it?", ["red"] * 8 + ["blue"] * 2, "other"),
         (8561, 856, "is it red?", ["yes"] * 10, "yes/no"),
         (90, 9, "how many?", ["two", "2", "2", "3"] + ["2"] * 6, "number")]
VAL = [(10, 1, "is it blue?", ["no"] * 9 + ["yes"], "yes/no"),
       (770, 77, "what color?", ["red"] * 10, "other")]
TEST_DEV = [(50, 5, "what color?", None, ""), (51, 5, "is it red?", None, ""), (60, 6, "how many?", None, "")]
# The overrides that make val2014 the second training split of vqa_v2_trainval.
VAL_SPLIT = ["DATASETS.QUESTIONS_VAL", "v2_OpenEnded_mscoco_val2014_questions.json",
             "DATASETS.ANNOTATIONS_VAL", "v2_mscoco_val2014_annotations.json",
             "DATASETS.IMAGE_DIR_VAL", "val2014"]


def _vqa_root(root: Path) -> None:
    """VQA v2 as downloaded (questions/annotations json, COCO image folders) plus an answer list."""
    for folder, split, items in (("train2014", "train2014", TRAIN), ("val2014", "val2014", VAL),
                                 ("test2015", "test-dev2015", TEST_DEV)):
        for k, image_id in enumerate(sorted({img for _, img, _, _, _ in items})):
            _image(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", image_id + k)
        _official_files(root, split, items)
    (root / "answers_vqa.txt").write_text("yes\nno\nred\nblue\n2\n")


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config-file", str(REPO / "configs" / "vqa" / "tiny.yaml"), "--output-dir", str(out),
            "MODEL.VL.NUM_ANSWERS", "5", "DATASETS.ROOT", str(root), *extra]


def test_vqa_v2_from_extraction_with_coco_names_to_training_and_test_dev_results(tmp_path, tiny_weights,
                                                                                 train_net, capsys):
    root = tmp_path / "vqa"
    _vqa_root(root)
    # As the README says: one extraction over the COCO folders, then training meets its records.
    folders = [root / "train2014", root / "val2014", root / "test2015"]
    assert _extract(tiny_weights, folders, root / "rois") == 0
    with RoIStore(root / "rois") as store:
        assert sorted(store.ids(), key=int) == ["1", "5", "6", "9", "77", "856"]

    out = tmp_path / "run"
    assert train_net.cli(_train_args(root, out)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == 2
    final = [r for r in rows if "eval/accuracy" in r][-1]
    results = json.loads((out / "vqa_v2_val_results.json").read_text())
    assert [r["question_id"] for r in results] == [10, 770]
    # The logged accuracy is the official one of the answers in the results file.
    expected = {q[0]: answer_accuracy(r["answer"], q[3]) for q, r in zip(VAL, results)}
    assert final["eval/accuracy"] == pytest.approx(sum(expected.values()) / 2)
    assert final["eval/accuracy/yes/no"] == pytest.approx(expected[10])

    # test-dev: questions only; --eval-only writes the file the evaluation server takes.
    capsys.readouterr()
    dev = ["DATASETS.TEST", "vqa_v2_test", "DATASETS.ANNOTATIONS_TEST", "",
           "DATASETS.IMAGE_DIR_TEST", "test2015",
           "DATASETS.QUESTIONS_TEST", "v2_OpenEnded_mscoco_test-dev2015_questions.json"]
    assert train_net.cli(["--eval-only", *_train_args(root, out, *dev)]) == 0
    assert "num_questions: 3.0000" in capsys.readouterr().out
    submitted = json.loads((out / "vqa_v2_test_results.json").read_text())
    check_results(submitted, [50, 51, 60])
    assert [r["question_id"] for r in submitted] == [50, 51, 60]
    assert all(r["answer"] in ("yes", "no", "red", "blue", "2") for r in submitted)

    # VL-BERT's test-dev run: trained on train2014 + val2014; the final evaluation writes the results file.
    run = tmp_path / "test_dev_run"
    assert train_net.cli(_train_args(root, run, "DATASETS.TRAIN", "vqa_v2_trainval", *VAL_SPLIT, *dev)) == 0
    check_results(json.loads((run / "vqa_v2_test_results.json").read_text()), [50, 51, 60])


def test_missing_records_stop_the_run_before_training(tmp_path, train_net):
    root = tmp_path / "vqa"
    _vqa_root(root)
    record = RoIRecord("1", "", 64, 80, boxes=np.array([[0, 0, 10, 10]], np.float32))
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:  # val2014's image 1 only
        writer.write_batch([record])
    out = tmp_path / "run"
    assert train_net.cli(_train_args(root, out)) == 2
    log = (out / "log.txt").read_text()
    assert ("v2_OpenEnded_mscoco_train2014_questions.json: 2 of 2 images have no record in the RoI store"
            in log)
    assert ("image ids '856', '9'" in log and "keys look like '1'" in log
            and "python tools/extract_rois.py" in log)
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("model_*.pth"))


def test_test_dev_config_trains_on_train_and_val_as_vlbert():
    """VL-BERT's test-dev runs train on train2014 + val2014 (cfgs/vqa/base_4x16G_fp32.yaml)."""
    from e2e_vl.config import load_train_cfg

    cfg = load_train_cfg(REPO / "configs" / "vqa" / "vlbert_base_e2e_test_dev.yaml")
    d = cfg.DATASETS
    assert d.TEST == "vqa_v2_test" and d.ANNOTATIONS_TEST == ""
    assert d.QUESTIONS_TEST == "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    assert d.IMAGE_DIR_TEST == "test2015"
    assert d.TRAIN == "vqa_v2_trainval"
    assert (d.QUESTIONS_TRAIN, d.ANNOTATIONS_TRAIN, d.IMAGE_DIR_TRAIN) == (
        "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014")
    assert (d.QUESTIONS_VAL, d.ANNOTATIONS_VAL, d.IMAGE_DIR_VAL) == (
        "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014")
    assert cfg.TEST.EVAL_PERIOD == 0  # nothing to select by on test-dev: one evaluation, at the end


def test_paper_configs_are_vlbert_settings():
    """configs/vqa at VL-BERT's cfgs/vqa (base: 128 questions per step at 8e-5; large: 256 at 1.6e-4, 4
    accumulation steps; both clip 1.0, 500 warm-up steps from 0, 5 epochs, one question per sample, the
    classifier from the answers' words)."""
    from e2e_vl.config import load_train_cfg

    base = load_train_cfg(REPO / "configs" / "vqa" / "vlbert_base_e2e.yaml")
    large = load_train_cfg(REPO / "configs" / "vqa" / "vlbert_large_e2e.yaml")
    for cfg, batch, lr, accum in ((base, 128, 8e-5, 1), (large, 256, 1.6e-4, 4)):
        s = cfg.SOLVER
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.GRAD_ACCUM_STEPS) == (batch, lr, accum)
        assert (s.CLIP_GRAD_NORM, s.WARMUP_ITERS, s.WARMUP_FACTOR, s.MAX_EPOCHS) == (1.0, 500, 0.0, 5.0)
        assert cfg.DATALOADER.QUESTIONS_PER_IMAGE == 1 and cfg.MODEL.VL.NUM_ANSWERS == 3129
    # CLASSIFIER_PRETRAINED: true in both of VL-BERT's VQA configs, and in every one of ours for VL-BERT; not
    # for the easy-VQA demo, nor for the released LXMERT, VisualBERT and ViLBERT (their classifiers start at
    # random in their papers)
    for path in sorted((REPO / "configs" / "vqa").glob("vlbert_*.yaml")):
        assert load_train_cfg(path).MODEL.VL.VQA_CLASSIFIER_FROM_WORDS, path.name
    for path in sorted((REPO / "configs" / "easy_vqa").glob("*.yaml")):
        demo = load_train_cfg(path, ["MODEL.WEIGHTS", ""])  # stage 1's detector need not exist
        assert not demo.MODEL.VL.VQA_CLASSIFIER_FROM_WORDS, path.name


# -- vqa_v2_trainval: train2014 + val2014 as one training set ---------------------------------------------


def _store(root: Path, image_ids: list[int]) -> None:
    """An RoI store with one record per image (64 x 80, as `_image` writes them): box i of image n is
    [n, i, n + 10, i + 10], so a record read for another image shows."""
    records = [RoIRecord(str(n), "", 64, 80, boxes=np.array([[n, i, n + 10, i + 10] for i in range(2)],
                                                              np.float32))
               for n in image_ids]
    with RoIStoreWriter(root / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch(records)


def _vqa_set(root: Path, name: str = "vqa_v2_trainval", *overrides: str, train: bool = True, limit: int = 0):
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling.hf import load_tokenizer
    from e2e_vl.tasks.vqa import VQA_DATASETS

    cfg = load_train_cfg(REPO / "configs" / "vqa" / "tiny.yaml",
                         ["DATASETS.ROOT", str(root), "MODEL.VL.NUM_ANSWERS", "5", *overrides])
    return VQA_DATASETS.build("DATASETS.TRAIN", name, cfg, load_tokenizer(), train, (64, 80), limit)


def test_trainval_reads_both_splits_each_from_its_own_folder(tmp_path):
    root = tmp_path / "vqa"
    _vqa_root(root)
    _store(root, [856, 9, 1, 77])
    ds, vocab = _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT)
    assert vocab == ["yes", "no", "red", "blue", "2"]
    assert [q.question_id for q in ds.questions] == [8560, 8561, 90, 10, 770]  # train2014, then val2014
    assert [q.image_id for q in ds.questions] == ["856", "856", "9", "1", "77"]
    assert ds.questions[4].scores == {2: 1.0}  # val2014's "red" x 10, from its own annotations file
    folder = {"856": "train2014", "9": "train2014", "1": "val2014", "77": "val2014"}
    for image_id, split in folder.items():
        image, boxes = ds.load_image(image_id)
        expected = cv2.imread(str(root / split / f"COCO_{split}_{int(image_id):012d}.jpg"), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(image, expected)
        n = int(image_id)
        np.testing.assert_array_equal(boxes, [[0, 0, 80, 64], [n, 0, n + 10, 10], [n, 1, n + 10, 11]])
    assert sorted(len(ds[i]) for i in range(len(ds))) == [1, 1, 1, 2]  # one item per image
    # A limit that ends inside train2014 needs no val2014 record.
    (root / "rois").rename(root / "rois_all")
    _store(root, [856])
    assert [q.question_id for q in _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT, limit=2)[0].questions] == [
        8560, 8561]


def test_trainval_stops_on_ids_in_both_splits_and_on_missing_val_files(tmp_path):
    from e2e_vl.data.catalog import DatasetError

    root = tmp_path / "vqa"
    _vqa_root(root)
    _store(root, [856, 9, 1, 77])
    val_q = "v2_OpenEnded_mscoco_val2014_questions.json"
    # question id 90 is train2014's too
    _official_files(root, "val2014", [*VAL, (90, 1, "what?", ["no"] * 10, "yes/no")])
    with pytest.raises(DatasetError, match=rf"{val_q}: 1 question ids are also in .*train2014_questions.json "
                                           r"\(e.g. 90\)"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT)
    # image 856 in both splits: its questions would share one image slot and one folder
    _official_files(root, "val2014", [*VAL, (11, 856, "what?", ["no"] * 10, "yes/no")])
    with pytest.raises(DatasetError, match=rf"{val_q}: 1 image ids are also in .*train2014_questions.json "
                                           r"\(e.g. '856'\)"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT)
    # the same file given as both splits
    with pytest.raises(DatasetError, match="3 question ids are also in"):
        _vqa_set(root, "vqa_v2_trainval", "DATASETS.QUESTIONS_VAL",
                 "v2_OpenEnded_mscoco_train2014_questions.json", "DATASETS.ANNOTATIONS_VAL",
                 "v2_mscoco_train2014_annotations.json", "DATASETS.IMAGE_DIR_VAL", "train2014")
    _official_files(root, "val2014", VAL)
    # val2014's records missing: named by its questions file, before any training
    (root / "rois").rename(root / "rois_all")
    _store(root, [856, 9])
    with pytest.raises(MissingRoIRecordsError, match=rf"{val_q}: 2 of 2 images have no record"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT)
    # with every record: a val2014 image file missing, then its annotations file
    all_records = ["DATASETS.ROI_STORE", "rois_all"]
    (root / "val2014" / "COCO_val2014_000000000077.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images have no file in .*val2014 \(e.g. image ids '77'"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT, *all_records)
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DatasetError, match=r"VQA file not found: .*v2_mscoco_val2014_annotations.json"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT, *all_records)


def test_val_keys_belong_to_trainval_only():
    root = Path("unused")  # every error below comes before a file is opened
    with pytest.raises(ConfigError, match="'DATASETS.QUESTIONS_VAL' must be set for vqa_v2_trainval"):
        _vqa_set(root, "vqa_v2_trainval")
    with pytest.raises(ConfigError, match="'DATASETS.ANNOTATIONS_VAL' must be set for vqa_v2_trainval"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT[:2], *VAL_SPLIT[4:])
    with pytest.raises(ConfigError, match="'DATASETS.QUESTIONS_VAL' is set but vqa_v2_train does not read"):
        _vqa_set(root, "vqa_v2_train", *VAL_SPLIT)
    with pytest.raises(ConfigError, match="vqa_v2_trainval is a training set"):
        _vqa_set(root, "vqa_v2_trainval", *VAL_SPLIT, train=False)


# -- the answer classifier from the answers' word embeddings (VL-BERT's CLASSIFIER_PRETRAINED) -------------
def test_classifier_rows_are_the_mean_word_piece_embedding_of_each_answer():
    from transformers import BertConfig

    from e2e_vl.modeling.hf import load_tokenizer
    from e2e_vl.modeling.heads import HEADS, HeadSpec

    tokenizer = load_tokenizer()  # BERT's uncased word pieces
    torch.manual_seed(0)
    table = torch.nn.Embedding(len(tokenizer), 8)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_attention_heads=2, intermediate_size=16)
    head = HEADS["vqa"].build(HeadSpec(config, table, num_answers=3))
    answers = ["yes", "2", "fire hydrant"]
    assert tokenizer.tokenize("fire hydrant") == ["fire", "hydra", "##nt"]  # one answer, three pieces
    row = {piece: table.weight[tokenizer.vocab[piece]] for piece in ("yes", "2", "fire", "hydra", "##nt")}
    expected = torch.stack([row["yes"], row["2"], (row["fire"] + row["hydra"] + row["##nt"]) / 3])
    assert not torch.allclose(head.classifier.weight, expected)
    head.init_from_answer_words(answers, tokenizer)
    torch.testing.assert_close(head.classifier.weight, expected)
    assert torch.equal(head.classifier.bias, torch.zeros(3)) and head.classifier.weight.grad_fn is None
    with torch.no_grad():
        table.weight[tokenizer.vocab["yes"]] += 1.0  # read when called: the table as loaded by then
    head.init_from_answer_words(answers, tokenizer)
    torch.testing.assert_close(head.classifier.weight[0], row["yes"])

    with pytest.raises(ValueError, match="2 answers for a vqa head of 3"):
        head.init_from_answer_words(answers[:2], tokenizer)
    with pytest.raises(ValueError, match="answer ' ' has no word pieces"):
        head.init_from_answer_words(["yes", "2", " "], tokenizer)
    narrow = HEADS["vqa"].build(HeadSpec(config, torch.nn.Embedding(len(tokenizer), 6), num_answers=3))
    with pytest.raises(ValueError, match="word embeddings are 6 wide but the vqa classifier reads 8-d"):
        narrow.init_from_answer_words(answers, tokenizer)


def test_vqa_task_starts_the_classifier_from_the_training_answers(tmp_path):
    """configs/vqa (tiny.yaml as vlbert_base_e2e.yaml) turn it on: the rows come from the model's word
    table once the training set's answers are read; not for --eval-only (the checkpoint's are used) or
    with the key off; an answer list of another size than the head's stops the run first."""
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling.registry import build_model
    from e2e_vl.tasks import get_task

    root = tmp_path / "vqa"
    _vqa_root(root)
    _store(root, [856, 9, 1, 77])
    task = get_task("vqa")

    def model_and_task(*overrides: str, eval_only: bool = False):
        cfg = load_train_cfg(REPO / "configs" / "vqa" / "tiny.yaml",
                             ["DATASETS.ROOT", str(root), "MODEL.VL.NUM_ANSWERS", "5", *overrides])
        torch.manual_seed(0)
        model = build_model(cfg, "vlbert")
        start = model.heads["vqa"].classifier.weight.detach().clone()
        task.build(cfg, model, torch.device("cpu"), eval_only)
        return cfg, model, start

    cfg, model, start = model_and_task()
    assert cfg.MODEL.VL.VQA_CLASSIFIER_FROM_WORDS
    words = model.bert.embeddings.word_embeddings.weight
    ids = model.tokenizer.convert_tokens_to_ids(["yes", "no", "red", "blue", "2"])  # answers_vqa.txt
    classifier = model.heads["vqa"].classifier
    assert torch.equal(classifier.weight, words[ids]) and not classifier.bias.any()
    for overrides, eval_only in (((), True), (("MODEL.VL.VQA_CLASSIFIER_FROM_WORDS", "False"), False)):
        _, model, start = model_and_task(*overrides, eval_only=eval_only)
        assert torch.equal(model.heads["vqa"].classifier.weight, start)
    (root / "answers_vqa.txt").write_text("yes\nno\nred\nblue\n")
    with pytest.raises(ConfigError, match=r"5 answers \(MODEL.VL.NUM_ANSWERS\) but vqa_v2_train has 4"):
        model_and_task()
