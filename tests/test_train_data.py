"""VQA data for training: easy-VQA regions and grouping by image, VQA v2 soft scores and reader, accuracy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from e2e_vl.data.easy_vqa import (EasyVQAImages, answer_vocab, balance_colour_existence,
                                  colour_existence_form, load_questions, shape_box)
from e2e_vl.data.catalog import DatasetError
import e2e_vl.modeling  # noqa: F401  (registers the heads, and so the batch targets they declare)
from e2e_vl.data.vqa import CocoImageLoader, ImageQuestionsDataset, Question, build_answer_vocab, load_vqa_v2
from e2e_vl.data.vqa_answers import normalize_answer, soft_scores


class WordTokenizer:
    """A tiny stand-in tokenizer: one id per word (ids from 10), BERT's special-token attributes."""

    cls_token_id, sep_token_id, mask_token_id, pad_token_id = 1, 2, 3, 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]}


def test_shape_box_is_the_tight_box_of_non_background_pixels():
    image = np.full((64, 64, 3), (240, 235, 250), np.uint8)
    image[10:30, 5:45] = (255, 0, 0)
    image[9, 5:45] = (245, 200, 230)  # a faint anti-aliased edge stays within the threshold
    assert shape_box(image).tolist() == [5, 10, 45, 30]
    assert shape_box(np.full((8, 8, 3), 200, np.uint8)) is None


def test_colour_existence_form():
    assert colour_existence_form("is there a red shape?") == "asks"
    assert colour_existence_form("does the image contain a teal shape?") == "asks"
    assert colour_existence_form("is there not a gray shape in the image?") == "asks not"
    assert colour_existence_form("is no black shape present?") == "asks not"
    assert colour_existence_form("is there a circle?") is None
    assert colour_existence_form("what color is the shape?") is None


def test_balanced_training_questions_take_the_colour_yes_no_prior_away():
    questions = load_questions("train")
    balanced = balance_colour_existence(questions)
    yes, no = answer_vocab().index("yes"), answer_vocab().index("no")

    def counts(qs):
        return {(form, answer): sum(1 for q in qs
                                    if colour_existence_form(q.text) == form and answer in q.scores)
                for form in ("asks", "asks not") for answer in (yes, no)}

    before, after = counts(questions), counts(balanced)
    assert before[("asks", no)] > 5 * before[("asks", yes)]  # the prior: absent colours are asked about
    for form in ("asks", "asks not"):
        assert after[(form, yes)] == after[(form, no)] == min(before[(form, yes)], before[(form, no)])
    # Every other question stays, in order, and the choice is the same on every call.
    kept = {q.question_id for q in balanced}
    assert all(q.question_id in kept for q in questions if colour_existence_form(q.text) is None)
    assert [q.question_id for q in balanced] == sorted(kept)
    assert [q.question_id for q in balance_colour_existence(questions)] == [q.question_id for q in balanced]


def test_every_easy_vqa_image_gets_a_shape_box_inside_the_image():
    images = EasyVQAImages("test", image_ids=range(200))
    for image_id, boxes in images.boxes.items():
        assert boxes.shape == (2, 4) and boxes[0].tolist() == [0, 0, 64, 64]
        x1, y1, x2, y2 = boxes[1]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and (x2 - x1) >= 4 and (y2 - y1) >= 4
        # the pixels outside the box are (close to) the background colour
        img = images.images[image_id].astype(int)
        outside = np.ones((64, 64), bool)
        outside[int(y1):int(y2), int(x1):int(x2)] = False
        background = np.median(img[outside], axis=0)
        assert np.abs(img[outside] - background).max() <= 48


