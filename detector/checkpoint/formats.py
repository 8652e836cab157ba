"""Reading and writing detector weights in Detectron2's layout.

Readers return a flat {Detectron2 key: tensor} dict whatever the file:
- Detectron2 / e2e-vl `.pth` (`{"model": sd, ...}` or a bare state dict): torch.load(weights_only=True);
- Detectron2 model-zoo `.pkl` (`{"model": {key: ndarray}, "__author__": ...}`, e.g. the VG
  faster_rcnn_from_caffe_attr.pkl): the restricted unpickler;
- bottom-up-attention.pytorch `.pth` (background-first classes, two-way RPN scores, Caffe anchor order,
  box weights (1,1,1,1), attribute layers cls_embed/attr_linear1/attr_linear2): converted;
- `.safetensors`.
The format is recognised from the file's first bytes, not its name. Every reader first checks that the
file is whole (not empty or cut short, a torch zip's CRCs) and refuses NaN/inf weights; writers write
atomically (`atomic_write`), so a failure leaves neither a partial file nor a temporary behind.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch

from detector.atomic import atomic_write
from detector.checkpoint.unpickler import CheckpointError, safe_unpickle

FORMATS = ("detectron2", "pkl", "safetensors")
AUTHOR = "e2e-vl detector"
# A pre-1.6 torch.save file starts with the pickled long 0x1950A86A20F9469CFC6C (LONG1, 10 bytes).
_TORCH_LEGACY_PREFIX = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

BUA_RENAMES = {
    "roi_heads.box_predictor.cls_embed.": "roi_heads.box_predictor.cls_embedding.",
    "roi_heads.box_predictor.attr_linear1.": "roi_heads.box_predictor.fc_attr.",
    "roi_heads.box_predictor.attr_linear2.": "roi_heads.box_predictor.attr_score.",
}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, for provenance records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sniff_format(path: str) -> str:
    """'zip' (torch.save), 'safetensors', 'torch-legacy' or 'pickle', from the first bytes of `path`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file too short ({len(head)} bytes) to be a checkpoint")
    if zipfile.is_zipfile(path):
        return "zip"
    if head[:4] == b"PK\x03\x04":  # a zip's first entry without its end (central directory): cut short
        raise CheckpointError(f"{path}: truncated or damaged torch checkpoint ({os.path.getsize(path)} "
                              "bytes, the zip archive has no end); copy or save it again")
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and 0 < header_len < 100_000_000:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "torch-legacy" if head[2:14] == _TORCH_LEGACY_PREFIX else "pickle"
    raise CheckpointError(f"{path}: unrecognised checkpoint format (not a torch zip, safetensors or pickle "
                          "file)")


def verify_checkpoint_file(path: str | os.PathLike) -> str:
    """`sniff_format(path)`, after checking a torch zip's CRCs: torch.load does not, and reads a damaged
    file as weights with silently wrong values."""
    path = os.fspath(path)
    kind = sniff_format(path)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise CheckpointError(f"{path}: damaged torch checkpoint ({exc}); copy or save it "
                                  "again") from None
        if bad is not None:
            raise CheckpointError(f"{path}: damaged torch checkpoint (the zip entry {bad} fails its CRC "
                                  "check); copy or save it again")
    return kind


class NonFiniteWeightsError(CheckpointError):
    """A weight tensor holds NaN or inf: such a checkpoint is neither written nor used."""


