"""Detector inputs: Detectron2's resize rounding, image validation/conversion, predictor, vocabulary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector import vocab
from detector.config import load_cfg
from detector.predictor import DetectorPredictor, ImageError, as_bgr_uint8
from detector.transforms import get_output_shape, pil_bilinear_resize, resize_shortest_edge

TINY = Path(__file__).resolve().parents[1] / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"


@pytest.mark.parametrize("hw,min_size,max_size,expected", [
    ((480, 640), 600, 1000, (600, 800)),
    ((640, 480), 600, 1000, (800, 600)),
    ((333, 500), 600, 1000, (600, 901)),    # 500 * 600 / 333 = 900.9 -> 901
    ((375, 500), 600, 1000, (600, 800)),
    ((100, 1000), 600, 1000, (100, 1000)),  # capped by the long side: 600x6000 -> x1/6
    ((427, 640), 800, 1333, (800, 1199)),   # 640 * 800 / 427 = 1199.06
    ((301, 1000), 600, 1000, (301, 1000)),  # 600 x 1993.4 capped -> 301.0 x 1000
    ((7, 9), 600, 1000, (600, 771)),        # 9 * 600 / 7 = 771.43
    ((500, 333), 600, 1000, (901, 600)),
])
def test_output_shape_rounding(hw, min_size, max_size, expected):
    assert get_output_shape(hw[0], hw[1], min_size, max_size)[0] == expected


def test_resize_keeps_dtype_and_content():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (255, 0, 10)
    out, scale = resize_shortest_edge(img, 20, 1000)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8 and scale == 0.5
    assert out.flags.writeable  # torch.from_numpy takes it without a warning
    assert (out[:, :14] == (255, 0, 10)).all() and (out[:, 16:] == 0).all()
    flt, _ = resize_shortest_edge(img.astype(np.float32), 80, 1000)
    assert flt.shape == (80, 120, 3) and flt.dtype == np.float32
    same, _ = resize_shortest_edge(img, 40, 1000)
    assert np.array_equal(same, img)
    with pytest.raises(ValueError, match="empty"):
        resize_shortest_edge(np.zeros((0, 5, 3), np.uint8), 20, 100)


def test_uint8_resize_follows_pil_bilinear_arithmetic():
    # values worked out by hand from PIL's algorithm (triangle filter widened by the scale when
    # shrinking, weights normalised then rounded to 22-bit fixed point, +half, >> 22)
    row = np.array([[0, 100, 200, 255]], np.uint8)[:, :, None]
    assert pil_bilinear_resize(row, 1, 2)[0, :, 0].tolist() == [71, 209]
    assert (pil_bilinear_resize(np.array([[10, 50]], np.uint8)[:, :, None], 1, 4)[0, :, 0].tolist()
            == [10, 20, 40, 50])
    column = np.array([[10], [50]], np.uint8)[:, :, None]
    assert pil_bilinear_resize(column, 4, 1)[:, 0, 0].tolist() == [10, 20, 40, 50]
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(pil_bilinear_resize(img, 37, 53), img)
    out, _ = resize_shortest_edge(img, 74, 1000)  # channels are independent
    for c in range(3):
        assert np.array_equal(resize_shortest_edge(np.ascontiguousarray(img[:, :, c]), 74, 1000)[0],
                              out[:, :, c])


@pytest.mark.parametrize("shape,new", [((37, 53), (74, 106)), ((40, 90), (60, 45)), ((90, 40), (90, 20)),
                                       ((31, 77), (31, 120)), ((300, 200), (450, 100))])
def test_numpy_resize_equals_pillow_when_height_does_not_shrink(shape, new):
    image_mod = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    ref = np.asarray(image_mod.fromarray(img).resize((new[1], new[0]), image_mod.BILINEAR))
    assert np.array_equal(pil_bilinear_resize(img, *new), ref)
    out, _ = resize_shortest_edge(img, min(new), 10_000)
    ref2 = np.asarray(image_mod.fromarray(img).resize((out.shape[1], out.shape[0]), image_mod.BILINEAR))
    assert np.array_equal(out, ref2)


def test_image_conversions_and_errors():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_bgr_uint8(gray).shape == (3, 4, 3) and (as_bgr_uint8(gray)[..., 2] == gray).all()
    assert as_bgr_uint8(gray[..., None]).shape == (3, 4, 3)
    bgra = np.random.default_rng(0).integers(0, 255, (3, 4, 4), dtype=np.uint8)
    assert np.array_equal(as_bgr_uint8(bgra), bgra[..., :3])
    with pytest.raises(ImageError, match="16-bit"):
        as_bgr_uint8(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ImageError, match="empty"):
        as_bgr_uint8(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageError, match="float32"):
        as_bgr_uint8(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="2 channels"):
        as_bgr_uint8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="numpy array"):
        as_bgr_uint8([[1, 2]])


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return DetectorPredictor(load_cfg(TINY))


def test_predictor_maps_detections_to_original_pixels(predictor):
    img = np.random.default_rng(1).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    out = predictor(img)
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(out["features"])
    if len(out["boxes"]):
        assert (out["boxes"][:, 2] <= 200).all() and (out["boxes"][:, 3] <= 150).all()
    gray = predictor(img[..., 0])
    assert set(gray) == set(out)


def test_predictor_fast_rcnn_scales_given_boxes(predictor):
    img = np.random.default_rng(2).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 100, 75], [50, 20, 190, 140]], np.float32)
    out = predictor.fast_rcnn(img, boxes)
    assert out["features"].shape == (2, 512)
    # the network input is 96x128 (150x200 -> shortest side 96): boxes scale by 0.64
    x, size, original = predictor._prepare(img)
    assert size == (96, 128) and original == (150, 200)
    direct = predictor.model.fast_rcnn(x, [torch.from_numpy(boxes) * 0.64])
    torch.testing.assert_close(out["features"], direct["features"])
    assert predictor.fast_rcnn(img, np.zeros((0, 4)))["features"].shape == (0, 512)
    with pytest.raises(ImageError, match="16-bit"):
        predictor(np.zeros((10, 10, 3), np.uint16))


def test_vocabulary():
    objects, attributes = vocab.object_names(), vocab.attribute_names()
    assert len(objects) == vocab.NUM_OBJECTS == 1600 and len(attributes) == vocab.NUM_ATTRIBUTES == 400
    assert attributes[0] == "gray" and "grey" in vocab.attribute_synonyms()[0]
    assert all("," not in n and n == n.strip() and n for n in objects + attributes)
    assert vocab.object_name(1600) == "background" and vocab.attribute_name(400) == "no attribute"
    assert vocab.object_name(0) == objects[0]
    with pytest.raises(IndexError, match="1601"):
        vocab.object_name(1601)