def test_easy_vqa_items_carry_all_questions_of_one_image():
    from e2e_vl.data.collate import VLCollator

    questions = load_questions("train", limit=30)
    images = EasyVQAImages("train", {q.image_id for q in questions})
    ds = ImageQuestionsDataset(questions, images, WordTokenizer(), len(answer_vocab()), 128, 128)
    assert len(ds) == len({q.image_id for q in questions})
    item = ds[0]
    assert len({s["image_key"] for s in item}) == 1 and len(item) == len(ds.item_question_ids(0))
    sample = item[0]
    assert sample["image"].shape == (3, 128, 128) and sample["image"].dtype == torch.uint8
    assert sample["boxes"][0].tolist() == [0, 0, 128, 128]  # boxes follow the 2x resize
    ids = sample["input_ids"].tolist()
    assert ids[0] == 1 and ids[-3:] == [2, 3, 2] and ids[sample["answer_pos"]] == 3
    assert sample["vqa_targets"].sum() == 1
    batch = VLCollator()([ds[0], ds[1]])
    assert batch["images"].shape[0] == 2  # one detector pass per image, not per question
    assert batch["sample_image_index"].tolist() == [0] * len(ds[0]) + [1] * len(ds[1])

    chunked = ImageQuestionsDataset(questions, images, WordTokenizer(), 13, 64, 64, questions_per_item=2)
    assert all(len(chunked[i]) <= 2 for i in range(len(chunked)))
    assert sum(len(chunked[i]) for i in range(len(chunked))) == len(questions)


