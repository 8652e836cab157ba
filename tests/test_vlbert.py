"""VL-BERT model: geometry embedding, sequence layout, pixel masking, joint updates, heads.

A tiny random detector (ResNet-50 layout with narrow widths) and a tiny random BERT keep every test
to CPU seconds; the real MiniLM folder is used once to check loading from a checkpoint.
"""

import math

import cv2
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from detector.layers import FrozenBatchNorm2d
from detector.modeling import build_detector
from e2e_vl.config import get_train_cfg
from e2e_vl.data.captions import CaptionPretrainDataset, read_tsv_captions
from e2e_vl.data.collate import collate_samples
from detector.roi_store import RoIRecord
from e2e_vl.data.transforms import ResizeFlip
from e2e_vl.data.vqa import encode_vqa_text
from e2e_vl.modeling.embeddings import ObjectFeatureEmbedding, box_geometry_embedding
from e2e_vl.modeling.heads import soft_cross_entropy
from e2e_vl.modeling.hf import load_tokenizer
from e2e_vl.modeling.vlbert import VLBert
from tiny import NUM_CLASSES, VOCAB, capture_backbone_input, image_sample, tiny_detector_cfg, tiny_model


def switch_on_visual_norms(model: VLBert) -> None:
    """VL-BERT starts the visual LayerNorms at gamma 0 (visual term off); tests that need the visual path
    to matter set them to 1, as training quickly does."""
    with torch.no_grad():
        model.visual_norms.text.weight.fill_(1.0)
        model.visual_norms.region.weight.fill_(1.0)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("appearance_dim", [2048, 512])
def test_geometry_code_is_as_wide_as_the_appearance_feature(appearance_dim):
    """VL-BERT's halves are equal (2048 + 2048); a narrower detector gets a narrower box code, so the
    box code does not outweigh the appearance in the projection."""
    embed = ObjectFeatureEmbedding(32, appearance_dim=appearance_dim)
    assert embed.proj.in_features == 2 * appearance_dim
    out = embed(torch.randn(3, appearance_dim), torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3),
                torch.tensor([16.0, 16.0]))
    assert out.shape == (3, 32)


def test_geometry_embedding_matches_formula():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 200.0, 100.0]])
    width, height = 200.0, 100.0
    out = box_geometry_embedding(boxes, torch.tensor([width, height]))
    assert out.shape == (2, 2048)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        values = [
            (x1 + x2) / 2 / width * 100,
            (y1 + y2) / 2 / height * 100,
            (x2 - x1) / width * 100,
            (y2 - y1) / height * 100,
        ]
        for j, v in enumerate(values):
            for i in (0, 1, 17, 255):
                angle = v / 1000 ** (i / 256)
                assert out[k, j * 512 + i].item() == pytest.approx(math.sin(angle), abs=1e-5)
                assert out[k, j * 512 + 256 + i].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_visual_norms_start_at_zero_so_text_input_is_bert():
    model = tiny_model().eval()
    batch = collate_samples([image_sample()])
    emb = model.embed(batch)
    words = model.bert.embeddings.word_embeddings(batch["input_ids"])
    assert torch.equal(emb["inputs_embeds"][:, :6], words)


