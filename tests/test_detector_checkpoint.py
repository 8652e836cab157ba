"""Detector checkpoints: round trips in every format, strictness, bottom-up-attention conversion, safety."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint, safe_unpickle,
                                 save_checkpoint)
from detector.config import load_cfg
from detector.modeling import build_detector

TINY = Path(__file__).resolve().parents[1] / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def _tiny(seed: int | None = None):
    model = build_detector(load_cfg(TINY))
    return _randomize(model, seed) if seed is not None else model


def _outputs(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = model.preprocess_image(torch.rand(1, 3, 96, 128, generator=g) * 255)
    boxes = [torch.tensor([[4.0, 6.0, 60.0, 70.0], [30.0, 20.0, 120.0, 90.0]])]
    out = model.fast_rcnn(x, boxes)
    props = model.proposal_generator(model.features(x), [(96, 128)])[0]
    out["proposals"] = props["proposal_boxes"]
    out["objectness"] = props["objectness_logits"]
    return out


@pytest.fixture(scope="module")
def reference():
    model = _tiny(seed=3)
    return model, _outputs(model)


@pytest.mark.parametrize("fmt,name", [("detectron2", "m.pth"), ("pkl", "m.pkl"),
                                      ("safetensors", "m.safetensors")])
def test_round_trip_gives_identical_outputs(reference, tmp_path, fmt, name):
    model, expected = reference
    path = tmp_path / name
    save_checkpoint(model, path, fmt=fmt, metadata={"config": "MODEL: {}", "note": "tiny"})
    fresh = _tiny(seed=None)
    assert load_checkpoint(fresh, path) == {"missing": [], "unexpected": []}
    got = _outputs(fresh)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    _, metadata = read_checkpoint(path)
    assert metadata["config"] == "MODEL: {}" and metadata["note"] == "tiny"


def test_bare_state_dict_and_numpy_pickle_protocol2(reference, tmp_path):
    model, expected = reference
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    fresh = _tiny()
    load_checkpoint(fresh, tmp_path / "bare.pth")
    assert torch.equal(_outputs(fresh)["features"], expected["features"])
    # a Detectron2 model-zoo pickle as written by older tools: protocol 2, float64 arrays, __author__
    arrays = {k: v.double().numpy() for k, v in model.state_dict().items()}
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "someone", "matching_heuristics": True}, f, protocol=2)
    fresh = _tiny()
    load_checkpoint(fresh, tmp_path / "zoo.pkl")
    torch.testing.assert_close(_outputs(fresh)["features"], expected["features"])


def test_ignored_tensors(reference, tmp_path):
    model, expected = reference
    sd = dict(model.state_dict())
    sd["backbone.stem.conv1.norm.num_batches_tracked"] = torch.tensor(5)
    sd["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(9, 4)
    sd["pixel_mean"] = torch.zeros(3, 1, 1)
    torch.save({"model": sd}, tmp_path / "old.pth")
    fresh = _tiny()
    load_checkpoint(fresh, tmp_path / "old.pth")
    assert torch.equal(_outputs(fresh)["class_logits"], expected["class_logits"])


def test_strict_errors_list_the_tensors(reference, tmp_path):
    model, _ = reference
    sd = dict(model.state_dict())
    del sd["roi_heads.res5.2.conv3.weight"]
    sd["roi_heads.box_predictor.extra.weight"] = torch.zeros(2)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 512)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_tiny(), tmp_path / "bad.pth")
    msg = str(err.value)
    assert "roi_heads.res5.2.conv3.weight" in msg and "missing" in msg
    assert "roi_heads.box_predictor.extra.weight" in msg and "unexpected" in msg
    assert "cls_score.weight: checkpoint (5, 512) vs model (11, 512)" in msg
    # non-strict still refuses wrong shapes, but reports missing/unexpected
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(_tiny(), tmp_path / "bad.pth", strict=False)
    sd["roi_heads.box_predictor.cls_score.weight"] = model.state_dict()[
        "roi_heads.box_predictor.cls_score.weight"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match="1 model tensors keep"):
        report = load_checkpoint(_tiny(), tmp_path / "partial.pth", strict=False)
    assert (report == {"missing": ["roi_heads.res5.2.conv3.weight"],
                       "unexpected": ["roi_heads.box_predictor.extra.weight"]})


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("evil_class", [_Evil, _EvalEvil])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, evil_class, protocol):
    marker = tmp_path / "pwned"
    payload = {"model": {"backbone.stem.conv1.weight": np.zeros((2, 2), np.float32)},
               "__author__": evil_class(str(marker))}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_unpickle(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(_tiny(), path)
    assert not marker.exists()


def test_pth_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "x": _Evil(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(_tiny(), tmp_path / "evil.pth")
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(_tiny(), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"hello world, not weights")
    with pytest.raises(CheckpointError, match="unrecognised"):
        load_checkpoint(_tiny(), tmp_path / "junk.pth")
    torch.save({"model": {"a": torch.zeros(1000)}}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:-300])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint(_tiny(), tmp_path / "cut.pth")
    (tmp_path / "half.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:2000])  # a copy cut short
    with pytest.raises(CheckpointError,
                       match=r"half.pth: truncated or damaged torch checkpoint \(2000 bytes"):
        load_checkpoint(_tiny(), tmp_path / "half.pth")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"model": {"a": np.zeros(3)}})[:-5])
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        safe_unpickle(tmp_path / "trunc.pkl")
    with pytest.raises(CheckpointError, match="Caffe2 blob names"):
        (tmp_path / "c2.pkl").write_bytes(pickle.dumps({"blobs": 1, "res2_0_branch2a_w": np.zeros(3)}))
        load_checkpoint(_tiny(), tmp_path / "c2.pkl")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save_checkpoint(_tiny(), tmp_path / "x.bin", fmt="onnx")


def _to_bua_layout(sd: dict[str, torch.Tensor], num_sizes: int, num_ratios: int) -> dict[str, torch.Tensor]:
    """Write a Detectron2-layout state dict the way bottom-up-attention.pytorch stores the same network."""
    g = torch.Generator().manual_seed(7)
    out = dict(sd)
    bp, rpn = "roi_heads.box_predictor.", "proposal_generator.rpn_head."
    weights = torch.tensor([10.0, 10.0, 5.0, 5.0])
    for name in ("weight", "bias"):
        cls = out.pop(bp + f"cls_score.{name}")
        out[bp + f"cls_score.{name}"] = torch.cat((cls[-1:], cls[:-1]))  # background first
        box = out.pop(bp + f"bbox_pred.{name}")
        unscaled = box / (weights.repeat(box.shape[0] // 4).view(-1, *([1] * (box.dim() - 1))))
        bg_rows = torch.randn((4,) + tuple(box.shape[1:]), generator=g)
        out[bp + f"bbox_pred.{name}"] = torch.cat((bg_rows, unscaled))
        attr = out.pop(bp + f"attr_score.{name}")
        out[bp + f"attr_linear2.{name}"] = torch.cat((attr[-1:], attr[:-1]))
        out[bp + f"attr_linear1.{name}"] = out.pop(bp + f"fc_attr.{name}")
        # two-way RPN scores in Caffe's ratio-major anchor order
        caffe_order = [s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)]
        logit = out.pop(rpn + f"objectness_logits.{name}")[caffe_order]
        bg = torch.randn(logit.shape, generator=g)
        out[rpn + f"objectness_logits.{name}"] = torch.cat((bg, bg + logit))
        deltas = out.pop(rpn + f"anchor_deltas.{name}")
        grouped = deltas.reshape(num_sizes * num_ratios, 4, *deltas.shape[1:])
        out[rpn + f"anchor_deltas.{name}"] = grouped[caffe_order].reshape(deltas.shape)
    emb = out.pop(bp + "cls_embedding.weight")
    out[bp + "cls_embed.weight"] = torch.cat((emb[-1:], emb[:-1], torch.randn(1, emb.shape[1], generator=g)))
    out["backbone.res2.0.conv1.norm.num_batches_tracked"] = torch.tensor(0)
    return out


def test_bottom_up_attention_checkpoint_is_converted(reference, tmp_path):
    model, expected = reference
    ag = model.proposal_generator.anchor_generator
    bua = _to_bua_layout(model.state_dict(), ag.num_sizes, ag.num_ratios)
    assert bua["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4 * 11
    assert bua["proposal_generator.rpn_head.objectness_logits.weight"].shape[0] == 2 * ag.num_anchors
    torch.save({"model": bua, "iteration": 5}, tmp_path / "bua.pth")
    fresh = _tiny()
    load_checkpoint(fresh, tmp_path / "bua.pth")
    got = _outputs(fresh)
    for key in ("features", "class_probs", "attr_probs", "box_deltas", "proposals", "objectness"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
