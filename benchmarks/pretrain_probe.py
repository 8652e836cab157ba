"""Does VL-BERT pre-training use the visual clue? A learning probe on captions of easy-VQA images.

Every easy-VQA image shows one coloured shape; its caption is "a <colour> <shape>" and its regions are
the whole image and the shape's box (`e2e_vl.data.easy_vqa.easy_vqa_captions`).

1. The detector comes from the demo's stage 1 (`configs/easy_vqa/detector.yaml`, exported; `make demo`
   writes `output/easy_vqa/detector.pth`), the stand-in for Visual Genome pre-training: it classifies the
   shape box into 24 colour-shape classes. Its softmax over the shape box is stored as the region's
   class distribution, as `tools/extract_rois.py` stores the VG detector's.
2. VL-BERT pre-training with the real pipeline, built from the demo's config (`configs/easy_vqa/e2e.yaml`:
   same detector, appearance standardisation, learning rates) with the pre-training heads:
   `CaptionPretrainDataset` (whole-word MLM 15%, masked RoI classification 15%/90%, flips), the
   collator, `VLBert` with the embedded MiniLM BERT, the detector trained jointly, pixel masking.
3. The colour word and the shape word of held-out (test split) captions are masked one at a time and
   predicted (a word counts as right when all its word pieces are) under:
     image          the image as is
     region masked  the shape box's pixels zeroed before the backbone (as pre-training masks them)
     text only      no image at all (the learned text-only visual embedding)
The text-only prior is the best blind guess (the most frequent word with the same number of word
pieces, since the number of [MASK] tokens shows); the claim is: image >> prior, and masking the
region brings the accuracy back down to it.

    .venv/bin/python benchmarks/pretrain_probe.py [--steps 800] [--json result.json] [KEY VALUE ...]

Trailing KEY VALUE pairs override the config, e.g. `MODEL.VL.APPEARANCE_NORM none` for the ablation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from e2e_vl.config import load_train_cfg
from e2e_vl.data.captions import CaptionPretrainDataset
from e2e_vl.data.collate import VLCollator, collate_samples
from e2e_vl.data.easy_vqa import easy_vqa_captions
from e2e_vl.data.transforms import ResizeFlip
from e2e_vl.engine.optim import build_optimizer, lr_factor
from e2e_vl.modeling.hf import load_tokenizer
from e2e_vl.modeling.vlbert import VLBert

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONDITIONS = ("image", "region masked", "text only")
WORDS = {"colour": 1, "shape": 2}  # word index in "a <colour> <shape>"


@torch.no_grad()
def store_class_probs(model: VLBert, dataset: CaptionPretrainDataset) -> None:
    """Fill each record's class distribution over the shape box with the detector's softmax (background
    last): what the RoI extractor stores and masked RoI classification learns to predict."""
    detector = model.detector.eval()
    for start in range(0, len(dataset), 64):
        chunk = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
        batch = VLCollator()(chunk)
        boxes = [b.float() for b in batch["boxes"]]
        features = detector.roi_heads.region_features(detector.features(model.backbone_input(batch)), boxes)
        probs = torch.softmax(detector.roi_heads.predict(features)["class_logits"], -1).split(
            [len(b) for b in boxes])
        for sample, rows in zip(chunk, probs):
            dataset.regions[sample["image_id"]].class_probs = rows[1:].numpy()  # row 0: the whole image


def probe_samples(dataset: CaptionPretrainDataset, tokenizer, word: int,
                  condition: str) -> list[dict[str, Any]]:
    """Held-out samples with caption word `word` masked (all its pieces labelled), under `condition`."""
    samples = []
    for index in range(len(dataset)):
        sample = dataset[index]  # built with mlm_prob = mrc_prob = 0: nothing masked yet
        word_ids = tokenizer(dataset.captions[index].text).word_ids()
        ids = sample["input_ids"].clone()
        labels = torch.full_like(ids, -100)
        for pos, w in enumerate(word_ids):
            if w == word:
                labels[pos] = ids[pos]
                ids[pos] = tokenizer.mask_token_id
        probe = {"input_ids": ids, "mlm_labels": labels}
        if condition != "text only":
            masked = torch.zeros(len(sample["boxes"]), dtype=torch.bool)
            masked[1:] = condition == "region masked"
            probe.update(image=sample["image"], boxes=sample["boxes"], region_masked=masked)
        samples.append(probe)
    return samples


@torch.no_grad()
def word_accuracy(model: VLBert, samples: list[dict[str, Any]], batch_size: int = 64) -> float:
    model.eval()
    right = total = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        out = model(collate_samples(chunk))
        correct = out["mlm_logits"].argmax(-1) == out["mlm_labels"]
        pieces = [int((s["mlm_labels"] != -100).sum()) for s in chunk]
        for ok in torch.split(correct, pieces):
            right += int(ok.all())
            total += 1
    return right / max(total, 1)


def text_prior(words: list[str], tokenizer) -> float:
    """Best accuracy without the image: the caption's other word is independent of this one, but the
    number of [MASK] pieces is visible ("teal", "rectangle" are two word pieces), so the best blind guess
    is the most frequent word among those with the same piece count."""
    by_length: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for word in words:
        by_length[len(tokenizer.tokenize(word))][word] += 1
    return sum(max(counts.values()) for counts in by_length.values()) / max(len(words), 1)


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train VL-BERT with the stage-1 detector in the loop; masked colour/shape word accuracy per
    condition before and after, and the text-only priors."""
    if not os.path.isfile(args.detector_weights):
        sys.exit(f"{args.detector_weights} not found: it is the demo's stage 1 detector; write it with\n"
                 f"  make output/easy_vqa/detector.pth   (or pass --detector-weights)")
    cfg = load_train_cfg(args.config_file, [
        "TASK", "pretrain",
        "MODEL.WEIGHTS", args.detector_weights,
        "MODEL.VL.HEADS", "['mlm', 'mrc']",
        "MODEL.VL.NUM_MRC_CLASSES", str(24 + 1),
        "SOLVER.FREEZE_PARAMS", "[]",  # the MLM decoder is tied to the word embeddings: they must train
        # VL-BERT's pre-training: text tokens see the whole image (the demo's fine-tuning gives them the
        # shape box); the margins in tests/test_pretrain_learning.py were measured so.
        "MODEL.VLBERT.TEXT_REGION", "0",
        "SOLVER.MAX_ITER", str(args.steps),
        "SOLVER.IMS_PER_BATCH", str(args.batch_size),
        "SEED", str(args.seed),
        *args.opts,
    ])
    torch.manual_seed(cfg.SEED)
    model = VLBert.build(cfg)
    tokenizer = load_tokenizer(cfg.MODEL.VL.BERT_PATH)
    size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    lengths = dict(max_seq_len=16, max_text_len=12)
    train_caps, train_records = easy_vqa_captions("train", args.num_train)
    test_caps, test_records = easy_vqa_captions("test", args.num_eval)
    unmasked = dict(mlm_prob=0.0, mrc_prob=0.0, **lengths)
    store_class_probs(model, CaptionPretrainDataset(train_caps, train_records, tokenizer,
                                                    ResizeFlip(size, max_size), **unmasked))
    train_set = CaptionPretrainDataset(
        train_caps, train_records, tokenizer,
        ResizeFlip(size, max_size, flip_prob=0.5, swap_text_sides=True),
        mlm_prob=args.mlm_prob, seed=cfg.SEED, **lengths,
    )
    test_set = CaptionPretrainDataset(test_caps, test_records, tokenizer, ResizeFlip(size, max_size),
                                      **unmasked)
    probes = {(w, c): probe_samples(test_set, tokenizer, i, c) for w, i in WORDS.items() for c in CONDITIONS}

    def measure() -> dict[str, dict[str, float]]:
        return {c: {w: word_accuracy(model, probes[w, c]) for w in WORDS} for c in CONDITIONS}

    before = measure()
    optimizer = build_optimizer(model, cfg)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=VLCollator(),
                                         generator=torch.Generator().manual_seed(cfg.SEED))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    while len(losses) < args.steps:
        train_set.set_epoch(len(losses) // len(loader))
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(len(losses), cfg, args.steps)
            loss = model(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRAD_NORM)
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) >= args.steps:
                break
    seconds = time.perf_counter() - start
    words = [c.text.split()[1:] for c in test_caps]
    return {
        "before": before,
        "after": measure(),
        "prior": {w: text_prior([ws[i - 1] for ws in words], tokenizer) for w, i in WORDS.items()},
        "losses": losses,
        "train_seconds": seconds,
        "num_train": len(train_set),
        "num_eval": len(test_set),
        "overrides": args.opts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "easy_vqa", "e2e.yaml"))
    parser.add_argument("--detector-weights", default=os.path.join("output", "easy_vqa", "detector.pth"),
                        help="the stage-1 detector (tools/export_detector.py output)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-train", type=int, default=2000, help="training captions (images)")
    parser.add_argument("--num-eval", type=int, default=300, help="held-out captions (test images)")
    parser.add_argument("--mlm-prob", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    # One thread by default: on a shared, oversubscribed CPU, multi-threaded kernels spin-wait and run
    # many times slower than one thread.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run_probe(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    losses = result["losses"]
    head = max(1, len(losses) // 10)
    print(f"VL-BERT pre-training: {len(losses)} steps x {args.batch_size} captions ({result['num_train']} "
          f"images), {result['train_seconds']:.0f} s; loss first/last {head} steps: "
          f"{np.mean(losses[:head]):.3f} -> {np.mean(losses[-head:]):.3f}"
          + (f"; overrides: {' '.join(args.opts)}" if args.opts else ""))
    print(f"held-out captions: {result['num_eval']}; accuracy of the masked word (all word pieces right)\n")
    print(f"| {'condition':<30} | {'colour':>7} | {'shape':>7} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 9}|")
    prior = result["prior"]
    print(f"| {'text-only prior (best guess)':<30} | {prior['colour']:7.3f} | {prior['shape']:7.3f} |")
    for when in ("before", "after"):
        for condition, acc in result[when].items():
            label = f"{condition} ({'untrained' if when == 'before' else 'trained'})"
            print(f"| {label:<30} | {acc['colour']:7.3f} | {acc['shape']:7.3f} |")
    image, masked = result["after"]["image"], result["after"]["region masked"]
    # Errors, not ratios, compare fairly: the piece count gives "rectangle" away, so the shape prior is high.
    for w in WORDS:
        errors = 1 - image[w]
        fewer = f"{(1 - prior[w]) / errors:.1f}x fewer" if errors > 0 else "none left"
        print(f"{w}: image {image[w]:.3f}, errors {errors:.3f} vs the prior's {1 - prior[w]:.3f} ({fewer}); "
              f"region masked {masked[w]:.3f}")


if __name__ == "__main__":
    main()
