"""Region (RoI) stores: what `tools/extract_rois.py` writes and what training reads.

Two formats:

* LMDB (default): one record per image, keyed by its image id (utf-8), plus a `__header__` record with
  the detector config, weights hash and schema version. A record is a small JSON header followed by raw
  little-endian numpy buffers (no pickle, so a store from an untrusted source cannot run code on load).
  Writes go in one transaction per batch: a killed writer leaves whole records only.
  Sharded runs write `DST/part-00000-of-00004`, ... which `RoIStore(DST)` opens together as one.
* npz: one `<image_id>.npz` per image with bottom-up-attention.pytorch's fields (`x`, `bbox`, `num_bbox`,
  `image_h`, `image_w`, `info`) so existing downstream code reads ours; each file is written to a temporary
  name and renamed, so a partial file never carries the final name.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import lmdb
import numpy as np

from detector.atomic import atomic_write

SCHEMA_VERSION = 1
HEADER_KEY = b"__header__"
_RESERVED_PREFIX = "__"
_MAGIC = b"RoI1"
_ALIGN = 16
_SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")

# Array fields of a record: name -> (stored dtype, trailing shape or None for [K]).
# Class/attribute probabilities keep the detector's own column layout (Detectron2: background / "no
# attribute" in the LAST column); ids are arg-max over the real classes only, 0-based, like the npz files.
ARRAY_FIELDS: dict[str, tuple[str, int | None]] = {
    "boxes": ("<f4", 4),
    "class_probs": ("<f2", -1),
    "attr_probs": ("<f2", -1),
    "object_ids": ("<i4", None),
    "object_conf": ("<f4", None),
    "attr_ids": ("<i4", None),
    "attr_conf": ("<f4", None),
    "features": ("<f2", -1),
}


class RoIStoreError(RuntimeError):
    """A store that cannot be opened, read or written as asked."""


@dataclasses.dataclass
class RoIRecord:
    """The regions of one image. Boxes are XYXY in original-image pixels; K rows in every array."""

    image_id: str
    path: str
    height: int
    width: int
    boxes: np.ndarray
    class_probs: np.ndarray | None = None
    attr_probs: np.ndarray | None = None
    object_ids: np.ndarray | None = None
    object_conf: np.ndarray | None = None
    attr_ids: np.ndarray | None = None
    attr_conf: np.ndarray | None = None
    features: np.ndarray | None = None

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_FIELDS if getattr(self, name) is not None}


def check_image_id(image_id: Any) -> str:
    """Image ids are non-empty strings (COCO ids as decimal text) that do not collide with reserved keys."""
    text = str(image_id)
    if not text or text.startswith(_RESERVED_PREFIX) or "\n" in text or "\t" in text:
        raise RoIStoreError(f"invalid image id {text!r}: must be non-empty, without tabs/newlines, "
                            f"and not start with {_RESERVED_PREFIX!r}")
    return text


# ---------------------------------------------------------------------------------------------------
# Record encoding
# ---------------------------------------------------------------------------------------------------
def encode_record(record: RoIRecord) -> bytes:
    """Serialise a record: magic, u32 meta length, JSON meta, then aligned raw arrays."""
    k = record.num_boxes
    arrays: list[tuple[str, np.ndarray]] = []
    for name, array in record.arrays().items():
        dtype, width = ARRAY_FIELDS[name]
        array = np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False))
        want_ndim = 1 if width is None else 2
        if (array.ndim != want_ndim or array.shape[0] != k
            or (width not in (None, -1) and array.shape[1] != width)):
            raise RoIStoreError(
                f"image {record.image_id!r}: field '{name}' has shape {array.shape}, "
                f"expected [{k}{'' if width is None else ', ' + ('D' if width == -1 else str(width))}]")
        arrays.append((name, array))
    meta: dict[str, Any] = {
        "image_id": check_image_id(record.image_id),
        "path": str(record.path),
        "height": int(record.height),
        "width": int(record.width),
        "arrays": [],
    }
    offset = 0
    for name, array in arrays:
        meta["arrays"].append([name, array.dtype.str, list(array.shape), offset, array.nbytes])
        offset += _pad(array.nbytes)
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    head = _MAGIC + struct.pack("<I", len(meta_bytes)) + meta_bytes
    out = bytearray(head + b"\0" * (_pad(len(head)) - len(head)))
    for _, array in arrays:
        data = array.tobytes()
        out += data + b"\0" * (_pad(len(data)) - len(data))
    return bytes(out)


def decode_record(data: bytes | memoryview, key: str = "?") -> RoIRecord:
    """Parse `encode_record`'s bytes, validating every offset, dtype and shape (no pickle involved)."""
    buf = bytearray(data)  # writable copy: arrays handed to torch.from_numpy must own writable memory
    if len(buf) < 8 or buf[:4] != _MAGIC:
        raise RoIStoreError(f"record {key!r}: not an RoI record (bad magic)")
    (meta_len,) = struct.unpack_from("<I", buf, 4)
    if 8 + meta_len > len(buf):
        raise RoIStoreError(f"record {key!r}: truncated header")
    try:
        meta = json.loads(bytes(buf[8:8 + meta_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RoIStoreError(f"record {key!r}: corrupt header: {exc}") from None
    base = _pad(8 + meta_len)
    fields: dict[str, np.ndarray] = {}
    for name, dtype, shape, offset, nbytes in meta["arrays"]:
        if name not in ARRAY_FIELDS or dtype != ARRAY_FIELDS[name][0]:
            raise RoIStoreError(f"record {key!r}: unexpected field '{name}' of dtype {dtype}")
        count = int(np.prod(shape)) if shape else 1
        if count * np.dtype(dtype).itemsize != nbytes or base + offset + nbytes > len(buf):
            raise RoIStoreError(f"record {key!r}: field '{name}' shape {shape} does not fit the record")
        fields[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=base + offset).reshape(shape)
    if "boxes" not in fields:
        raise RoIStoreError(f"record {key!r}: has no 'boxes'")
    return RoIRecord(image_id=meta["image_id"], path=meta["path"], height=meta["height"], width=meta["width"],
                     **fields)


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------
def shard_name(index: int, count: int) -> str:
    """`part-00002-of-00004`: the sub-store (or failures-file suffix) of shard `index` of `count`."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return f"part-{index:05d}-of-{count:05d}"


def _is_lmdb_dir(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def resolve_store_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One store directory, a directory of `part-i-of-N` stores, or a list of either -> store dirs.

    A sharded directory must hold every part 0..N-1 (a missing part means an unfinished or lost run;
    training on it silently would drop images).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise RoIStoreError("no RoI store paths given")
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if _is_lmdb_dir(path):
            out.append(path)
            continue
        if not path.is_dir():
            raise RoIStoreError(f"RoI store not found: {path}")
        parts = sorted(p for p in path.iterdir() if _SHARD_RE.match(p.name) and _is_lmdb_dir(p))
        if not parts:
            raise RoIStoreError(f"{path}: not an RoI store (no data.mdb and no part-XXXXX-of-XXXXX stores)")
        counts = {int(_SHARD_RE.match(p.name).group(2)) for p in parts}
        if len(counts) != 1:
            raise RoIStoreError(f"{path}: parts from runs with different shard counts: {sorted(counts)}")
        (n,) = counts
        missing = sorted(set(range(n)) - {int(_SHARD_RE.match(p.name).group(1)) for p in parts})
        if missing:
            raise RoIStoreError(f"{path}: missing parts {[shard_name(i, n) for i in missing]} of {n}")
        out.extend(parts)
    return out


# ---------------------------------------------------------------------------------------------------
# LMDB writer / reader
# ---------------------------------------------------------------------------------------------------
def header_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the result-defining header fields that differ (for the refusal message)."""
    skip = {"fingerprint", "created", "weights", "schema_version"}
    return sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))


class RoIStoreWriter:
    """Appends records to one LMDB store; each `write_batch` is one atomic transaction.

    Re-opening an existing store checks that its header `fingerprint` equals the new one, so a resumed run
    never mixes regions from two different detectors or selection settings into one store.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], overwrite: bool = False,
                 map_size: int = 1 << 30):
        self.path = Path(path)
        try:
            if overwrite and self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(self.path), map_size=map_size, subdir=True, max_dbs=0, readahead=False)
        except (OSError, lmdb.Error) as exc:  # e.g. a read-only or full file system
            raise RoIStoreError(f"{self.path}: cannot open the RoI store for writing: "
                                f"{_reason(exc)}") from None
        with self._env.begin() as txn:
            existing = txn.get(HEADER_KEY)
        # A store without records (a run that failed before storing anything) pins nothing: its header
        # is replaced, so the corrected command is not refused for settings that produced no data.
        if existing is not None and not self.existing_ids():
            existing = None
        if existing is None:
            header = {"schema_version": SCHEMA_VERSION, **header}
            self._put_many([(HEADER_KEY, json.dumps(header, sort_keys=True).encode("utf-8"))])
            self.header = header
        else:
            self.header = json.loads(existing.decode("utf-8"))
            if self.header.get("schema_version") != SCHEMA_VERSION:
                raise RoIStoreError(f"{self.path}: schema version {self.header.get('schema_version')} "
                                    f"!= {SCHEMA_VERSION}; write to a new output or pass --overwrite")
            if self.header.get("fingerprint") != header.get("fingerprint"):
                differ = header_differences(self.header, header)
                raise RoIStoreError(
                    f"{self.path}: was written with a different detector config, weights or selection "
                    f"settings ({', '.join(differ) or 'fingerprint'} differ); write to a new output or "
                    f"pass --overwrite")

    def existing_ids(self) -> set[str]:
        with self._env.begin() as txn:
            return {k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)
                    if not k.startswith(_RESERVED_PREFIX.encode())}

    def write_batch(self, records: Iterable[RoIRecord]) -> None:
        items = [(check_image_id(r.image_id).encode("utf-8"), encode_record(r)) for r in records]
        if items:
            self._put_many(items)

    def _put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as exc:  # disk full, I/O error: the transaction was aborted as a whole
                raise RoIStoreError(f"{self.path}: cannot store a batch of {len(items)} record(s) "
                                    f"({_reason(exc)}); none of it was stored, the records stored before are "
                                    "intact") from None

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> "RoIStoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# py-lmdb refuses to open one environment twice in a process, so readers share them, reference-counted.
_ENVS: dict[str, tuple[lmdb.Environment, int, int]] = {}  # realpath -> (env, pid, users)


def _acquire_env(path: Path) -> lmdb.Environment:
    key = os.path.realpath(path)
    env, pid, users = _ENVS.get(key, (None, -1, 0))
    if env is not None and pid != os.getpid():
        # Inherited through fork: py-lmdb still counts it as open here, so close the child's copy first.
        # That only unmaps the child's view and clears the child's reader slots; the parent's fcntl
        # locks stay (they belong to the parent process).
        env.close()
        env = None
    if env is None:
        kwargs = dict(subdir=True, readonly=True, readahead=False, meminit=False, max_readers=2048)
        try:
            env = lmdb.open(key, lock=True, **kwargs)
        except lmdb.Error:  # read-only media: no lock file can be made; reading is safe when idle
            env = lmdb.open(key, lock=False, **kwargs)
        pid, users = os.getpid(), 0
    _ENVS[key] = (env, pid, users + 1)
    return env


def _release_env(path: Path) -> None:
    key = os.path.realpath(path)
    env, pid, users = _ENVS.get(key, (None, -1, 0))
    if env is None or pid != os.getpid():
        return
    if users <= 1:
        env.close()
        del _ENVS[key]
    else:
        _ENVS[key] = (env, pid, users - 1)


class RoIStore:
    """Read-only view of one or more LMDB RoI stores (e.g. all parts of a sharded run) as one.

    LMDB environments are opened lazily in each process, so a store built in the parent can be handed
    to forked or spawned DataLoader workers.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        self.paths = resolve_store_paths(paths)
        self._envs: list[lmdb.Environment] | None = None
        self._pid = -1
        self._ids: list[str] | None = None
        if len(self.paths) > 1:
            self.ids()  # stores read as one must not overlap: checked once, here

    # lifetime -----------------------------------------------------------------------------------------
    def _open(self) -> list[lmdb.Environment]:
        if self._envs is None or self._pid != os.getpid():
            # Envs inherited through fork must not be used (nor closed) in the child: drop and reopen.
            self._envs = [_acquire_env(p) for p in self.paths]
            self._pid = os.getpid()
        return self._envs

    def close(self) -> None:
        if self._envs is not None and self._pid == os.getpid():
            for path in self.paths:
                _release_env(path)
        self._envs = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down lmdb already
            pass

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_envs": None, "_pid": -1, "_ids": self._ids}

    def __enter__(self) -> "RoIStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # metadata -----------------------------------------------------------------------------------------
    @property
    def headers(self) -> list[dict[str, Any]]:
        out = []
        for path, env in zip(self.paths, self._open()):
            with env.begin() as txn:
                raw = txn.get(HEADER_KEY)
            if raw is None:
                raise RoIStoreError(f"{path}: has no {HEADER_KEY.decode()} record")
            out.append(json.loads(raw.decode("utf-8")))
        return out

    @property
    def header(self) -> dict[str, Any]:
        return self.headers[0]

    # access -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        total = 0
        for env in self._open():
            with env.begin() as txn:
                total += txn.stat()["entries"] - (txn.get(HEADER_KEY) is not None)
        return total

    def ids(self) -> list[str]:
        if self._ids is None:
            ids: list[str] = []
            owner: dict[str, Path] = {}
            for path, env in zip(self.paths, self._open()):
                with env.begin() as txn:
                    for k in txn.cursor().iternext(keys=True, values=False):
                        if k.startswith(_RESERVED_PREFIX.encode()):
                            continue
                        image_id = k.decode("utf-8")
                        if len(self.paths) > 1:
                            if image_id in owner:  # lookups would silently return the first store's record
                                raise RoIStoreError(
                                    f"image id {image_id!r} is in both {owner[image_id]} and {path}: stores "
                                    "opened together must hold disjoint ids")
                            owner[image_id] = path
                        ids.append(image_id)
            self._ids = ids
        return list(self._ids)

    def _get_raw(self, image_id: Any) -> bytes | None:
        key = str(image_id).encode("utf-8")
        for env in self._open():
            with env.begin() as txn:
                raw = txn.get(key)
            if raw is not None:
                return raw
        return None

    def __contains__(self, image_id: Any) -> bool:
        return not str(image_id).startswith(_RESERVED_PREFIX) and self._get_raw(image_id) is not None

    def __getitem__(self, image_id: Any) -> RoIRecord:
        raw = None if str(image_id).startswith(_RESERVED_PREFIX) else self._get_raw(image_id)
        if raw is None:
            raise KeyError(f"image id {str(image_id)!r} not in RoI store {[str(p) for p in self.paths]}")
        return decode_record(raw, str(image_id))

    def get(self, image_id: Any, default: RoIRecord | None = None) -> RoIRecord | None:
        try:
            return self[image_id]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[RoIRecord]:
        for env in self._open():
            with env.begin() as txn:
                for key, value in txn.cursor():
                    if not key.startswith(_RESERVED_PREFIX.encode()):
                        yield decode_record(value, key.decode("utf-8"))


# ---------------------------------------------------------------------------------------------------
# npz (bottom-up-attention.pytorch layout)
# ---------------------------------------------------------------------------------------------------
def write_npz(directory: str | os.PathLike, record: RoIRecord) -> Path:
    """Write `<image_id>.npz` atomically (temporary file, fsync, rename).

    `x` (features, only when extracted), `bbox`, `num_bbox`, `image_h`, `image_w` and the `info` dict are
    bottom-up-attention.pytorch's; `x` is float16, the precision the extractor computes them in (theirs
    is float32: a float32 array of fp16-rounded values would claim a precision it does not have; cast it
    with `.astype(np.float32)` where code needs float32); `info` is an object array, so reading *it* needs
    `allow_pickle=True` as in their code. The same values are also stored as plain arrays (`image_id`,
    `objects_id`, ..., plus `cls_prob`/`attr_prob`) so `read_npz` never unpickles. A detector without an
    attribute head writes no `attrs_id`/`attrs_conf`/`attr_prob` at all (in `info` neither), so nothing
    reads as a real attribute; readers that expect them fail on the missing key instead.
    """
    directory = Path(directory)
    image_id = check_image_id(record.image_id)
    if "/" in image_id or image_id in (".", ".."):
        raise RoIStoreError(f"image id {image_id!r} cannot be used as an npz file name")
    k = record.num_boxes
    # Ids and confidences the detector did not produce are left out (not zero-filled: attribute id 0 with
    # confidence 0 would read as a real, if unlikely, attribute).
    produced = (("objects_id", record.object_ids, np.int64), ("objects_conf", record.object_conf, np.float32),
                ("attrs_id", record.attr_ids, np.int64), ("attrs_conf", record.attr_conf, np.float32))
    labels = {name: np.asarray(value).astype(dtype) for name, value, dtype in produced if value is not None}
    info = {"image_id": image_id, "image_h": int(record.height), "image_w": int(record.width), "num_boxes": k,
            **labels}
    fields: dict[str, Any] = {
        "bbox": record.boxes.astype(np.float32), "num_bbox": np.int64(k),
        "image_h": np.int64(record.height), "image_w": np.int64(record.width),
        "info": np.array(info, dtype=object),
        "image_id": np.str_(image_id), "path": np.str_(record.path), **labels,
    }
    if record.features is not None:
        fields["x"] = record.features.astype(np.float16)
    if record.class_probs is not None:
        fields["cls_prob"] = record.class_probs.astype(np.float16)
    if record.attr_probs is not None:
        fields["attr_prob"] = record.attr_probs.astype(np.float16)
    buf = io.BytesIO()
    np.savez_compressed(buf, **fields)
    final = directory / f"{image_id}.npz"
    try:
        atomic_write(final, lambda f: f.write(buf.getbuffer()))
    except OSError as exc:  # disk full, read-only folder: no half-written file is left behind
        raise RoIStoreError(f"cannot write {final}: {_reason(exc)}") from None
    return final


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def read_npz(path: str | os.PathLike) -> RoIRecord:
    """Read an npz written by `write_npz` without unpickling anything (the `info` dict is skipped)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            get = lambda name: data[name] if name in data.files else None  # noqa: E731
            features = get("x")
            return RoIRecord(
                image_id=str(data["image_id"]), path=str(data["path"]),
                height=int(data["image_h"]), width=int(data["image_w"]), boxes=data["bbox"],
                class_probs=get("cls_prob"), attr_probs=get("attr_prob"),
                object_ids=_as_int32(get("objects_id")), object_conf=get("objects_conf"),
                attr_ids=_as_int32(get("attrs_id")), attr_conf=get("attrs_conf"),
                features=features,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise RoIStoreError(f"{path}: not a readable RoI npz file: {exc}") from None


def _as_int32(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else array.astype(np.int32)


def npz_ids(directory: str | os.PathLike) -> set[str]:
    """Image ids with a finished `<id>.npz` in `directory` (temporaries start with a dot and are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return set()
    return {p.name[:-4] for p in directory.iterdir()
            if p.name.endswith(".npz") and not p.name.startswith(".")}
