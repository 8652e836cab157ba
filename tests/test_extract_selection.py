"""Bottom-up-attention box selection against a plain per-class NMS loop, and image decoding/sources."""
import io
import json
import tarfile

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import nms

from detector.extraction import Selection, max_conf_dense, max_conf_per_class_nms, select_boxes
from detector import image_sources as src


def random_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 400
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 200 + 1], 1)


def reference_max_conf(boxes, scores, thresh):
    """Caffe generate_tsv: for each class NMS over all boxes; each box keeps its best surviving score."""
    max_conf = torch.zeros(len(boxes))
    for c in range(scores.shape[1]):
        keep = nms(boxes, scores[:, c], thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep, c])
    return max_conf


def reference_select(boxes, probs, min_boxes, max_boxes, conf):
    mc = reference_max_conf(boxes, probs[:, :-1], 0.3)
    order = torch.argsort(mc, descending=True, stable=True)
    count = min(max(int((mc >= conf).sum()), min_boxes), max_boxes, len(boxes))
    return order[:count]


@pytest.mark.parametrize("n,c,temp", [(40, 7, 3.0), (120, 60, 4.0), (300, 1600, 6.0)])
def test_max_conf_matches_per_class_loop(n, c, temp):
    boxes = random_boxes(n, seed=n)
    probs = (torch.randn(n, c + 1, generator=torch.Generator().manual_seed(c)) * temp).softmax(-1)
    ref = reference_max_conf(boxes, probs[:, :-1], 0.3)
    torch.testing.assert_close(max_conf_dense(boxes, probs[:, :-1], 0.3), ref, rtol=0, atol=0)
    sparse = max_conf_per_class_nms(boxes, probs[:, :-1], 0.3, floor=0.01)
    above = ref >= 0.01
    assert torch.equal(sparse >= 0.01, above)  # exact wherever the floor is reached, 0 elsewhere
    torch.testing.assert_close(sparse[above], ref[above], rtol=0, atol=0)
    assert (sparse[~above] == 0).all()


@pytest.mark.parametrize("temp,min_boxes,max_boxes,conf", [
    (6.0, 10, 100, 0.2),   # peaked scores: the sparse path decides
    (0.1, 10, 100, 0.2),   # near-uniform scores (random weights): nothing above conf, top-up via the
                           # dense path
    (6.0, 3, 5, 0.0),      # everything above conf: cut to max_boxes
    (6.0, 50, 60, 0.99),   # few above: topped up to min_boxes
])
def test_select_boxes_matches_reference(temp, min_boxes, max_boxes, conf):
    n, c = 150, 200
    boxes = random_boxes(n, seed=3)
    probs = (torch.randn(n, c + 1, generator=torch.Generator().manual_seed(5)) * temp).softmax(-1)
    sel = Selection(min_boxes=min_boxes, max_boxes=max_boxes, conf_thresh=conf)
    got = select_boxes(boxes, probs, sel)
    want = reference_select(boxes, probs, min_boxes, max_boxes, conf)
    assert min_boxes <= len(got) <= max_boxes
    assert torch.equal(got, want)


def test_select_boxes_fewer_proposals_than_min():
    boxes = random_boxes(4)
    probs = torch.full((4, 6), 1 / 6)
    assert len(select_boxes(boxes, probs, Selection(min_boxes=10))) == 4
    assert len(select_boxes(boxes[:0], probs[:0], Selection())) == 0


def test_selection_validates():
    with pytest.raises(ValueError, match="min_boxes"):
        Selection(min_boxes=20, max_boxes=10)
    with pytest.raises(ValueError, match="conf_thresh"):
        Selection(conf_thresh=1.5)


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------
def encode(img, ext=".png"):
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def test_decode_normalises_to_bgr_uint8():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (20, 30, 3), np.uint8)
    np.testing.assert_array_equal(src.decode_image(encode(bgr)), bgr)
    gray = rng.integers(0, 255, (20, 30), np.uint8)
    out = src.decode_image(encode(gray))
    assert out.shape == (20, 30, 3) and (out == gray[:, :, None]).all()
    bgra = np.dstack([bgr, np.full((20, 30), 7, np.uint8)])
    np.testing.assert_array_equal(src.decode_image(encode(bgra)), bgr)
    g16 = (gray.astype(np.uint16) * 257)  # 16-bit with the same visible values
    out = src.decode_image(encode(g16))
    assert out.dtype == np.uint8 and (out == gray[:, :, None]).all()


