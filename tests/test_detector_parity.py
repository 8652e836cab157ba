"""Numerical parity of our C4 R-CNN with Detectron2.

Detectron2 cannot be installed in CI, so `tests/data/detector/parity_*.json` hold reduced outputs that
Detectron2 produced for small models (see tests/data/detector/README.md). The weights are not stored:
`parity_state_dict` regenerates them from (seed, key name, shape), so both implementations run exactly
the same tensors. Each golden covers, on a two-image padded batch:
- res4 (sums and a corner), Fast R-CNN on given boxes (region features, class logits, box deltas,
  attribute logits), RPN proposals and Faster R-CNN detections (boxes, scores, classes, class and
  attribute probabilities, the features and proposal of each detection);
- the gradient norm of every trainable parameter through Fast R-CNN (the path VL-BERT trains).
`predictor_*.json` follows Detectron2's DefaultPredictor from a BGR uint8 image to detections in
original pixels. Outputs are compared in fp32 with max abs diff <= 1e-4 (sums over hundreds of values:
plus relative 1e-5), gradient norms with relative 1e-4.

With Detectron2 importable, the `detectron2`-marked tests also compare live against it on the
configurations stock Detectron2 can express (the VG caffe stem, dilated res5 and attribute head are
py-bottom-up-attention extensions, covered by the goldens only).
"""
from __future__ import annotations

import functools
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "data" / "detector"
GOLDENS = sorted(GOLDEN_DIR.glob("parity_*.json"))
ATOL = 1e-4
SUM_RTOL = 1e-5
GRAD_RTOL = 1e-4
# Weight gains that keep random-weight outputs O(1), RPN deltas moderate and class scores peaked.
_WEIGHT_GAIN = {"anchor_deltas": 0.2, "cls_score": 15.0, "bbox_pred": 3.0}


# -- deterministic inputs shared with the golden producer ---------------------------------------------
def parity_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights that depend only on (seed, key name, shape), whatever the implementation.

    Each tensor has its own generator seeded from its key, so adding or removing a key changes no
    other tensor. FrozenBN scales in [0.2, 0.5] and fan-in scaled convs keep activations O(1) through
    the ResNet; the class-score gain makes softmax scores peaked, keeping thresholds and NMS away
    from near-ties that 1e-6 rounding could flip.
    """
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        leaf = name.rsplit(".", 1)[-1]
        if ".norm." in name:
            if leaf == "weight":
                tensor = torch.rand(shape, generator=gen) * 0.3 + 0.2
            elif leaf == "running_var":
                tensor = torch.rand(shape, generator=gen) + 0.5
            else:
                tensor = torch.randn(shape, generator=gen) * 0.1
        elif leaf == "weight" and len(shape) >= 2:
            tensor = torch.randn(shape, generator=gen)
            if "cls_embedding" not in name:
                tensor = tensor / math.prod(shape[1:]) ** 0.5 * _WEIGHT_GAIN.get(name.split(".")[-2], 1.0)
        else:
            tensor = torch.randn(shape, generator=gen) * 0.1
        out[name] = tensor
    return out


def parity_images(seed: int, batch_shape: list[int]) -> torch.Tensor:
    """Random 0..255 images (B, 3, H, W), channel order as the model expects."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, tuple(batch_shape), generator=gen).float()


def parity_uint8_image(seed: int, shape: list[int]) -> np.ndarray:
    """A random HxWx3 uint8 BGR image, as a user would pass to the predictor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, tuple(shape), generator=gen, dtype=torch.uint8).numpy()


def zero_padding(images: torch.Tensor, image_sizes: list[list[int]]) -> torch.Tensor:
    """Zero everything outside each image's (h, w): Detectron2 pads the *normalised* images with 0."""
    images = images.clone()
    for i, (h, w) in enumerate(image_sizes):
        images[i, :, h:, :] = 0
        images[i, :, :, w:] = 0
    return images


