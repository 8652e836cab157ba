"""Pre-training data: whole-word / region masking, pixel masks, collation, transforms, samplers, captions."""

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from e2e_vl.data.captions import (
    CaptionDataError,
    CaptionPretrainDataset,
    TextOnlyDataset,
    read_captions,
    read_coco_captions,
    read_tsv_captions,
)
from detector.structures import box_pixel_mask
from e2e_vl.data.collate import VLCollator, collate_samples
from e2e_vl.data.masking import IGNORE_INDEX, mask_whole_words, select_masked_regions
from e2e_vl.data.roi_records import MissingRoIRecordsError
from detector.roi_store import RoIRecord
from e2e_vl.data.samplers import AspectRatioGroupedBatchSampler
from e2e_vl.data.transforms import ResizeFlip, swap_left_right
from e2e_vl.data.vqa import encode_vqa_text
import e2e_vl.modeling  # noqa: F401  (registers the heads, and so the batch targets they declare)

PRETRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "vlbert_base_cc.yaml"


# ---- masking -------------------------------------------------------------------------------------------
def test_whole_word_masking_rates_and_word_pieces():
    rng = random.Random(0)
    n_words = 4000
    ids = [101] + [1000 + (i % 7) for i in range(2 * n_words)] + [102]
    word_ids = [None] + [i // 2 for i in range(2 * n_words)] + [None]  # every word = 2 pieces
    new, labels = mask_whole_words(
        ids, word_ids, mask_token_id=103, vocab_size=30522, special_ids=[0, 100, 101, 102, 103], rng=rng
    )
    assert labels[0] == labels[-1] == IGNORE_INDEX and new[0] == 101 and new[-1] == 102
    chosen = masked = kept = 0
    for w in range(n_words):
        a, b = 1 + 2 * w, 2 + 2 * w
        assert (labels[a] == IGNORE_INDEX) == (labels[b] == IGNORE_INDEX)  # pieces go together
        if labels[a] != IGNORE_INDEX:
            chosen += 1
            assert labels[a] == ids[a] and labels[b] == ids[b]
            masked += new[a] == 103 and new[b] == 103
            kept += new[a] == ids[a] and new[b] == ids[b]
        else:
            assert new[a] == ids[a]
    assert 0.13 < chosen / n_words < 0.17
    assert 0.75 < masked / chosen < 0.85
    assert 0.05 < kept / chosen < 0.16
    assert all(t not in (0, 100, 101, 102) for t in new[1:-1])


def test_region_selection_skips_the_whole_image():
    rng = random.Random(1)
    labelled_total = masked_total = 0
    for _ in range(400):
        labelled, masked = select_masked_regions(21, rng=rng)
        assert not labelled[0] and not masked[0]
        assert not (masked & ~labelled).any()
        labelled_total += int(labelled.sum())
        masked_total += int(masked.sum())
    assert 0.13 < labelled_total / (400 * 20) < 0.17
    assert 0.85 < masked_total / labelled_total < 0.95


def test_box_pixel_mask_covers_touched_pixels():
    mask = box_pixel_mask(torch.tensor([[1.0, 2.0, 4.0, 3.0], [5.5, 0.2, 6.1, 1.0]]), 6, 8)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[2:3, 1:4] = True
    expected[0:1, 5:7] = True
    assert torch.equal(mask, expected)
    assert not box_pixel_mask(torch.zeros(0, 4), 3, 3).any()


# ---- collation -----------------------------------------------------------------------------------------
def test_collate_pads_tokens_boxes_and_images():
    a = {
        "input_ids": torch.tensor([1, 2, 3]),
        "image": torch.ones(3, 4, 6, dtype=torch.uint8),
        "boxes": torch.tensor([[0, 0, 6, 4.0], [1, 1, 2, 2]]),
        "region_labelled": torch.tensor([False, True]),
        "mrc_targets": torch.tensor([[0.0, 0.0], [0.3, 0.7]]),
        "mlm_labels": torch.tensor([-100, 5, -100]),
    }
    b = {
        "input_ids": torch.tensor([1, 9]),
        "image": torch.full((3, 5, 2), 2, dtype=torch.uint8),
        "boxes": torch.tensor([[0, 0, 2, 5.0], [0, 1, 1, 2], [0, 0, 1, 1]]),
        "region_labelled": torch.tensor([False, True, True]),
        "mrc_targets": torch.tensor([[0, 0], [1, 0], [0.5, 0.5]]),
        "region_masked": torch.tensor([False, False, True]),
    }
    batch = VLCollator(pad_token_id=0)([a, [b]])
    assert batch["images"].shape == (2, 3, 5, 6) and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"].tolist() == [[4, 6], [5, 2]]
    assert batch["images"][0, :, 4:].eq(0).all() and batch["images"][1, :, :, 2:].eq(0).all()
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 9, 0]]
    assert batch["text_mask"].tolist() == [[True] * 3, [True, True, False]]
    assert batch["mlm_labels"].tolist() == [[-100, 5, -100], [-100, -100, -100]]
    assert batch["region_labelled"].tolist() == [[False, True, False], [False, True, True]]
    assert torch.equal(batch["mrc_targets"], torch.tensor([[0.3, 0.7], [1, 0], [0.5, 0.5]]))
    assert [m.tolist() for m in batch["region_masked"]] == [[False, False], [False, False, True]]
    assert batch["sample_image_index"].tolist() == [0, 1]


