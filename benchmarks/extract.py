"""Region extraction throughput (tools/extract_rois.py's per-image work) and where the time goes.

    python benchmarks/extract.py           # VG R101-C4 config, 480x800 JPEGs resized to 600x1000
    python benchmarks/extract.py --quick   # tiny R18 model, small images: a smoke run
    python benchmarks/extract.py --device cuda --json rows.json   # CUDA rows only, also as JSON
    python benchmarks/extract.py --device cuda --tool 64 --precision bf16 --json t.json   # the perf step

Table 1: images/s with and without --features (ratio to the fp32 no-features row of the same device;
with CUDA also bf16 autocast rows, batch 4; with --fold also the CPU model with FrozenBN folded into the
convolutions and channels-last weights, "fp32+fold"), and the
share of time in decoding (+ resize), backbone, RPN, RoI heads and box selection (per-class NMS).
"serial" counts decoding in the same process; "pipelined" is the model alone, which is what the tool
reaches when its DataLoader workers decode ahead. Table 2: the box selection alone against a Python
loop of per-class NMS (what the original extractors ran), both measured here.

Weights are random (nothing is downloaded), made to behave like trained ones where it matters for timing
(see `sane_random_weights`): FrozenBN statistics from one image so the RPN yields proposals, and a class
scorer under which a few classes dominate each box (with raw random weights every class is near 1/1601
and the selection would take its rarer, slower exact top-up path).

`--tool N` measures tools/extract_rois.py itself instead: JPEG files on disk, decoded and resized in its
DataLoader workers, the store written, `--features`. Steady images/s = N / (wall of 2N images - wall of
N images), so start-up (building the model, loading weights, the workers) cancels. Then the records of
the first `--compare` images are checked against the per-image CPU fp32 policy (RegionExtractor, one image
per call): boxes matched by IoU, features by relative L2 error, and against a one-image call of the same
device and precision (batch independence: equal bit for bit).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, when run as a script from a checkout

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_iou, nms  # noqa: E402

from detector.config import load_cfg  # noqa: E402
from detector.extraction import (  # noqa: E402
    RegionExtractor, Selection, max_conf_dense, prepare_image, select_boxes)
from detector.modeling import build_detector  # noqa: E402
from detector.image_sources import decode_image  # noqa: E402

VG = ROOT / "configs" / "vg" / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml"
TINY = ROOT / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"
STAGES = ("backbone", "rpn", "roi_heads", "selection")


def make_jpegs(n: int, h: int, w: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = cv2.resize(rng.integers(0, 255, (12, 20, 3), np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def sane_random_weights(model: torch.nn.Module, image: np.ndarray, min_size: int, max_size: int) -> None:
    """Make a randomly initialised detector behave like a trained one where it matters for timing.

    Random convolutions under identity FrozenBN blow activations up through ResNet-101 (res4 ~1e6), so the
    RPN's boxes degenerate and no proposal survives. Each FrozenBN takes the statistics of its input on
    one image (a data-dependent init), then cls_score is rescaled so that a few classes dominate each box.
    """
    from detector.layers.batch_norm import FrozenBatchNorm2d

    def set_stats(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)).clamp(min=1e-4))

    hooks = [m.register_forward_pre_hook(set_stats)
             for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    p = prepare_image(image, min_size, max_size)
    x = model.preprocess_image(torch.from_numpy(p.image).permute(2, 0, 1)[None].float().to(model.device))
    with torch.no_grad():
        res4 = model.features(x)
        props = model.proposal_generator(res4, [p.image.shape[:2]])[0]["proposal_boxes"]
        f = model.roi_heads.region_features(res4, [props])
        for h in hooks:
            h.remove()
        f = model.roi_heads.region_features(res4, [props])
        mu, sd = f.mean(0), f.std(0).clamp(min=1e-3)
        cls = model.roi_heads.box_predictor.cls_score
        w = torch.randn_like(cls.weight) * 4.0 / (sd * f.shape[1] ** 0.5)
        cls.weight.copy_(w)
        cls.bias.copy_(-w @ mu)


def bench_device(cfg_path: Path, device: torch.device, jpegs: list[bytes], batch: int, warmup: int,
                 dtypes: tuple[torch.dtype, ...] = (torch.float32,), fold: bool = False) -> list[dict]:
    """Rows per dtype, with and without features; `fold`: also the float32 model with its FrozenBNs
    folded into the convolutions and channels-last weights (`optimize_for_inference(float32)`)."""
    cfg = load_cfg(cfg_path, ["MODEL.DEVICE", str(device)])
    lo, hi = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    torch.manual_seed(0)
    model = build_detector(cfg)
    sane_random_weights(model, decode_image(jpegs[0]), lo, hi)

    t = time.perf_counter()
    prepared = [prepare_image(decode_image(j), lo, hi) for j in jpegs]
    decode_s = (time.perf_counter() - t) / len(jpegs)

    variants = [(str(d).replace("torch.", ""), model, d) for d in dtypes]
    if fold:
        folded = copy.deepcopy(model).optimize_for_inference(torch.float32)
        variants.append(("fp32+fold", folded, torch.float32))
    rows = []
    for (label, net, dtype), features in [(v, f) for v in variants for f in (False, True)]:
        ex = RegionExtractor(net, cfg.INPUT.FORMAT, Selection(), with_features=features, autocast_dtype=dtype)
        for i in range(warmup):
            ex(prepared[i * batch:(i + 1) * batch] or prepared[:batch])
        ex.timings.clear()
        boxes = 0
        for i in range(0, len(prepared), batch):
            boxes += sum(len(r["boxes"]) for r in ex(prepared[i:i + batch]))
        per_image = {k: ex.timings[k] / len(prepared) for k in STAGES}
        model_s = sum(per_image.values())
        rows.append({"device": str(device), "dtype": label, "features": features,
                     "decode": decode_s, **per_image,
                     "model": model_s, "boxes": boxes / len(prepared)})
    return rows


def _extract_tool():
    """tools/extract_rois.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("_bench_extract_rois", ROOT / "tools" / "extract_rois.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_tool(cfg_path: Path, device: torch.device, n: int, size: tuple[int, int], precision: str,
               batch: int, workers: int, compare: int) -> dict:
    """tools/extract_rois.py on N and 2N JPEG files (steady images/s from the difference), then its
    records of the first `compare` images against the per-image CPU fp32 policy and a one-image call."""
    from detector.roi_store import RoIStore

    tool = _extract_tool()
    h, w = size
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        jpegs = make_jpegs(2 * n, h, w)
        for count in (n, 2 * n):
            folder = tmp / f"jpegs{count}"
            folder.mkdir()
            for i, data in enumerate(jpegs[:count]):
                (folder / f"img_{i:05d}.jpg").write_bytes(data)
        cfg = load_cfg(cfg_path, ["MODEL.DEVICE", "cpu"])
        lo, hi = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        torch.manual_seed(0)
        cpu_model = build_detector(cfg)
        sane_random_weights(cpu_model, decode_image(jpegs[0]), lo, hi)
        weights = tmp / "weights.pth"
        torch.save(cpu_model.state_dict(), weights)

        def run(count: int) -> float:
            argv = ["--config-file", str(cfg_path), "--weights", str(weights), "--input",
                    str(tmp / f"jpegs{count}"), "--output", str(tmp / f"store{count}"), "--features",
                    "--device", str(device), "--precision", precision, "--batch-size", str(batch),
                    "--num-workers", str(workers), "--no-progress"]
            t = time.perf_counter()
            stats = tool.run(tool.parse_args(argv))
            if stats["done"] != count or stats["failed"]:
                raise RuntimeError(f"extract_rois.py on {count} images: {stats}")
            return time.perf_counter() - t

        t_n, t_2n = run(n), run(2 * n)
        # None when the difference is lost in the noise (tiny runs, where start-up dominates)
        steady = n / (t_2n - t_n) if t_2n > t_n * 1.05 else None

        prepared = [prepare_image(decode_image(j), lo, hi) for j in jpegs[:compare]]
        cpu_ex = RegionExtractor(cpu_model, cfg.INPUT.FORMAT, Selection(), with_features=True)
        dev_model = build_detector(load_cfg(cfg_path, ["MODEL.DEVICE", str(device)]))
        dev_model.load_state_dict(cpu_model.state_dict())
        dev_ex = RegionExtractor(dev_model, cfg.INPUT.FORMAT, Selection(), with_features=True,
                                 autocast_dtype=tool.PRECISIONS[precision])
        with RoIStore(tmp / f"store{2 * n}") as store:
            records = [store[f"img_{i:05d}"] for i in range(compare)]
        agreement = [compare_records(r, cpu_ex([p])[0], dev_ex([p])[0]) for r, p in zip(records, prepared)]
    return {"device": str(device), "precision": precision, "images": n, "batch": batch, "workers": workers,
            "size": [h, w], "wall_n": t_n, "wall_2n": t_2n, "images_per_s": steady,
            "images_per_s_with_start": 2 * n / t_2n, "compare": agreement}


