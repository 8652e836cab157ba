"""Detector architecture: Detectron2 key names/shapes of the VG R101-C4 model, and the tiny model's
behaviour."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detector.config import load_cfg
from detector.modeling import GeneralizedRCNN, build_detector
from detector.modeling.resnet import BasicStem

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vg"
VG = CONFIGS / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml"
TINY = CONFIGS / "tiny_R_18_C4_attr.yaml"


def _conv(prefix: str, out_c: int, in_c: int, k: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (out_c, in_c, k, k)}
    shapes.update({f"{prefix}.norm.{n}": (out_c,) for n in ("weight", "bias", "running_mean", "running_var")})
    return shapes


def _bottleneck_stage(prefix: str, blocks: int, in_c: int, mid: int,
                      out_c: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(blocks):
        p = f"{prefix}.{i}"
        if i == 0:
            shapes.update(_conv(f"{p}.shortcut", out_c, in_c, 1))
        shapes.update(_conv(f"{p}.conv1", mid, in_c if i == 0 else out_c, 1))
        shapes.update(_conv(f"{p}.conv2", mid, mid, 3))
        shapes.update(_conv(f"{p}.conv3", out_c, mid, 1))
    return shapes


def released_vg_layout() -> dict[str, tuple[int, ...]]:
    """The tensors of faster_rcnn_from_caffe_attr.pkl, written out from the published architecture."""
    shapes = _conv("backbone.stem.conv1", 64, 3, 7)
    shapes.update(_bottleneck_stage("backbone.res2", 3, 64, 64, 256))
    shapes.update(_bottleneck_stage("backbone.res3", 4, 256, 128, 512))
    shapes.update(_bottleneck_stage("backbone.res4", 23, 512, 256, 1024))
    shapes.update(_bottleneck_stage("roi_heads.res5", 3, 1024, 512, 2048))
    rpn = "proposal_generator.rpn_head"
    shapes.update({f"{rpn}.conv.weight": (512, 1024, 3, 3), f"{rpn}.conv.bias": (512,),
                   f"{rpn}.objectness_logits.weight": (12, 512, 1, 1), f"{rpn}.objectness_logits.bias": (12,),
                   f"{rpn}.anchor_deltas.weight": (48, 512, 1, 1), f"{rpn}.anchor_deltas.bias": (48,)})
    bp = "roi_heads.box_predictor"
    shapes.update({f"{bp}.cls_score.weight": (1601, 2048), f"{bp}.cls_score.bias": (1601,),
                   f"{bp}.bbox_pred.weight": (6400, 2048), f"{bp}.bbox_pred.bias": (6400,),
                   f"{bp}.cls_embedding.weight": (1601, 256),
                   f"{bp}.fc_attr.weight": (512, 2304), f"{bp}.fc_attr.bias": (512,),
                   f"{bp}.attr_score.weight": (401, 512), f"{bp}.attr_score.bias": (401,)})
    return shapes


def _meta_model(path: Path, *overrides: str) -> GeneralizedRCNN:
    with torch.device("meta"):  # no memory, no init cost: only names and shapes
        return GeneralizedRCNN(load_cfg(path, list(overrides)))


def test_vg_r101_state_dict_matches_released_layout():
    sd = _meta_model(VG).state_dict()
    expected = released_vg_layout()
    assert len(expected) == 535
    assert sorted(sd) == sorted(expected)
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in sd.items() if tuple(v.shape) != expected[k]}
    assert not wrong
    assert sum(v.numel() for v in sd.values()) == sum(torch.Size(s).numel() for s in expected.values())
    assert tuple(sd["backbone.res4.22.conv3.weight"].shape) == (1024, 256, 1, 1)


def test_e2e_variant_has_same_layout_and_legacy_roialign():
    model = _meta_model(CONFIGS / "vlbert_e2e_R_101_C4.yaml")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == released_vg_layout()
    pooler = model.roi_heads.pooler
    assert (pooler.pooler_type, pooler.output_size, pooler.sampling_ratio) == ("ROIAlign", (14, 14), 1)
    assert pooler.scale == 1 / 16


@pytest.mark.parametrize("depth,res4_key,shape", [
    (18, "backbone.res4.1.conv2.weight", (256, 256, 3, 3)),
    (34, "backbone.res4.5.conv2.weight", (256, 256, 3, 3)),
    (50, "backbone.res4.5.conv3.weight", (1024, 256, 1, 1)),
    (152, "backbone.res3.7.conv3.weight", (512, 128, 1, 1)),
])
def test_other_depths_build(depth, res4_key, shape):
    over = ["MODEL.RESNETS.DEPTH", str(depth)]
    if depth < 50:
        over += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    sd = _meta_model(VG, *over).state_dict()
    assert tuple(sd[res4_key].shape) == shape


def test_vg_res5_keeps_14x14_and_dilates():
    model = _meta_model(VG)
    block = model.roi_heads.res5[0]
    assert block.conv1.stride == (1, 1) and block.shortcut.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in model.roi_heads.res5)


def test_stem_variants_differ_on_odd_sizes():
    caffe, basic = BasicStem(caffe_maxpool=True), BasicStem(caffe_maxpool=False)
    basic.load_state_dict(caffe.state_dict())
    # 301 -> conv7/2 -> 151 -> pool: caffe ceil((151-3)/2)+1 = 75, stock floor((151+2-3)/2)+1 = 76
    x = torch.randn(1, 3, 301, 301)
    assert caffe(x).shape[-2:] == (75, 75) and basic(x).shape[-2:] == (76, 76)
    # 600 -> 300 -> both 150
    y = torch.randn(1, 3, 600, 600)
    assert caffe(y).shape[-2:] == basic(y).shape[-2:] == (150, 150)
    # the caffe pool takes its window from the top-left corner without padding
    t = torch.arange(25.0).view(1, 1, 5, 5)
    caffe.conv1 = torch.nn.Identity()
    assert torch.equal(caffe(t)[0, 0], torch.tensor([[12.0, 14.0], [22.0, 24.0]]))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="POOLER_TYPE"):
        _meta_model(VG, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV3")
    with pytest.raises(ValueError, match="DEPTH"):
        _meta_model(VG, "MODEL.RESNETS.DEPTH", "77")
    with pytest.raises(ValueError, match="NORM"):
        _meta_model(VG, "MODEL.RESNETS.NORM", "LN")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_detector(load_cfg(TINY))
    for p in model.parameters():  # non-trivial weights so scores are not uniform
        torch.nn.init.normal_(p, std=0.05) if p.dim() < 4 else None
    return model


def _images(n=2, h=96, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 255


def test_tiny_fast_rcnn_shapes_and_probabilities(tiny):
    x = tiny.preprocess_image(_images())
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 50.0], [10.0, 12.0, 100.0, 90.0]]),
             torch.tensor([[5.0, 5.0, 30.0, 60.0]])]
    out = tiny.fast_rcnn(x, boxes)
    assert out["features"].shape == (3, 512)
    assert out["class_logits"].shape == (3, 11) and out["box_deltas"].shape == (3, 40)
    assert out["attr_logits"].shape == (3, 7)
    torch.testing.assert_close(out["class_probs"].sum(1), torch.ones(3))
    torch.testing.assert_close(out["attr_probs"].sum(1), torch.ones(3))


def test_tiny_fast_rcnn_batching_does_not_change_rows(tiny):
    x = tiny.preprocess_image(_images())
    b0 = torch.tensor([[0.0, 0.0, 50.0, 50.0], [10.0, 12.0, 100.0, 90.0]])
    b1 = torch.tensor([[5.0, 5.0, 30.0, 60.0]])
    both = tiny.fast_rcnn(x, [b0, b1])
    alone = tiny.fast_rcnn(x[1:], [b1])
    torch.testing.assert_close(both["features"][2:], alone["features"], atol=1e-5, rtol=1e-5)


def test_tiny_zero_boxes_and_boxes_outside(tiny):
    x = tiny.preprocess_image(_images())
    out = tiny.fast_rcnn(x, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out["features"].shape == (0, 512) and out["class_probs"].shape == (0, 11)
    outside = torch.tensor([[-50.0, -40.0, 300.0, 400.0], [500.0, 500.0, 600.0, 600.0]])
    out = tiny.fast_rcnn(x[:1], [outside])
    assert torch.isfinite(out["features"]).all() and out["features"].shape == (2, 512)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        tiny.fast_rcnn(x[:1], [torch.tensor([[10.0, 10.0, 5.0, 20.0]])])
    with pytest.raises(ValueError, match="shape"):
        tiny.fast_rcnn(x[:1], [torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="box tensors"):
        tiny.fast_rcnn(x, [torch.zeros(0, 4)])


def test_tiny_attribute_head_uses_given_classes(tiny):
    x = tiny.preprocess_image(_images(1))
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 50.0], [10.0, 12.0, 100.0, 90.0]])]
    auto = tiny.fast_rcnn(x, boxes)
    given = tiny.fast_rcnn(x, boxes, classes=[auto["class_logits"].argmax(1)])
    torch.testing.assert_close(auto["attr_logits"], given["attr_logits"])
    other = tiny.fast_rcnn(x, boxes, classes=[(auto["class_logits"].argmax(1) + 1) % 11])
    assert not torch.allclose(auto["attr_logits"], other["attr_logits"])


def test_tiny_faster_rcnn_inference_maps_to_output_size(tiny):
    x = tiny.preprocess_image(_images(1))
    (raw,) = tiny.inference(x, [(96, 128)])
    (mapped,) = tiny.inference(x, [(96, 128)], output_sizes=[(192, 256)])
    n = len(raw["boxes"])
    assert n > 0 and n <= 100
    assert (set(raw) >= {"boxes", "scores", "classes", "class_probs", "attr_probs", "features",
                         "proposal_boxes"})
    assert raw["features"].shape == (n, 512) and raw["class_probs"].shape == (n, 11)
    assert raw["attr_probs"].shape == (n, 7)
    assert (raw["scores"] > 0.05).all() and (raw["classes"] < 10).all()
    assert (raw["scores"][:-1] >= raw["scores"][1:]).all()
    torch.testing.assert_close(raw["scores"], raw["class_probs"][torch.arange(n), raw["classes"]])
    assert ((raw["boxes"][:, 2] <= 128).all() and (raw["boxes"][:, 3] <= 96).all()
            and (raw["boxes"] >= 0).all())
    torch.testing.assert_close(mapped["boxes"],
                               raw["boxes"][(raw["boxes"][:, 2:] > raw["boxes"][:, :2]).all(1)] * 2)
    # the features reported for a detection are those of its proposal
    again = tiny.fast_rcnn(x, [raw["proposal_boxes"]])
    torch.testing.assert_close(again["features"], raw["features"], atol=1e-4, rtol=1e-4)


def test_anchor_order_and_offset():
    from detector.modeling.rpn import DefaultAnchorGenerator

    gen = DefaultAnchorGenerator([32, 64], [0.5, 1.0, 2.0], stride=16, offset=0.0)
    cell = gen.cell_anchors
    assert cell.shape == (6, 4)
    widths, heights = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    torch.testing.assert_close(widths * heights, torch.tensor([32.0**2] * 3 + [64.0**2] * 3))  # size-major
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0] * 2))
    torch.testing.assert_close(cell[:, :2] + cell[:, 2:], torch.zeros(6, 2))  # centred on 0
    anchors = gen(torch.zeros(1, 1, 2, 3))  # positions row-major, anchors innermost
    assert anchors.shape == (2 * 3 * 6, 4)
    torch.testing.assert_close(anchors[6] - cell[0], torch.tensor([16.0, 0.0, 16.0, 0.0]))
    torch.testing.assert_close(anchors[18] - cell[0], torch.tensor([0.0, 16.0, 0.0, 16.0]))
    shifted = DefaultAnchorGenerator([32], [1.0], stride=16, offset=0.5)(torch.zeros(1, 1, 1, 1))
    torch.testing.assert_close(shifted[0], torch.tensor([-8.0, -8.0, 24.0, 24.0]))


def test_box_coder_round_trip_and_clamp():
    from detector.modeling.box_regression import DEFAULT_SCALE_CLAMP, Box2BoxTransform

    coder = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    src = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 16.0, 16.0]])
    tgt = torch.tensor([[12.0, 18.0, 60.0, 70.0], [2.0, 4.0, 30.0, 20.0]])
    torch.testing.assert_close(coder.apply_deltas(coder.get_deltas(src, tgt), src), tgt)
    huge = coder.apply_deltas(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    side = 16 * torch.exp(torch.tensor(DEFAULT_SCALE_CLAMP))
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], side)  # clamped at log(1000/16): 1000 px
    two_class = coder.apply_deltas(torch.zeros(1, 8), src[:1])
    torch.testing.assert_close(two_class, src[:1].repeat(1, 2))


def test_tiny_fast_rcnn_trains_the_unfrozen_stages():
    torch.manual_seed(0)
    model = build_detector(load_cfg(TINY)).train()
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.res2.parameters())
    x = model.preprocess_image(_images(1))
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 50.0], [10.0, 12.0, 100.0, 90.0]])]
    labels = torch.tensor([3, 10])
    out = model.fast_rcnn(x, boxes, classes=[labels])
    loss = (torch.nn.functional.cross_entropy(out["class_logits"], labels)
            + out["attr_logits"].logsumexp(1).mean())
    loss.backward()
    for name in ("backbone.res3.0.conv1.weight", "backbone.res4.1.conv2.weight",
                 "roi_heads.res5.2.conv3.weight", "roi_heads.box_predictor.cls_score.weight",
                 "roi_heads.box_predictor.cls_embedding.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.get_parameter("backbone.stem.conv1.weight").grad is None


def test_optimize_for_inference_keeps_outputs():
    torch.manual_seed(0)
    model = build_detector(load_cfg(TINY))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # statistics that keep activations O(1) so the comparison is meaningful
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.3 + 0.2)
            elif name.endswith(("norm.bias", "running_mean")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    x = model.preprocess_image(_images(1))
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 50.0], [10.0, 12.0, 100.0, 90.0]])]
    before = model.fast_rcnn(x, boxes)
    model.optimize_for_inference(torch.float32)
    assert not any(".norm." in k for k in model.state_dict())
    assert "backbone.res4.0.conv1.bias" in model.state_dict()
    after = model.fast_rcnn(x, boxes)
    scale = before["features"].abs().max()
    torch.testing.assert_close(after["features"] / scale, before["features"] / scale, atol=1e-5, rtol=0)
    torch.testing.assert_close(after["class_logits"], before["class_logits"], atol=1e-4, rtol=1e-4)
    model.optimize_for_inference(torch.bfloat16)  # bf16 weights, autocast inside the model
    low = model.fast_rcnn(x, boxes)
    assert low["features"].dtype == torch.bfloat16 and low["class_probs"].dtype == torch.float32
    torch.testing.assert_close(low["features"].float() / scale, before["features"] / scale, atol=5e-2, rtol=0)
    (det_low,) = model.inference(x, [(96, 128)])
    assert det_low["boxes"].dtype == torch.float32 and len(det_low["boxes"]) > 0
    res4 = model.features(x)  # the parts called one by one (as VL-BERT and the extractor do) work too
    assert res4.dtype == torch.bfloat16
    (proposals,) = model.proposal_generator(res4, [(96, 128)])
    assert len(proposals["proposal_boxes"]) > 0 and torch.isfinite(proposals["proposal_boxes"].float()).all()
    with pytest.raises(ValueError, match="dtype"):
        model.optimize_for_inference(torch.int8)


def test_pad_images_and_box_helpers():
    from detector.structures import clip_boxes, nonempty, pad_images

    a, b = torch.ones(3, 4, 5), torch.full((3, 6, 2), 2.0)
    batch, sizes = pad_images([a, b])
    assert batch.shape == (2, 3, 6, 5) and sizes == [(4, 5), (6, 2)]
    assert batch[0, :, 4:].abs().sum() == 0 and batch[1, :, :, 2:].abs().sum() == 0
    assert pad_images([a], size_divisibility=4)[0].shape == (1, 3, 4, 8)
    with pytest.raises(ValueError, match="image 1"):
        pad_images([a, torch.ones(1, 4, 5)])
    boxes = torch.tensor([[-5.0, 2.0, 30.0, 8.0], [3.0, 3.0, 3.0, 9.0]])
    torch.testing.assert_close(clip_boxes(boxes, (6, 20)),
                               torch.tensor([[0.0, 2.0, 20.0, 6.0], [3.0, 3.0, 3.0, 6.0]]))
    assert nonempty(boxes).tolist() == [True, False]


def test_no_detections_keep_shapes():
    torch.manual_seed(0)
    model = build_detector(load_cfg(TINY, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]))
    x = model.preprocess_image(_images(2))
    for det in model.inference(x, [(96, 128), (80, 100)], output_sizes=[(192, 256), (80, 100)]):
        assert det["boxes"].shape == (0, 4) and det["features"].shape == (0, 512)
        assert det["class_probs"].shape == (0, 11) and det["attr_probs"].shape == (0, 7)
        assert det["classes"].dtype == torch.int64


@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_other_norms_build_and_freeze(norm):
    from detector.layers import FrozenBatchNorm2d

    model = build_detector(load_cfg(TINY, ["MODEL.RESNETS.NORM", norm]))
    stem_norm = model.backbone.stem.conv1.norm
    res3_norm = model.backbone.res3[0].conv1.norm
    if norm == "":
        assert stem_norm is None and res3_norm is None
    elif norm == "BN":  # frozen stages become FrozenBN; trainable ones keep BatchNorm
        assert isinstance(stem_norm, FrozenBatchNorm2d) and isinstance(res3_norm, torch.nn.BatchNorm2d)
    else:
        assert isinstance(res3_norm, torch.nn.GroupNorm) and res3_norm.num_groups == 32
    out = model.fast_rcnn(model.preprocess_image(_images(1)), [torch.tensor([[0.0, 0.0, 40.0, 40.0]])])
    assert torch.isfinite(out["features"]).all()
