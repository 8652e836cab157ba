"""End-to-end VL-BERT training step: throughput, model FLOP utilisation and time per stage.

Model (random weights, built in code): the VG R101-C4 detector as VL-BERT trains it (res5 stride 1,
dilation 2, 14x14 legacy RoIAlign, stem + res2 frozen, FrozenBN) + a BERT-base-sized encoder (12
layers, 768 hidden) with the VQA answer head (3129 answers). One question per image, batch 8 per
device, images 600x1000, 36 or 100 regions + the whole image, bf16 autocast, AdamW.

Stages are timed by difference: trunk = forward+backward of res2..res4 alone (loss on res4);
regions = trunk+RoIAlign+res5 minus trunk; transformer = the full forward+backward minus trunk+regions;
optimizer = AdamW step + zero_grad. FLOPs of one step are counted with torch's FlopCounterMode
(convolutions, matmuls, attention; RoIAlign and element-wise ops are not counted). Utilisation =
counted FLOPs / step time / peak, where peak is measured in the same run (a large bf16 matmul) and,
on NVIDIA H100/H200, also the dense bf16 spec figure (989 TFLOP/s).

    python benchmarks/train_step.py            # GPU (or CPU if none): the full sizes above
    python benchmarks/train_step.py --quick    # CPU smoke: R18 trunk, narrow res5, 2-layer BERT, small images
    python benchmarks/train_step.py --batch-sizes 8 16 32 --memory-cap-gib 40 --no-stages --sync-debug \
        --time-box 240                          # the perf step (make gpu-check STEPS=perf)

`--batch-sizes` measures each batch size in turn, per region count, until one does not fit: with
`--memory-cap-gib` the process may use only that much of the GPU (torch's per-process memory fraction), so
"the largest batch that fits 40 GiB" is measured on a larger card too; an out-of-memory batch is a row
marked "OOM" and ends that region count. `--time-box` seconds: no new row starts after it (the rows so far
are written). `--sync-debug` counts the host-device synchronisations of one training step on CUDA
(`torch.cuda.set_sync_debug_mode("warn")`, one warning per sync) and keeps where they come from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, when run as a script from a checkout

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from detector.modeling import build_detector  # noqa: E402
from e2e_vl.config import get_train_cfg  # noqa: E402
from e2e_vl.modeling.vlbert import VLBert  # noqa: E402

E2E_DETECTOR = ROOT / "configs" / "vg" / "vlbert_e2e_R_101_C4.yaml"
SPEC_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def build_model(quick: bool, device: torch.device) -> VLBert:
    cfg = get_train_cfg()
    cfg.merge_from_file(E2E_DETECTOR)
    if quick:
        cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                             "MODEL.RESNETS.WIDTH_PER_GROUP", "16", "MODEL.RESNETS.RES5_DILATION", "1",
                             "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7"])
        bert_cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=512)
    else:
        bert_cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072)
    torch.manual_seed(0)
    detector = build_detector(cfg)
    bert = BertModel(bert_cfg, add_pooling_layer=False)
    model = VLBert(detector, bert, heads=["vqa"], num_answers=3129, sep_token_id=102, mask_token_id=103)
    return model.to(device).train()


def make_batch(n_images: int, regions: int, size: tuple[int, int], text_len: int,
               device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = size
    xy = torch.rand(n_images, regions, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 16 + torch.rand(n_images, regions, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    boxes = [torch.cat([torch.tensor([[0.0, 0.0, w, h]]), torch.cat([xy[i], xy[i] + wh[i]], 1)])
             for i in range(n_images)]
    ids = torch.randint(1000, 20000, (n_images, text_len), generator=g)
    ids[:, 0], ids[:, -3], ids[:, -2], ids[:, -1] = 101, 102, 103, 102
    batch = {
        "images": torch.randint(0, 256, (n_images, 3, h, w), generator=g, dtype=torch.uint8),
        "image_sizes": torch.tensor([[h, w]] * n_images),
        "boxes": boxes,
        "sample_image_index": torch.arange(n_images),
        "input_ids": ids, "token_type_ids": torch.zeros_like(ids),
        "text_mask": torch.ones_like(ids, dtype=torch.bool),
        "answer_pos": torch.full((n_images,), text_len - 2),
        "vqa_targets": (torch.rand(n_images, 3129, generator=g) > 0.999).float(),
    }
    return {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: torch.device, n: int) -> float:
    """Measured bf16 matmul FLOP/s: the attainable peak on this machine, in this run."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sec = timed(lambda: a @ b, device, 2, 5)
    return 2 * n ** 3 / sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--regions", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8, quick 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="several batch sizes, smallest first (overrides --batch); stops at the first OOM")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="CUDA: let this process use at most this much GPU memory")
    p.add_argument("--time-box", type=float, default=None, help="seconds after which no new row starts")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage split (faster)")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count host-device syncs in one training step")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default="", help="also write the rows to this file (rewritten after each row)")
    a = p.parse_args()
    t_start = time.perf_counter()
    device = torch.device(a.device)
    regions = a.regions or ([10, 36] if a.quick else [36, 100])
    batch_sizes = a.batch_sizes or [a.batch or (2 if a.quick else 8)]
    if device.type == "cuda" and a.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gib * 2**30 / total), device)
    size = (128, 192) if a.quick else (600, 1000)
    repeats = a.repeats or (3 if a.quick else 10)
    warmup = 1 if a.quick else 3
    text_len = 16

    model = build_model(a.quick, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    peak = matmul_peak(device, 1024 if device.type == "cpu" else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    print(f"device: {name} ({torch.get_num_threads()} threads)" if device.type == "cpu"
          else f"device: {name}")
    model_name = ("R18-C4 (narrow res5, 7x7) + BERT L2/H128 (quick)" if a.quick
                  else "R101-C4 (res5 dil. 2, 14x14) + BERT-base")
    print(f"model: {model_name}, batch {','.join(map(str, batch_sizes))}, images {size[0]}x{size[1]}, "
          "bf16 autocast, AdamW")
    print(f"measured bf16 matmul peak: {peak / 1e12:.2f} TFLOP/s"
          + (f"; spec {spec:.0f} TFLOP/s" if spec else ""))
    print()
    header = (f"{'regions':>7} {'batch':>5} {'images/s':>9} {'step ms':>8} {'TFLOP/step':>10} "
              f"{'MFU(meas)':>9} {'MFU(spec)':>9} {'mem GiB':>7} {'syncs':>5} | {'trunk':>6} {'regions':>7} "
              f"{'transf.':>7} {'optim':>6}")
    print(header)
    print("-" * len(header))
    rows: list[dict] = []
    meta = {"device": name, "batch": batch_sizes[0], "batch_sizes": batch_sizes, "size": list(size),
            "peak_tflops_meas": peak / 1e12, "peak_tflops_spec": spec, "memory_cap_gib": a.memory_cap_gib,
            "rows": rows}
    for k in regions:
        for n_images in batch_sizes:
            if a.time_box is not None and time.perf_counter() - t_start > a.time_box:
                print(f"{k:>7} {n_images:>5} not measured: --time-box {a.time_box:.0f} s spent")
                rows.append({"regions": k, "batch": n_images, "skipped": "time box"})
                continue
            try:
                row = measure(model, opt, autocast, make_batch(n_images, k, size, text_len, device), device,
                              warmup, repeats, stages=not a.no_stages, sync_debug=a.sync_debug)
            except torch.cuda.OutOfMemoryError:
                rows.append({"regions": k, "batch": n_images, "oom": True})
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                cap = f" (cap {a.memory_cap_gib:g} GiB)" if a.memory_cap_gib else ""
                print(f"{k:>7} {n_images:>5} OOM{cap}")
                break
            t_step, flops = row["step_ms"] / 1e3, row["tflop_per_step"] * 1e12
            row.update(regions=k, batch=n_images, images_per_s=n_images / t_step,
                       mfu_meas=flops / t_step / peak,
                       mfu_spec=flops / t_step / (spec * 1e12) if spec else None)
            rows.append(row)
            mfu_spec = f"{row['mfu_spec']:9.1%}" if spec else f"{'-':>9}"
            mem = f"{row['memory_gib']:7.1f}" if row["memory_gib"] is not None else f"{'-':>7}"
            syncs = f"{row['syncs']:>5}" if row["syncs"] is not None else f"{'-':>5}"
            shares = (" ".join(f"{row['shares'][s]:>{w}.0%}" for s, w in zip(STAGE_NAMES, (6, 7, 7, 6)))
                      if row["shares"] else "(not split)")
            print(f"{k:>7} {n_images:>5} {row['images_per_s']:9.2f} {row['step_ms']:8.0f} "
                  f"{row['tflop_per_step']:10.3f} {row['mfu_meas']:9.1%} {mfu_spec} {mem} {syncs} | {shares}")
            if a.json:  # after every row: a run cut by its time limit keeps what it measured
                write_json(a.json, meta)
    if a.json:
        write_json(a.json, meta)
    sync_sites = Counter()
    for r in rows:
        sync_sites.update(r.get("sync_sites") or {})
    if sync_sites:
        print("\nhost-device syncs in one training step (torch.cuda.set_sync_debug_mode), by place:")
        for site, count in sync_sites.most_common():
            print(f"  {count:>4}  {site}")
    if device.type == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


STAGE_NAMES = ("trunk", "regions", "transformer", "optimizer")


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def count_syncs(fn) -> tuple[int, dict[str, int]]:
    """Host-device synchronisations while `fn()` runs (CUDA): torch warns once per sync in "warn" mode.
    Returns the count and the count per place (the Python line that asked for it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()  # the final sync is the harness's, not the step's
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), dict(sites)


def measure(model: VLBert, opt: torch.optim.Optimizer, autocast, batch: dict, device: torch.device,
            warmup: int, repeats: int, stages: bool, sync_debug: bool) -> dict:
    """One row: step time, counted FLOPs, peak memory, syncs and (with `stages`) the time per stage."""
    def trunk():
        with autocast:
            res4 = model.detector.features(model.backbone_input(batch))
        res4.float().mean().backward()

    def detector_part():
        with autocast:
            res4 = model.detector.features(model.backbone_input(batch))
            feats = model.detector.roi_heads.region_features(res4, batch["boxes"])
        feats.float().mean().backward()

    def fwd_bwd():
        with autocast:
            out = model(batch)
        out["loss"].backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    t_step = timed(step, device, warmup, repeats)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    syncs, sites = count_syncs(step) if sync_debug and device.type == "cuda" else (None, None)
    shares = None
    if stages:
        t_trunk = timed(lambda: (trunk(), opt.zero_grad(set_to_none=True)), device, 1, repeats)
        t_det = timed(lambda: (detector_part(), opt.zero_grad(set_to_none=True)), device, 1, repeats)
        t_full = timed(lambda: (fwd_bwd(), opt.zero_grad(set_to_none=True)), device, 1, repeats)
        parts = [t_trunk, max(0.0, t_det - t_trunk), max(0.0, t_full - t_det), max(0.0, t_step - t_full)]
        shares = dict(zip(STAGE_NAMES, (x / sum(parts) for x in parts)))
    return {"step_ms": t_step * 1e3, "tflop_per_step": flops / 1e12, "memory_gib": memory, "syncs": syncs,
            "sync_sites": sites, "shares": shares}


if __name__ == "__main__":
    main()
