#!/usr/bin/env python
"""What a trained model sees: for a run and an image with a question (or caption), the regions with the
detector's labels and scores, the answers with their probabilities and, for chosen layers and heads, each
word's attention to each region drawn on the image; PNG files plus look.json with every number.

    python tools/visualize_attention.py RUN_DIR --image photo.jpg --box 10,20,200,220 \
        --text "what shape is in the image?" --output vis/
    python tools/visualize_attention.py RUN_DIR --easy-vqa 12 --text "what color is the shape?" --output vis/
    python tools/visualize_attention.py RUN_DIR --grounding 200 --output vis/   # easy-VQA grounding table
    python tools/visualize_attention.py RUN_DIR --grounding 100 --flickr30k data/flickr30k_entities \
        --split val --rois rois --output vis/   # Flickr30K Entities grounding table

Regions: box 0 is the whole image, then the --box boxes (original pixels), or for --easy-vqa the shape's
box. Attention sites: VL-BERT / VisualBERT layer<i> (joint self-attention), LXMERT x_layer<i> and ViLBERT
co_layer<i> (cross-attention from the words to the regions); --sites picks them (default: all), --heads
picks heads (default: all). --grounding writes grounding.md, grounding.json and grounding.png: per layer
and head how often an entity's last word piece attends most to the entity's box (the VisualBERT paper's
section 5 analysis), beside always picking the region of highest detector confidence. Entities: an
easy-VQA shape word and the shape's box, or with --flickr30k the phrases of the first N images of a
Flickr30K Entities split and their chain's box (candidates: the --rois store's boxes, else the
annotation's).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from e2e_vl.visualize.grounding import GroundingCase

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (config.yaml + model_best.pth or step checkpoints)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file")
    source.add_argument("--easy-vqa", type=int, metavar="ID", help="an easy-VQA test image id")
    source.add_argument("--grounding", type=int, metavar="N",
                        help="grounding analysis on the first N easy-VQA test questions with a shape word "
                             "(with --flickr30k: the captions of the split's first N images)")
    p.add_argument("--flickr30k", metavar="ROOT",
                   help="with --grounding: Flickr30K Entities' official layout under ROOT (Sentences/, "
                        "Annotations/, <split>.txt, the images in flickr30k-images/) instead of easy-VQA")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="Flickr30K split")
    p.add_argument("--rois", metavar="STORE",
                   help="with --flickr30k: candidate regions from this RoI store (relative to ROOT, as "
                        "DATASETS.ROI_STORE) instead of the annotation's boxes")
    p.add_argument("--box", type=parse_box, action="append", default=[], help="x1,y1,x2,y2 (repeatable)")
    p.add_argument("--text", default="what shape is in the image?", help="question or caption")
    p.add_argument("--sites", nargs="*", default=None, help="attention sites to draw (default: all)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="heads to draw (default: all)")
    p.add_argument("--top-k", type=int, default=5, help="answers to list")
    p.add_argument("--output", required=True, help="folder for the PNGs and JSON")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.flickr30k is not None and args.grounding is None:
        p.error("--flickr30k needs --grounding N")
    if args.rois is not None and args.flickr30k is None:
        p.error("--rois needs --flickr30k ROOT")

    from detector.checkpoint import CheckpointError
    from detector.image_sources import ImageError, load_image
    from e2e_vl.config import ConfigError
    from e2e_vl.data.easy_vqa import REGION_CLASSES, EasyVQAImages
    from e2e_vl.visualize import pictures
    from e2e_vl.visualize.attention import TextLayout
    from e2e_vl.visualize.run_model import answer_names, load_run

    try:
        cfg, model, weights = load_run(args.run, device=args.device)
        sizes = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        if args.grounding is not None:
            return run_grounding(grounding_cases(args, cfg, model, sizes), Path(args.output))
        if args.image:
            image = load_image(args.image)
            boxes = np.array(args.box, np.float32).reshape(-1, 4)
        else:
            image, stored = EasyVQAImages("test", [args.easy_vqa])(args.easy_vqa)
            boxes = stored[1:]
        boxes = pictures.whole_image_first(boxes, image.shape[1], image.shape[0])
        result = pictures.look(model, image, boxes, args.text, *sizes, answer_names(cfg, model),
                               REGION_CLASSES, args.top_k, TextLayout.from_cfg(cfg))
        attention = result.explanation.attention
        sites = args.sites if args.sites is not None else list(attention)
        heads = args.heads if args.heads is not None else list(range(next(iter(attention.values())).shape[0]))
        written = pictures.write_look(result, pictures.attention_pictures(result, image, sites, heads),
                                      args.output)
    except (ConfigError, CheckpointError, ImageError, ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{weights}: answers {', '.join(f'{a} {s:.2f}' for a, s in result.explanation.answers) or '-'}; "
          f"{len(result.drawn)} regions; wrote {len(written)} files to {args.output}")
    return 0


def grounding_cases(args: argparse.Namespace, cfg, model, sizes: tuple[int, int]) -> list[GroundingCase]:
    """The grounding cases of the chosen source: easy-VQA, or Flickr30K Entities with its captions read
    whole as TASK flickr30k reads them (DATASETS.FLICKR30K.MAX_TEXT_LEN pieces), whatever the run's
    question length."""
    import dataclasses

    from e2e_vl.visualize.attention import TextLayout
    from e2e_vl.visualize.grounding import easy_vqa_cases, flickr30k_cases

    layout = TextLayout.from_cfg(cfg)
    if args.flickr30k is None:
        return easy_vqa_cases(model, sizes, args.grounding, layout)
    layout = dataclasses.replace(layout, max_tokens=cfg.DATASETS.FLICKR30K.MAX_TEXT_LEN)
    return flickr30k_cases(model, sizes, args.flickr30k, args.split, args.grounding, layout, args.rois)


def run_grounding(cases: Sequence[GroundingCase], out: Path) -> int:
    """The grounding table, plot and numbers of the cases."""
    from detector.atomic import atomic_write_text
    from e2e_vl.visualize.drawing import save_png
    from e2e_vl.visualize.grounding import grounding_plot, grounding_table

    table = grounding_table(cases)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grounding.md", table.markdown() + "\n")
    atomic_write_text(out / "grounding.json", json.dumps(table.to_json(), indent=1))
    save_png(grounding_plot(table), out / "grounding.png")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