def compare_records(stored, cpu: dict[str, np.ndarray], one: dict[str, np.ndarray]) -> dict:
    """A stored record against the CPU fp32 per-image policy (`cpu`) and a one-image call on the same
    device and precision (`one`): boxes and features of the first against the other two."""
    boxes = torch.from_numpy(stored.boxes.astype(np.float32)).reshape(-1, 4)
    ref = torch.from_numpy(cpu["boxes"].astype(np.float32)).reshape(-1, 4)
    iou = box_iou(ref, boxes) if len(boxes) else torch.zeros(len(ref), 1)
    best, match = iou.max(1) if len(ref) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    matched = best >= 0.9
    f_ref = torch.from_numpy(cpu["features"].astype(np.float32))[matched]
    f_got = torch.from_numpy(stored.features.astype(np.float32))[match[matched]]
    rel = (f_got - f_ref).norm(dim=1) / f_ref.norm(dim=1).clamp(min=1e-12)
    same = (np.array_equal(one["boxes"], stored.boxes)
            and np.array_equal(one["features"].astype(stored.features.dtype), stored.features))
    return {"boxes": len(boxes), "cpu_boxes": len(ref),
            "matched": float(matched.float().mean()) if len(ref) else 1.0,
            "feature_rel_err_median": float(rel.median()) if len(rel) else None,
            "feature_rel_err_max": float(rel.max()) if len(rel) else None, "equal_to_one_image_call": same}


