"""Property-based tests (hypothesis): RoIAlign over its whole argument space against torchvision, the box
utilities of detector.structures, and the collation of variable-length VL-BERT samples.

Example counts are kept small so the file runs in seconds; a failure prints the smallest example found.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import roi_align as tv_roi_align

from detector.layers import roi_align
from detector.structures import box_iou, box_pixel_mask, check_boxes, clip_boxes, pad_images, scale_boxes
from e2e_vl.data.collate import collate_samples
import e2e_vl.modeling  # noqa: F401  (registers the heads, and so the batch targets they declare)
from e2e_vl.data.masking import IGNORE_INDEX

# The machine running the suite may be loaded: no per-example deadline, few examples, reproducible.
FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)

coordinate = st.floats(-40.0, 120.0, allow_nan=False, width=32)
extent = st.floats(0.0, 150.0, allow_nan=False, width=32)


@st.composite
def xyxy_boxes(draw, min_k: int = 0, max_k: int = 6) -> torch.Tensor:
    """(K, 4) float64 XYXY boxes: anywhere around an image of about 80x80, zero-size ones included."""
    k = draw(st.integers(min_k, max_k))
    rows = [(x, y, x + w, y + h) for x, y, w, h in
            (draw(st.tuples(coordinate, coordinate, extent, extent)) for _ in range(k))]
    return torch.tensor(rows, dtype=torch.float64).reshape(k, 4)


# ---------------------------------------------------------------------------------------------------
# RoIAlign
# ---------------------------------------------------------------------------------------------------
@settings(FAST, max_examples=80)
@given(
    n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
    boxes=xyxy_boxes(min_k=1, max_k=5), data=st.data(),
    output_size=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    spatial_scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3]),
    sampling_ratio=st.integers(-1, 3), aligned=st.booleans(), seed=st.integers(0, 2**16),
)
def test_roi_align_matches_torchvision_everywhere(n, c, h, w, boxes, data, output_size, spatial_scale,
                                                  sampling_ratio, aligned, seed):
    index = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=len(boxes), max_size=len(boxes))),
                         dtype=torch.float64)
    rois = torch.cat([index[:, None], boxes], dim=1)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = roi_align(ours_in, rois, output_size, spatial_scale, sampling_ratio, aligned)
    ref = tv_roi_align(ref_in, rois, output_size, spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Box utilities
# ---------------------------------------------------------------------------------------------------
@FAST
@given(a=xyxy_boxes(), b=xyxy_boxes(), scale=st.floats(0.1, 10.0), shift=st.tuples(coordinate, coordinate))
def test_box_iou_is_bounded_symmetric_and_invariant_to_scale_and_shift(a, b, scale, shift):
    iou = box_iou(a, b)
    assert iou.shape == (len(a), len(b))
    assert ((iou >= 0) & (iou <= 1 + 1e-12)).all()
    torch.testing.assert_close(iou, box_iou(b, a).T)
    moved = torch.tensor([*shift, *shift], dtype=torch.float64)
    transformed = box_iou(scale_boxes(a, scale, scale) + moved, scale_boxes(b, scale, scale) + moved)
    torch.testing.assert_close(transformed, iou, rtol=1e-6, atol=1e-9)
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    if len(a) and len(b) and (area(a) > 0).all() and (area(b) > 0).all():
        torch.testing.assert_close(iou, tv_box_iou(a, b))  # the usual definition where it is defined
    self_iou = box_iou(a, a).diagonal()
    torch.testing.assert_close(self_iou, (area(a) > 0).to(torch.float64))  # 1 for a real box, 0 for empty


@FAST
@given(boxes=xyxy_boxes(), height=st.integers(1, 90), width=st.integers(1, 90))
def test_clip_boxes_stays_inside_is_idempotent_and_keeps_inner_boxes(boxes, height, width):
    clipped = clip_boxes(boxes, (height, width))
    assert (clipped[:, 0::2] >= 0).all() and (clipped[:, 0::2] <= width).all()
    assert (clipped[:, 1::2] >= 0).all() and (clipped[:, 1::2] <= height).all()
    torch.testing.assert_close(clip_boxes(clipped, (height, width)), clipped)
    inside = ((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= width)).all(1) & \
             ((boxes[:, 1::2] >= 0) & (boxes[:, 1::2] <= height)).all(1)
    torch.testing.assert_close(clipped[inside], boxes[inside])
    assert torch.equal(check_boxes(clipped), clipped)  # still valid XYXY


@FAST
@given(boxes=xyxy_boxes(min_k=1), bad=st.data())
def test_check_boxes_names_the_first_flipped_box(boxes, bad):
    i = bad.draw(st.integers(0, len(boxes) - 1))
    flipped = boxes.clone()
    flipped[i] = flipped[i, [2, 3, 0, 1]] + torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # x1 > x2
    try:
        check_boxes(flipped)
    except ValueError as exc:
        assert f"boxes[{i}]" in str(exc)
    else:
        raise AssertionError("a box with x2 < x1 was accepted")


@FAST
@given(sizes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4),
       divisibility=st.sampled_from([0, 1, 4, 5]), pad_value=st.sampled_from([0.0, -1.5]))
def test_pad_images_keeps_each_image_and_pads_with_the_value(sizes, divisibility, pad_value):
    images = [torch.rand(2, h, w) + 1.0 for h, w in sizes]
    batch, got_sizes = pad_images(images, divisibility, pad_value)
    assert got_sizes == list(sizes)
    max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    step = max(divisibility, 1)
    assert batch.shape == (len(images), 2, math.ceil(max_h / step) * step, math.ceil(max_w / step) * step)
    for image, padded, (h, w) in zip(images, batch, sizes):
        assert torch.equal(padded[:, :h, :w], image)
        outside = torch.ones(padded.shape[1:], dtype=torch.bool)
        outside[:h, :w] = False
        assert (padded[:, outside] == pad_value).all()


@FAST
@given(boxes=xyxy_boxes(), height=st.integers(1, 40), width=st.integers(1, 40))
def test_box_pixel_mask_equals_the_per_pixel_definition(boxes, height, width):
    mask = box_pixel_mask(boxes, height, width)
    want = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():  # a box covers every pixel it touches, clipped to the image
        c0, c1 = max(math.floor(x1), 0), min(math.ceil(x2), width)
        r0, r1 = max(math.floor(y1), 0), min(math.ceil(y2), height)
        if c1 > c0 and r1 > r0:
            want[r0:r1, c0:c1] = True
    assert torch.equal(mask, want)


# ---------------------------------------------------------------------------------------------------
# Collation of variable-length samples
# ---------------------------------------------------------------------------------------------------
@st.composite
def vl_samples(draw) -> list[dict]:
    """1-5 samples: tokens of any length, images of any size (or none: text only), 1-5 boxes, MLM labels
    and masked-RoI targets on some of them, and image keys that make some samples share their image."""
    samples = []
    shared: dict[int, dict] = {}
    for _ in range(draw(st.integers(1, 5))):
        t = draw(st.integers(1, 9))
        sample = {"input_ids": torch.randint(5, 100, (t,)), "image_id": draw(st.integers(0, 3))}
        if draw(st.booleans()):
            sample["mlm_labels"] = torch.where(torch.rand(t) < 0.5, sample["input_ids"], IGNORE_INDEX)
        kind = draw(st.sampled_from(["image", "shared", "text"]))
        if kind == "shared" and shared:
            key = draw(st.sampled_from(sorted(shared)))
            sample.update(shared[key], image_key=key)
        elif kind != "text":
            k, h, w = draw(st.integers(1, 5)), draw(st.integers(4, 20)), draw(st.integers(4, 20))
            boxes = torch.rand(k, 4) * 4 + torch.tensor([0, 0, 4, 4])
            image = {"image": torch.rand(3, h, w) * 255, "boxes": boxes}
            if kind == "shared":
                shared[len(shared)] = image
                sample.update(image, image_key=len(shared) - 1)
            else:
                sample.update(image)
                if draw(st.booleans()):
                    sample["region_labelled"] = torch.rand(k) < 0.5
                    sample["mrc_targets"] = torch.softmax(torch.randn(k, 6), 1)
        samples.append(sample)
    return samples


@FAST
@given(samples=vl_samples(), pad=st.sampled_from([0, 1]))
def test_collation_keeps_every_sample_and_pads_consistently(samples, pad):
    batch = collate_samples(samples, pad_token_id=pad)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (len(samples), max(lengths))
    assert batch["text_mask"].sum(1).tolist() == lengths
    for row, mask, s in zip(batch["input_ids"], batch["text_mask"], samples):
        assert torch.equal(row[mask], s["input_ids"]) and (row[~mask] == pad).all()
    if "mlm_labels" in batch:
        for row, s in zip(batch["mlm_labels"], samples):
            t = len(s["input_ids"])
            assert torch.equal(row[:t], s.get("mlm_labels", torch.full((t,), IGNORE_INDEX)))
            assert (row[t:] == IGNORE_INDEX).all()
    # Images: one slot per distinct image; text-only samples point nowhere (-1); every image unchanged.
    slots = batch["sample_image_index"].tolist()
    keys_seen: dict = {}
    for s, slot in zip(samples, slots):
        if "image" not in s:
            assert slot == -1
            continue
        if "image_key" in s:
            assert keys_seen.setdefault(s["image_key"], slot) == slot
        _, h, w = s["image"].shape
        assert torch.equal(batch["images"][slot, :, :h, :w], s["image"])
        assert batch["image_sizes"][slot].tolist() == [h, w]
        assert torch.equal(batch["boxes"][slot], s["boxes"])
    assert len(set(s for s in slots if s >= 0)) == len(batch.get("boxes", []))
    if "region_labelled" in batch:
        labelled = [s.get("region_labelled", torch.zeros(0, dtype=torch.bool)) for s in samples]
        assert batch["mrc_targets"].shape[0] == int(sum(f.sum() for f in labelled))
        for row, flags in zip(batch["region_labelled"], labelled):
            assert torch.equal(row[:len(flags)], flags) and not row[len(flags):].any()
    assert batch["image_ids"] == [s["image_id"] for s in samples]
