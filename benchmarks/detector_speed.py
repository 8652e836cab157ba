"""Throughput of the detector: Faster R-CNN inference and Fast R-CNN training steps.

Prints a table of images/s (best of N runs) for each (device, dtype) with the ratio to the fp32 row
of the same device measured in the same run. Weights are random (no downloads); with random weights the VG
model's class scores stay below SCORE_THRESH_TEST, so the per-class NMS stage is cheap here and real
weights may spend somewhat more time after the RoI head.

    python benchmarks/detector_speed.py            # VG R101-C4 at 600x1000, 100 boxes per image
    python benchmarks/detector_speed.py --quick    # tiny R18 model, small images: a smoke run

When Detectron2 is importable, a last section times Detectron2 and this package on the same stock
R101-C4 configuration (ROIAlignV2, res5 stride 2, no attributes: what stock Detectron2 can build),
fp32, and prints our speed relative to Detectron2's. Output equality is checked by
tests/test_detector_parity.py.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, when run as a script from a checkout

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from detector.config import load_cfg  # noqa: E402
from detector.modeling import build_detector  # noqa: E402

VG = ROOT / "configs" / "vg" / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml"
E2E = ROOT / "configs" / "vg" / "vlbert_e2e_R_101_C4.yaml"
TINY = ROOT / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _random_boxes(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5]) + 16
    return torch.cat((xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))), dim=1)


def _time(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Best of `iters` timed calls (seconds): on a shared machine the minimum is the least disturbed run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_inference(cfg_path: Path, device: torch.device, dtype: torch.dtype, h: int, w: int,
                    warmup: int, iters: int, optimize: bool = False) -> float:
    """Seconds per image of Faster R-CNN inference (backbone, RPN, RoI head, per-class NMS)."""
    cfg = load_cfg(cfg_path, ["MODEL.DEVICE", device.type])
    model = build_detector(cfg)
    if optimize:
        model.optimize_for_inference(dtype)
    gen = torch.Generator().manual_seed(0)
    x = model.preprocess_image((torch.rand(1, 3, h, w, generator=gen) * 255).to(device))

    def step():
        with torch.no_grad(), _autocast(device, dtype):
            model.inference(x, [(h, w)])

    return _time(step, warmup, iters, device)


def bench_train(cfg_path: Path, device: torch.device, dtype: torch.dtype, h: int, w: int, num_boxes: int,
                warmup: int, iters: int, channels_last: bool = False) -> float:
    """Seconds per image of a Fast R-CNN training step on given boxes (forward, losses, backward, SGD)."""
    cfg = load_cfg(cfg_path, ["MODEL.DEVICE", device.type])
    model = build_detector(cfg).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = model.preprocess_image((torch.rand(1, 3, h, w, generator=gen) * 255).to(device))
    boxes = [_random_boxes(num_boxes, h, w, gen).to(device)]
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    labels = torch.randint(0, num_classes + 1, (num_boxes,), generator=gen).to(device)
    attr_labels = torch.randint(0, cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES + 1, (num_boxes,),
                                generator=gen)

    def step():
        with _autocast(device, dtype):
            out = model.fast_rcnn(x, boxes, classes=[labels])
            loss = F.cross_entropy(out["class_logits"].float(), labels)
            if "attr_logits" in out:
                loss = loss + F.cross_entropy(out["attr_logits"].float(), attr_labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time(step, warmup, iters, device)


def _stock_overrides(quick: bool) -> list:
    """Config keys (Detectron2 names, valid for both implementations) of the stock comparison model."""
    pairs = [("MODEL.ROI_HEADS.NUM_CLASSES", 1600), ("MODEL.ANCHOR_GENERATOR.SIZES", [[64, 128, 256, 512]]),
             ("MODEL.RPN.POST_NMS_TOPK_TEST", 300), ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.2),
             ("MODEL.RESNETS.DEPTH", 101), ("MODEL.DEVICE", "cpu")]
    if quick:
        pairs += [("MODEL.RESNETS.DEPTH", 18), ("MODEL.RESNETS.RES2_OUT_CHANNELS", 64),
                  ("MODEL.ROI_HEADS.NUM_CLASSES", 10), ("MODEL.ANCHOR_GENERATOR.SIZES", [[16, 32, 64]])]
    return [item for pair in pairs for item in pair]


def bench_vs_detectron2(h: int, w: int, num_boxes: int, warmup: int, iters: int, quick: bool) -> None:
    """fp32 CPU inference and Fast R-CNN train step, Detectron2 vs ours, same stock config and sizes."""
    try:
        from detectron2.config import get_cfg as d2_get_cfg
        from detectron2.modeling import build_model as d2_build_model
        from detectron2.structures import Boxes
    except ImportError:
        print("Detectron2 not importable: no comparison rows")
        return
    overrides = _stock_overrides(quick)
    d2_cfg = d2_get_cfg()
    d2_cfg.merge_from_list(overrides)
    ours = build_detector(load_cfg(None, overrides))
    theirs = d2_build_model(d2_cfg).eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=gen) * 255
    boxes = _random_boxes(num_boxes, h, w, gen)
    labels = torch.randint(0, d2_cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1, (num_boxes,), generator=gen)

    def ours_infer():
        with torch.no_grad():
            ours.inference(ours.preprocess_image(image[None]), [(h, w)])

    def theirs_infer():
        with torch.no_grad():
            theirs.inference([{"image": image, "height": h, "width": w}], do_postprocess=False)

    def train_step(model, forward):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

        def step():
            loss = F.cross_entropy(forward(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def ours_forward():
        return ours.fast_rcnn(ours.preprocess_image(image[None]), [boxes])["class_logits"]

    def theirs_forward():  # Detectron2's Res5ROIHeads pieces on given boxes
        images = theirs.preprocess_image([{"image": image}])
        res4 = theirs.backbone(images.tensor)["res4"]
        pooled = theirs.roi_heads._shared_roi_transform([res4], [Boxes(boxes)])
        return theirs.roi_heads.box_predictor(pooled.mean(dim=(2, 3)))[0]

    cpu = torch.device("cpu")
    print(f"vs Detectron2 (stock R{'18' if quick else '101'}-C4, ROIAlignV2, fp32, cpu):")
    print(f"{'task':<22}{'impl':<12}{'s/img':>9}{'img/s':>9}{'vs d2':>9}")
    for task, ours_fn, theirs_fn in (
        ("Faster R-CNN infer", ours_infer, theirs_infer),
        ("Fast R-CNN train", None, None),
    ):
        if ours_fn is None:
            ours.train(), theirs.train()
            ours_fn, theirs_fn = train_step(ours, ours_forward), train_step(theirs, theirs_forward)
        d2_sec = _time(theirs_fn, warmup, iters, cpu)
        our_sec = _time(ours_fn, warmup, iters, cpu)
        print(f"{task:<22}{'detectron2':<12}{d2_sec:>9.3f}{1 / d2_sec:>9.2f}{'1.00x':>9}")
        print(f"{task:<22}{'ours':<12}{our_sec:>9.3f}{1 / our_sec:>9.2f}{d2_sec / our_sec:>8.2f}x",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and images, few iterations")
    parser.add_argument("--devices", default="cpu,cuda", help="comma list; cuda rows only when available")
    parser.add_argument("--dtypes", default="fp32,bf16,fp32+opt,bf16+opt,fp32+cl,bf16+cl",
                        help="comma list of fp32, bf16, fp16; suffix '+opt' (inference rows) first applies "
                             "model.optimize_for_inference(dtype), '+cl' (training rows) uses channels-last "
                             "weights, e.g. bf16+opt,bf16+cl")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip", default="",
                        help="comma list of sections to skip: inference,train,detectron2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        infer_cfg, train_cfg, (h, w), boxes, warmup, iters = TINY, TINY, (96, 128), 10, 1, args.iters or 2
    else:
        infer_cfg, train_cfg, (h, w), boxes, warmup, iters = VG, E2E, (600, 1000), 100, 1, args.iters or 3
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    devices = [torch.device(d) for d in args.devices.split(",")
               if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    skip = set(filter(None, args.skip.split(",")))
    print(f"detector benchmark: {h}x{w}, {boxes} boxes/image, batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, inference cfg {infer_cfg.name}, train cfg "
          f"{train_cfg.name}")
    print(f"{'task':<22}{'device':<8}{'dtype':<11}{'s/img':>9}{'img/s':>9}{'vs fp32':>9}")
    for task in ("inference", "train"):
        if task in skip:
            continue
        for device in devices:
            base = None
            for name in args.dtypes.split(","):
                dtype, suffix = dtypes[name.split("+")[0]], name.partition("+")[2]
                if task == "inference" and suffix in ("", "opt"):
                    sec = bench_inference(infer_cfg, device, dtype, h, w, warmup, iters, suffix == "opt")
                    label = "Faster R-CNN infer"
                elif task == "train" and suffix in ("", "cl"):
                    sec = bench_train(train_cfg, device, dtype, h, w, boxes, warmup, iters, suffix == "cl")
                    label = "Fast R-CNN train"
                else:
                    continue
                base = base or (sec if name == "fp32" else None)
                ratio = f"{base / sec:.2f}x" if base else "-"
                print(f"{label:<22}{device.type:<8}{name:<11}{sec:>9.3f}{1 / sec:>9.2f}{ratio:>9}",
                      flush=True)
    if "detectron2" not in skip:
        bench_vs_detectron2(h, w, boxes, warmup, iters, args.quick)


if __name__ == "__main__":
    main()
