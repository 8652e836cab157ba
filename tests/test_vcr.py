"""TASK vcr: VCR's released layout (jsonl + per-image metadata json under vcr1images/), references rendered
as names and grounded in their regions, VL-BERT's VCR head and loss, Q->A / QA->R / Q->AR accuracy, a short
training run and --eval-only through tools/train_net.py, and malformed inputs named before training."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import BertConfig

from e2e_vl.data.collate import collate_samples
from e2e_vl.data.transforms import ResizeFlip
from e2e_vl.data.vcr import (PERSON_NAMES, VCRDataError, VCRDataset, choice_sequence, encode_words,
                             object_names, read_vcr_jsonl, render_tokens)
from e2e_vl.evaluation.vcr import VCREvaluator, leaderboard_rows, vcr_metrics
from e2e_vl.modeling.heads import ChoiceScoreHead, Encoded, ObjectClassHead

REPO = Path(__file__).resolve().parents[1]
MOVIE = "lsmdc_0001_American_Beauty"
IMAGES = [  # (file stem, objects, boxes x1 y1 x2 y2)
    ("0001_American_Beauty_00.00.51.926-00.00.54.277@0", ["person", "person", "dog"],
     [[4, 6, 30, 44], [34, 2, 60, 40], [10, 30, 28, 46]]),
    ("0001_American_Beauty_00.01.10.351-00.01.13.072@1", ["person", "diningtable"],
     [[2, 2, 26, 46], [30, 20, 62, 44]]),
    ("0001_American_Beauty_00.02.05.000-00.02.07.500@0", ["person", "cellphone", "person"],
     [[0, 0, 20, 40], [22, 10, 30, 18], [36, 4, 62, 46]]),
]


def _annotation(k: int, split: str, image: int, question, answers, rationales, labels=(1, 2)) -> dict:
    stem, objects, _ = IMAGES[image]
    ann = {"movie": MOVIE[6:], "objects": objects, "interesting_scores": [0], "answer_likelihood": "likely",
           "img_fn": f"{MOVIE}/{stem}.jpg", "metadata_fn": f"{MOVIE}/{stem}.json",
           "answer_orig": "", "question_orig": "", "rationale_orig": "", "question": question,
           "answer_match_iter": [3, 0, 2, 1], "answer_sources": [10, 0, 20, 30], "answer_choices": answers,
           "rationale_sources": [1, 0, 2, 3], "rationale_match_iter": [3, 0, 2, 1],
           "rationale_choices": rationales, "img_id": f"{split}-{image}", "question_number": k,
           "annot_id": f"{split}-{k}", "match_fold": f"{split}-0", "match_index": k}
    if split != "test":
        ann["answer_label"], ann["rationale_label"] = labels
    return ann


def write_vcr(root: Path) -> Path:
    """VCR's layout, generated: three 48x64 jpgs with their metadata json in vcr1images/<movie>/, and
    train.jsonl (4 annotations), val.jsonl (2), test.jsonl (2, without labels)."""
    folder = root / "vcr1images" / MOVIE
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, objects, boxes in IMAGES:
        image = np.full((48, 64, 3), 200, np.uint8)
        for x1, y1, x2, y2 in boxes:
            cv2.rectangle(image, (x1, y1), (x2, y2), [int(c) for c in rng.integers(0, 255, 3)], thickness=-1)
        cv2.imwrite(str(folder / f"{stem}.jpg"), image)
        meta = {"boxes": [[*b, 0.9] for b in boxes],
                "segms": [[[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]]] for b in boxes],
                "names": objects, "width": 64, "height": 48}
        (folder / f"{stem}.json").write_text(json.dumps(meta))
    answers = [["Yes", ",", [0], "is", "happy", "."], ["No", "."], [[1], "is", "sad", "."], ["Maybe", "."]]
    rationales = [[[0], "smiles", "."], ["Because", "of", "the", [1], "."], ["It", "rains", "."],
                  ["No", "reason"]]
    rows = {
        "train": [_annotation(0, "train", 0, ["Why", "is", [0, 1], "near", "the", [2], "?"], answers,
                              rationales),
                  _annotation(1, "train", 1, ["What", "is", [0], "doing", "?"], answers, rationales, (0, 1)),
                  _annotation(2, "train", 2, ["Is", [2], "holding", [1], "?"], answers, rationales, (3, 0)),
                  _annotation(3, "train", 0, ["Where", "is", [2], "?"], answers, rationales, (2, 3))],
        "val": [_annotation(0, "val", 1, ["Is", [0], "eating", "?"], answers, rationales, (1, 1)),
                _annotation(1, "val", 2, ["Who", "is", "on", "the", "left", "?"], answers, rationales,
                            (0, 2))],
        "test": [_annotation(0, "test", 0, ["Why", "is", [1], "there", "?"], answers, rationales),
                 _annotation(1, "test", 2, ["Does", [0], "call", [2], "?"], answers, rationales)],
    }
    for split, anns in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in anns))
    return root


@pytest.fixture
def vcr_root(tmp_path) -> Path:
    return write_vcr(tmp_path / "vcr")


def test_reader_parses_the_released_layout(vcr_root):
    train = read_vcr_jsonl(vcr_root / "train.jsonl", labelled=True)
    assert [r.annot_id for r in train] == ["train-0", "train-1", "train-2", "train-3"]
    first = train[0]
    assert first.objects == ("person", "person", "dog") and first.img_fn.endswith("@0.jpg")
    assert first.question == ["Why", "is", [0, 1], "near", "the", [2], "?"]
    assert (first.answer_label, first.rationale_label) == (1, 2) and len(first.answer_choices) == 4
    test = read_vcr_jsonl(vcr_root / "test.jsonl", labelled=False)
    assert [(r.answer_label, r.rationale_label) for r in test] == [(None, None)] * 2


def test_people_are_named_from_vl_berts_list_in_its_order():
    """VL-BERT's GENDER_NEUTRAL_NAMES (vcr/data/datasets/vcr.py), which its VCR models were trained with:
    13 names, the third Jessie; the 14th person of an annotation gets the first name again."""
    vl_bert = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
               "Frankie", "Pat", "Quinn")
    assert PERSON_NAMES == vl_bert
    assert object_names(["person"] * 14 + ["dog"]) == [*vl_bert, "Casey", "dog"]


def test_references_render_as_names_and_each_word_piece_is_grounded_in_its_region(tokenizer):
    names = object_names(["person", "dog", "person", "diningtable"])
    assert (names == [PERSON_NAMES[0], "dog", PERSON_NAMES[1], "diningtable"]
            == ["Casey", "dog", "Riley", "diningtable"])
    words, regions = render_tokens(["Why", "is", [2, 0], "near", "the", [3], "?"], names)
    assert words == ["Why", "is", "Riley", "and", "Casey", "near", "the", "diningtable", "?"]
    question = encode_words(tokenizer, words, regions)
    # Object i is region i + 1 (region 0 is the whole image); "and" and plain words take the whole image.
    assert list(zip(tokenizer.convert_ids_to_tokens(question[0]), question[1])) == [
        ("why", 0), ("is", 0), ("riley", 3), ("and", 0), ("casey", 1), ("near", 0), ("the", 0),
        ("dining", 4), ("##table", 4), ("?", 0)]
    answer = encode_words(tokenizer, *render_tokens([[1], "left", "."], names, flipped=True))
    assert (list(zip(tokenizer.convert_ids_to_tokens(answer[0]), answer[1]))
            == [("dog", 2), ("right", 0), (".", 0)])

    seq = choice_sequence(tokenizer, [question], answer, max_text_len=64)
    assert tokenizer.convert_ids_to_tokens(seq["input_ids"].tolist()) == [
        "[CLS]", "why", "is", "riley", "and", "casey", "near", "the", "dining", "##table", "?", "[SEP]",
        "dog", "right", ".", "[SEP]"]
    assert seq["token_type_ids"].tolist() == [0] * 12 + [1] * 4
    assert seq["text_region_index"].tolist() == [0, 0, 0, 3, 0, 1, 0, 0, 4, 4, 0, 0, 2, 0, 0, 0]
    # QA->R: question and answer are the first text; truncation trims the longest part from its end.
    short = choice_sequence(tokenizer, [question, answer], ([7, 8], [0, 1]), max_text_len=9)
    assert (short["input_ids"].tolist()[1:-1]
            == [*question[0][:4], *answer[0][:3], tokenizer.sep_token_id, 7, 8])
    assert len(short["input_ids"]) == 9 + 3 and short["token_type_ids"].tolist() == [0] * 9 + [1] * 3


def test_items_hold_a_group_per_subtask_and_the_test_split_conditions_on_each_answer(vcr_root, tokenizer):
    train = VCRDataset(read_vcr_jsonl(vcr_root / "train.jsonl", True), vcr_root / "vcr1images", tokenizer,
                       ResizeFlip(64, 96))
    samples = train[0]
    assert len(samples) == 8 and [g.name for g in train.item_groups(0)] == ["answer", "rationale"]
    assert [s.get("choice_label") for s in samples] == [1, None, None, None, 2, None, None, None]
    assert all(s["boxes"].shape == (4, 4) for s in samples)  # whole image + 3 objects
    assert samples[0]["object_labels"].tolist() == [0, 1, 1, 17]  # background, person, person, dog
    torch.testing.assert_close(samples[0]["boxes"][0], torch.tensor([0.0, 0, 85, 64]), atol=1, rtol=0)
    # The QA->R context holds the right answer (label 1: "No ."), every rationale choice after it.
    rationale_text = tokenizer.decode(samples[4]["input_ids"])
    assert rationale_text.startswith("[CLS] why is casey and riley near the dog? no. [SEP] casey smiles.")
    batch = collate_samples(samples)
    assert batch["text_region_index"].shape == batch["input_ids"].shape and len(batch["boxes"]) == 1

    test = VCRDataset(read_vcr_jsonl(vcr_root / "test.jsonl", False), vcr_root / "vcr1images", tokenizer,
                      ResizeFlip(64, 96))
    names = [g.name for g in test.item_groups(0)]
    assert names == ["answer"] + [f"rationale_conditioned_on_a{a}" for a in range(4)]
    assert len(test[0]) == 20 and all(s.get("choice_label", -1) == -1 for s in test[0])


def test_the_model_gives_each_grounded_token_its_regions_feature(vcr_root, tokenizer, one_thread):
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling.registry import build_model

    torch.manual_seed(0)
    model = build_model(load_train_cfg(REPO / "configs" / "vcr" / "tiny.yaml"), "vlbert").eval()
    data = VCRDataset(read_vcr_jsonl(vcr_root / "train.jsonl", True), vcr_root / "vcr1images", tokenizer,
                      ResizeFlip(64, 96), subtasks=["q2a"])
    batch = collate_samples(data[0][:1])
    index = batch["text_region_index"][0]
    assert sorted(set(index.tolist())) == [0, 1, 2, 3]
    with torch.no_grad():
        objects, _ = model.encode_regions(batch)
        emb = model.embed(batch)
        words = model.bert.embeddings.word_embeddings(batch["input_ids"][0])
        expected = words + model.visual_norms.text(objects[0, index])
        ungrounded = model.embed({k: v for k, v in batch.items() if k != "text_region_index"})
    text_len = len(index)
    torch.testing.assert_close(emb["inputs_embeds"][0, :text_len], expected)
    plain = index == 0
    same = emb["inputs_embeds"][0, :text_len] == ungrounded["inputs_embeds"][0, :text_len]
    assert same[plain].all() and not same[~plain].all(dim=1).any()
    # VL-BERT's VCR pooler starts as the text encoder's pre-trained one.
    pooler = _checkpoint_tensors(model.tokenizer.name_or_path, "pooler.dense.weight")
    assert torch.equal(model.heads["vcr"].pooler.dense.weight, pooler)
    with pytest.raises(ValueError, match="text_region_index 7 is outside its 4 regions"):
        collate_samples([dict(data[0][0], text_region_index=torch.full_like(index, 7))])


def _checkpoint_tensors(folder: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


def test_head_and_loss_match_a_hand_computation():
    head = ChoiceScoreHead(BertConfig(hidden_size=2, num_attention_heads=1)).eval()
    with torch.no_grad():
        head.pooler.dense.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.pooler.dense.bias.zero_()
        head.classifier.weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.classifier.bias.fill_(0.5)
    cls = torch.tensor([[0.5, 0.0], [0.0, 0.5], [1.0, 1.0], [0.0, 0.0], [0.2, 0.1], [0.0, 0.3], [0.0, 0.0],
                        [1.0, 0.0]])
    text = torch.cat([cls[:, None, :], torch.randn(8, 3, 2)], dim=1)  # only [CLS] is read
    encoded = Encoded(text, torch.zeros(8, 0, 2), torch.zeros(8, 0, dtype=torch.bool),
                      torch.ones(8, dtype=torch.bool))
    out = head.outputs(encoded, {"choice_labels": torch.tensor([2, -1])})
    pooled = torch.tanh(cls * torch.tensor([1.0, 2.0]))
    logits = (pooled[:, 0] - pooled[:, 1] + 0.5).view(2, 4)
    torch.testing.assert_close(out["vcr_logits"], logits)
    # Only the labelled question counts: mean over its 4 choices of -log sigmoid(+-z).
    z, y = logits[0], torch.tensor([0.0, 0.0, 1.0, 0.0])
    expected = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    torch.testing.assert_close(out["losses"]["vcr"], expected)
    assert head.outputs(encoded, {"choice_labels": torch.tensor([-1, -1])})["losses"] == {}


def test_region_class_regulariser_matches_a_hand_computation():
    head = ObjectClassHead(2, 3)
    with torch.no_grad():
        head.dense.weight.copy_(torch.eye(2))
        head.dense.bias.zero_()
        head.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.classifier.bias.zero_()
    regions = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], [[0.5, 0.5], [9.0, 9.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    encoded = Encoded(torch.zeros(2, 1, 2), regions, valid, torch.ones(2, dtype=torch.bool))
    out = head.outputs(encoded, {"object_labels": torch.tensor([[0, 2, -1], [1, 1, -1]])})
    gelu = torch.nn.functional.gelu
    rows = [(gelu(torch.tensor([1.0, 0.0])), 0), (gelu(torch.tensor([0.0, 2.0])), 2),
            (gelu(torch.tensor([0.5, 0.5])), 1)]
    # Class scores of a row (a, b) are (a, b, a + b); -1 labels and invalid regions are left out.
    expected = sum(-torch.log_softmax(torch.stack([a, b, a + b]), 0)[y] for (a, b), y in rows) / 3
    torch.testing.assert_close(out["losses"]["vcr_objects"], expected)
    assert out["vcr_objects_logits"].shape == (3, 3)


def test_metrics_equal_a_hand_computation():
    def group(probs, label):
        return (probs, label)

    results = {  # q2a right/wrong, qa2r right/wrong
        "a": {"answer": group([0.1, 0.7, 0.1, 0.1], 1),
              "rationale": group([0.4, 0.3, 0.2, 0.1], 0)},  # both right
        "b": {"answer": group([0.1, 0.7, 0.1, 0.1], 1),
              "rationale": group([0.1, 0.3, 0.5, 0.1], 0)},  # A only
        "c": {"answer": group([0.6, 0.2, 0.1, 0.1], 3),
              "rationale": group([0.1, 0.2, 0.3, 0.4], 3)},  # R only
        "d": {"answer": group([0.25, 0.25, 0.25, 0.25], 1),
              "rationale": group([0.1, 0.7, 0.1, 0.1], 0)},  # none
        "e": {"answer": group([0.1, 0.1, 0.1, 0.7], 3)},  # Q->A only: counts for q2a alone
    }
    assert vcr_metrics(results) == {"num_annotations": 5.0, "q2a_accuracy": 3 / 5, "qa2r_accuracy": 2 / 4,
                                    "q2ar_accuracy": 1 / 4}


class _ScriptedModel(torch.nn.Module):
    """Returns fixed logits per question group, picked by the annotation index the collate passes on."""

    def __init__(self, logits: dict[int, torch.Tensor]):
        super().__init__()
        self.logits = logits

    def forward(self, batch):
        return {"vcr_logits": torch.cat([self.logits[int(i)] for i in batch["index"]])}


class _Groups:
    def __init__(self, groups):
        self.groups = groups

    def __len__(self):
        return len(self.groups)

    def item_groups(self, i):
        return self.groups[i]

    def __getitem__(self, i):
        return i


def test_evaluator_scores_and_writes_predictions_metrics_and_the_leaderboard_file(tmp_path):
    from e2e_vl.data.vcr import ChoiceGroup

    labelled = _Groups([[ChoiceGroup("val-0", "answer", 2), ChoiceGroup("val-0", "rationale", 0, 2)],
                        [ChoiceGroup("val-1", "answer", 1), ChoiceGroup("val-1", "rationale", 3, 1)],
                        [ChoiceGroup("val-2", "answer", 0), ChoiceGroup("val-2", "rationale", 1, 0)]])
    logits = {0: torch.tensor([[0.0, 1, 3, 0], [5.0, 0, 0, 0]]),   # both right
              1: torch.tensor([[0.0, 2, 0, 0], [0.0, 0, 1, 0]]),   # answer right, rationale wrong
              2: torch.tensor([[0.0, 0, 0, 4], [0.0, 2, 0, 0]])}   # answer wrong, rationale right
    evaluator = VCREvaluator(labelled, lambda items: {"index": torch.tensor(items)}, 2, torch.device("cpu"),
                             output_dir=tmp_path, split="val")
    metrics = evaluator(_ScriptedModel(logits))
    assert (metrics == {"num_annotations": 3.0, "q2a_accuracy": 2 / 3, "qa2r_accuracy": 2 / 3,
                        "q2ar_accuracy": 1 / 3})
    assert json.loads((tmp_path / "vcr_val_metrics.json").read_text()) == metrics
    predictions = json.loads((tmp_path / "vcr_val_predictions.json").read_text())
    np.testing.assert_allclose(predictions["val-0"]["answer"], torch.softmax(logits[0][0], 0).numpy(),
                               rtol=1e-6)
    assert not (tmp_path / "vcr_val_leaderboard.csv").exists()

    names = ["answer"] + [f"rationale_conditioned_on_a{a}" for a in range(4)]
    unlabelled = _Groups([[ChoiceGroup("test-0", n, -1) for n in names]])
    test_logits = {0: torch.arange(20.0).view(5, 4) / 10}
    metrics = VCREvaluator(unlabelled, lambda items: {"index": torch.tensor(items)}, 2, torch.device("cpu"),
                           output_dir=tmp_path, split="test")(_ScriptedModel(test_logits))
    assert metrics == {"num_annotations": 1.0}
    with open(tmp_path / "vcr_test_leaderboard.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert (rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3",
                            "rationale_conditioned_on_a0_0"])
    assert len(rows[0]) == 21 and rows[1][0] == "test-0"
    np.testing.assert_allclose([float(x) for x in rows[1][1:]], torch.softmax(test_logits[0], 1).flatten(),
                               rtol=1e-6)
    assert leaderboard_rows({"x": {"answer": [0.5, 0.5]}}) == []  # rationale groups missing: no file


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config-file", str(REPO / "configs" / "vcr" / "tiny.yaml"), "--output-dir", str(out),
            "DATASETS.ROOT", str(root), *extra]


def test_a_short_training_run_goes_and_eval_only_scores_val_and_writes_the_test_leaderboard(
        vcr_root, tmp_path, train_net, capsys, one_thread):
    out = tmp_path / "run"
    assert train_net.cli(_args(vcr_root, out)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["train/vcr"], r["train/vcr_objects"]) for r in rows if "train/vcr" in r]
    assert len(losses) == 2 and np.isfinite(losses).all() and min(losses[0]) > 0
    evals = [r for r in rows if "eval/q2ar_accuracy" in r]
    assert len(evals) == 1 and evals[0]["eval/num_annotations"] == 2
    for key in ("eval/q2a_accuracy", "eval/qa2r_accuracy", "eval/q2ar_accuracy"):
        assert evals[0][key] in (0.0, 0.5, 1.0)
    saved = json.loads((out / "vcr_val_metrics.json").read_text())
    assert saved["q2ar_accuracy"] == evals[0]["eval/q2ar_accuracy"]

    capsys.readouterr()
    assert train_net.cli(["--eval-only", *_args(vcr_root, out, "DATASETS.TEST", "vcr_test",
                                                "DATASETS.TEST_LIMIT", "1")]) == 0
    assert "num_annotations: 1.0000" in capsys.readouterr().out
    with open(out / "vcr_test_leaderboard.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["annot_id", "test-0"] and len(rows[1]) == 21
    probs = np.array([[float(x) for x in r[1:]] for r in rows[1:]]).reshape(1, 5, 4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_paper_configs_use_vl_berts_solver_sgd_with_step_decay():
    from e2e_vl.config import load_train_cfg
    from e2e_vl.engine.optim import build_optimizer, lr_factor

    for size in ("base", "large"):
        cfg = load_train_cfg(REPO / "configs" / "vcr" / f"vlbert_{size}_e2e.yaml")
        assert cfg.TASK == "vcr" and cfg.MODEL.VL.HEADS == ["vcr", "vcr_objects"]
        assert cfg.DATASETS.VCR.MAX_TEXT_LEN == 64
        assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == ("SGD", 4.48e-3, 64)
    # 1,000 warm-up steps from 0, then x0.1 at 70% and again at 90% of the run.
    assert [lr_factor(s, cfg, 10000) for s in (0, 500, 1000, 6999, 7000, 8999, 9000)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01])
    model = torch.nn.Linear(2, 1)
    model.parameter_kind = lambda name: "head"
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    # every parameter decays, as VL-BERT's
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4}


def _rewrite(path: Path, line: int, change) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    change(rows[line])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("change, message", [
    (lambda r: r["answer_choices"][2].append([5]),
     r"train.jsonl:1 \(annot_id 'train-0'\): 'answer_choices': object reference \[5\] has index 5 out of "
     r"range \(the record has 3 objects: 0..2\)"),
    (lambda r: r.pop("rationale_label"),
     r"train.jsonl:1 \(annot_id 'train-0'\): missing key\(s\) \['rationale_label'\]"),
    (lambda r: r.update(answer_label=4),
     r"train.jsonl:1 \(annot_id 'train-0'\): 'answer_label' 4 is not a choice"),
    (lambda r: r.update(question=["Why", {"x": 1}]),
     r"annot_id 'train-0'\): 'question': token \{'x': 1\} is neither"),
    (lambda r: r["objects"].append("unicorn"), r"annot_id 'train-0'\): object class 'unicorn' is not one of"),
])
def test_malformed_records_fail_naming_file_record_and_problem(vcr_root, change, message):
    _rewrite(vcr_root / "train.jsonl", 0, change)
    with pytest.raises(VCRDataError, match=message):
        read_vcr_jsonl(vcr_root / "train.jsonl", labelled=True)


def test_missing_files_fail_before_training_and_bad_metadata_names_its_file(vcr_root, tmp_path, tokenizer,
                                                                            train_net, capsys):
    records = read_vcr_jsonl(vcr_root / "train.jsonl", True)
    meta = vcr_root / "vcr1images" / records[1].metadata_fn
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "boxes": data["boxes"][:1]}))
    dataset = VCRDataset(records, vcr_root / "vcr1images", tokenizer, ResizeFlip(64, 96))
    with pytest.raises(VCRDataError, match=f"{meta} \\(annot_id 'train-1'\\): 1 boxes for 2 objects"):
        dataset[1]

    image = vcr_root / "vcr1images" / records[2].img_fn
    image.unlink()
    with pytest.raises(VCRDataError, match=f"annot_id 'train-2': img_fn {image} does not exist"):
        VCRDataset(records, vcr_root / "vcr1images", tokenizer, ResizeFlip(64, 96), source="train.jsonl")
    (vcr_root / "vcr1images" / records[0].metadata_fn).unlink()
    with pytest.raises(VCRDataError, match="annot_id 'train-0': metadata_fn .*@0.json does not exist"):
        VCRDataset(records[:1], vcr_root / "vcr1images", tokenizer, ResizeFlip(64, 96))
    out = tmp_path / "run"
    assert train_net.cli(_args(vcr_root, out)) == 2  # one logged line, before any step
    assert "annot_id 'train-0': metadata_fn" in capsys.readouterr().err
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.jsonl").exists()