def parity_loss(outputs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """A scalar touching every Fast R-CNN output with fixed random weights, to compare gradients."""
    loss = torch.zeros((), dtype=torch.float64, device=outputs["features"].device)
    for key in ("features", "class_logits", "box_deltas", "attr_logits"):
        if outputs.get(key) is not None:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            weight = torch.randn(outputs[key].shape, generator=gen).to(outputs[key].device)
            loss = loss + (outputs[key] * weight).sum()
    return loss


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of every parameter gradient (parameters frozen by FREEZE_AT have none)."""
    return {name: float(p.grad.double().norm()) for name, p in model.named_parameters() if p.grad is not None}


# -- reduction of full outputs to what a golden stores --------------------------------------------------
def _rows(t: torch.Tensor) -> list:
    return t.detach().double().tolist()


def summarize(outputs: dict[str, Any], stored: dict[str, int]) -> dict[str, Any]:
    """Reduce full outputs (see `our_outputs`) to the golden layout: leading rows/channels and sums."""
    nf, npr, nd = stored["features"], stored["proposals"], stored["detections"]
    res4, fast = outputs["res4"], outputs["fast"]
    out: dict[str, Any] = {
        "res4": {"shape": list(res4.shape), "sum": float(res4.double().sum()),
                 "abs_sum": float(res4.double().abs().sum()), "corner": _rows(res4[:, :4, 0, :4])},
        "fast": {"features": _rows(fast["features"][:, :nf]),
                 "features_sum": _rows(fast["features"].double().sum(1)),
                 "class_logits": _rows(fast["class_logits"]),
                 "box_deltas": _rows(fast["box_deltas"][:, :8])},
        "proposals": [{"count": len(boxes), "boxes": _rows(boxes[:npr]),
                       "objectness_logits": _rows(logits[:npr])}
                      for boxes, logits in outputs["proposals"]],
    }
    if fast.get("attr_logits") is not None:
        out["fast"]["attr_logits"] = _rows(fast["attr_logits"])
    out["detections"] = [summarize_detections(det, nd, nf) for det in outputs["detections"]]
    return out


def summarize_detections(det: dict[str, torch.Tensor], nd: int, nf: int) -> dict[str, Any]:
    """One image's detections: count, then the leading `nd` rows (features: `nf` channels + sum)."""
    entry = {"count": len(det["scores"]), "boxes": _rows(det["boxes"][:nd]),
             "scores": _rows(det["scores"][:nd]), "classes": det["classes"][:nd].tolist(),
             "class_probs": _rows(det["class_probs"][:nd]), "features": _rows(det["features"][:nd, :nf]),
             "features_sum": _rows(det["features"][:nd].double().sum(1))}
    if "proposal_boxes" in det:
        entry["proposal_boxes"] = _rows(det["proposal_boxes"][:nd])
    if "attr_probs" in det:
        entry["attr_probs"] = _rows(det["attr_probs"][:nd])
    return entry


_EXACT = {"count", "classes", "shape", "resized_shape"}
_SUMS = {"sum", "abs_sum", "features_sum"}


def compare(ours: Any, ref: Any, path: str, diffs: dict[str, float]) -> None:
    """Walk both summaries; exact for counts/classes/shapes, 1e-4 abs for values (sums: + rel 1e-5).

    Records the max abs diff of every leaf in `diffs`; raises AssertionError naming the first mismatch.
    """
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and set(ours) == set(ref), \
            f"{path}: keys {sorted(ours)} != Detectron2's {sorted(ref)}"
        for key in ref:
            compare(ours[key], ref[key], f"{path}.{key}", diffs)
        return
    leaf = path.rsplit(".", 1)[-1].split("[")[0]
    if leaf in _EXACT:
        assert ours == ref, f"{path}: {ours} != Detectron2's {ref}"
        return
    if isinstance(ref, list) and ref and isinstance(ref[0], dict):
        assert len(ours) == len(ref), f"{path}: {len(ours)} entries != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            compare(a, b, f"{path}[{i}]", diffs)
        return
    a = torch.tensor(ours, dtype=torch.float64)
    b = torch.tensor(ref, dtype=torch.float64)
    assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != Detectron2's {tuple(b.shape)}"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    key = re.sub(r"\[\d+\]", "", path)
    diffs[key] = max(diffs.get(key, 0.0), diff)
    tol = ATOL + (SUM_RTOL * b.abs().max().item() if leaf in _SUMS and b.numel() else 0.0)
    assert diff <= tol, f"{path}: max abs diff {diff:.3g} > {tol:.3g} against Detectron2"


# -- our model --------------------------------------------------------------------------------------------
def parity_cfg(golden: dict[str, Any]):
    from detector.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_dict(golden["config"], source="golden config")
    cfg.MODEL.DEVICE = "cpu"
    return cfg.freeze()


def load_parity_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(parity_state_dict(shapes, seed), strict=True)
    return model.float().eval()


def build_ours(golden: dict[str, Any]):
    from detector.modeling.rcnn import build_detector

    return load_parity_weights(build_detector(parity_cfg(golden)), golden["seed"])


def _inputs(model, golden: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The golden's normalised, zero-padded batch and given boxes, on the model's device."""
    raw = parity_images(golden["image_seed"], golden["batch_shape"]).to(model.device)
    images = zero_padding(model.preprocess_image(raw), golden["image_sizes"])
    return images, [torch.tensor(b, dtype=torch.float32, device=model.device) for b in golden["boxes"]]


@torch.no_grad()
def our_outputs(model, golden: dict[str, Any]) -> dict[str, Any]:
    """Run every path the golden covers: res4, Fast R-CNN on its boxes, RPN, Faster R-CNN inference."""
    images, boxes = _inputs(model, golden)
    fast = model.fast_rcnn(images, boxes)
    res4 = model.features(images)
    image_sizes = [tuple(s) for s in golden["image_sizes"]]
    proposals = model.proposal_generator(res4, image_sizes)
    detections = model.inference(images, image_sizes)
    return {"res4": res4, "fast": fast,
            "proposals": [(p["proposal_boxes"], p["objectness_logits"]) for p in proposals],
            "detections": detections}


def our_grad_norms(model, golden: dict[str, Any]) -> dict[str, float]:
    """Backward of `parity_loss` through Fast R-CNN on the golden's boxes (the path VL-BERT trains)."""
    images, boxes = _inputs(model, golden)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        parity_loss(model.fast_rcnn(images, boxes), golden["seed"]).backward()
    return grad_norms(model)


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _golden_and_model(path: Path):
    """Each golden's model is built once per session (weights are never modified by the tests)."""
    golden = _load(path)
    return golden, build_ours(golden)


@pytest.fixture(scope="module", params=GOLDENS, ids=[p.stem.removeprefix("parity_") for p in GOLDENS])
def golden_run(request):
    golden, model = _golden_and_model(request.param)
    return golden, summarize(our_outputs(model, golden), golden["stored"])


def test_goldens_present():
    """Stock C4 (ROIAlignV2), R18 (basic blocks), VG ROIPool + attributes, VG legacy ROIAlign + attributes."""
    names = {p.stem for p in GOLDENS}
    assert names == {"parity_r50_c4_alignv2", "parity_r18_c4_alignv2", "parity_r50_vg_roipool_attr",
                     "parity_r50_vg_align_legacy_attr"}, names


@pytest.mark.parametrize("section", ["res4", "fast", "proposals", "detections"])
def test_matches_detectron2_golden(golden_run, section):
    golden, ours = golden_run
    diffs: dict[str, float] = {}
    compare(ours[section], golden[section], section, diffs)
    assert diffs, f"nothing compared in {section}"


def test_optimized_fp32_model_keeps_detectron2_parity():
    """optimize_for_inference(float32) (folded BatchNorm, channels-last) still meets the 1e-4 bar."""
    for path in GOLDENS:
        golden = _load(path)
        model = build_ours(golden).optimize_for_inference(torch.float32)
        ours = summarize(our_outputs(model, golden), golden["stored"])
        for section in ("res4", "fast", "proposals", "detections"):
            compare(ours[section], golden[section], f"{path.stem}.{section}", {})


def test_bfloat16_model_stays_close_to_detectron2():
    """optimize_for_inference(bfloat16) on every pooler (ROIPool included) runs and stays near Detectron2.

    bf16 keeps ~3 significant digits, so this bounds drift rather than proving parity: region features
    (O(1)) within 0.05 and class logits within 0.25 of Detectron2's fp32 values.
    """
    for path in GOLDENS:
        golden = _load(path)
        model = build_ours(golden).optimize_for_inference(torch.bfloat16)
        images, boxes = _inputs(model, golden)
        with torch.no_grad():
            fast = model.fast_rcnn(images, boxes)
            detections = model.inference(images, [tuple(s) for s in golden["image_sizes"]])
        nf = golden["stored"]["features"]
        features = torch.tensor(golden["fast"]["features"])
        logits = torch.tensor(golden["fast"]["class_logits"])
        assert (fast["features"][:, :nf].float() - features).abs().max() <= 0.05, path.name
        assert (fast["class_logits"].float() - logits).abs().max() <= 0.25, path.name
        assert all(len(d["scores"]) > 0 for d in detections), path.name


@pytest.mark.cuda
def test_matches_detectron2_goldens_on_cuda():
    """The same goldens on the GPU (our CUDA RoIAlign, cuDNN convs with TF32 off), outputs and gradients."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for path in GOLDENS:
            golden = _load(path)
            model = build_ours(golden).to("cuda")
            ours = summarize(our_outputs(model, golden), golden["stored"])
            for section in ("res4", "fast", "proposals", "detections"):
                compare(ours[section], golden[section], f"{path.stem}.{section}", {})
            _check_grad_norms(our_grad_norms(model, golden), golden["grad_norms"], path.name)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fast_rcnn_gradients_match_detectron2_golden():
    """Gradients of every trainable parameter (res3..res5, heads) equal Detectron2's, relative 1e-4.

    Covers the backward of our RoIAlign/ROIPool, res5 and the attribute head; FREEZE_AT=2 must leave
    the stem and res2 without gradients, as Detectron2 does.
    """
    for path in GOLDENS:
        golden, model = _golden_and_model(path)
        _check_grad_norms(our_grad_norms(model, golden), golden["grad_norms"], path.name)


def _check_grad_norms(ours: dict[str, float], ref: dict[str, float], name: str) -> None:
    assert set(ours) == set(ref), f"{name}: parameters with gradients differ: {sorted(set(ours) ^ set(ref))}"
    for key, value in ref.items():
        assert abs(ours[key] - value) <= GRAD_RTOL * max(value, 1.0), \
            f"{name}: grad norm of {key} {ours[key]} != Detectron2's {value}"


def test_golden_detections_are_nontrivial():
    """Guard against goldens that would pass vacuously (no detections, no proposals)."""
    for path in GOLDENS:
        golden = _load(path)
        for proposals, detections in zip(golden["proposals"], golden["detections"]):
            assert proposals["count"] >= 10, path.name
            assert detections["count"] >= 5, path.name
        classes = {c for detections in golden["detections"] for c in detections["classes"]}
        assert len(classes) >= 2, f"{path.name}: per-class NMS needs several detected classes, got {classes}"


def test_predictor_matches_detectron2_default_predictor():
    """BGR uint8 image -> resize (Detectron2's PIL bilinear) -> detections in original pixels, and
    Fast R-CNN on boxes given in original pixels.

    The golden follows Detectron2's DefaultPredictor: ResizeShortestEdge to 96 (max 160), the model,
    detector_postprocess to the original size; the second image is limited by the max size.
    """
    from detector.predictor import DetectorPredictor
    from detector.transforms import get_output_shape

    golden = _load(GOLDEN_DIR / "predictor_r50_vg_roipool_attr.json")
    predictor = DetectorPredictor(parity_cfg(golden))
    load_parity_weights(predictor.model, golden["seed"])
    stored = golden["stored"]
    nf = stored["features"]
    for spec, ref in zip(golden["images"], golden["results"], strict=True):
        image = parity_uint8_image(spec["seed"], spec["shape"])
        (new_h, new_w), _ = get_output_shape(*spec["shape"][:2], predictor.min_size, predictor.max_size)
        det = predictor(image)
        det.pop("proposal_boxes")  # Detectron2 does not rescale proposals: compared in the batch tests
        given = ref.pop("given")
        ours = {"resized_shape": [new_h, new_w, 3], **summarize_detections(det, stored["detections"], nf)}
        compare(ours, ref, f"image{spec['shape']}", {})
        # Fast R-CNN on boxes in original pixels, scaled per axis like py-bottom-up-attention's demo.
        fast = predictor.fast_rcnn(image, np.array(given.pop("boxes"), dtype=np.float32))
        ours = {"features": _rows(fast["features"][:, :nf]),
                "features_sum": _rows(fast["features"].double().sum(1)),
                "class_logits": _rows(fast["class_logits"]), "attr_logits": _rows(fast["attr_logits"])}
        compare(ours, given, f"image{spec['shape']}.given_boxes", {})


# -- live comparison against stock Detectron2 ----------------------------------------------------------------
def _stock_detectron2_cfg(golden: dict[str, Any]):
    """Detectron2's config for a golden's C4 model (our overrides use Detectron2's key names)."""
    from detectron2.config import get_cfg as d2_get_cfg

    cfg = d2_get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "False",
                         "MODEL.RESNETS.OUT_FEATURES", "['res4']", "MODEL.RPN.IN_FEATURES", "['res4']",
                         "MODEL.ROI_HEADS.NAME", "Res5ROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", "['res4']"])
    pairs: list = []

    def flatten(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}.")
            else:
                pairs.extend([f"{prefix}{key}", repr(value) if not isinstance(value, str) else value])

    flatten(golden["config"], "")
    cfg.merge_from_list(pairs)
    return cfg


def _stock_detectron2_model(golden: dict[str, Any]):
    """Detectron2's own C4 GeneralizedRCNN for a golden config, with our parity weights loaded strictly."""
    from detectron2.modeling import build_model

    return load_parity_weights(build_model(_stock_detectron2_cfg(golden)), golden["seed"])


@torch.no_grad()
def _detectron2_outputs(model, golden: dict[str, Any]) -> dict[str, Any]:
    from detectron2.structures import Boxes, ImageList

    sizes = golden["image_sizes"]
    raw = parity_images(golden["image_seed"], golden["batch_shape"])
    images = zero_padding((raw - model.pixel_mean) / model.pixel_std, sizes)
    res4 = model.backbone(images)["res4"]
    heads = model.roi_heads
    given = [Boxes(torch.tensor(b)) for b in golden["boxes"]]
    features = heads._shared_roi_transform([res4], given).mean(dim=(2, 3))
    class_logits, box_deltas = heads.box_predictor(features)
    batch = ImageList(images, [tuple(s) for s in sizes])
    proposals, _ = model.proposal_generator(batch, {"res4": res4}, None)
    prop_boxes = [p.proposal_boxes for p in proposals]
    prop_features = heads._shared_roi_transform([res4], prop_boxes).mean(dim=(2, 3))
    predictions = heads.box_predictor(prop_features)
    instances, kept = heads.box_predictor.inference(predictions, proposals)
    probs = torch.softmax(predictions[0], dim=-1)
    all_boxes = torch.cat([p.tensor for p in prop_boxes])
    detections, start = [], 0
    for props, inst, rows in zip(proposals, instances, kept):
        rows = rows + start  # kept rows index this image's proposals
        start += len(props)
        detections.append({"boxes": inst.pred_boxes.tensor, "scores": inst.scores,
                           "classes": inst.pred_classes, "class_probs": probs[rows],
                           "features": prop_features[rows], "proposal_boxes": all_boxes[rows]})
    fast = {"features": features, "class_logits": class_logits, "box_deltas": box_deltas}
    return {"res4": res4, "fast": fast, "detections": detections,
            "proposals": [(p.proposal_boxes.tensor, p.objectness_logits) for p in proposals]}


def _stock_goldens() -> list[Path]:
    """Goldens whose config stock Detectron2 can build (none of py-bottom-up-attention's VG-only keys)."""
    def keys(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.items():
            out |= keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        return out

    vg_only = {"MODEL.CAFFE_MAXPOOL", "MODEL.ATTRIBUTE_ON", "MODEL.ROI_BOX_HEAD.RES5HALVE",
               "MODEL.RESNETS.RES5_DILATION", "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES"}
    return [p for p in GOLDENS if not keys(_load(p)["config"]) & vg_only]


@pytest.mark.detectron2
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign", "ROIPool"])
@pytest.mark.parametrize("path", _stock_goldens(), ids=lambda p: p.stem.removeprefix("parity_"))
def test_matches_detectron2_live(path, pooler_type):
    golden = _load(path)
    golden["config"]["MODEL"]["ROI_BOX_HEAD"]["POOLER_TYPE"] = pooler_type
    ref = summarize(_detectron2_outputs(_stock_detectron2_model(golden), golden), golden["stored"])
    ours = summarize(our_outputs(build_ours(golden), golden), golden["stored"])
    diffs: dict[str, float] = {}
    compare(ours, ref, "outputs", diffs)
    assert diffs, "nothing compared"


# Config knobs stock Detectron2 also has, each applied on top of the stock R50-C4 golden config.
_LIVE_VARIANTS = {
    "cls_agnostic_bbox_reg": {"ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True}},
    "resnext_2x4d": {"RESNETS": {"NUM_GROUPS": 2, "WIDTH_PER_GROUP": 4}},
    "stride_in_3x3": {"RESNETS": {"STRIDE_IN_1X1": False}},
    "norm_bn_eval": {"RESNETS": {"NORM": "BN"}},
    "norm_gn": {"RESNETS": {"NORM": "GN", "STEM_OUT_CHANNELS": 32, "WIDTH_PER_GROUP": 32,
                            "RES2_OUT_CHANNELS": 64}},
    "r34": {"RESNETS": {"DEPTH": 34, "RES2_OUT_CHANNELS": 64}},
    "anchor_offset_ratios": {"ANCHOR_GENERATOR": {"OFFSET": 0.5, "ASPECT_RATIOS": [[0.25, 1.0, 4.0]]}},
    "rpn_box_weights_nms": {"RPN": {"BBOX_REG_WEIGHTS": [2.0, 2.0, 1.0, 1.0], "NMS_THRESH": 0.5}},
    "pool7_sampling2": {"ROI_BOX_HEAD": {"POOLER_RESOLUTION": 7, "POOLER_SAMPLING_RATIO": 2}},
    "proposal_min_size": {"PROPOSAL_GENERATOR": {"MIN_SIZE": 8}},
    "pixel_std": {"PIXEL_MEAN": [123.675, 116.28, 103.53], "PIXEL_STD": [58.395, 57.12, 57.375]},
}


def _deep_merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict):
            _deep_merge(dst.setdefault(key, {}), value)
        else:
            dst[key] = value
    return dst


@pytest.mark.detectron2
@pytest.mark.parametrize("variant", sorted(_LIVE_VARIANTS))
def test_config_variants_match_detectron2_live(variant):
    golden = _load(GOLDEN_DIR / "parity_r50_c4_alignv2.json")
    _deep_merge(golden["config"]["MODEL"], _LIVE_VARIANTS[variant])
    ref = summarize(_detectron2_outputs(_stock_detectron2_model(golden), golden), golden["stored"])
    ours = summarize(our_outputs(build_ours(golden), golden), golden["stored"])
    diffs: dict[str, float] = {}
    compare(ours, ref, variant, diffs)
    assert diffs, "nothing compared"


@pytest.mark.detectron2
@pytest.mark.parametrize("path", _stock_goldens(), ids=lambda p: p.stem.removeprefix("parity_"))
def test_state_dict_layout_matches_detectron2(path):
    """Same keys and shapes as Detectron2's model, so its checkpoints load into ours one to one."""
    golden = _load(path)
    theirs = {k: tuple(v.shape) for k, v in _stock_detectron2_model(golden).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in build_ours(golden).state_dict().items()}
    assert ours == theirs, (sorted(set(ours) ^ set(theirs)),
                            [k for k in ours if k in theirs and ours[k] != theirs[k]])


@pytest.mark.detectron2
@pytest.mark.parametrize("path", _stock_goldens(), ids=lambda p: p.stem.removeprefix("parity_"))
def test_golden_reproduced_by_detectron2(path):
    """The stored golden is still what this Detectron2 computes (catches a stale golden)."""
    golden = _load(path)
    ref = summarize(_detectron2_outputs(_stock_detectron2_model(golden), golden), golden["stored"])
    for section in ("res4", "fast", "proposals", "detections"):
        compare(ref[section], golden[section], section, {})


@pytest.mark.detectron2
@pytest.mark.parametrize("path", _stock_goldens(), ids=lambda p: p.stem.removeprefix("parity_"))
def test_predictor_matches_detectron2_default_predictor_live(path):
    """Detectron2's DefaultPredictor and ours on the same BGR uint8 images, boxes in original pixels."""
    from detectron2.engine import DefaultPredictor

    from detector.predictor import DetectorPredictor

    golden = _load(path)
    golden["config"]["INPUT"] = {"MIN_SIZE_TEST": 96, "MAX_SIZE_TEST": 160}
    theirs = DefaultPredictor(_stock_detectron2_cfg(golden))
    load_parity_weights(theirs.model, golden["seed"])
    ours = DetectorPredictor(parity_cfg(golden))
    load_parity_weights(ours.model, golden["seed"])
    for seed, shape in ((13, [150, 200, 3]), (12, [100, 300, 3])):
        image = parity_uint8_image(seed, shape)
        ref = theirs(image)["instances"]
        det = ours(image)
        compare({"count": len(det["scores"]), "boxes": _rows(det["boxes"]), "scores": _rows(det["scores"]),
                 "classes": det["classes"].tolist()},
                {"count": len(ref), "boxes": _rows(ref.pred_boxes.tensor), "scores": _rows(ref.scores),
                 "classes": ref.pred_classes.tolist()}, f"image{shape}", {})