def test_collate_shares_images_by_key_and_rejects_mixed_answers():
    image = torch.zeros(3, 4, 4)
    boxes = torch.tensor([[0, 0, 4, 4.0]])
    q1 = {
        "input_ids": torch.tensor([1, 2]),
        "image": image,
        "boxes": boxes,
        "image_key": 5,
        "answer_pos": 1,
        "vqa_targets": torch.tensor([1.0, 0.0]),
    }
    q2 = dict(q1, input_ids=torch.tensor([1, 3, 4]))
    other = dict(q1, image_key=6)
    batch = collate_samples([q1, other, q2])
    assert batch["images"].shape[0] == 2 and batch["sample_image_index"].tolist() == [0, 1, 0]
    assert batch["answer_pos"].tolist() == [1, 1, 1] and batch["vqa_targets"].shape == (3, 2)
    with pytest.raises(KeyError, match="sample 1 lacks vqa_targets"):
        collate_samples([q1, {"input_ids": torch.tensor([1]), "answer_pos": 0}])
    mixed = collate_samples([{"input_ids": torch.tensor([1])}, q1])  # a caption beside a question
    assert mixed["vqa_labelled"].tolist() == [False, True] and mixed["vqa_targets"][0].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="different images"):
        collate_samples([q1, dict(q1, image=torch.zeros(3, 5, 4))])


def _sample(n_tokens: int, n_boxes: int | None, **targets) -> dict:
    """A sample of `n_tokens` tokens, with an image of `n_boxes` boxes (None: text only), and `targets`."""
    sample = {"input_ids": torch.arange(1, n_tokens + 1), **targets}
    if n_boxes is not None:
        sample.update(image=torch.zeros(3, 4, 4), boxes=torch.tensor([[0, 0, 4, 4.0]] * n_boxes))
    return sample


CAPTION = _sample(3, 2, mlm_labels=torch.tensor([-100, 7, -100]), itm_labels=1,
                  region_labelled=torch.tensor([False, True]), mrc_targets=torch.tensor([[0, 0], [.25, .75]]))
GENERIC_KEYS = {"sample_image_index", "images", "image_sizes", "boxes", "input_ids", "text_mask",
                "token_type_ids"}


@pytest.mark.parametrize("task,samples,expected", [
    ("captions", [CAPTION, _sample(2, None, mlm_labels=torch.tensor([8, -100]))],
     {"mlm_labels": torch.tensor([[-100, 7, -100], [8, -100, -100]]), "itm_labels": torch.tensor([1, -1]),
      "region_labelled": torch.tensor([[False, True], [False, False]]),
      "mrc_targets": torch.tensor([[.25, .75]])}),
    ("vqa", [_sample(3, 1, answer_pos=2, vqa_targets=torch.tensor([0.0, 1.0])), _sample(2, 1)],
     {"answer_pos": torch.tensor([2, 0]), "vqa_targets": torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
      "vqa_labelled": torch.tensor([True, False])}),
    ("vqa inference", [_sample(3, 1, answer_pos=2), _sample(2, 1, answer_pos=1)],
     {"answer_pos": torch.tensor([2, 1])}),
    ("refcoco", [_sample(2, 3, ref_labels=torch.tensor([-1.0, 1.0, 0.0])),
                 _sample(2, 1, ref_labels=torch.tensor([-1.0]))],
     {"ref_labels": torch.tensor([[-1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])}),
    ("vcr", [_sample(2, 2, object_labels=torch.tensor([0, 5]), choice_label=1),
             _sample(3, 2, object_labels=torch.tensor([0, -1]))],
     {"object_labels": torch.tensor([[0, 5], [0, -1]]), "choice_labels": torch.tensor([1])}),
])
def test_each_task_batch_holds_exactly_the_targets_its_heads_declare(task, samples, expected):
    """The heads' declarations (`Head.targets`) give these batches bit for bit, dtypes included, and no
    target that no sample carries."""
    batch = collate_samples(samples)
    assert set(batch) - GENERIC_KEYS == set(expected), task
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), (task, key, batch[key])