def test_sequence_layout_one_and_two_segments():
    model = tiny_model().eval()
    one = image_sample(num_boxes=3, text_len=5)
    two = image_sample(num_boxes=2, text_len=4, seed=1)
    two["token_type_ids"] = torch.tensor([0, 0, 1, 1])
    text_only = {"input_ids": torch.arange(5, 12)}
    emb = model.embed(collate_samples([one, two, text_only]))
    assert emb["inputs_embeds"].shape[:2] == (3, 9)  # longest: 5 text + 3 regions + [END]
    assert emb["token_type_ids"][0].tolist() == [0] * 5 + [2] * 4
    assert emb["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 6]
    assert emb["attention_mask"][0].all()
    valid = emb["attention_mask"][1]
    assert valid.tolist() == [True] * 7 + [False] * 2  # 4 text + 2 regions + [END], padding after [END]
    assert emb["token_type_ids"][1, :7].tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert emb["position_ids"][1, :7].tolist() == [0, 1, 2, 3, 4, 4, 5]
    assert emb["attention_mask"][2].tolist() == [True] * 7 + [False] * 2  # text only: no regions, no [END]
    assert emb["position_ids"][2, :7].tolist() == list(range(7))
    # Where each element landed: regions of sample 1 follow its 4 text tokens.
    assert emb["region_index"][1, :2].tolist() == [4, 5]
    assert emb["region_valid"].tolist() == [[True] * 3, [True, True, False], [False] * 3]


def test_embeddings_of_text_and_region_tokens():
    model = tiny_model().eval()
    switch_on_visual_norms(model)
    sample = image_sample(num_boxes=3, text_len=5, region_masked=torch.tensor([False, True, False]))
    batch = collate_samples([sample, {"input_ids": torch.arange(5, 9)}])
    emb = model.embed(batch)
    objects, _ = model.encode_regions(batch)
    words = model.bert.embeddings.word_embeddings(batch["input_ids"])
    expect_text = words[0, :5] + model.visual_norms.text(objects[0, 0])
    torch.testing.assert_close(emb["inputs_embeds"][0, :5], expect_text)
    regions = model.visual_norms.region(objects[0])
    torch.testing.assert_close(emb["inputs_embeds"][0, 5], model.img_token + regions[0])
    torch.testing.assert_close(emb["inputs_embeds"][0, 6], model.masked_region_token + regions[1])
    torch.testing.assert_close(emb["inputs_embeds"][0, 8], model.end_token)
    expect_text_only = words[1, :4] + model.visual_norms.text(model.text_only_visual)
    torch.testing.assert_close(emb["inputs_embeds"][1, :4], expect_text_only)


def test_text_region_option_gives_text_tokens_that_regions_feature_and_checks_it_exists():
    model = tiny_model(text_region=1).eval()
    switch_on_visual_norms(model)
    batch = collate_samples([image_sample(num_boxes=3, text_len=5), image_sample(num_boxes=2, text_len=4)])
    emb = model.embed(batch)
    objects, _ = model.encode_regions(batch)
    words = model.bert.embeddings.word_embeddings(batch["input_ids"])
    for b, length in ((0, 5), (1, 4)):
        torch.testing.assert_close(emb["inputs_embeds"][b, :length],
                                   words[b, :length] + model.visual_norms.text(objects[b, 1]))
    with pytest.raises(ValueError, match="TEXT_REGION 1: a sample of this batch has no region 1"):
        model.embed(collate_samples([image_sample(num_boxes=3), image_sample(num_boxes=1)]))
    with pytest.raises(ValueError, match="TEXT_REGION 3"):
        tiny_model(text_region=3).embed(batch)
    with pytest.raises(ValueError, match="expected a region index >= 0, got -1"):
        tiny_model(text_region=-1)


def test_pixel_masking_zeroes_exactly_the_masked_box():
    model = tiny_model().eval()
    seen = capture_backbone_input(model)
    masked = torch.tensor([False, True, False])  # box 1 = [4, 6, 20, 30]
    small = image_sample(num_boxes=3, height=40, width=30, seed=2)  # padded up to the other image's size
    small["boxes"] = torch.tensor([[0, 0, 30, 40], [2.5, 3.2, 9.7, 11.0], [10, 10, 20, 20]])
    batch = collate_samples([image_sample(region_masked=masked), dict(small, region_masked=masked)])
    model.encode_regions(batch)
    x = seen[0]
    normalised = model.detector.preprocess_image(batch["images"].float())
    inside = torch.zeros(64, 48, dtype=torch.bool)
    inside[6:30, 4:20] = True
    assert (x[0][:, inside] == 0).all()
    assert torch.equal(x[0][:, ~inside], normalised[0][:, ~inside])
    # Fractional box: every pixel it touches is blanked (rows 3..10, columns 2..9); padding is zero too.
    inside = torch.zeros(64, 48, dtype=torch.bool)
    inside[3:11, 2:10] = True
    real = torch.zeros(64, 48, dtype=torch.bool)
    real[:40, :30] = True
    assert (x[1][:, inside | ~real] == 0).all()
    assert torch.equal(x[1][:, real & ~inside], normalised[1][:, real & ~inside])


def test_masked_region_pixels_and_label_from_the_caption_data_set(tmp_path):
    """Data set -> collate -> model: the masked box is zero in the backbone input at its resized
    coordinates, untouched elsewhere, and its MRC target is the stored distribution."""
    cv2.imwrite(str(tmp_path / "17.png"), (np.arange(30 * 60 * 3) % 251).astype(np.uint8).reshape(30, 60, 3))
    probs = np.random.default_rng(0).dirichlet(np.ones(NUM_CLASSES), size=1).astype(np.float16)
    record = RoIRecord(
        "17",
        str(tmp_path / "17.png"),
        30,
        60,
        boxes=np.array([[20, 5, 40, 25]], np.float32),
        class_probs=probs,
        object_conf=np.array([0.9], np.float32),
    )
    (tmp_path / "caps.tsv").write_text("17.png\ta red circle\n")
    captions = read_tsv_captions(tmp_path / "caps.tsv", image_root=str(tmp_path))
    data = CaptionPretrainDataset(
        captions, {"17": record}, load_tokenizer(""), ResizeFlip(45, 1000), mrc_prob=1.0, mrc_mask_frac=1.0
    )
    batch = collate_samples([data[0]])
    model = tiny_model(heads=("mrc",)).eval()
    seen = capture_backbone_input(model)
    out = model(batch)
    x = seen[0][0]
    inside = torch.zeros(45, 90, dtype=torch.bool)
    inside[7:38, 30:60] = True  # stored box (20, 5, 40, 25) at scale 1.5 -> (30, 7.5, 60, 37.5)
    assert (x[:, inside] == 0).all()
    normalised = model.detector.preprocess_image(batch["images"].float())[0]
    assert torch.equal(x[:, ~inside], normalised[:, ~inside])
    torch.testing.assert_close(batch["mrc_targets"], torch.from_numpy(probs.astype(np.float32)))
    assert out["mrc_logits"].shape == (1, NUM_CLASSES)


def test_feature_masking_leaves_pixels_and_replaces_the_object_feature():
    model = tiny_model(masking="feature").eval()
    seen = capture_backbone_input(model)
    batch = collate_samples([image_sample(region_masked=torch.tensor([False, True, False]))])
    objects, _ = model.encode_regions(batch)
    assert torch.equal(seen[0][0], model.detector.preprocess_image(batch["images"].float())[0])
    assert torch.equal(objects[0, 1], model.masked_region_feature)
    assert not torch.equal(objects[0, 2], model.masked_region_feature)


def test_one_step_updates_unfrozen_detector_only():
    model = tiny_model().train()
    switch_on_visual_norms(model)
    names = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    frozen_bn = [k for k, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_bn and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    samples = [
        image_sample(
            region_masked=torch.tensor([False, True, False]),
            region_labelled=torch.tensor([False, True, True]),
            mrc_targets=torch.softmax(torch.randn(3, NUM_CLASSES), -1),
            mlm_labels=torch.tensor([-100, 7, -100, 9, -100, -100]),
            answer_pos=2,
            vqa_targets=torch.rand(5),
        ),
    ]
    out = model(collate_samples(samples))
    assert set(out["losses"]) == {"mlm", "mrc", "vqa"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out["loss"].backward()
    optimizer.step()
    after = model.state_dict()

    def changed(prefix):
        keys = [k for k in names if k.startswith(prefix)]
        assert keys, prefix
        return [not torch.equal(before[k], after[k]) for k in keys]

    assert not any(changed("detector.backbone.stem.")) and not any(changed("detector.backbone.res2."))
    for frozen in ("detector.backbone.stem.", "detector.backbone.res2.", "detector.roi_heads.box_predictor."):
        assert all(not names[k].requires_grad for k in names if k.startswith(frozen))
    for trained in ("detector.backbone.res3.", "detector.backbone.res4.", "detector.roi_heads.res5."):
        assert all(changed(trained)), trained
    for module in frozen_bn:
        for buf in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(before[f"{module}.{buf}"], after[f"{module}.{buf}"])


def test_freeze_detector_option_stops_all_detector_updates():
    model = tiny_model(freeze_detector=True)
    assert not any(p.requires_grad for p in model.detector.parameters())
    switch_on_visual_norms(model)
    out = model(collate_samples([image_sample(answer_pos=1, vqa_targets=torch.rand(5))]))
    out["loss"].backward()
    assert model.object_embedding.proj.weight.grad is not None


def test_samples_sharing_an_image_run_the_detector_once_and_match_separate_runs():
    model = tiny_model(heads=("vqa",)).eval()
    switch_on_visual_norms(model)
    seen = capture_backbone_input(model)
    first = image_sample(text_len=5, image_key="img-7", answer_pos=2)
    second = dict(first, input_ids=torch.arange(10, 17), answer_pos=4)
    joint = model(collate_samples([first, second]))
    assert len(seen) == 1 and seen[0].shape[0] == 1
    alone = [model(collate_samples([s]))["vqa_logits"] for s in (first, second)]
    torch.testing.assert_close(joint["vqa_logits"], torch.cat(alone), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="masks regions"):
        collate_samples([first, dict(second, region_masked=torch.tensor([False, True, False]))])


def test_heads_outputs_and_losses():
    model = tiny_model(heads=("mlm", "mrc", "vqa", "ref", "vcr")).eval()
    targets = torch.softmax(torch.randn(3, NUM_CLASSES), -1)
    samples = []
    for i in range(4):  # one VCR question with 4 choices
        samples.append(
            image_sample(
                seed=i,
                answer_pos=3,
                vqa_targets=torch.rand(5),
                ref_labels=torch.tensor([-1.0, 1.0, 0.0]),
                region_labelled=torch.tensor([False, True, True]),
                mrc_targets=targets,
                mlm_labels=torch.tensor([-100, 8, -100, -100, -100, -100]),
                **({"choice_label": 2} if i == 0 else {}),
            )
        )
    batch = collate_samples(samples)
    out = model(batch)
    assert out["vqa_logits"].shape == (4, 5)
    assert out["ref_logits"].shape == (4, 3)
    assert out["vcr_logits"].shape == (1, 4)
    assert out["mrc_logits"].shape == (8, NUM_CLASSES)
    assert out["mlm_logits"].shape == (4, VOCAB) and out["mlm_labels"].tolist() == [8] * 4
    expected_vqa = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            out["vqa_logits"], batch["vqa_targets"], reduction="none"
        )
        .sum(1)
        .mean()
    )
    torch.testing.assert_close(out["losses"]["vqa"], expected_vqa)
    expected_mrc = -(targets[1:].repeat(4, 1) * out["mrc_logits"].log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out["losses"]["mrc"], expected_mrc)
    torch.testing.assert_close(  # VL-BERT's VCR loss: per-choice sigmoid BCE against the one-hot label
        out["losses"]["vcr"],
        torch.nn.functional.binary_cross_entropy_with_logits(out["vcr_logits"],
                                                             torch.tensor([[0.0, 0, 1, 0]])),
    )
    assert set(out["losses"]) == {"mlm", "mrc", "vqa", "ref", "vcr"}
    torch.testing.assert_close(out["loss"], sum(out["losses"].values()))


def test_soft_cross_entropy_without_rows_keeps_the_graph():
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = soft_cross_entropy(logits, torch.zeros(0, 4))
    loss.backward()
    assert loss.item() == 0.0


def test_mlm_head_is_tied_and_keys_follow_detectron2():
    model = tiny_model()
    model.heads["mlm"](torch.zeros(1, 32)).sum().backward()
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    keys = model.state_dict().keys()
    assert "detector.backbone.stem.conv1.weight" in keys
    assert "detector.roi_heads.res5.0.conv1.weight" in keys
    assert "detector.roi_heads.box_predictor.cls_score.weight" in keys
    assert not any("mlm.word_embeddings" in k for k in keys)
    kinds = {VLBert.parameter_kind(k) for k, _ in model.named_parameters()}
    assert kinds == {"detector", "bert", "head"}
    assert model.bert.embeddings.token_type_embeddings.num_embeddings == 3


def test_text_only_batch_needs_no_images():
    model = tiny_model(heads=("mlm",))
    out = model(
        collate_samples(
            [{"input_ids": torch.arange(5, 12), "mlm_labels": torch.tensor([-100, 9] + [-100] * 5)}]
        )
    )
    assert set(out["losses"]) == {"mlm_text"}
    assert out["mlm_logits"].shape == (1, VOCAB) and torch.isfinite(out["loss"])


def test_batch_without_targets_is_a_clear_error():
    model = tiny_model(heads=("mrc",))
    with pytest.raises(ValueError, match="inputs for none"):
        model(collate_samples([image_sample()]))


def test_build_from_config_with_the_embedded_minilm():
    cfg = tiny_detector_cfg(get_train_cfg())
    cfg.MODEL.VL.NUM_ANSWERS = 13
    model = VLBert.build(cfg)
    assert model.bert.config.hidden_size == 384
    rows = model.bert.embeddings.token_type_embeddings.weight
    assert torch.equal(rows[2], rows[0]) and not torch.equal(rows[1], rows[0])
    tok = load_tokenizer("")
    text = encode_vqa_text(tok, "what color is the shape?", 16)
    assert text["input_ids"][text["answer_pos"]].item() == tok.mask_token_id
    assert torch.equal(
        model.end_token.detach(), model.bert.embeddings.word_embeddings.weight[tok.sep_token_id]
    )
    sample = image_sample(**text)
    sample["vqa_targets"] = torch.zeros(13)
    out = model(collate_samples([sample]))
    assert out["vqa_logits"].shape == (1, 13)


def edited_bert_folder(path, model, edit) -> str:
    """`model` saved as a Hugging Face folder at `path`, its tensors then changed in place by `edit`."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def test_bert_folder_with_missing_or_misshapen_tensors_is_an_error(tmp_path, caplog):
    from e2e_vl.modeling.hf import load_bert

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    key = "encoder.layer.0.output.dense.weight"

    def folder(name: str, edit) -> str:
        return edited_bert_folder(tmp_path / name, BertModel(config), edit)

    good = folder("good", lambda t: t.update({"pooler.dense.bias": torch.zeros(16)}))
    with caplog.at_level("WARNING"):
        bert = load_bert(good)
    assert bert.config.hidden_size == 16 and "not used" not in caplog.text  # the pooler is an expected extra
    with caplog.at_level("WARNING"):
        load_bert(folder("extra", lambda t: t.update({"adapter.weight": torch.zeros(2)})))
    assert "1 tensors not used" in caplog.text and "adapter.weight" in caplog.text
    with pytest.raises(ValueError, match=f"missing: \\['{key}'\\]"):
        load_bert(folder("missing", lambda t: t.pop(key)))
    with pytest.raises(ValueError, match=f"wrong shape .*{key} \\(3, 3\\) vs \\(16, 32\\)"):
        load_bert(folder("shape", lambda t: t.update({key: torch.zeros(3, 3)})))


def test_detector_weights_load_and_missing_trunk_tensors_are_an_error(tmp_path, caplog):
    from detector.checkpoint import CheckpointError, save_checkpoint

    cfg = tiny_detector_cfg(get_train_cfg())
    cfg.MODEL.VL.NUM_ANSWERS = 13
    torch.manual_seed(1)
    source = build_detector(tiny_detector_cfg())
    full = {k: v for k, v in source.state_dict().items()}
    save_checkpoint(full, tmp_path / "full.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "full.pth")
    model = VLBert.build(cfg)
    for key in ("backbone.stem.conv1.weight", "roi_heads.res5.0.conv1.weight"):
        assert torch.equal(model.detector.state_dict()[key], full[key])

    # Box predictor absent: the region features do not need it, so it only warns.
    save_checkpoint({k: v for k, v in full.items() if "box_predictor" not in k}, tmp_path / "no_head.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "no_head.pth")
    with caplog.at_level("WARNING"):
        VLBert.build(cfg)
    assert "missing" in caplog.text

    # A res5 tensor absent: every region feature would use random weights, so it is an error.
    save_checkpoint({k: v for k, v in full.items() if k != "roi_heads.res5.0.conv1.weight"},
                    tmp_path / "no_res5.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "no_res5.pth")
    with pytest.raises(CheckpointError, match=r"roi_heads\.res5\.0\.conv1\.weight"):
        VLBert.build(cfg)


def test_running_standardize_first_batch_sets_stats_then_moving_average():
    from e2e_vl.modeling.embeddings import RunningStandardize

    torch.manual_seed(0)
    norm = RunningStandardize(6, momentum=0.25).train()
    first = torch.randn(20, 6) * 3 + 5
    out = norm(first)
    # Normalised with the first batch's own statistics: zero mean, unit (biased) variance per channel.
    assert torch.allclose(out.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(6), atol=1e-4)
    second = torch.randn(10, 6) - 2
    mean0, var0 = norm.running_mean.clone(), norm.running_var.clone()
    out2 = norm(second)
    # The second batch is normalised with the statistics from before it, then they move by 25%.
    assert torch.allclose(out2, (second - mean0) / torch.sqrt(var0 + norm.eps), atol=1e-5)
    assert torch.allclose(norm.running_mean, 0.75 * mean0 + 0.25 * second.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, 0.75 * var0 + 0.25 * second.var(0, unbiased=False), atol=1e-5)
    assert int(norm.num_updates) == 2
    # A row's output does not depend on its batch mates, and evaluation changes nothing.
    norm.eval()
    alone = norm(second[:1])
    assert torch.allclose(alone, norm(second)[:1]) and int(norm.num_updates) == 2
    with pytest.raises(ValueError, match=r"expected features \[N, 6\]"):
        norm(torch.zeros(3, 5))


def test_appearance_norm_option_standardises_region_features_and_is_saved():
    with pytest.raises(ValueError, match="APPEARANCE_NORM"):
        tiny_model(appearance_norm="batch")
    model = tiny_model(appearance_norm="running", visual_scale_object_init=1.0).train()
    assert model.visual_norms.region.weight.eq(1).all() and model.visual_norms.text.weight.eq(0).all()
    assert {"appearance_norm.running_mean", "appearance_norm.running_var"} <= set(model.state_dict())
    batch = collate_samples([image_sample(answer_pos=1, vqa_targets=torch.rand(5)),
                             image_sample(seed=1, answer_pos=1, vqa_targets=torch.rand(5))])
    seen = []
    model.object_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    out = model(batch)
    out["loss"].backward()
    # The first batch sets the statistics, so the appearance entering the projection is standardised.
    appearance = seen[0]
    assert torch.allclose(appearance.mean(0), torch.zeros(appearance.shape[1]), atol=1e-4)
    assert int(model.appearance_norm.num_updates) == 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.detector.roi_heads.res5.parameters())


def test_region_classifier_trains_trunk_and_class_scores_and_checks_labels():
    from e2e_vl.data.collate import collate_region_samples
    from detector.modeling.region_classifier import RegionClassifier

    torch.manual_seed(0)
    model = RegionClassifier(build_detector(tiny_detector_cfg())).train()
    predictor = model.detector.roi_heads.box_predictor
    assert predictor.cls_score.weight.requires_grad and not predictor.bbox_pred.weight.requires_grad
    samples = [dict(image_sample(seed=s), region_labels=torch.tensor([s, -1, 3])) for s in range(2)]
    out = model(collate_region_samples(samples))
    assert out["class_logits"].shape == (6, NUM_CLASSES) and set(out["losses"]) == {"cls"}
    out["loss"].backward()
    assert predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.detector.roi_heads.res5[0].conv1.weight.grad.abs().sum() > 0
    samples[0]["region_labels"] = torch.tensor([0, NUM_CLASSES - 1, 1])  # index C is background: not a label
    with pytest.raises(ValueError, match=r"region_labels must lie in \[-1, 9\]"):
        model(collate_region_samples(samples))


def test_mlm_head_loads_old_gamma_beta_names_and_refuses_a_partial_head(tmp_path):
    """bert-base-uncased's own files name LayerNorm tensors gamma/beta (TF conversion); transformers renames
    them for the encoder, and the MLM head, read tensor by tensor, must too rather than keep its init."""
    from transformers import BertForMaskedLM

    from detector.checkpoint import CheckpointError
    from e2e_vl.modeling.heads import MLMHead
    from e2e_vl.modeling.hf import load_bert, load_mlm_head_weights

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    source = BertForMaskedLM(config)
    with torch.no_grad():
        for p in source.cls.predictions.transform.LayerNorm.parameters():
            p.uniform_(-1, 1)

    def folder(name: str, edit) -> str:
        def old_names(tensors: dict) -> None:
            for key in [k for k in tensors if k.endswith(("LayerNorm.weight", "LayerNorm.bias"))]:
                tensors[key.replace(".weight", ".gamma").replace(".bias", ".beta")] = tensors.pop(key)
            edit(tensors)

        return edited_bert_folder(tmp_path / name, source, old_names)

    old = folder("old_names", lambda t: None)
    assert torch.equal(load_bert(old).embeddings.LayerNorm.weight, source.bert.embeddings.LayerNorm.weight)
    heads = {"mlm": MLMHead(config, torch.nn.Embedding(50, 16))}
    used = load_mlm_head_weights(heads, old)
    assert "transform.LayerNorm.weight" in used and "transform.LayerNorm.bias" in used
    expected = source.cls.predictions.transform.LayerNorm
    assert torch.equal(heads["mlm"].transform.LayerNorm.weight, expected.weight)
    assert torch.equal(heads["mlm"].transform.LayerNorm.bias, expected.bias)
    assert torch.equal(heads["mlm"].bias, source.cls.predictions.bias)

    partial = folder("partial", lambda t: t.pop("cls.predictions.transform.dense.weight"))
    with pytest.raises(CheckpointError, match="transform.dense.weight"):
        load_mlm_head_weights({"mlm": MLMHead(config, torch.nn.Embedding(50, 16))}, partial)