def bench_selection(n: int, c: int, repeats: int) -> list[tuple[str, float]]:
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=gen) * 800
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 300 + 4], 1)
    probs = (torch.randn(n, c + 1, generator=gen) * 4.0).softmax(-1)

    def python_loop():
        mc = torch.zeros(n)
        for k in range(c):
            keep = nms(boxes, probs[:, k], 0.3)
            mc[keep] = torch.maximum(mc[keep], probs[keep, k])
        return mc

    def timed(fn):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    return [("python loop over classes (baseline)", timed(python_loop)),
            ("select_boxes (pairs above floor, one NMS)",
             timed(lambda: select_boxes(boxes, probs, Selection()))),
            ("max_conf_dense (exact top-up path)", timed(lambda: max_conf_dense(boxes, probs[:, :-1], 0.3)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, small images")
    ap.add_argument("--images", type=int, default=None, help="images per setting (default 2, quick 8)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all: the CPU, then CUDA when available")
    ap.add_argument("--json", default="", help="also write the rows (seconds per image) to this file")
    ap.add_argument("--fold", action="store_true",
                    help="CPU: also rows of the model with FrozenBN folded and channels-last weights")
    ap.add_argument("--tool", type=int, default=0, metavar="N",
                    help="measure tools/extract_rois.py on N and 2N JPEG files instead (see above)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16", help="with --tool")
    ap.add_argument("--batch-size", type=int, default=8, help="with --tool")
    ap.add_argument("--workers", type=int, default=None, help="with --tool (default: CPU cores, at most 8)")
    ap.add_argument("--compare", type=int, default=3, help="with --tool: images checked against the CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")

    cfg_path, (h, w) = (TINY, (90, 120)) if args.quick else (VG, (480, 800))
    if args.tool:
        report_tool(args, cfg_path, (h, w))
        return
    n = args.images or (8 if args.quick else 2)
    jpegs = make_jpegs(n, h, w)
    rows = []
    if args.device in ("cpu", "all"):
        rows += bench_device(cfg_path, torch.device("cpu"), jpegs, batch=1, warmup=1 if args.quick else 0,
                             fold=args.fold)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        rows += bench_device(cfg_path, torch.device("cuda"), make_jpegs(max(n, 32), h, w), batch=4, warmup=2,
                             dtypes=(torch.float32, torch.bfloat16))

    name = "tiny R18-C4" if args.quick else "VG R101-C4"
    print(f"\nExtraction, {name}, {n} {w}x{h} JPEGs (resized per config), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    head = (f"{'device':<8} {'dtype':<9} {'features':<8} {'s/img':>8} {'serial img/s':>12} "
            f"{'pipelined img/s':>15} {'ratio':>6} {'boxes':>6} "
            + " ".join(f"{s:>9}" for s in ("decode", *STAGES)))
    print(head)
    print("-" * len(head))
    base = {}
    for r in rows:
        total = r["decode"] + r["model"]
        base.setdefault(r["device"], r["model"])
        shares = [r["decode"] / total] + [r[s] / total for s in STAGES]
        print(f"{r['device']:<8} {r['dtype']:<9} {'yes' if r['features'] else 'no':<8} {total:>8.3g} "
              f"{1 / total:>12.3g} {1 / r['model']:>15.3g} "
              f"{base[r['device']] / r['model']:>6.2f} {r['boxes']:>6.1f} "
              + " ".join(f"{100 * s:>8.1f}%" for s in shares))

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": name, "rows": rows}, f, indent=1)

    sel = bench_selection(300, 1600, repeats=1 if args.quick else 3)
    print("\nBox selection, 300 proposals x 1600 classes (CPU)")
    print(f"{'method':<44} {'ms':>9} {'speed-up':>9}")
    for label, seconds in sel:
        print(f"{label:<44} {1000 * seconds:>9.1f} {sel[0][1] / seconds:>8.1f}x")


def report_tool(args: argparse.Namespace, cfg_path: Path, size: tuple[int, int]) -> None:
    device = torch.device("cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda")
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    r = bench_tool(cfg_path, device, args.tool, size, args.precision, args.batch_size, workers, args.compare)
    name = "tiny R18-C4" if args.quick else "VG R101-C4"
    steady = "not measurable" if r["images_per_s"] is None else f"{r['images_per_s']:.1f} img/s"
    print(f"tools/extract_rois.py, {name}, --features, {r['precision']} on {device}, batch {r['batch']}, "
          f"{workers} workers, {size[1]}x{size[0]} JPEGs: {steady} steady "
          f"({args.tool} images in {r['wall_n']:.1f} s, {2 * args.tool} in {r['wall_2n']:.1f} s; "
          f"{r['images_per_s_with_start']:.1f} img/s with start-up)")
    print(f"\n{'image':>5} {'boxes':>5} {'CPU boxes':>9} {'IoU>=0.9':>8} {'feat. rel. err (median/max)':>28} "
          f"{'= one-image call':>16}")
    for i, c in enumerate(r["compare"]):
        err = ("-" if c["feature_rel_err_median"] is None
               else f"{c['feature_rel_err_median']:.2e} / {c['feature_rel_err_max']:.2e}")
        print(f"{i:>5} {c['boxes']:>5} {c['cpu_boxes']:>9} {c['matched']:>8.0%} {err:>28} "
              f"{'yes' if c['equal_to_one_image_call'] else 'NO':>16}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": name, "tool": r}, f, indent=1)


if __name__ == "__main__":
    main()
