"""Step 6 (`STEPS=perf`, not part of the default run): every row of issue 30's target table in one call of
at most 8 minutes on a warm machine, by the benchmarks with the options for it.

- perf_train: benchmarks/train_step.py at 100 and 36 regions, batch sizes 8, 16, ... until one does not
  fit 40 GiB (the process is capped there), MFU and peak GPU memory per batch size, and the host-device
  syncs of one training step (`torch.cuda.set_sync_debug_mode("warn")`).
- perf_extract: benchmarks/extract.py --tool: tools/extract_rois.py on JPEG files (bf16, --features),
  steady images/s, and its records against the per-image CPU fp32 policy and a one-image call.
- perf_roi: benchmarks/roi_align.py --quick, the 24 cases of docs/gpu_runs.md (bf16 against torchvision's
  autocast path, and the deterministic backward against the fast one).

`perf_targets` puts the measured values beside the targets (the report's "Perf targets (issue 30)")."""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from .bench import bench, ratio_verdict, summarize

if TYPE_CHECKING:
    from .runner import StepFn

MEMORY_CAP_GIB = 40.0
FEATURE_TOLERANCE = 0.05  # median relative L2 error of a region feature, bf16 on the device vs CPU fp32
BOX_MATCH = 0.9  # share of the CPU's boxes that the device's record has (IoU >= 0.9)

# key, title, seconds on CUDA (their sum, 470 s, leaves the set-up steps time in an 8-minute call), step
STEPS: list[tuple[str, str, int, StepFn]] = [
    ("perf_train", "train_step.py: MFU and memory per batch size, syncs per step", 250,
     bench("train_step",
           ["--device", "cuda", "--regions", "100", "36", "--batch-sizes", "8", "16", "24", "32", "48", "64",
            "--memory-cap-gib", str(MEMORY_CAP_GIB), "--no-stages", "--sync-debug", "--repeats", "5",
            "--time-box", "210"],
           ["--quick", "--device", "cpu", "--regions", "100", "36", "--batch-sizes", "1", "2",
            "--repeats", "1", "--no-stages", "--sync-debug", "--time-box", "60"], key="perf_train")),
    ("perf_extract", "extract.py --tool: extract_rois.py on JPEG files, records vs CPU", 130,
     bench("extract",
           ["--device", "cuda", "--tool", "64", "--precision", "bf16", "--batch-size", "8", "--compare", "3"],
           ["--quick", "--device", "cpu", "--tool", "2", "--precision", "fp32", "--batch-size", "2",
            "--workers", "1", "--compare", "1"], key="perf_extract")),
    ("perf_roi", "roi_align.py: the 24 cases of docs/gpu_runs.md, bf16 and deterministic backward", 90,
     bench("roi_align", ["--device", "cuda", "--quick"],
           ["--device", "cpu", "--quick", "--boxes", "10", "--repeats", "1"], key="perf_roi")),
]


def _mfu_row(rows: list[dict], regions: int, goal: float) -> dict:
    """The training row at `regions` with the largest batch that fit, against `goal`."""
    fit = [r for r in rows if r["regions"] == regions and "step_ms" in r]
    oom = [r["batch"] for r in rows if r["regions"] == regions and r.get("oom")]
    target = (f"training step, R101-C4 + BERT-base, bf16, {regions} regions, 600x1000, the largest batch "
              f"that fits {MEMORY_CAP_GIB:g} GiB")
    if not fit:
        return {"target": target, "goal": f">= {goal:.0%} MFU", "measured": "-", "verdict": "not measured"}
    best = max(fit, key=lambda r: r["batch"])
    mfu = best["mfu_spec"] if best.get("mfu_spec") is not None else best["mfu_meas"]
    basis = "of the dense bf16 spec" if best.get("mfu_spec") is not None else "of the measured matmul peak"
    limit = (f"; batch {min(oom)} did not fit" if oom
             else "; no batch tried ran out of memory (the largest that fits may be larger)")
    return {"target": target, "goal": f">= {goal:.0%} MFU",
            "measured": f"{mfu:.1%} {basis} at batch {best['batch']}{limit}",
            "verdict": ratio_verdict([mfu], goal, True)}


