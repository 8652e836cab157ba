"""Image collections for region extraction, and decoding that rejects bad files instead of crashing.

Sources (`list_images`): a folder (recursive), a text file of paths, a COCO-style json (its `images`),
or webdataset tar shards as img2dataset writes them (`<key>.jpg` next to `<key>.json` / `<key>.txt`).
Every item is an `ImageItem` with an image id and where its bytes are; tar members are addressed as
`shard.tar::member` and read by offset, so workers never hold tar files open.

Image ids (the RoI store's keys, and what every task reader looks records up by) are one notion across
the project, so that extraction and training meet:
* COCO file names give the numeric COCO id as decimal text: `COCO_train2014_000000000856.jpg` (also
  `COCO_val2014_...`, `COCO_test2015_...`) and COCO 2017's `000000000856.jpg` are image `856`, as in
  the VQA v2, RefCOCO and COCO captions json files (`image_id_from_path`);
* a COCO-style json input gives its `images[].id`;
* a webdataset shard gives the sample key, and any other file its stem.
Two different files with one image id are an error naming both (`dedupe`).
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import tarfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pbm", ".pgm", ".ppm")
DEFAULT_MAX_PIXELS = 100_000_000
TAR_SEPARATOR = "::"
# COCO 2014/2015 file names (`COCO_<split><year>_<12-digit id>`) and COCO 2017's bare 12-digit names.
_COCO_STEM = re.compile(r"^(?:COCO_[a-z]+\d{4}_)?(\d{12})$")


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason written to the failures file."""


class SourceError(ValueError):
    """An input collection that cannot be listed (bad path, bad json, ...)."""


@dataclasses.dataclass(frozen=True)
class ImageItem:
    image_id: str
    path: str  # a file path, or "<tar path>::<member name>"
    offset: int = -1  # byte offset of a tar member's data; -1 for plain files
    size: int = -1


# ---------------------------------------------------------------------------------------------------
# Image ids
# ---------------------------------------------------------------------------------------------------
def image_id_from_stem(stem: str) -> str:
    """The image id of a file stem: the COCO id ("856") for COCO names, else the stem itself."""
    match = _COCO_STEM.match(stem)
    return str(int(match.group(1))) if match else stem


def image_id_from_path(path: str | os.PathLike) -> str:
    """The image id of an image file (see the module docstring): the COCO id or the file stem."""
    return image_id_from_stem(Path(path).stem)


# ---------------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------------
def list_images(inputs: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None,
                kind: str = "auto") -> list[ImageItem]:
    """List the images of every input (in order, each source deterministically sorted)."""
    items: list[ImageItem] = []
    for src in inputs:
        src_kind = _detect_kind(Path(src)) if kind == "auto" else kind
        if src_kind == "folder":
            items.extend(_list_folder(Path(src)))
        elif src_kind == "list":
            items.extend(_list_text(Path(src), image_root))
        elif src_kind == "coco":
            items.extend(_list_coco(Path(src), image_root))
        elif src_kind == "wds":
            tars = sorted(Path(src).rglob("*.tar")) if Path(src).is_dir() else [Path(src)]
            for tar in tars:
                items.extend(_list_tar(tar))
        else:
            raise SourceError(f"unknown input kind {src_kind!r} (folder, list, coco, wds)")
    return items


def _detect_kind(src: Path) -> str:
    if src.is_dir():
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in src.rglob("*") if p.is_file())
        return "folder" if has_images or not any(src.rglob("*.tar")) else "wds"
    if not src.is_file():
        raise SourceError(f"input not found: {src}")
    if src.suffix.lower() == ".json":
        return "coco"
    if src.suffix.lower() == ".tar":
        return "wds"
    return "list"


def _list_folder(root: Path) -> list[ImageItem]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [ImageItem(image_id_from_path(p), str(p)) for p in files]


def _list_text(path: Path, image_root: str | os.PathLike | None) -> list[ImageItem]:
    """One path per line; blank lines and `#` comments skipped; relative paths are under --image-root."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line) if image_root is None else Path(image_root) / line
            items.append(ImageItem(image_id_from_path(p), str(p)))
    return items


def _list_coco(path: Path, image_root: str | os.PathLike | None) -> list[ImageItem]:
    """Walk a COCO-style json's `images`; `file_name` is relative to --image-root (default: the json's
    folder)."""
    from pycocotools.coco import COCO  # heavy import, only for this source kind

    try:
        coco = COCO(str(path))
    except Exception as exc:  # pycocotools raises assorted errors on bad files
        raise SourceError(f"{path}: not a readable COCO-style json: {exc}") from None
    root = Path(image_root) if image_root is not None else path.parent
    items = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        if "file_name" not in info:
            raise SourceError(f"{path}: image {image_id} has no 'file_name'")
        items.append(ImageItem(str(image_id), str(root / info["file_name"])))
    return items


def _list_tar(path: Path) -> list[ImageItem]:
    """Image members of an img2dataset webdataset shard; the id is the sample key (member name stem)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{path}: not a readable (uncompressed) tar shard: {exc}") from None
    items = []
    for m in members:
        name = Path(m.name)
        if name.suffix.lower() in IMAGE_EXTENSIONS:
            items.append(ImageItem(name.stem, f"{path}{TAR_SEPARATOR}{m.name}", m.offset_data, m.size))
    return sorted(items, key=lambda it: it.path)


