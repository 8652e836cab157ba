#!/usr/bin/env python
r"""Run the detector over an image collection into a resumable RoI store (bottom-up-attention outputs).

    python tools/extract_rois.py --config-file configs/vg/faster_rcnn_R_101_C4_attr_caffemaxpool.yaml \
        --weights faster_rcnn_from_caffe_attr_original.pkl --input images/ --output rois/ [--features]

Re-running the same command skips the images already stored; a killed run loses at most the batch in
flight. Unreadable images are listed in `failures.tsv` next to the store and never stop the run.
Boxes below --conf-thresh top an image up to --min-boxes, as bottom-up attention's generate_tsv does, however
low their scores; an image whose detector proposed fewer regions than --min-boxes is stored with all of
them, listed in `failures.tsv` ("stored K boxes, fewer than --min-boxes") and counted in the summary.
`--shard i/N` (or torchrun's RANK / WORLD_SIZE) writes part i of N; `RoIStore(output)` reads all parts.
Records are keyed by image id (`detector.image_sources`): COCO file names (`COCO_train2014_000000000856.jpg`,
`000000000856.jpg`) and COCO json inputs give the numeric COCO id (`856`), which the task readers look
up; other files their stem, webdataset samples their key. Two files with one id stop the run before
anything is written.
Exit status: 0 when anything was processed (or everything was already done), 1 when nothing could be
processed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector.checkpoint import CheckpointError, file_sha256, load_checkpoint  # noqa: E402
from detector.config import ConfigError, load_cfg  # noqa: E402
from detector.extraction import PreparedImage, RegionExtractor, Selection, prepare_image  # noqa: E402
from detector.modeling import build_detector  # noqa: E402
from detector.workers import init_worker  # noqa: E402
from detector import image_sources as sources  # noqa: E402
from detector.roi_store import (  # noqa: E402
    SCHEMA_VERSION, RoIRecord, RoIStore, RoIStoreError, RoIStoreWriter, header_differences, npz_ids,
    shard_name, write_npz)

log = logging.getLogger("extract_rois")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """Bad command-line arguments (exit status 2)."""


class ExtractionInterrupted(RuntimeError):
    """Ctrl-C (SIGINT): the batch in flight was not stored (a batch is one transaction), the rest is."""

    def __init__(self, stored: int, output: str):
        super().__init__(f"interrupted (SIGINT) after storing {stored} images in this run; {output} is "
                         "consistent: run the same command again to continue where it stopped")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="detector YAML (configs/vg/...)")
    p.add_argument("--weights", required=True,
                   help="checkpoint (.pth/.pkl/.safetensors, Detectron2 or bua layout)")
    p.add_argument("--input", required=True, nargs="+",
                   help="image folder, text file of paths, COCO-style json, or webdataset .tar shard(s)")
    p.add_argument("--input-type", default="auto", choices=["auto", "folder", "list", "coco", "wds"])
    p.add_argument("--image-root", default=None,
                   help="root for relative paths of a list file / COCO file_name (default: cwd / the json's "
                        "folder)")
    p.add_argument("--output", required=True, help="store directory (lmdb) or npz directory")
    p.add_argument("--format", default="lmdb", choices=["lmdb", "npz"])
    p.add_argument("--min-boxes", type=int, default=10)
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--conf-thresh", type=float, default=0.2)
    p.add_argument("--nms-thresh", type=float, default=0.3)
    p.add_argument("--features", action="store_true", help="store the 2048-d region features (fp16 in lmdb)")
    p.add_argument("--boxes-from", default=None,
                   help="RoI store with the boxes to use (Fast R-CNN mode: features/scores for exactly those "
                        "boxes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images decoded and stored per store transaction; the network runs image by image, "
                        "so the stored values never depend on it")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                   help="autocast dtype for the network (bf16/fp16 on GPUs); scores and boxes stay fp32")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images (0: decode in this process)")
    p.add_argument("--max-pixels", type=int, default=sources.DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels than this")
    p.add_argument("--shard", default=None,
                   help="i/N: process the i-th of N disjoint parts (default from torchrun)")
    p.add_argument("--overwrite", action="store_true", help="delete this shard's existing output first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


def resolve_shard(arg: str | None, env: dict[str, str]) -> tuple[int, int]:
    """`--shard i/N`, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if arg is None:
        world = int(env.get("WORLD_SIZE", "1"))
        return (int(env.get("RANK", "0")), world) if world > 1 else (0, 1)
    try:
        index, count = (int(x) for x in arg.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like i/N (e.g. 0/4), got {arg!r}") from None
    if not 0 <= index < count:
        raise UsageError(f"--shard {arg}: need 0 <= i < N")
    return index, count


def resolve_device(arg: str, env: dict[str, str]) -> torch.device:
    """A bare `cuda` under torchrun means this process's GPU (LOCAL_RANK)."""
    if arg == "cuda" and "LOCAL_RANK" in env:
        return torch.device("cuda", int(env["LOCAL_RANK"]))
    try:
        device = torch.device(arg)
    except RuntimeError as exc:
        raise UsageError(f"--device {arg!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {arg}: CUDA is not available on this machine")
    return device


def build_header(cfg_yaml: str, weights: str, selection: Selection, args: argparse.Namespace,
                 boxes_header: dict[str, Any] | None) -> dict[str, Any]:
    """What produced the store; `fingerprint` covers everything that changes the stored values."""
    mode = "fast_rcnn" if args.boxes_from else "faster_rcnn"
    weights_sha = file_sha256(weights)
    result_defining = {
        "detector_config": cfg_yaml, "weights_sha256": weights_sha, "mode": mode, "features": args.features,
        "precision": args.precision,
        "selection": None if args.boxes_from else vars_of(selection),
        "boxes_from": None if boxes_header is None else boxes_header.get("fingerprint"),
    }
    fingerprint = hashlib.sha256(json.dumps(result_defining, sort_keys=True).encode()).hexdigest()
    return {**result_defining, "weights": os.path.basename(weights), "fingerprint": fingerprint,
            "schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def vars_of(selection: Selection) -> dict[str, Any]:
    return {f: getattr(selection, f) for f in selection.__dataclass_fields__}


class FailureLog:
    """`image_id<TAB>path<TAB>reason` lines; rewritten per run (failed images are retried on re-runs).
    Images stored with fewer boxes than asked are listed too (`short`), but not counted as failed."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.short = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO = open(path, "w", encoding="utf-8")
        self._f.write("image_id\tpath\treason\n")
        self._f.flush()

    def add(self, item: sources.ImageItem, reason: str) -> None:
        self._line(item, reason, "skipping")
        self.count += 1

    def add_short(self, record: RoIRecord, min_boxes: int) -> None:
        """`record` was stored with fewer than `min_boxes` boxes: every region its detector proposed."""
        k = record.num_boxes
        self._line(record, f"stored {k} boxes, fewer than --min-boxes {min_boxes}: the detector proposed "
                   f"only {k} regions", "short")
        self.short += 1

    def _line(self, item: sources.ImageItem | RoIRecord, reason: str, what: str) -> None:
        clean = " ".join(reason.split())
        log.warning("%s %s: %s", what, item.path, clean)
        self._f.write(f"{item.image_id}\t{item.path}\t{clean}\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _collate(batch: list) -> list:
    return batch


class Sink:
    """Where finished records go: an LMDB store (one transaction per batch) or npz files."""

    def __init__(self, args: argparse.Namespace, shard: tuple[int, int], header: dict[str, Any]):
        out = Path(args.output)
        index, count = shard
        suffix = "" if count == 1 else shard_name(index, count)
        if args.format == "lmdb":
            self.dir = out / suffix if suffix else out
            self.writer: RoIStoreWriter | None = RoIStoreWriter(self.dir, header, overwrite=args.overwrite)
            self.failures_path = self.dir / "failures.tsv"
            self.done = self.writer.existing_ids()
        else:
            self.dir = out
            self.writer = None
            self.dir.mkdir(parents=True, exist_ok=True)
            self.failures_path = out / (f"failures-{suffix}.tsv" if suffix else "failures.tsv")
            header_path = out / (f"header-{suffix}.json" if suffix else "header.json")
            self.done = self._npz_state(header_path, header, args.overwrite, shard)
        try:
            refuse_stem_keyed_coco(self.dir, self.done)
        except RoIStoreError:
            self.close()
            raise

    def _npz_state(self, header_path: Path, header: dict[str, Any], overwrite: bool,
                   shard: tuple[int, int]) -> set[str]:
        # A header without any npz file (a run that failed before storing anything) pins nothing.
        if header_path.exists() and not overwrite and npz_ids(self.dir):
            old = json.loads(header_path.read_text(encoding="utf-8"))
            if old.get("fingerprint") != header["fingerprint"]:
                differ = header_differences(old, header)
                raise RoIStoreError(f"{self.dir}: npz files were written with a different detector config, "
                                    f"weights or selection settings ({', '.join(differ) or 'fingerprint'} "
                                    "differ); write to a new output or pass --overwrite")
            return npz_ids(self.dir)
        header_path.write_text(json.dumps(header, indent=1, sort_keys=True), encoding="utf-8")
        return set() if overwrite else npz_ids(self.dir)

    def write(self, records: list[RoIRecord]) -> None:
        if self.writer is not None:
            self.writer.write_batch(records)
        else:
            for record in records:
                write_npz(self.dir, record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def refuse_stem_keyed_coco(directory: Path, done: set[str]) -> None:
    """Stores written before COCO file names were keyed by their numeric id hold `COCO_val2014_...`
    keys; resuming one would store each of those images a second time under its new key."""
    old = sorted(k for k in done if sources.image_id_from_stem(k) != k)
    if old:
        raise RoIStoreError(
            f"{directory}: holds {len(old)} records keyed by COCO file stem (e.g. {old[0]!r}), written "
            f"before COCO images were keyed by their numeric id ({sources.image_id_from_stem(old[0])!r}); "
            "resuming would store them twice. Training reads such a store as it is; to add images, write a "
            "new --output (or pass --overwrite)")


def stored_boxes(boxes_store: RoIStore, item: sources.ImageItem) -> RoIRecord | None:
    """The --boxes-from record of an image: by its image id, or by its file stem (stores keyed by stem)."""
    found = boxes_store.get(item.image_id)
    if found is None and sources.TAR_SEPARATOR not in item.path:
        found = boxes_store.get(Path(item.path).stem)
    return found


def load_model(cfg, weights: str) -> torch.nn.Module:
    model = build_detector(cfg)
    load_checkpoint(model, weights)
    return model.eval()


def run(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, int]:
    env = dict(os.environ if env is None else env)
    shard = resolve_shard(args.shard, env)
    device = resolve_device(args.device, env)
    if args.batch_size < 1 or args.num_workers < 0 or args.max_pixels < 1:
        raise UsageError("--batch-size and --max-pixels must be >= 1 and --num-workers >= 0")
    try:
        selection = Selection(args.min_boxes, args.max_boxes, args.conf_thresh, args.nms_thresh)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights: file not found: {args.weights}")
    try:
        cfg = load_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", str(device)])
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    boxes_store = RoIStore(args.boxes_from) if args.boxes_from else None
    try:
        items = sources.dedupe(sources.list_images(args.input, args.image_root, args.input_type))
    except sources.SourceError as exc:
        raise UsageError(str(exc)) from None
    if not items:
        raise UsageError(f"no images found in {args.input}")
    index, count = shard
    items = items[index::count]

    portable = cfg.clone()
    portable.MODEL.DEVICE = ""  # resuming on another device (or GPU index) must not look like another config
    header = build_header(portable.dump(), args.weights, selection, args,
                          boxes_store.header if boxes_store is not None else None)
    model = load_model(cfg, args.weights)  # bad weights fail here, before any output exists
    sink = Sink(args, shard, header)
    todo = [it for it in items if it.image_id not in sink.done]
    stats = {"done": 0, "skipped": len(items) - len(todo), "failed": 0, "short": 0}
    failures = FailureLog(sink.failures_path)
    log.info("shard %d/%d: %d images, %d already done, %d to process", index, count, len(items),
             stats["skipped"], len(todo))
    try:
        if todo:
            extractor = RegionExtractor(model, cfg.INPUT.FORMAT, selection, with_features=args.features,
                                        autocast_dtype=PRECISIONS[args.precision])
            process(todo, extractor, cfg, args, sink, failures, boxes_store, stats)
    except KeyboardInterrupt:
        raise ExtractionInterrupted(stats["done"], args.output) from None
    finally:
        stats["failed"], stats["short"] = failures.count, failures.short
        failures.close()
        sink.close()
    return stats


def process(todo: list[sources.ImageItem], extractor: RegionExtractor, cfg, args: argparse.Namespace,
            sink: Sink, failures: FailureLog, boxes_store: RoIStore | None, stats: dict[str, int]) -> None:
    prepare = functools.partial(prepare_image, min_size=cfg.INPUT.MIN_SIZE_TEST,
                                max_size=cfg.INPUT.MAX_SIZE_TEST)
    dataset = sources.ImageDataset(todo, prepare, args.max_pixels)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=_collate, worker_init_fn=init_worker if args.num_workers else None,
                        pin_memory=False, persistent_workers=False)
    bar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, disable=args.no_progress, smoothing=0.1)
    for batch in loader:
        ready: list[tuple[sources.ImageItem, PreparedImage, np.ndarray | None]] = []
        for item, prepared, reason in batch:
            if reason is None and boxes_store is not None:
                given = stored_boxes(boxes_store, item)
                if given is None:
                    reason = "no boxes for this image id in --boxes-from"
                else:
                    ready.append((item, prepared, given.boxes))
                    continue
            if reason is not None:
                failures.add(item, reason)
            else:
                ready.append((item, prepared, None))
        records = extract_batch(ready, extractor, boxes_store is not None, failures)
        sink.write(records)  # one transaction: the batch is stored entirely or not at all
        if boxes_store is None:  # given boxes are stored as given, however few
            for record in records:
                if record.num_boxes < extractor.selection.min_boxes:
                    failures.add_short(record, extractor.selection.min_boxes)
        failures.flush()
        stats["done"] += len(records)
        bar.update(len(batch))
        bar.set_postfix(failed=failures.count, refresh=False)
    bar.close()


def extract_batch(ready: list, extractor: RegionExtractor, given_boxes: bool,
                  failures: FailureLog) -> list[RoIRecord]:
    """Run a batch; if it fails as a whole (e.g. out of memory), retry image by image to isolate the
    culprit."""
    if not ready:
        return []
    try:
        outputs = extractor([p for _, p, _ in ready], [b for _, _, b in ready] if given_boxes else None)
    except Exception as exc:  # noqa: BLE001
        if extractor.device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory error, before the one-by-one retry
        if len(ready) == 1:
            failures.add(ready[0][0], f"detector failed: {type(exc).__name__}: {exc}")
            return []
        return [r for one in ready for r in extract_batch([one], extractor, given_boxes, failures)]
    return [RoIRecord(image_id=item.image_id, path=item.path, height=p.height, width=p.width, **out)
            for (item, p, _), out in zip(ready, outputs)]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # Ctrl-C stops the run cleanly even when the parent started us with SIGINT ignored (Python then keeps
    # it ignored: pytest-xdist workers, background jobs of scripts), as train_net installs its own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    try:
        stats = run(args)
    except (UsageError, RoIStoreError, CheckpointError) as exc:
        log.error("%s", exc)
        return 2
    except ExtractionInterrupted as exc:
        log.error("%s", exc)
        return 128 + signal.SIGINT
    except OSError as exc:  # e.g. failures.tsv or header.json in a read-only or full output folder
        if exc.filename is None:
            raise
        log.error("cannot write or read %s: %s", exc.filename, exc.strerror or exc)
        return 2
    short = f", fewer boxes than --min-boxes {stats['short']}" if stats["short"] else ""
    listed = " (see failures.tsv)" if stats["failed"] or stats["short"] else ""
    print(f"done {stats['done']}, skipped {stats['skipped']} (already stored), failed {stats['failed']}"
          f"{short}{listed}", flush=True)
    return 0 if stats["done"] + stats["skipped"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
