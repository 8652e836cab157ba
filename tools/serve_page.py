#!/usr/bin/env python
"""A local page to try a trained run: upload an image (or pick one of the run's test images), type a
question, and see the regions with the detector's labels and scores, the answers with their
probabilities and each word's attention to each region (the pictures of tools/visualize_attention.py).

    python tools/serve_page.py                             # the demo's run (make demo), on port 7860
    python tools/serve_page.py output/easy_vqa/e2e --port 8000

Served on 127.0.0.1 only (this machine), with nothing fetched from the network; open the printed address
in a browser, stop with Ctrl-C. The model is loaded once, on --device (the CPU by default), and answers
one request at a time. Uploads larger than --max-upload-mb megabytes or --max-pixels pixels, files that
are not images and empty questions get a message on the page.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEMO_CONFIG = REPO / "configs" / "easy_vqa" / "e2e.yaml"  # its OUTPUT_DIR is the demo's run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder (config.yaml + model_best.pth or step checkpoints); "
                   "default: the demo's, OUTPUT_DIR of configs/easy_vqa/e2e.yaml")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: 7860)")
    p.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    p.add_argument("--top-k", type=int, default=5, help="answers to list")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest upload in megabytes")
    p.add_argument("--max-pixels", type=int, default=20_000_000, help="largest image in pixels")
    args = p.parse_args(argv)

    from detector.checkpoint import CheckpointError
    from e2e_vl.config import ConfigError, load_train_cfg
    from e2e_vl.visualize.page import Runner, serve

    run = args.run or load_train_cfg(DEMO_CONFIG).OUTPUT_DIR
    try:
        runner = Runner.load(run, args.device, args.max_pixels, args.top_k)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        hint = "" if args.run else " (`make demo` trains the demo's run)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    print(f"{runner.weights}: serving the page on http://127.0.0.1:{args.port}", flush=True)
    serve(runner, args.port, args.max_upload_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