def test_decode_rejects_bad_input_with_reasons():
    img = np.zeros((50, 60, 3), np.uint8)
    jpg = encode(img, ".jpg")
    with pytest.raises(src.ImageError, match="empty file"):
        src.decode_image(b"")
    with pytest.raises(src.ImageError, match="not a decodable image"):
        src.decode_image(b"this is a text file, not a picture")
    with pytest.raises(src.ImageError, match="not a decodable image"):
        src.decode_image(jpg[: len(jpg) // 2])
    with pytest.raises(src.ImageError, match="too large: 60x50"):
        src.decode_image(jpg, max_pixels=1000)  # refused from the header, before decoding
    assert src.peek_image_size(jpg) == (50, 60) and src.peek_image_size(encode(img)) == (50, 60)


def _pil_bytes(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _two_colour_rgb():
    """40x20 RGB: a green left quarter on red, so orientation and channel order both show."""
    from PIL import Image

    image = Image.new("RGB", (40, 20), (200, 30, 10))
    image.paste((10, 200, 30), (0, 0, 10, 20))
    return image


def test_cmyk_palette_16bit_and_gray_alpha_have_a_defined_conversion():
    rgb = _two_colour_rgb()
    want = np.asarray(rgb)[:, :, ::-1]  # BGR
    near = lambda out, tol: np.abs(out.astype(int) - want.astype(int)).max() <= tol  # noqa: E731
    cmyk = src.decode_image(_pil_bytes(rgb.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == (20, 40, 3) and cmyk.dtype == np.uint8 and near(cmyk, 6)
    assert near(src.decode_image(_pil_bytes(rgb.convert("CMYK"), "TIFF")), 1)
    assert near(src.decode_image(_pil_bytes(rgb.convert("P"), "PNG")), 60)  # palette: quantised colours
    rgb16 = src.decode_image(encode(want.astype(np.uint16) * 257))  # 16-bit colour PNG
    np.testing.assert_array_equal(rgb16, want)
    gray_alpha = src.decode_image(_pil_bytes(rgb.convert("LA"), "PNG"))
    np.testing.assert_array_equal(gray_alpha, np.repeat(np.asarray(rgb.convert("L"))[:, :, None], 3, 2))


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_their_first_frame(fmt):
    from PIL import Image

    frames = [Image.new("RGB", (40, 20), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3  # really animated
    out = src.decode_image(data)
    assert out.shape == (20, 40, 3)
    assert np.abs(out.astype(int) - [0, 0, 255]).max() <= 4  # red (BGR), the first frame


def test_exif_orientation_is_applied_as_detectron2_does():
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = src.decode_image(_pil_bytes(_two_colour_rgb(), "JPEG", quality=95, exif=exif))
    assert out.shape == (40, 20, 3)  # displayed upright: the 40x20 image stands 20 wide, 40 tall
    assert out[2, 10, 1] > 150 and out[38, 10, 2] > 150  # the green quarter is now on top, red below


def test_decompression_bombs_are_refused_from_the_header_in_every_format():
    from PIL import Image

    small = Image.new("RGB", (60, 50), (9, 9, 9))
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        data = _pil_bytes(small, fmt)
        assert src.peek_image_size(data) == (50, 60), fmt
        with pytest.raises(src.ImageError, match="too large: 60x50"):
            src.decode_image(data, max_pixels=1000)
    # Headers that claim far more than the bytes hold: refused before any allocation.
    bmp = bytearray(_pil_bytes(small, "BMP"))
    bmp[18:26] = (12000).to_bytes(4, "little") + (12000).to_bytes(4, "little")  # 144M pixels
    with pytest.raises(src.ImageError, match="too large: 12000x12000"):
        src.decode_image(bytes(bmp))
    gif = bytearray(_pil_bytes(small, "GIF"))
    gif[6:10] = (65535).to_bytes(2, "little") * 2  # 4.3G pixels: Pillow's own guard names it
    with pytest.raises(src.ImageError, match="too large by its header"):
        src.decode_image(bytes(gif))
    png = bytearray(_pil_bytes(small, "PNG"))
    png[16:24] = (50000).to_bytes(4, "big") * 2
    with pytest.raises(src.ImageError, match="too large: 50000x50000"):
        src.decode_image(bytes(png))


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------
def test_sources_folder_list_coco_and_webdataset(tmp_path):
    img = encode(np.zeros((8, 9, 3), np.uint8), ".jpg")
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for rel in ["b.jpg", "sub/a.PNG", "notes.txt"]:
        (tmp_path / "imgs" / rel).write_bytes(img)
    folder = src.list_images([tmp_path / "imgs"])
    assert ([(i.image_id, i.path.endswith(p)) for i, p in zip(folder, ["b.jpg", "a.PNG"])]
            == [("b", True), ("a", True)])

    (tmp_path / "list.txt").write_text("# comment\nb.jpg\n\nsub/a.PNG\n")
    listed = src.list_images([tmp_path / "list.txt"], image_root=tmp_path / "imgs")
    assert [i.image_id for i in listed] == ["b", "a"]
    assert src.read_bytes(listed[1]) == img

    coco = {"images": [{"id": 42, "file_name": "sub/a.PNG", "height": 8, "width": 9},
                       {"id": 7, "file_name": "b.jpg", "height": 8, "width": 9}], "annotations": [],
            "categories": []}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    items = src.list_images([tmp_path / "ann.json"], image_root=tmp_path / "imgs")
    assert [i.image_id for i in items] == ["7", "42"]
    assert src.read_bytes(items[1]) == img

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ["000000001", "000000002"]:
            for ext, data in [(".jpg", img), (".txt", b"a caption"),
                              (".json", b'{"key": "%s"}' % key.encode())]:
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    wds = src.list_images([shard])
    assert [i.image_id for i in wds] == ["000000001", "000000002"]
    assert src.read_bytes(wds[0]) == img
    assert src.load_image(wds[1].path).shape == (8, 9, 3)  # "shard.tar::member" paths, as stored in records
    assert [i.image_id for i in src.list_images([tmp_path], kind="wds")] == ["000000001", "000000002"]

    assert src.dedupe(folder + folder) == folder  # the same files listed twice
    with pytest.raises(src.SourceError, match=r"two files have image id 'b': .*b.jpg and .*b.jpg"):
        src.dedupe(folder + [src.ImageItem("b", str(tmp_path / "elsewhere" / "b.jpg"))])
    with pytest.raises(src.SourceError, match="not found"):
        src.list_images([tmp_path / "missing"])