@pytest.mark.parametrize("matches,score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_scores_match_the_official_leave_one_out_accuracy(matches, score):
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert soft_scores(answers).get("yes", 0.0) == pytest.approx(score)


def test_normalize_answer():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("a Red car!") == "red car"
    assert normalize_answer("3.5") == "3.5"
    # the official rule keeps apostrophes
    assert normalize_answer("don't") == normalize_answer("dont") == "don't"


def test_vqa_v2_reader(tmp_path):
    qs = {"questions": [{"question_id": 11, "image_id": 5, "question": "How many dogs?"},
                        {"question_id": 12, "image_id": 5, "question": "What color?"}]}
    anns = {"annotations": [
        {"question_id": 11, "image_id": 5, "multiple_choice_answer": "2", "answer_type": "number",
         "answers": [{"answer": "two"}] * 3 + [{"answer": "3"}] * 7},
        {"question_id": 12, "image_id": 5, "multiple_choice_answer": "red",
         "answers": [{"answer": "red"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    vocab = build_answer_vocab(anns["annotations"], size=10)
    assert vocab == ["2", "red"]  # ties alphabetical; "3" never the most common answer
    out = load_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", vocab)
    assert out[0].scores == {0: pytest.approx(0.9)} and out[1].scores == {1: 1.0}
    assert out[0].answer_type == "number" and out[1].answer_type == ""  # the type is optional
    assert out[0].image_id == "5" and out[0].answers == ("two",) * 3 + ("3",) * 7  # as the store keys it
    with pytest.raises(DatasetError, match="nope.json"):
        load_vqa_v2(tmp_path / "nope.json", None, vocab)
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(DatasetError, match="questions"):
        load_vqa_v2(tmp_path / "bad.json", None, vocab)


def test_coco_image_loader_prepends_the_whole_image_box(tmp_path):
    import cv2

    from detector.roi_store import RoIRecord

    cv2.imwrite(str(tmp_path / "COCO_val2014_000000000005.jpg"), np.zeros((20, 30, 3), np.uint8))
    store = {"5": RoIRecord("5", "", 20, 30, boxes=np.array([[1, 2, 10, 12]], np.float32))}
    image, boxes = CocoImageLoader(tmp_path, store, [5], "q.json")(5)
    assert image.shape == (20, 30, 3)
    assert boxes.tolist() == [[0, 0, 30, 20], [1, 2, 10, 12]]
    with pytest.raises(DatasetError, match=r"q.json: 1 of 2 images have no file in .*'6'"):
        CocoImageLoader(tmp_path, store, [5, 6], "q.json")


def test_question_dataclass_defaults():
    assert Question(1, 2, "q").scores == {}


def test_question_facts_read_the_answer_and_the_question_words():
    from e2e_vl.data.easy_vqa import question_facts

    facts = question_facts
    assert facts("what is the color of the circle?", "red") == ({"shape": "circle", "colour": "red"}, {})
    assert facts("what is the teal shape?", "triangle") == ({"colour": "teal", "shape": "triangle"}, {})
    assert question_facts("what shape is present?", "circle") == ({"shape": "circle"}, {})
    assert question_facts("is there a red shape?", "yes") == ({"colour": "red"}, {})
    assert question_facts("is there a red shape?", "no") == ({}, {"colour": "red"})
    assert question_facts("is there not a circle in the image?", "no") == ({"shape": "circle"}, {})
    assert question_facts("is no gray shape present?", "yes") == ({}, {"colour": "gray"})
    assert question_facts("does the image not contain a rectangle?", "yes") == ({}, {"shape": "rectangle"})


def test_region_labels_agree_with_every_question_and_contradictions_raise(monkeypatch):
    import easy_vqa

    from e2e_vl.data.collate import collate_region_samples
    from e2e_vl.data.easy_vqa import REGION_CLASSES, EasyVQARegions, question_facts, region_class_labels

    labels = region_class_labels("test")
    assert len(labels) == 888  # 603 from the colour and shape answers alone
    checked = 0
    for text, answer, image_id in zip(*easy_vqa.get_test_questions()):
        if image_id in labels:
            colour, shape = REGION_CLASSES[labels[image_id]].split()
            known, ruled_out = question_facts(text, answer)
            assert known.get("colour", colour) == colour and known.get("shape", shape) == shape, text
            assert ruled_out.get("colour") != colour and ruled_out.get("shape") != shape, text
            checked += 1
    assert checked > 5 * len(labels)
    assert len(region_class_labels("train")) == 3578
    for questions, message in (
            ((["is there a circle?", "what shape is present?"], ["yes", "triangle"], [7, 7]),
             r"test image 7: .*'what shape is present\?'.* says shape 'triangle', another question 'circle'"),
            ((["is there not a red shape?", "what color is the shape?"], ["yes", "red"], [7, 7]),
             r"test image 7: colour 'red' is both stated and ruled out")):
        monkeypatch.setattr(easy_vqa, "get_test_questions", lambda q=questions: q)
        with pytest.raises(ValueError, match=message):
            region_class_labels("test")
    monkeypatch.undo()

    ds = EasyVQARegions("test", 96, 96, limit=3)
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
    assert (item["boxes"].shape == (2, 4)
            and torch.equal(item["boxes"][0], torch.tensor([0.0, 0.0, 96.0, 96.0])))
    assert item["region_labels"].tolist() == [-1, labels[ds.image_ids[0]]]  # the whole image is no object
    batch = collate_region_samples([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 96, 96) and batch["region_labels"].shape == (4,)
    bad = dict(ds[2], region_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="1 region_labels for 2 boxes"):
        collate_region_samples([bad])
    with pytest.raises(KeyError, match="region_labels"):
        collate_region_samples([{k: v for k, v in ds[2].items() if k != "region_labels"}])


def test_region_evaluator_reports_the_worst_class_and_logs_the_confusions(caplog):
    from e2e_vl.evaluation.regions import RegionEvaluator

    # labels and predictions of 8 regions; -1: not an object (the whole-image box), not scored
    labels = [0, 0, 0, 1, 1, 1, 1, -1]
    predicted = [0, 0, 1, 1, 1, 1, 2, 0]
    items = [{"label": torch.tensor([y]), "logits": torch.nn.functional.one_hot(torch.tensor([p]), 3).float()}
             for y, p in zip(labels, predicted)]

    def collate(batch):
        return {"region_labels": torch.cat([b["label"] for b in batch]),
                "logits": torch.cat([b["logits"] for b in batch])}

    class Model(torch.nn.Module):
        def forward(self, batch):
            return {"region_labels": batch["region_labels"], "class_logits": batch["logits"]}

    names = ["circle", "square", "background"]
    with caplog.at_level("INFO", logger="e2e_vl.evaluation.regions"):
        metrics = RegionEvaluator(items, collate, 3, torch.device("cpu"), names)(Model())
    assert metrics == {"num_regions": 7.0, "region_accuracy": 5 / 7, "worst_class_accuracy": 2 / 3}
    assert "circle -> square: 1; square -> background: 1" in caplog.text
    with pytest.raises(ValueError, match="3 class logits per region, the evaluator names 2 classes"):
        RegionEvaluator(items, collate, 3, torch.device("cpu"), names[:2])(Model())


def test_easy_vqa_captions_name_the_region_class_and_feed_pretraining():
    from e2e_vl.data.captions import CaptionPretrainDataset
    from e2e_vl.data.easy_vqa import REGION_CLASSES, easy_vqa_captions, region_class_labels
    from e2e_vl.data.transforms import ResizeFlip
    from e2e_vl.modeling.hf import load_tokenizer

    captions, records = easy_vqa_captions("test", limit=4)
    labels = region_class_labels("test")
    image_ids = sorted(labels)[:4]
    images = EasyVQAImages("test", image_ids)
    assert [c.image_id for c in captions] == [f"easy-vqa-test-{i}" for i in image_ids] == list(records)
    for caption, image_id in zip(captions, image_ids):
        assert caption.text == f"a {REGION_CLASSES[labels[image_id]]}"
        record = records[caption.image_id]
        assert (record.height, record.width) == images(image_id)[0].shape[:2]
        np.testing.assert_array_equal(record.boxes, images(image_id)[1][1:])  # the shape box only
        assert record.class_probs is None  # the detector's to fill
    tokenizer = load_tokenizer("")
    ds = CaptionPretrainDataset(captions, records, tokenizer, ResizeFlip(64, 64), mlm_prob=0.0, mrc_prob=0.0,
                                max_seq_len=16, max_text_len=12)
    sample = ds[0]
    assert sample["boxes"].shape == (2, 4)  # whole image + shape box
    assert tokenizer.decode(sample["input_ids"][1:-1]) == captions[0].text


def test_vqa_evaluator_reports_accuracy_by_answer_type():
    from e2e_vl.data.collate import VLCollator
    from e2e_vl.evaluation.vqa import VQAEvaluator

    questions = load_questions("test", limit=40)
    vocab = answer_vocab()
    kinds = {q.question_id: q.answer_type for q in questions}
    assert set(kinds.values()) == {"yes/no", "colour", "shape"}
    images = EasyVQAImages("test", {q.image_id for q in questions})
    ds = ImageQuestionsDataset(questions, images, WordTokenizer(), len(vocab), 64, 64)

    class AlwaysYes(torch.nn.Module):
        def forward(self, batch):
            logits = torch.zeros(len(batch["vqa_targets"]), len(vocab))
            logits[:, vocab.index("yes")] = 1.0
            return {"vqa_logits": logits}

    metrics = VQAEvaluator(ds, VLCollator(), 8, torch.device("cpu"), None, vocab)(AlwaysYes())
    yes_no = [q for q in questions if q.answer_type == "yes/no"]
    share_yes = sum(vocab[next(iter(q.scores))] == "yes" for q in yes_no) / len(yes_no)
    assert metrics["num_questions"] == len(questions)
    assert metrics["accuracy/yes/no"] == pytest.approx(share_yes)
    assert metrics["accuracy/colour"] == 0.0 and metrics["accuracy/shape"] == 0.0
    assert metrics["accuracy"] == pytest.approx(share_yes * len(yes_no) / len(questions))
    with pytest.raises(ValueError, match="'maybe'"):
        from e2e_vl.data.easy_vqa import answer_type

        answer_type("maybe")
