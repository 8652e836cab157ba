"""VL-BERT pre-training really uses the visual clue: `benchmarks/pretrain_probe.py`, scaled down, on a
detector from the demo's stage 1. Masked colour and shape words of held-out easy-VQA
captions ("a <colour> <shape>") are predicted far better than the best blind guess with the image,
and no better once the shape box's pixels are zeroed before the backbone.

What it can meet: one configuration. Stage 1 runs with 2 threads (`run_script`), the probe with seed 0
and 1 thread (its `--threads` default), so on one machine every run is the same run.

Measured margins (2-core machine, 128 px demo config, the probe on the 2-thread stage-1 export, 200
held-out captions; prior colour 0.250, shape 0.735): with the image colour 1.000 and shape 1.000
(thresholds: colour > prior + 0.5 = 0.75, shape > 0.8675: margins 0.25 and 0.13); pixels zeroed 0.260 /
0.665 and text only 0.115 / 0.680 (ceilings 0.330 / 0.815: margins 0.07 / 0.15 and 0.215 / 0.135).
Before the 128 px / box-code changes, a new machine gave shape 0.71 with the image, under the 0.735 prior.
Probe seed 1 on the same export (a perturbation of the kind another machine's float order would make):
with the image 1.000 / 1.000, pixels zeroed 0.250 / 0.735 (the prior exactly), text only 0.140 / 0.735:
the smallest margin is 0.08 (zeroed and text-only shape, zeroed colour). Probe seeds 2, 3, 4 (1 thread)
and seed 0 at 2 threads on the same export, image / pixels zeroed / text only, colour then shape:
seed 2 1.000 / 0.150 / 0.150, 1.000 / 0.740 / 0.345; seed 3 1.000 / 0.250 / 0.110, 1.000 / 0.700 / 0.655;
seed 4 1.000 / 0.245 / 0.150, 1.000 / 0.670 / 0.735; seed 0 at 2 threads 1.000 / 0.245 / 0.130,
1.000 / 0.650 / 0.705. Smallest margin over all six probe runs: 0.075 (seed 2, pixels zeroed, shape).
Stage-1 exports of other thread counts were not measured; the test runs only the pinned configuration.
"""
from __future__ import annotations

import json

import pytest
from demo_stages import run_script, stage1_detector


@pytest.mark.slow
# stage 1 (128 px, ~6 min alone) + pre-training (~7 min): up to 30 on a busy 2-core machine
@pytest.mark.timeout(3600)
def test_pretraining_reads_the_region_and_pixel_masking_takes_the_clue_away(tmp_path):
    weights = stage1_detector(tmp_path, steps=1200, images=0, batch=16, timeout=1800)  # the demo's stage 1
    out = tmp_path / "probe.json"
    r = run_script("benchmarks/pretrain_probe.py", "--detector-weights", str(weights), "--steps", "400",
                   "--num-train", "1000", "--num-eval", "200", "--json", str(out), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    prior, after = result["prior"], result["after"]
    image, masked, blind = after["image"], after["region masked"], after["text only"]
    assert 0.15 < prior["colour"] < 0.35 and 0.6 < prior["shape"] < 0.8, prior  # 8 colours; 3 shapes
    # With the image: most of the prior's errors are gone.
    assert image["colour"] > prior["colour"] + 0.5, after
    assert 1 - image["shape"] < 0.5 * (1 - prior["shape"]), after
    # The region's pixels zeroed, or no image: back to (about) the blind guess.
    for word in ("colour", "shape"):
        assert masked[word] < prior[word] + 0.08 and blind[word] < prior[word] + 0.08, (word, after)
    # Before training nothing is known (the MLM decoder starts without the words' statistics).
    assert result["before"]["image"]["colour"] < prior["colour"] + 0.08
