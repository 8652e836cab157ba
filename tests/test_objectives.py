"""The pre-training objectives of issue 16 (`e2e_vl.modeling.objectives`): each loss against a hand
computation on fixed tensors, the mismatched-caption choice of image-text matching (never the caption's
own image, the same after a resume), questions mixed into caption batches, the contrastive loss gathered
over two gloo processes, and a 2-step pre-training run with every objective on for each architecture."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detector.roi_store import RoIRecord
from e2e_vl.data.captions import Caption, CaptionDataError, CaptionPretrainDataset
from e2e_vl.data.collate import collate_samples
from e2e_vl.modeling.heads import HEADS, Encoded
from e2e_vl.modeling.objectives import contrastive_loss, feature_regression_loss, kl_to_distribution
from tiny import CAPTION_CLASSES, NUM_CLASSES, build_arch, image_sample, tiny_detector_cfg, tiny_model
from tiny import write_caption_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

ALL_OBJECTIVES = ["mlm", "mrc", "itm", "mrc_kl", "obj_label", "feat_regression", "contrastive", "vqa"]


def log_softmax(row: list[float]) -> list[float]:
    top = math.log(sum(math.exp(v) for v in row))
    return [v - top for v in row]


def encoded(regions: torch.Tensor, valid: torch.Tensor, **fields) -> Encoded:
    batch = regions.shape[0]
    return Encoded(torch.zeros(batch, 2, regions.shape[-1]), regions, valid,
                   torch.ones(batch, dtype=torch.bool), **fields)


# ---- losses against hand computations ----------------------------------------------------------------
def test_kl_to_the_stored_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    stored = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    expected = 0.0
    for z, p in zip(logits.tolist(), stored.tolist()):
        log_q = log_softmax(z)
        expected += sum(pc * (math.log(pc) - lq) for pc, lq in zip(p, log_q) if pc > 0)
    assert kl_to_distribution(logits, stored).item() == pytest.approx(expected / 2, rel=1e-6)
    assert kl_to_distribution(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3)).item() == 0.0
    # equal: none
    assert kl_to_distribution((stored + 1e-9).log(), stored).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_regression_is_smooth_l1_to_the_detached_target():
    predicted = torch.tensor([[0.0, 2.0], [1.5, -0.25]], requires_grad=True)
    target = torch.tensor([[0.5, 0.0], [1.0, 1.0]], requires_grad=True)
    # |d| < 1: d^2 / 2, else |d| - 1/2; mean over the 4 entries.
    expected = (0.5 * 0.25 + (2.0 - 0.5) + 0.5 * 0.25 + (1.25 - 0.5)) / 4
    loss = feature_regression_loss(predicted, target)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert target.grad is None and predicted.grad is not None


def test_contrastive_loss_is_symmetric_infonce_with_the_learned_scale():
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    image = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    log_scale = torch.tensor(math.log(2.0), requires_grad=True)
    sims = [[sum(a * b for a, b in zip(t, i)) * 2.0 for i in image.tolist()] for t in text.tolist()]
    t2i = -sum(log_softmax(row)[k] for k, row in enumerate(sims)) / 2
    i2t = -sum(log_softmax([sims[r][c] for r in range(2)])[c] for c in range(2)) / 2
    logits, loss = contrastive_loss(text, image, log_scale)
    assert (torch.allclose(logits, torch.tensor(sims))
            and loss.item() == pytest.approx((t2i + i2t) / 2, rel=1e-6))
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad != 0
    capped = contrastive_loss(text, image, torch.tensor(10.0))[0]  # exp(10) is capped at 100
    assert torch.allclose(capped, 100.0 * text @ image.T)


def test_itm_head_reads_pooled_and_skips_unpaired_samples():
    head = HEADS["itm"](2)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.classifier.bias.zero_()
    pooled = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    enc = encoded(torch.zeros(3, 1, 2), torch.ones(3, 1, dtype=torch.bool), pooled=pooled)
    out = head.outputs(enc, {"itm_labels": torch.tensor([0, 0, -1])})
    expected = -(log_softmax([2.0, 0.0])[0] + log_softmax([0.0, 1.0])[0]) / 2
    assert out["losses"]["itm"].item() == pytest.approx(expected) and out["itm_logits"].shape == (2, 2)
    assert head.outputs(enc, {}) is None


def region_batch():
    """Two samples, 3 region slots; chosen: (0, 1), (1, 0), (1, 2) in row-major order, (1, 2) padding."""
    regions = torch.arange(18, dtype=torch.float32).view(2, 3, 3) / 10
    valid = torch.tensor([[True, True, True], [True, True, False]])
    labelled = torch.tensor([[False, True, False], [True, False, True]])
    stored = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])  # rows of the valid chosen regions
    return regions, valid, {"region_labelled": labelled, "mrc_targets": stored}


def spec(num_classes: int = 3, appearance_dim: int = 0):
    from transformers import BertConfig

    from e2e_vl.modeling.heads import HeadSpec

    return HeadSpec(BertConfig(hidden_size=3, layer_norm_eps=1e-12), torch.nn.Embedding(4, 3), 0, num_classes,
                    appearance_dim=appearance_dim)


@pytest.mark.parametrize("name", ["mrc_kl", "obj_label", "feat_regression"])
def test_region_heads_score_the_chosen_regions_in_target_order(name):
    torch.manual_seed(0)
    regions, valid, batch = region_batch()
    head = HEADS[name].build(spec(appearance_dim=2))
    target = torch.randn(2, 3, 2)
    out = head.outputs(encoded(regions, valid, appearance_target=target), batch)
    rows = torch.stack([regions[0, 1], regions[1, 0]])
    logits = head(rows)
    assert torch.equal(out[f"{name}_logits"], logits)
    expected = {
        "mrc_kl": lambda: kl_to_distribution(logits, batch["mrc_targets"]),
        # top stored classes
        "obj_label": lambda: torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])),
        "feat_regression": lambda: feature_regression_loss(logits, torch.stack([target[0, 1], target[1, 0]])),
    }[name]()
    assert out["losses"][name].item() == pytest.approx(expected.item())


def test_feature_regression_needs_the_appearance_width():
    with pytest.raises(ValueError, match="feat_regression head needs an output width"):
        HEADS["feat_regression"].build(spec(appearance_dim=0))


def test_summaries_default_to_cls_and_the_mean_of_valid_regions():
    regions, valid, _ = region_batch()
    enc = encoded(regions, valid)
    assert torch.equal(enc.text_summary(), enc.text[:, 0])
    assert torch.allclose(enc.image_summary()[1], (regions[1, 0] + regions[1, 1]) / 2)
    own = torch.ones(2, 3)
    assert (enc.image_summary() is not own
            and Encoded(enc.text, regions, valid, enc.has_image, image_pooled=own).image_summary() is own)


def test_contrastive_head_pairs_only_captions_with_their_own_image():
    torch.manual_seed(0)
    head = HEADS["contrastive"].build(spec())
    regions, valid, _ = region_batch()
    enc = encoded(torch.randn(3, 3, 3), torch.ones(3, 3, dtype=torch.bool))
    enc.text = torch.randn(3, 2, 3)
    out = head.outputs(enc, {"itm_labels": torch.tensor([1, 0, 1])})
    text = torch.nn.functional.normalize(head.text_projection(enc.text[[0, 2], 0]), dim=-1)
    image = torch.nn.functional.normalize(head.image_projection(enc.regions[[0, 2]].mean(1)), dim=-1)
    assert (out["losses"]["contrastive"].item()
            == pytest.approx(contrastive_loss(text, image, head.logit_scale)[1].item()))


def test_vqa_loss_covers_the_questions_of_a_mixed_batch_only():
    from e2e_vl.modeling.heads import soft_bce_loss

    torch.manual_seed(0)
    head = HEADS["vqa"].build(dataclasses.replace(spec(), num_answers=2)).eval()
    question = {"input_ids": torch.tensor([1, 2]), "answer_pos": 1, "vqa_targets": torch.tensor([1.0, 0.0])}
    batch = collate_samples([{"input_ids": torch.tensor([1, 3, 4]),
                              "mlm_labels": torch.tensor([-100, 3, -100])},
                             question])
    enc = Encoded(torch.randn(2, 3, 3), torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool),
                  torch.zeros(2, dtype=torch.bool))
    out = head.outputs(enc, batch)
    assert out["vqa_logits"].shape == (2, 2)
    assert (out["losses"]["vqa"].item()
            == pytest.approx(soft_bce_loss(out["vqa_logits"][1:], batch["vqa_targets"][1:]).item()))


# ---- image-text matching: the mismatched caption's image --------------------------------------------------
class _Tokenizer:
    all_special_ids = [0]


def caption_set(seed: int = 3, prob: float = 0.5) -> CaptionPretrainDataset:
    """Ten captions of five images (two each, adjacent), regions as plain records: no image is read."""
    captions = [Caption(str(i // 2), f"caption {i}") for i in range(10)]
    records = {str(k): RoIRecord(str(k), "unused.png", 8, 8, boxes=np.zeros((1, 4), np.float32))
               for k in range(5)}
    return CaptionPretrainDataset(captions, records, _Tokenizer(), transform=None, seed=seed,
                                  mismatch_prob=prob, image_loader=lambda path: None)


def test_mismatched_captions_never_get_their_own_image_and_survive_a_resume():
    data = caption_set()
    shown = {}
    for epoch in range(6):
        data.set_epoch(epoch)
        shown[epoch] = [data.image_index(i) for i in range(len(data))]
        for i, j in enumerate(shown[epoch]):
            assert j == i or data.captions[j].image_id != data.captions[i].image_id, (epoch, i, j)
    mismatched = sum(j != i for row in shown.values() for i, j in enumerate(row))
    assert 15 <= mismatched <= 45  # about half of 60
    assert shown[0] != shown[1]  # a new draw each epoch
    resumed = caption_set()  # a fresh process, as after --resume
    for epoch in (4, 2):
        resumed.set_epoch(epoch)
        assert [resumed.image_index(i) for i in range(len(resumed))] == shown[epoch]
    other_seed = caption_set(seed=4)
    assert [other_seed.image_index(i) for i in range(10)] != shown[0]
    assert [caption_set(prob=0.0).image_index(i) for i in range(10)] == list(range(10))


def test_matching_needs_two_images():
    captions = [Caption("7", "one"), Caption("7", "two")]
    records = {"7": RoIRecord("7", "x.png", 8, 8, boxes=np.zeros((1, 4), np.float32))}
    with pytest.raises(CaptionDataError, match="at least two images"):
        CaptionPretrainDataset(captions, records, _Tokenizer(), transform=None, mismatch_prob=0.5)


# ---- contrastive negatives gathered over two gloo processes ------------------------------------------------
ROWS = (2, 3)  # rows per rank: unequal, so the gather pads


def _features(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    text = torch.nn.functional.normalize(torch.randn(ROWS[rank], 4, generator=g), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(ROWS[rank], 4, generator=g), dim=-1)
    return text, image


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        text, image = (t.requires_grad_() for t in _features(rank))
        logits, loss = contrastive_loss(text, image, torch.tensor(math.log(5.0)))
        loss.backward()
        torch.save({"loss": loss.detach(), "logits": logits.detach(), "text_grad": text.grad,
                    "image_grad": image.grad},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_gathers_negatives_over_processes(tmp_path):
    # fork: the workers inherit the imported modules (spawned workers would import torch and the models again)
    mp.start_processes(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    parts = [_features(r) for r in range(2)]
    text = torch.cat([p[0] for p in parts]).requires_grad_()
    image = torch.cat([p[1] for p in parts]).requires_grad_()
    logits, loss = contrastive_loss(text, image, torch.tensor(math.log(5.0)))  # one process, the whole batch
    loss.backward()
    start = 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(start, start + ROWS[rank])
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        assert torch.allclose(got["logits"], logits[rows], atol=1e-6)
        # DDP averages over the 2 processes: 2 x the local share = the whole batch's gradient.
        assert torch.allclose(got["text_grad"] / 2, text.grad[rows], atol=1e-6)
        assert torch.allclose(got["image_grad"] / 2, image.grad[rows], atol=1e-6)
        start += ROWS[rank]


# ---- every objective at once, through the task and the training loop -------------------------------------
@pytest.mark.parametrize("arch", ["vlbert", "visualbert", "lxmert", "vilbert"])
def test_two_pretraining_steps_with_every_objective(arch, bert_folder, tmp_path):
    from e2e_vl.config import get_train_cfg
    from e2e_vl.engine.trainer import train
    from e2e_vl.modeling.registry import build_model
    from e2e_vl.tasks import get_task

    root = tmp_path / "data"
    root.mkdir()
    write_caption_data(root)
    cfg = tiny_detector_cfg(get_train_cfg())
    cfg.merge_from_list([
        "TASK", "pretrain", "MODEL.ARCH", arch, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "run"),
        "MODEL.VL.BERT_PATH", bert_folder, "MODEL.VL.HEADS", str(ALL_OBJECTIVES),
        "MODEL.VL.NUM_MRC_CLASSES", str(CAPTION_CLASSES), "MODEL.VL.NUM_ANSWERS", "13",
        "MODEL.LXMERT.R_LAYERS", "1", "MODEL.LXMERT.X_LAYERS", "1",
        # ViLBERT at widths unlike the text's (32 vs the BERT's), so every head meets its own widths.
        "MODEL.VILBERT.V_HIDDEN_SIZE", "32", "MODEL.VILBERT.V_NUM_HIDDEN_LAYERS", "1",
        "MODEL.VILBERT.V_NUM_ATTENTION_HEADS", "2", "MODEL.VILBERT.V_INTERMEDIATE_SIZE", "64",
        "MODEL.VILBERT.BI_HIDDEN_SIZE", "48", "MODEL.VILBERT.BI_NUM_ATTENTION_HEADS", "2",
        "MODEL.VILBERT.V_BIATTENTION_ID", "[0]", "MODEL.VILBERT.T_BIATTENTION_ID", "[1]",
        "DATASETS.ROOT", str(root), "DATASETS.ROI_STORE", "rois", "DATASETS.TRAIN", "captions_train",
        "DATASETS.TEST", "", "DATASETS.CAPTIONS_TRAIN", "train.json", "DATASETS.TEXT_CORPUS", "text.txt",
        "MODEL.VL.PRETRAIN.MRC_PROB", "0.9", "MODEL.VL.PRETRAIN.MLM_PROB", "0.5",
        "DATASETS.PRETRAIN_VQA", "easy_vqa_train", "DATASETS.PRETRAIN_VQA_LIMIT", "2",
        "DATALOADER.QUESTIONS_PER_IMAGE", "1", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "[64]",
        "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2",
        "SOLVER.LOG_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.WARMUP_ITERS", "0",
    ])
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg, arch)
    train(cfg, model, get_task("pretrain").build(cfg, model, torch.device("cpu"), False), torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert len(rows) == 2
    expected = {f"train/{name}" for name in ALL_OBJECTIVES} | {"train/mlm_text", "train/loss"}
    for row in rows:
        assert expected <= set(row), sorted(expected - set(row))
        assert all(np.isfinite(row[k]) for k in expected), row
    assert any(row[f"train/{name}"] > 0 for row in rows
               for name in ("itm", "mrc_kl", "obj_label", "feat_regression",
                                                                       "contrastive", "vqa"))


def test_a_mismatched_caption_carries_no_word_or_region_targets(tmp_path, tokenizer):
    from e2e_vl.data.captions import read_coco_captions
    from e2e_vl.data.roi_records import open_roi_store
    from e2e_vl.data.transforms import ResizeFlip

    write_caption_data(tmp_path)
    data = CaptionPretrainDataset(read_coco_captions(tmp_path / "train.json"),
                                  open_roi_store(tmp_path / "rois"), tokenizer, ResizeFlip([64], 64),
                                  mlm_prob=0.9, mrc_prob=0.9, mismatch_prob=0.5)
    seen = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(len(data)):
            sample = data[i]
            matched = data.image_index(i) == i
            seen.add(matched)
            assert sample["itm_labels"] == int(matched)
            assert (sample["image_id"] == data.captions[i].image_id) == matched
            if not matched:
                assert (sample["mlm_labels"] == -100).all() and not sample["region_labelled"].any()
                assert not sample["region_masked"].any()
    assert seen == {True, False}


def test_the_regression_target_is_the_unmasked_feature_and_leaves_running_statistics():
    model = tiny_model(heads=("feat_regression",), appearance_norm="running").train()
    masked = torch.tensor([False, True, False])
    sample = image_sample(region_masked=masked, region_labelled=masked,
                          mrc_targets=torch.full((3, NUM_CLASSES), 1 / NUM_CLASSES))
    batch = collate_samples([sample, {"input_ids": torch.arange(3)}])
    model.region_appearance(batch)  # the first batch sets the running statistics
    stats = model.appearance_norm.running_mean.clone()
    target = model.appearance_targets(batch)
    assert torch.equal(model.appearance_norm.running_mean, stats) and model.appearance_norm.training
    unmasked = {k: v for k, v in batch.items() if k != "region_masked"}
    model.appearance_norm.eval()
    with torch.no_grad():
        clean = model.region_appearance(unmasked)[0]
        dirty = model.region_appearance(batch)[0]
    assert torch.allclose(target[0], clean) and not torch.allclose(target[0, 1], dirty[1])
    assert (target[1] == 0).all()  # the text-only sample
    model.appearance_norm.train()
    out = model(batch)
    assert (out["feat_regression_logits"].shape == (1, model.appearance_dim)
            and out["losses"]["feat_regression"] > 0)


@pytest.mark.parametrize("name", ["lxmert_cc", "visualbert_cc"])
def test_pretraining_configs_of_the_other_architectures_load(name):
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling.heads import check_heads

    cfg = load_train_cfg(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / f"{name}.yaml")
    assert cfg.TASK == "pretrain" and cfg.MODEL.ARCH == name.split("_")[0] and "itm" in cfg.MODEL.VL.HEADS
    check_heads(cfg.MODEL.VL.HEADS, cfg.MODEL.VL.NUM_ANSWERS)


def test_pretraining_pairs_the_vqa_head_with_its_questions():
    from types import SimpleNamespace

    from e2e_vl.config import ConfigError, get_train_cfg
    from e2e_vl.tasks import get_task

    cfg = get_train_cfg()
    model = SimpleNamespace(tokenizer=None, heads={"mlm": None, "vqa": None})
    with pytest.raises(ConfigError, match="the vqa head and 'DATASETS.PRETRAIN_VQA' go together"):
        get_task("pretrain").build(cfg, model, torch.device("cpu"), False)


@pytest.mark.parametrize("head", ["itm", "mrc_kl", "obj_label", "feat_regression", "contrastive"])
def test_visualbert_without_grounding_refuses_the_image_objectives(head, bert_folder):
    from detector.config import ConfigError

    with pytest.raises(ConfigError, match=f"region heads \\['{head}'\\]"):
        build_arch("visualbert", bert_folder, "MODEL.VISUALBERT.GROUNDED", "False",
              "MODEL.VL.HEADS", f"['mlm', '{head}']")
