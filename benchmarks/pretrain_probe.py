"""Does VL-BERT pre-training use the visual clue? A learning probe on captions of easy-VQA images.

Every easy-VQA image shows one coloured shape. Its caption "a <colour> <shape>" is read off the data
set's own questions and answers; its regions are the whole image plus the shape's box, found from the
plain background (pixels far from the median border colour).

1. Detector pre-training (stand-in for Visual Genome, whose weights cannot be downloaded here): a small
   random-init C4 detector (ResNet-50 layout, narrow widths, trainable BatchNorm) learns to classify the
   boxes into the 24 colour-shape classes; then its BatchNorms become FrozenBN and its stem and res2
   are frozen, as for the VG detector. Its softmax over the shape box is stored as the region's class
   distribution, as tools/extract_rois.py stores the VG detector's.
2. VL-BERT pre-training with the real pipeline: `CaptionPretrainDataset` (whole-word MLM 15%, masked
   RoI classification 15%/90%, flips), the collator, `VLBert` with the embedded MiniLM BERT and that
   detector trained jointly (stem and res2 frozen), pixel masking.
3. The colour word and the shape word of held-out (test split) captions are masked one at a time and
   predicted (a word counts as right when all its word pieces are) under:
     image          the image as is
     region masked  the shape box's pixels zeroed before the backbone (as pre-training masks them)
     text only      no image at all (the learned text-only visual embedding)
The text-only prior is the best blind guess (the most frequent word with the same number of word
pieces, since the number of [MASK] tokens shows); the claim is: image >> prior, and masking the
region brings the accuracy back down near it.

    .venv/bin/python benchmarks/pretrain_probe.py [--steps 800] [--detector-steps 800]

(about 12 minutes on two busy CPU cores; the defaults are the run reported in the README).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detector.config import get_cfg  # noqa: E402
from detector.layers import FrozenBatchNorm2d  # noqa: E402
from detector.modeling import GeneralizedRCNN, build_detector  # noqa: E402
from e2e_vl.data.captions import Caption, CaptionPretrainDataset  # noqa: E402
from e2e_vl.data.collate import VLCollator, collate_samples  # noqa: E402
from e2e_vl.data.roi_store import RoIRecord  # noqa: E402
from e2e_vl.data.transforms import ResizeFlip  # noqa: E402
from e2e_vl.modeling.vlbert import VLBert, backbone_input, load_bert, load_tokenizer  # noqa: E402

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # the probe detector's classes


def shape_box(image: np.ndarray, threshold: int = 60) -> list[float]:
    """Box of the pixels that differ from the background (the median border colour) by > threshold."""
    pixels = image.astype(np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).sum(-1)
    ys, xs = np.nonzero(distance > threshold)
    if len(xs) == 0:
        return [0.0, 0.0, float(image.shape[1]), float(image.shape[0])]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def easy_vqa_captions(
    split: str, limit: int
) -> tuple[list[Caption], dict[str, RoIRecord], dict[str, tuple[str, str]]]:
    """Captions, RoI records and (colour, shape) of the first `limit` images of a split."""
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    facts: dict[int, dict[str, str]] = collections.defaultdict(dict)
    for question, answer, image_id in zip(questions, answers, image_ids):
        if answer in COLOURS and "color" in question:
            facts[image_id]["colour"] = answer
        elif answer in SHAPES:
            facts[image_id]["shape"] = answer
    captions, records, truth = [], {}, {}
    for image_id in sorted(paths):
        if len(captions) >= limit:
            break
        fact = facts.get(image_id, {})
        if "colour" not in fact or "shape" not in fact:
            continue  # the questions of this image do not name both
        image = cv2.imread(paths[image_id])
        key = f"{split}-{image_id}"
        records[key] = RoIRecord(
            key,
            paths[image_id],
            image.shape[0],
            image.shape[1],
            boxes=np.array([shape_box(image)], np.float32),
            object_conf=np.ones(1, np.float32),
        )
        captions.append(
            Caption(key, f"a {fact['colour']} {fact['shape']}", paths[image_id], f"easy-vqa {split}")
        )
        truth[key] = (fact["colour"], fact["shape"])
    return captions, records, truth


def build_probe_detector(seed: int, freeze_at: int, norm: str = "FrozenBN") -> GeneralizedRCNN:
    """A small random-init ResNet-50-layout C4 detector (narrow widths) over the 24 colour-shape classes."""
    torch.manual_seed(seed)
    cfg = get_cfg()
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.RES2_OUT_CHANNELS, r.STEM_OUT_CHANNELS, r.WIDTH_PER_GROUP = 50, 32, 16, 8
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    r.NORM = norm
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    return build_detector(cfg)


def region_features(detector: GeneralizedRCNN, batch: dict[str, Any]) -> torch.Tensor:
    """Appearance features of every box of a collated batch (padding and masked boxes zeroed first)."""
    x = backbone_input(detector, batch)
    return detector.roi_heads.region_features(detector.features(x), [b.float() for b in batch["boxes"]])


def pretrain_detector(
    detector: GeneralizedRCNN,
    dataset: CaptionPretrainDataset,
    labels: dict[str, int],
    steps: int,
    batch_size: int,
    seed: int,
) -> float:
    """Stand-in for the detector's own (Visual Genome) pre-training: Fast R-CNN classification of the
    whole-image and shape boxes into the 24 colour-shape classes. Returns the last 20 steps' accuracy."""
    detector.train()
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=VLCollator(),
        generator=generator,
    )
    step, hits = 0, []
    while step < steps:
        for batch in loader:
            target = torch.tensor([labels[i] for i in batch["image_ids"] for _ in range(2)])
            logits = detector.roi_heads.predict(region_features(detector, batch))["class_logits"]
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hits.append(float((logits.argmax(-1) == target).float().mean()))
            step += 1
            if step >= steps:
                break
    return float(np.mean(hits[-20:]))