def test_a_new_heads_declared_target_is_batched_without_touching_collate():
    from e2e_vl.data.collate import BATCH_TARGETS, SampleTargets
    from e2e_vl.modeling.heads import HEADS, Head, register_head

    @register_head("test_only_score")
    class ScoreHead(Head):
        targets = (SampleTargets("score_label", fill=-1),)

    try:
        batch = collate_samples([_sample(2, 1, score_label=3), _sample(2, 1)])
    finally:
        del HEADS["test_only_score"], BATCH_TARGETS["test_only_score"]
    assert torch.equal(batch["score_label"], torch.tensor([3, -1]))
    assert "score_label" not in collate_samples([_sample(2, 1, score_label=3)])  # unregistered again


def test_collating_before_any_head_registered_its_targets_is_refused(monkeypatch):
    from e2e_vl.data import collate

    monkeypatch.setattr(collate, "BATCH_TARGETS", {})  # as in a process that never imported the models
    with pytest.raises(RuntimeError, match="import e2e_vl.modeling"):
        collate_samples([_sample(2, 1, answer_pos=1)])


def test_vqa_text_layout(tokenizer):
    """VL-BERT's VQA (prepare_text_from_qa): [CLS] question [SEP] segment 0, [MASK] [SEP] segment 1, which its
    released VQA models were fine-tuned with; the easy-VQA demo keeps 0 (DATASETS.ANSWER_SEGMENT)."""
    text = encode_vqa_text(tokenizer, "What colour is the shape?", 16)
    tokens = tokenizer.convert_ids_to_tokens(text["input_ids"].tolist())
    assert tokens == ["[CLS]", "what", "colour", "is", "the", "shape", "?", "[SEP]", "[MASK]", "[SEP]"]
    assert text["token_type_ids"].tolist() == [0] * 8 + [1, 1]
    assert text["answer_pos"] == 8
    demo = encode_vqa_text(tokenizer, "What colour is the shape?", 16, answer_segment=0)
    assert demo["token_type_ids"].tolist() == [0] * 10 and torch.equal(demo["input_ids"], text["input_ids"])


# ---- transforms and samplers ---------------------------------------------------------------------------
def test_swap_left_right():
    assert (
        swap_left_right("the Left cup, right of LEFT; leftover") == "the Right cup, left of RIGHT; leftover"
    )


def test_resize_and_flip_boxes_and_text():
    image = np.zeros((40, 80, 3), np.uint8)
    image[10:20, 0:10] = 255
    boxes = torch.tensor([[0.0, 10.0, 10.0, 20.0]])
    out = ResizeFlip(20, 1000, flip_prob=1.0, swap_text_sides=True)(
        image, boxes, "a box on the left", random.Random(0)
    )
    assert out.image.shape == (3, 20, 40) and out.flipped and out.text == "a box on the right"
    torch.testing.assert_close(out.boxes, torch.tensor([[35.0, 5.0, 40.0, 10.0]]))
    assert out.image[:, 5:10, 35:40].float().mean() > 200 and out.image[:, 5:10, 0:5].max() == 0
    kept = ResizeFlip(20, 1000)(image, boxes, "left")
    assert not kept.flipped and kept.text == "left"
    torch.testing.assert_close(kept.boxes, torch.tensor([[0.0, 5.0, 5.0, 10.0]]))