def _extraction_row(tool: dict | None) -> dict:
    """extract.py --tool's steady images/s, and whether its records agree with the CPU and are
    batch-independent."""
    row = {"target": ("extraction, VG R101-C4, bf16, with features, JPEG files, one GPU + the machine's "
                      "CPU cores"),
           "goal": (f">= 60 img/s; boxes IoU >= 0.9 for >= {BOX_MATCH:.0%}, feature error <= "
                    f"{FEATURE_TOLERANCE:g}; batch-independent"), "measured": "-", "verdict": "not measured"}
    if not tool:
        return row
    cmp, ips = tool["compare"], tool["images_per_s"]
    errs = [c["feature_rel_err_median"] for c in cmp if c["feature_rel_err_median"] is not None]
    close = (all(c["matched"] >= BOX_MATCH for c in cmp) and len(errs) == len(cmp)
             and max(errs) <= FEATURE_TOLERANCE)
    independent = all(c["equal_to_one_image_call"] for c in cmp)
    speed = (f"{ips:.1f} img/s steady" if ips is not None else
             f"steady rate not measurable ({tool['images_per_s_with_start']:.1f} img/s with start-up)")
    row["measured"] = (f"{speed} ({tool['precision']}, batch {tool['batch']}, {tool['workers']} workers); "
                       f"vs CPU fp32 on {len(cmp)} images: boxes matched "
                       f"{min(c['matched'] for c in cmp):.0%} at least, feature error median "
                       + (f"{max(errs):.2e} at most" if errs else "-")
                       + f"; equal to a one-image call: {'yes' if independent else 'NO'}")
    verdict = ratio_verdict([ips], 60.0, True) if ips is not None else "not measured"
    row["verdict"] = verdict if close and independent else f"{verdict}; records NOT within the tolerance"
    return row


def perf_targets(results: dict, dry: bool) -> list[dict]:
    """Issue 30's targets beside the values the perf step measured (results: the benchmarks' JSON)."""
    train = (results.get("perf_train") or {}).get("rows", [])
    rows = [_mfu_row(train, 100, 0.35), _mfu_row(train, 36, 0.30)]

    rows.append(_extraction_row((results.get("perf_extract") or {}).get("tool")))

    roi = [r for r in (results.get("perf_roi") or {}).get("rows", [])
           if r.get("device") == ("cpu" if dry else "cuda")]
    bf16 = [(r["tv_fwd"] + r["tv_bwd"]) / (r["fwd"] + r["bwd"]) for r in roi if r["dtype"] == "bfloat16"]
    verdict = "not measured"
    if bf16:
        med, low = statistics.median(bf16), min(bf16)
        verdict = "met" if med >= 2.0 and low >= 1.5 else f"missed (median {med:.2f}x, min {low:.2f}x)"
    rows.append({"target": "RoIAlign bf16 forward+backward vs torchvision's autocast path",
                 "goal": ">= 2x median, none below 1.5x", "measured": summarize(bf16), "verdict": verdict})
    det = [r["det_bwd"] / r["bwd"] for r in roi if "det_bwd" in r]
    rows.append({"target": "deterministic RoIAlign backward vs the fast one", "goal": "every case <= 1.5x",
                 "measured": summarize(det), "verdict": ratio_verdict(det, 1.5, False)})

    mem = [r for r in train if r.get("memory_gib") is not None]
    rows.append({"target": "GPU memory at the training rows", "goal": "reported per batch size",
                 "measured": ", ".join(f"{r['regions']} regions batch {r['batch']}: {r['memory_gib']:.1f} GiB"
                                       for r in mem) or "-",
                 "verdict": "reported" if mem else "not measured"})
    syncs = [r["syncs"] for r in train if r.get("syncs") is not None]
    rows.append({"target": "host-device syncs inside one training step", "goal": "0",
                 "measured": (f"{min(syncs)} to {max(syncs)} per step" if syncs else "-"),
                 "verdict": ratio_verdict(syncs, 0, False) if syncs else "not measured"})
    if dry:
        for r in rows:
            if r["verdict"] != "not measured":
                r["verdict"] = "n/a (dry run: CPU, tiny sizes)"
    return rows