@torch.no_grad()
def detector_class_probs(detector: GeneralizedRCNN, dataset: CaptionPretrainDataset) -> dict[str, np.ndarray]:
    """The detector's softmax over its classes (background last) for each image's shape box: what the RoI
    extractor stores and masked RoI classification learns to predict."""
    detector.eval()
    out = {}
    for start in range(0, len(dataset), 64):
        chunk = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
        batch = VLCollator()(chunk)
        probs = torch.softmax(
            detector.roi_heads.predict(region_features(detector, batch))["class_logits"], -1
        )
        for sample, row in zip(chunk, probs.view(len(chunk), 2, -1)[:, 1]):
            out[sample["image_id"]] = row.numpy()[None]
    return out


def train(
    model: VLBert, dataset: CaptionPretrainDataset, steps: int, batch_size: int, lr: float, seed: int
) -> list[float]:
    groups: dict[str, list] = {"detector": [], "bert": [], "head": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[VLBert.parameter_kind(name)].append(param)
    # Fresh parts (heads, visual embedding) move 10x faster than the pre-trained BERT and detector.
    optimizer = torch.optim.AdamW(
        [
            {"params": groups["bert"] + groups["detector"], "lr": lr},
            {"params": groups["head"], "lr": 10 * lr},
        ],
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=1e-4,
        foreach=True,
    )
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=VLCollator(),
        generator=generator,
    )
    model.train()
    losses, step, epoch = [], 0, 0
    while step < steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            losses.append(float(out["loss"].detach()))
            step += 1
            if step >= steps:
                break
        epoch += 1
    return losses


def probe_samples(
    dataset: CaptionPretrainDataset, tokenizer, word: int, condition: str
) -> list[dict[str, Any]]:
    """Held-out samples with caption word `word` (1 = colour, 2 = shape) masked, all pieces labelled."""
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
            probe.update(
                image=sample["image"],
                boxes=sample["boxes"],
                region_masked=torch.tensor([False, condition == "region masked"]),
            )
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