def test_aspect_ratio_grouping():
    ratios = [1.5, 0.5, 2.0, 0.7, 1.0, 0.9, 1.2]
    order = [6, 5, 4, 3, 2, 1, 0]
    sampler = AspectRatioGroupedBatchSampler(order, ratios, batch_size=2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len({ratios[i] >= 1 for i in b}) == 1
    assert len(batches) == len(sampler) == 4
    assert (
        len(AspectRatioGroupedBatchSampler(order, ratios, 2, drop_last=True))
        == len(list(AspectRatioGroupedBatchSampler(order, ratios, 2, drop_last=True)))
        == 3
    )


# ---- captions ------------------------------------------------------------------------------------------
def test_read_coco_and_tsv_captions(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 4, "width": 4}],
        "annotations": [
            {"id": 2, "image_id": 7, "caption": " A dog. "},
            {"id": 1, "image_id": 7, "caption": "x"},
        ],
    }
    (tmp_path / "caps.json").write_text(json.dumps(coco))
    caps = read_coco_captions(tmp_path / "caps.json", image_root="imgs")
    assert [(c.image_id, c.text) for c in caps] == [("7", "x"), ("7", "A dog.")]
    assert caps[0].path.endswith("imgs/a.jpg")
    (tmp_path / "cc.tsv").write_text("dir/123.jpg\ta cat\n\nother/456.png\ttwo dogs\n")
    caps = read_captions(tmp_path / "cc.tsv", image_root=str(tmp_path))
    assert [(c.image_id, c.text) for c in caps] == [("123", "a cat"), ("456", "two dogs")]
    assert caps[1].source.endswith("cc.tsv:3")
    (tmp_path / "bad.tsv").write_text("only-a-path\n")
    with pytest.raises(CaptionDataError, match="bad.tsv:1"):
        read_tsv_captions(tmp_path / "bad.tsv")


def _store_with_one_image(tmp_path, num_classes=5):
    image = (np.arange(30 * 60 * 3) % 251).astype(np.uint8).reshape(30, 60, 3)
    cv2.imwrite(str(tmp_path / "17.png"), image)
    probs = np.random.default_rng(0).dirichlet(np.ones(num_classes), size=3).astype(np.float16)
    record = RoIRecord(
        "17",
        str(tmp_path / "17.png"),
        30,
        60,
        boxes=np.array([[0, 0, 10, 10], [20, 5, 40, 25], [30, 0, 60, 30]], np.float32),
        class_probs=probs,
        object_conf=np.array([0.9, 0.2, 0.8], np.float32),
    )
    return {"17": record}, record


def test_caption_dataset_sample_and_missing_record(tmp_path, tokenizer):
    store, record = _store_with_one_image(tmp_path)
    (tmp_path / "caps.tsv").write_text("17.png\ta red circle on the left\nmissing.png\tno regions\n")
    caps = read_tsv_captions(tmp_path / "caps.tsv", image_root=str(tmp_path))
    transform = ResizeFlip(60, 1000)
    with pytest.raises(MissingRoIRecordsError, match=r"caps.tsv: 1 of 2 images have no record .*'missing'"):
        CaptionPretrainDataset(caps, store, tokenizer, transform)
    text_len = len(tokenizer("a red circle on the left")["input_ids"])
    ds = CaptionPretrainDataset(
        caps[:1],
        store,
        tokenizer,
        transform,
        mrc_prob=1.0,
        mrc_mask_frac=1.0,
        max_seq_len=text_len + 4,
        max_text_len=text_len,
    )
    sample = ds[0]
    # Whole image + the two highest-scoring boxes (0.9 and 0.8), in stored order, scaled x2.
    torch.testing.assert_close(
        sample["boxes"], torch.tensor([[0, 0, 120, 60.0], [0, 0, 20, 20], [60, 0, 120, 60]])
    )
    assert sample["image"].shape == (3, 60, 120)
    assert sample["region_masked"].tolist() == [False, True, True]
    assert sample["region_labelled"].tolist() == [False, True, True]
    torch.testing.assert_close(
        sample["mrc_targets"][1:], torch.from_numpy(record.class_probs[[0, 2]].astype(np.float32))
    )
    again = ds[0]
    assert torch.equal(again["input_ids"], sample["input_ids"])  # reproducible per (seed, epoch, index)
    assert ds.aspect_ratios() == [2.0]


