#!/usr/bin/env python
"""What a trained model sees: for a run and an image with a question (or caption), the regions with the
detector's labels and scores, the answers with their probabilities and, for chosen layers and heads, each
word's attention to each region drawn on the image; PNG files plus look.json with every number.

    python tools/visualize_attention.py RUN_DIR --image photo.jpg --box 10,20,200,220 \
        --text "what shape is in the image?" --output vis/
    python tools/visualize_attention.py RUN_DIR --easy-vqa 12 --text "what color is the shape?" --output vis/
    python tools/visualize_attention.py RUN_DIR --grounding 200 --output vis/   # easy-VQA grounding table

Regions: box 0 is the whole image, then the --box boxes (original pixels), or for --easy-vqa the shape's
box. Attention sites: VL-BERT / VisualBERT layer<i> (joint self-attention), LXMERT x_layer<i> and ViLBERT
co_layer<i> (cross-attention from the words to the regions); --sites picks them (default: all), --heads
picks heads (default: all). --grounding writes grounding.md, grounding.json and grounding.png: per layer
and head how often an easy-VQA shape word attends most to the shape's box (the VisualBERT paper's
section 5 analysis), beside always picking the region of highest detector confidence.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

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
                        help="grounding analysis on the first N easy-VQA test questions with a shape word")
    p.add_argument("--box", type=parse_box, action="append", default=[], help="x1,y1,x2,y2 (repeatable)")
    p.add_argument("--text", default="what shape is in the image?", help="question or caption")
    p.add_argument("--sites", nargs="*", default=None, help="attention sites to draw (default: all)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="heads to draw (default: all)")
    p.add_argument("--top-k", type=int, default=5, help="answers to list")
    p.add_argument("--output", required=True, help="folder for the PNGs and JSON")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

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
            return run_grounding(model, sizes, args.grounding, TextLayout.from_cfg(cfg), Path(args.output))
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


def run_grounding(model, sizes: tuple[int, int], limit: int, layout, out: Path) -> int:
    """The grounding table, plot and numbers of easy-VQA's test questions that name a shape."""
    from detector.atomic import atomic_write_text
    from e2e_vl.visualize.drawing import save_png
    from e2e_vl.visualize.grounding import easy_vqa_cases, grounding_plot, grounding_table

    table = grounding_table(easy_vqa_cases(model, sizes, limit, layout))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grounding.md", table.markdown() + "\n")
    atomic_write_text(out / "grounding.json", json.dumps(table.to_json(), indent=1))
    save_png(grounding_plot(table), out / "grounding.png")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