def dedupe(items: Iterable[ImageItem]) -> list[ImageItem]:
    """The items with repeated listings of one file dropped (e.g. a folder given twice).

    Two different files with one image id would overwrite each other's record in the store (or the
    second would be silently skipped), so that is a SourceError naming both files.
    """
    seen: dict[str, ImageItem] = {}
    kept = []
    for item in items:
        first = seen.get(item.image_id)
        if first is None:
            seen[item.image_id] = item
            kept.append(item)
        elif os.path.realpath(first.path) != os.path.realpath(item.path):
            raise SourceError(f"two files have image id {item.image_id!r}: {first.path} and {item.path} "
                              "(COCO file names are keyed by their numeric id, other files by their stem); "
                              "rename one, or extract them into separate stores")
    return kept


# ---------------------------------------------------------------------------------------------------
# Reading and decoding
# ---------------------------------------------------------------------------------------------------
def read_bytes(item: ImageItem) -> bytes:
    if item.offset >= 0:
        tar_path = item.path.split(TAR_SEPARATOR, 1)[0]
        with open(tar_path, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
        if len(data) != item.size:
            raise ImageError(f"tar member truncated ({len(data)} of {item.size} bytes)")
        return data
    try:
        with open(item.path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageError(f"cannot read file {item.path}: {exc.strerror or exc}") from None


def load_image(path: str) -> np.ndarray:
    """Decode an image given as a file path or `shard.tar::member` (for tools that revisit a record)."""
    if TAR_SEPARATOR in path:
        tar_path, member = path.split(TAR_SEPARATOR, 1)
        with tarfile.open(tar_path, "r:") as tar:
            info = tar.getmember(member)
        return decode_image(read_bytes(ImageItem("", path, info.offset_data, info.size)))
    return decode_image(read_bytes(ImageItem("", path)))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> HxWx3 uint8 BGR, or ImageError with the reason.

    Decodes with IMREAD_ANYDEPTH | IMREAD_ANYCOLOR rather than IMREAD_UNCHANGED: both keep 16-bit and
    grayscale data for us to normalise, but only the former applies the EXIF orientation, as the original
    extractors' cv2.imread did (boxes must match the image as people see it). The defined conversions:
    EXIF orientation applied; grayscale repeated to 3 channels; alpha dropped; 16-bit scaled to 8 bits;
    CMYK and palette images converted to BGR by the decoder; animated GIF/PNG/WebP: the first frame.
    The size is read from the header first (`peek_image_size`), so a decompression bomb is refused
    before anything is allocated.
    """
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    size = peek_image_size(data)
    if size is not None:
        h, w = size
        if h <= 0 or w <= 0:
            raise ImageError(f"zero-size image ({w}x{h}) in header")
        if h * w > max_pixels:
            raise ImageError(f"image too large: {w}x{h} = {w * h} pixels > --max-pixels {max_pixels}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise ImageError("not a decodable image (corrupt, truncated or unsupported format)")
    if img.size == 0 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageError(f"zero-size image {img.shape}")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageError(f"image too large: {img.shape[1]}x{img.shape[0]} pixels > --max-pixels {max_pixels}")
    return to_bgr_uint8(img)


def to_bgr_uint8(img: np.ndarray) -> np.ndarray:
    """A decoded file's array -> HxWx3 uint8 BGR: 16-bit and float [0, 1] data (which files hold) are
    scaled to 8 bits and gray+alpha loses its alpha; the channels then follow `as_bgr_uint8`."""
    if img.dtype == np.uint16:
        img = (img.astype(np.uint32) * 255 + 32767) // 65535
        img = img.astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.nan_to_num(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        img = img[:, :, 0]
    return as_bgr_uint8(img)


def as_bgr_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate and convert an image to HxWx3 uint8 following the rules in the module docstring."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name} must be a numpy array (HxWx3 uint8 BGR), got {type(image).__name__}")
    if image.size == 0 or image.ndim < 2 or min(image.shape[:2]) == 0:
        raise ImageError(f"{name} is empty (shape {image.shape}); was the file read correctly?")
    if image.dtype == np.uint16:
        raise ImageError(f"{name} is 16-bit (uint16, shape {image.shape}); the detector takes 8-bit images: "
                         "convert with (image >> 8).astype(np.uint8) or read with cv2.IMREAD_COLOR")
    if image.dtype != np.uint8:
        raise ImageError(f"{name} has dtype {image.dtype}; expected uint8 BGR values 0..255 "
                         "(for floats in 0..1 use (image * 255).round().astype(np.uint8))")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ImageError(f"{name} has shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if channels != 3:
        raise ImageError(f"{name} has {channels} channels (shape {image.shape}); expected 1, 3 or 4")
    return image


def peek_image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header without decoding, so huge images are refused cheaply: PNG and JPEG
    parsed here, other formats (GIF, BMP, WebP, TIFF, ...) by Pillow's header reader; None if unknown."""
    size = _png_or_jpeg_size(data)
    return size if size is not None else _pillow_header_size(data)


def _pillow_header_size(data: bytes) -> tuple[int, int] | None:
    """Pillow's `Image.open` reads only the header. Its own bomb guard refuses sizes above twice
    `Image.MAX_IMAGE_PIXELS` (about 179M pixels) whatever --max-pixels says."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large by its header: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        return None  # not a format Pillow knows, or a damaged header: the decoder decides
    return height, width


def _png_or_jpeg_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return h, w
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2:i + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return h, w
            i += 2 + length
    return None


class ImageDataset:
    """Decodes (and optionally transforms) items in DataLoader workers; failures come back as values.

    `__getitem__` returns (item, transformed image or None, failure reason or None), so one bad file
    never kills a worker or the run.
    """

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[np.ndarray], Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.items = list(items)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[ImageItem, Any, str | None]:
        item = self.items[index]
        try:
            image = decode_image(read_bytes(item), self.max_pixels)
            return item, (self.transform(image) if self.transform else image), None
        except ImageError as exc:
            return item, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder/resize crash is this file's failure, not the run's
            return item, None, f"{type(exc).__name__}: {exc}"