def test_missing_caption_image_files_are_counted_when_the_data_set_is_built(tmp_path, tokenizer):
    store, _ = _store_with_one_image(tmp_path)
    (tmp_path / "caps.tsv").write_text("17.png\ta red circle\nmoved/17.png\tthe same image, moved away\n")
    caps = read_tsv_captions(tmp_path / "caps.tsv", image_root=str(tmp_path))
    with pytest.raises(CaptionDataError, match=f"caps.tsv: 1 of 2 image files do not exist \\(e.g. "
                                               f"{tmp_path / 'moved' / '17.png'}\\); check "
                                               "DATASETS.CAPTIONS_IMAGE_DIR_TRAIN"):
        CaptionPretrainDataset(caps, store, tokenizer, ResizeFlip(60, 1000))
    assert len(CaptionPretrainDataset(caps[:1], store, tokenizer, ResizeFlip(60, 1000))) == 1


def test_text_only_dataset(tokenizer):
    ds = TextOnlyDataset(
        ["a sentence about shapes and colours", "  ", "another one"], tokenizer, mlm_prob=1.0
    )
    assert len(ds) == 2
    sample = ds[0]
    assert (sample["mlm_labels"][1:-1] != IGNORE_INDEX).all() and sample["mlm_labels"][0] == IGNORE_INDEX
    assert "image" not in sample


def test_pretrain_config_builds_datasets_from_an_roi_store(tmp_path, tokenizer):
    from types import SimpleNamespace

    from detector.config import ConfigError
    from detector.roi_store import RoIStoreWriter
    from e2e_vl.config import load_train_cfg
    from e2e_vl.tasks import get_task
    from e2e_vl.tasks.pretrain import CAPTION_DATASETS

    _, record = _store_with_one_image(tmp_path)
    with RoIStoreWriter(tmp_path / "rois", {"fingerprint": "test"}) as writer:
        writer.write_batch([record])
    (tmp_path / "images").mkdir()
    (tmp_path / "17.png").rename(tmp_path / "images" / "17.png")
    (tmp_path / "caps.tsv").write_text("17.png\ta red circle\n")
    (tmp_path / "held_out.tsv").write_text("images/17.png\ta red circle on the left\n"
                                           "images/17.png\ta circle\n")
    (tmp_path / "text.txt").write_text("a passage of text\n")
    overrides = [
        "DATASETS.ROOT", str(tmp_path), "DATASETS.ROI_STORE", "rois",
        "DATASETS.CAPTIONS_TRAIN", "caps.tsv", "DATASETS.CAPTIONS_IMAGE_DIR_TRAIN", "images",
        "DATASETS.CAPTIONS_TEST", "held_out.tsv", "DATASETS.CAPTIONS_IMAGE_DIR_TEST", ".",
        "DATASETS.TEXT_CORPUS", "text.txt", "INPUT.MIN_SIZE_TRAIN", "[60]", "INPUT.MIN_SIZE_TEST", "30",
        "MODEL.VL.NUM_MRC_CLASSES", "5",
    ]
    cfg = load_train_cfg(PRETRAIN_CONFIG, overrides)
    model = SimpleNamespace(tokenizer=tokenizer, heads={"mlm": None, "mrc": None})
    task = get_task("pretrain").build(cfg, model, torch.device("cpu"), False)
    captions, text = task.train_set.parts  # the captions paired 1:1 with the text corpus
    sample = captions[0]
    assert sample["image"].shape[-2:] == (60, 120) and len(sample["boxes"]) == 4
    assert sample["mrc_targets"].shape == (4, 5)
    assert len(text) == 1
    # captions_test: its own file and image folder, at the test size
    held_out = CAPTION_DATASETS.build("DATASETS.TEST", cfg.DATASETS.TEST, cfg, tokenizer, False)
    assert held_out.captions[0].text == "a red circle on the left"
    assert held_out[0]["image"].shape[-2:] == (30, 60) and len(held_out) == 2
    # DATASETS.TEST_LIMIT / TRAIN_LIMIT keep the first captions, as every task's limits do
    limited = load_train_cfg(PRETRAIN_CONFIG, [*overrides, "DATASETS.TEST_LIMIT", "1"])
    assert len(CAPTION_DATASETS.build("DATASETS.TEST", limited.DATASETS.TEST, limited, tokenizer, False)) == 1
    no_captions = load_train_cfg(PRETRAIN_CONFIG, ["DATASETS.CAPTIONS_TRAIN", ""])
    with pytest.raises(ConfigError, match="'DATASETS.CAPTIONS_TRAIN' is empty: captions_train needs"):
        CAPTION_DATASETS.build("DATASETS.TRAIN", "captions_train", no_captions, tokenizer, True)
