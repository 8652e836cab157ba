"""Benchmark detector.layers.roi_align against torchvision.ops.roi_align on VL-BERT's workload.

Images 600x1000 -> res4 map 38x63x1024 (stride 16), 14x14 bins, 10/36/100 boxes per image, sampling
ratio 0 and 1, float32 and bfloat16, aligned False and True. Both ops get the same inputs in the same
process; for bfloat16 torchvision runs under autocast (its only low-precision path: it upcasts to float32).
Batch 8 and 32 on CUDA, 2 on the CPU. Prints one table; ratios are torchvision time / ours (> 1: ours is
faster). "fwd GB/s" counts the bytes of the input map and the output once each, "%copy" relates that to
a plain device copy measured in the same run.

    python benchmarks/roi_align.py                 # CUDA if available, else CPU
    python benchmarks/roi_align.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import torch  # noqa: E402
from torchvision.ops import roi_align as tv_roi_align  # noqa: E402

from detector.layers import roi_align  # noqa: E402

IMAGE_H, IMAGE_W, STRIDE, CHANNELS, OUT = 600, 1000, 16, 1024, 14


def timer(device: str, fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    n = 64 * 2**20  # 256 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(device, lambda: dst.copy_(src), repeats=5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_boxes(batch: int, per_image: int, device: str, seed: int) -> torch.Tensor:
    """Realistic region proposals: 16..600 px boxes inside the 600x1000 image, as (K, 5) rois."""
    g = torch.Generator().manual_seed(seed)
    k = batch * per_image
    w = torch.exp(torch.empty(k).uniform_(math.log(16), math.log(600), generator=g))
    h = torch.exp(torch.empty(k).uniform_(math.log(16), math.log(600), generator=g))
    x1 = torch.rand(k, generator=g) * (IMAGE_W - w).clamp(min=0)
    y1 = torch.rand(k, generator=g) * (IMAGE_H - h).clamp(min=0)
    idx = torch.arange(batch).repeat_interleave(per_image).float()
    return torch.stack([idx, x1, y1, x1 + w, (y1 + h).clamp(max=IMAGE_H)], 1).to(device)


def bench_case(device: str, batch: int, per_image: int, sr: int, dtype: torch.dtype, aligned: bool,
               repeats: int, copy_gbs: float) -> dict[str, object]:
    fh, fw = math.ceil(IMAGE_H / STRIDE), math.ceil(IMAGE_W / STRIDE)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, CHANNELS, fh, fw, device=device, generator=g).to(dtype)
    rois = make_boxes(batch, per_image, device, seed=per_image)
    scale = 1.0 / STRIDE
    low = dtype != torch.float32

    def ours(inp):
        return roi_align(inp, rois, OUT, scale, sr, aligned)

    def theirs(inp):
        if low:
            with torch.autocast(device, dtype=dtype):
                return tv_roi_align(inp, rois, OUT, scale, sr, aligned)
        return tv_roi_align(inp, rois, OUT, scale, sr, aligned)

    row: dict[str, object] = dict(device=device, B=batch, boxes=per_image, sr=sr, dtype=str(dtype)[6:],
                                  aligned=aligned)
    with torch.no_grad():
        row["fwd"] = timer(device, lambda: ours(x), repeats)
        row["tv_fwd"] = timer(device, lambda: theirs(x), repeats)
    xa = x.clone().requires_grad_()
    out_a = ours(xa)
    grad = torch.randn(out_a.shape, device=device, generator=g).to(out_a.dtype)
    def ours_backward():
        return torch.autograd.grad(out_a, xa, grad, retain_graph=True)

    row["bwd"] = timer(device, ours_backward, repeats)
    if device == "cuda":  # the CPU backward is deterministic by construction: the same kernel
        torch.use_deterministic_algorithms(True)
        try:
            row["det_bwd"] = timer(device, ours_backward, repeats)
        finally:
            torch.use_deterministic_algorithms(False)
    xb = x.clone().requires_grad_()
    out_b = theirs(xb)
    grad_b = grad.to(out_b.dtype)
    row["tv_bwd"] = timer(device, lambda: torch.autograd.grad(out_b, xb, grad_b, retain_graph=True), repeats)
    bytes_moved = x.numel() * x.element_size() + out_a.numel() * out_a.element_size()
    row["fwd_gbs"] = bytes_moved / (row["fwd"] * 1e-3) / 1e9
    row["pct_copy"] = 100 * row["fwd_gbs"] / copy_gbs
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    header = (f"{'dev':4} {'B':>2} {'box':>3} {'sr':>2} {'dtype':8} {'algn':5} | "
              f"{'fwd ms':>8} {'tv ms':>8} {'x':>5} | {'bwd ms':>8} {'tv ms':>8} {'x':>5} | "
              f"{'det ms':>8} {'det/bwd':>7} | {'fwd GB/s':>8} {'%copy':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "det_bwd" in r:
            det = f"{r['det_bwd']:8.2f} {r['det_bwd'] / r['bwd']:7.2f}"
        else:
            det = f"{'(=bwd)':>8} {'':>7}"
        print(f"{r['device']:4} {r['B']:2d} {r['boxes']:3d} {r['sr']:2d} {r['dtype']:8} "
              f"{str(r['aligned']):5} | "
              f"{r['fwd']:8.2f} {r['tv_fwd']:8.2f} {r['tv_fwd'] / r['fwd']:5.2f} | "
              f"{r['bwd']:8.2f} {r['tv_bwd']:8.2f} {r['tv_bwd'] / r['bwd']:5.2f} | {det} | "
              f"{r['fwd_gbs']:8.1f} {r['pct_copy']:5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (aligned=False only, VL-BERT's setting)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--boxes", type=int, nargs="+", default=[10, 36, 100], help="boxes per image")
    parser.add_argument("--json", default="", help="also write the rows (times in ms) to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    rows = []
    meta = {}
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
        copy_gbs = copy_bandwidth(device)
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"# {device}: {name}; copy bandwidth {copy_gbs:.1f} GB/s")
        meta[device] = {"name": name, "copy_gbs": copy_gbs}
        batches = [8, 32] if device == "cuda" else [2]
        aligned = [False] if args.quick else [False, True]
        repeats = args.repeats or (10 if device == "cuda" else 3)
        for batch, per_image, sr, dtype, al in itertools.product(
            batches, args.boxes, [0, 1], [torch.float32, torch.bfloat16], aligned
        ):
            rows.append(bench_case(device, batch, per_image, sr, dtype, al, repeats, copy_gbs))
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"devices": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