def check_finite_weights(state: Mapping[str, Any], where: str) -> None:
    """Raise NonFiniteWeightsError naming the first floating tensor of `state` with a NaN or inf."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteWeightsError(
                f"{where}: model tensor '{name}' holds {bad} non-finite value(s) (NaN or inf); refusing it")


def weights_only_refusal(path: str | os.PathLike, exc: pickle.UnpicklingError) -> CheckpointError:
    """The error for a torch file that `weights_only=True` refused, in one line: torch's own message spans
    several and suggests `weights_only=False`, which is exactly what a file from a stranger must not get."""
    found = re.search(r"Unsupported (?:global|operand)[^.\n]*", str(exc))
    what = found.group(0) if found else str(exc).strip().splitlines()[0]
    return CheckpointError(f"{os.fspath(path)}: refused by torch.load(weights_only=True): it contains "
                           f"objects other than tensors and plain data ({what}); nothing in it was run")


def load_data_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The object stored in a torch.save (zip or legacy) or pickle file, admitting only tensors and plain
    data (torch.load(weights_only=True), or the restricted unpickler): a file that names code is refused
    with a CheckpointError before anything runs. Shared by every reader of weights that are not
    safetensors (Detectron2 files, VL-BERT releases, training checkpoints)."""
    path = os.fspath(path)
    kind = verify_checkpoint_file(path)
    if kind == "safetensors":
        raise CheckpointError(f"{path}: a safetensors file holds tensors only; read it with read_checkpoint")
    if kind == "pickle":
        return safe_unpickle(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise weights_only_refusal(path, exc) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read this torch checkpoint ({type(exc).__name__}: "
                              f"{exc})") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict in Detectron2 layout, metadata) of any supported file; bua layouts are NOT converted
    here."""
    path = os.fspath(path)
    metadata: dict[str, str] = {}
    if sniff_format(path) == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged or truncated safetensors file ({exc})") from None
    else:
        obj = load_data_file(path)
        sd = _unwrap(obj, path)
        if isinstance(obj, Mapping):
            metadata = {k: v for k, v in obj.items() if isinstance(v, str)}
            if isinstance(obj.get("metadata"), Mapping):
                metadata.update({k: v for k, v in obj["metadata"].items() if isinstance(v, str)})
    check_finite_weights(sd, path)
    return sd, metadata


def _unwrap(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    sd = obj.get("model", obj) if isinstance(obj.get("model"), Mapping) else obj
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                raise CheckpointError(f"{path}: '{key}' is an array of Python objects, not numbers")
            tensors[key] = torch.from_numpy(np.array(value))
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    if "__author__" not in obj and any("_branch2" in k or k.endswith("_bn_s") for k in tensors):
        raise CheckpointError(f"{path}: Caffe2 blob names (e.g. res2_0_branch2a_w) are not supported; use a "
                              "Detectron2-layout checkpoint (keys like backbone.res2.0.conv1.weight)")
    if all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# ---------------------------------------------------------------------------------------------------
# bottom-up-attention.pytorch -> Detectron2 layout
# ---------------------------------------------------------------------------------------------------
def is_bua_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    """bottom-up-attention.pytorch checkpoints: a background box row, 2 RPN logits per anchor or bua names."""
    if any(k.startswith(tuple(BUA_RENAMES)) for k in sd):
        return True
    cls, box = (sd.get("roi_heads.box_predictor.cls_score.weight"),
                sd.get("roi_heads.box_predictor.bbox_pred.weight"))
    if cls is not None and box is not None and box.shape[0] == 4 * cls.shape[0]:
        return True
    obj = sd.get("proposal_generator.rpn_head.objectness_logits.weight")
    deltas = sd.get("proposal_generator.rpn_head.anchor_deltas.weight")
    return obj is not None and deltas is not None and obj.shape[0] * 2 == deltas.shape[0]


def move_first_row_last(t: torch.Tensor) -> torch.Tensor:
    """Caffe's class order (background first) -> Detectron2's (background last), along dim 0."""
    return torch.cat((t[1:], t[:1]), dim=0)


def _anchor_permutation(num_sizes: int, num_ratios: int) -> torch.Tensor:
    """perm[d2_index] = caffe_index: Detectron2 orders anchors size-major, Caffe ratio-major."""
    return torch.tensor([r * num_sizes + s for s in range(num_sizes) for r in range(num_ratios)])


def convert_bua(sd: Mapping[str, torch.Tensor], num_sizes: int, num_ratios: int,
                bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)) -> dict[str, torch.Tensor]:
    """Convert a bottom-up-attention.pytorch state dict to Detectron2's layout.

    - classes: background row 0 -> last (cls_score, cls_embedding); bbox_pred drops the 4 background
      rows and scales its (1,1,1,1)-weighted deltas to `bbox_reg_weights`;
    - attributes: cls_embed/attr_linear1/attr_linear2 -> cls_embedding/fc_attr/attr_score, the
      "no attribute" row 0 -> last;
    - RPN: the two-way softmax (A background then A foreground channels) becomes one sigmoid logit
      fg - bg (same probability), and anchors are permuted from Caffe's ratio-major order.
    Not convertible: Caffe's "+1" box width convention and its anchor centres (7.5, 7.5), so
    proposals can differ slightly from bottom-up-attention.pytorch's.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for old, new in BUA_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    bp = "roi_heads.box_predictor."
    num_classes1 = out[bp + "cls_score.weight"].shape[0]  # C + 1
    for name in ("weight", "bias"):
        out[bp + f"cls_score.{name}"] = move_first_row_last(out[bp + f"cls_score.{name}"])
        box = out[bp + f"bbox_pred.{name}"]
        if box.shape[0] == 4 * num_classes1:
            box = box[4:]
        scale = torch.tensor(bbox_reg_weights, dtype=box.dtype).repeat(box.shape[0] // 4)
        out[bp + f"bbox_pred.{name}"] = box * (scale.view(-1, 1) if box.dim() == 2 else scale)
        if bp + f"attr_score.{name}" in out:
            out[bp + f"attr_score.{name}"] = move_first_row_last(out[bp + f"attr_score.{name}"])
    if bp + "cls_embedding.weight" in out:
        emb = out[bp + "cls_embedding.weight"][:num_classes1]  # bua allocates one unused extra row
        out[bp + "cls_embedding.weight"] = move_first_row_last(emb)

    rpn = "proposal_generator.rpn_head."
    perm = _anchor_permutation(num_sizes, num_ratios)
    num_anchors = num_sizes * num_ratios
    for name in ("weight", "bias"):
        obj = out.get(rpn + f"objectness_logits.{name}")
        if obj is not None:
            if obj.shape[0] == 2 * num_anchors:
                obj = obj[num_anchors:] - obj[:num_anchors]
            if obj.shape[0] != num_anchors:
                raise CheckpointError(f"{rpn}objectness_logits.{name} has {obj.shape[0]} channels; expected "
                                      f"{num_anchors} or {2 * num_anchors} for {num_sizes} sizes x "
                                      f"{num_ratios} ratios")
            out[rpn + f"objectness_logits.{name}"] = obj[perm]
        deltas = out.get(rpn + f"anchor_deltas.{name}")
        if deltas is not None:
            grouped = deltas.reshape(num_anchors, 4, *deltas.shape[1:])
            out[rpn + f"anchor_deltas.{name}"] = grouped[perm].reshape(deltas.shape)
    return out


# ---------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------
def write_checkpoint(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, fmt: str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a Detectron2-layout state dict as 'detectron2' (.pth), 'pkl' (model-zoo) or 'safetensors',
    atomically; an OS error (disk full, read-only folder) becomes one CheckpointError naming the file."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    path = os.fspath(path)
    writers: dict[str, Callable[[BinaryIO], Any]] = {
        "safetensors": lambda f: f.write(_safetensors_bytes(tensors, {"format": "detectron2", **metadata})),
        "detectron2": lambda f: torch.save({"model": tensors, "__author__": AUTHOR, "metadata": metadata}, f),
        "pkl": lambda f: pickle.dump({"model": {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                                                for k, v in tensors.items()},
                                      "__author__": AUTHOR, "metadata": metadata}, f, protocol=4),
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, writers[fmt])
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CheckpointError(f"cannot write {path}: {reason}; nothing was written") from None


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.clone() for k, v in tensors.items()}, metadata=dict(metadata))