def run_probe(
    steps: int = 800,
    batch_size: int = 16,
    image_size: int = 64,
    num_train: int = 2000,
    num_eval: int = 300,
    lr: float = 1e-4,
    mlm_prob: float = 0.15,
    freeze_at: int = 2,
    detector_steps: int = 800,
    seed: int = 0,
    appearance_norm: str = "none",
    visual_scale_object_init: float = 0.0,
) -> dict[str, Any]:
    """Pre-train the detector, then VL-BERT with it in the loop; measure masked colour/shape word accuracy
    per condition before and after. Returns the numbers."""
    random.seed(seed)
    tokenizer = load_tokenizer("")
    train_caps, train_records, train_truth = easy_vqa_captions("train", num_train)
    test_caps, test_records, truth = easy_vqa_captions("test", num_eval)
    plain = ResizeFlip(image_size, 10 * image_size)
    unmasked = dict(mlm_prob=0.0, mrc_prob=0.0, max_seq_len=16, max_text_len=12)
    detector_set = CaptionPretrainDataset(train_caps, train_records, tokenizer, plain, **unmasked)
    test_set = CaptionPretrainDataset(test_caps, test_records, tokenizer, plain, **unmasked)

    # Trained from scratch with BatchNorm, as ImageNet/VG backbones are; then frozen like theirs.
    detector = build_probe_detector(seed, freeze_at=0, norm="BN")
    labels = {key: CLASSES.index(f"{c} {s}") for key, (c, s) in train_truth.items()}
    start = time.perf_counter()
    detector_accuracy = pretrain_detector(detector, detector_set, labels, detector_steps, 32, seed)
    detector_seconds = time.perf_counter() - start
    detector.backbone.freeze(freeze_at)
    FrozenBatchNorm2d.convert_frozen_batchnorm(detector)
    for key, probs in detector_class_probs(detector, detector_set).items():
        train_records[key].class_probs = probs  # what the RoI extractor would store

    transform = ResizeFlip(image_size, 10 * image_size, flip_prob=0.5, swap_text_sides=True)
    train_set = CaptionPretrainDataset(
        train_caps,
        train_records,
        tokenizer,
        transform,
        mlm_prob=mlm_prob,
        max_seq_len=16,
        max_text_len=12,
        seed=seed,
    )
    model = VLBert(
        detector,
        load_bert(""),
        heads=("mlm", "mrc"),
        num_mrc_classes=len(CLASSES) + 1,
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
        appearance_norm=appearance_norm,
        visual_scale_object_init=visual_scale_object_init,
    )
    conditions = ("image", "region masked", "text only")
    probes = {(w, c): probe_samples(test_set, tokenizer, w, c) for w in (1, 2) for c in conditions}

    def measure() -> dict[str, tuple[float, float]]:
        return {
            c: (word_accuracy(model, probes[1, c]), word_accuracy(model, probes[2, c])) for c in conditions
        }

    before = measure()
    start = time.perf_counter()
    losses = train(model, train_set, steps, batch_size, lr, seed)
    seconds = time.perf_counter() - start
    after = measure()
    prior = (
        text_prior([c for c, _ in truth.values()], tokenizer),
        text_prior([s for _, s in truth.values()], tokenizer),
    )
    return {
        "before": before,
        "after": after,
        "prior": prior,
        "losses": losses,
        "train_seconds": seconds,
        "detector_accuracy": detector_accuracy,
        "detector_seconds": detector_seconds,
        "num_train": len(train_set),
        "num_eval": len(test_set),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mlm-prob", type=float, default=0.15)
    parser.add_argument("--freeze-at", type=int, default=2)
    parser.add_argument("--detector-steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--appearance-norm", choices=("none", "running"), default="none",
                        help="MODEL.VLBERT.APPEARANCE_NORM (running: standardised detector features)")
    parser.add_argument("--visual-scale-object-init", type=float, default=0.0,
                        help="MODEL.VLBERT.VISUAL_SCALE_OBJECT_INIT (initial gamma of the region LayerNorm)")
    # One thread by default: on a shared, oversubscribed CPU, multi-threaded kernels spin-wait and run
    # many times slower than one thread.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run_probe(
        args.steps,
        args.batch_size,
        args.image_size,
        args.num_train,
        args.num_eval,
        args.lr,
        args.mlm_prob,
        args.freeze_at,
        args.detector_steps,
        args.seed,
        args.appearance_norm,
        args.visual_scale_object_init,
    )
    losses = result["losses"]
    head = max(1, len(losses) // 10)
    print(
        f"detector pre-training (24 colour-shape classes): {args.detector_steps} steps x 32 images, "
        f"{result['detector_seconds']:.0f} s, "
        f"train accuracy (last 20 steps) {result['detector_accuracy']:.3f}"
    )
    print(
        f"VL-BERT pre-training: {len(losses)} steps x {args.batch_size} captions "
        f"({result['num_train']} images), "
        f"{result['train_seconds']:.0f} s; loss first/last {head} steps: "
        f"{np.mean(losses[:head]):.3f} -> {np.mean(losses[-head:]):.3f}"
    )
    print(f"held-out captions: {result['num_eval']}; accuracy of the masked word (all word pieces right)\n")
    print(f"| {'condition':<30} | {'colour':>7} | {'shape':>7} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 9}|")
    colour_prior, shape_prior = result["prior"]
    print(f"| {'text-only prior (best guess)':<30} | {colour_prior:7.3f} | {shape_prior:7.3f} |")
    for when in ("before", "after"):
        for condition, (colour, shape) in result[when].items():
            label = f"{condition} ({'untrained' if when == 'before' else 'trained'})"
            print(f"| {label:<30} | {colour:7.3f} | {shape:7.3f} |")
    image = result["after"]["image"]
    masked = result["after"]["region masked"]
    print(
        f"\nimage / prior: colour {image[0] / colour_prior:.1f}x, shape {image[1] / shape_prior:.1f}x; "
        f"masking the region: colour {image[0]:.3f} -> {masked[0]:.3f}, "
        f"shape {image[1]:.3f} -> {masked[1]:.3f}"
    )


if __name__ == "__main__":
    main()
