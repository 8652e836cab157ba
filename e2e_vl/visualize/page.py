"""A local page to try a trained run (issue 32): upload an image or pick one of the run's test images, ask
a question, and see what `pictures.look` draws - the regions with the detector's labels and scores, the
answers with their probabilities, each word's attention to the regions - without writing files.

Everything stays on this machine, so the page works with the network closed: served on 127.0.0.1 only,
no share link, Gradio's analytics off, and a theme of system fonts (a theme may name Google Fonts). The
model is loaded once (`Runner.load`) and Gradio runs one request at a time (its default), which is what
one model on a CPU can serve anyway. A bad request (no image, a file that is not an image, one too large,
no question) gets a message on the page and changes nothing on the server.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from detector.config import CfgNode  # noqa: E402
from detector.image_sources import ImageError, decode_image  # noqa: E402
from e2e_vl.data.easy_vqa import REGION_CLASSES, shape_box  # noqa: E402
from e2e_vl.visualize import pictures  # noqa: E402
from e2e_vl.visualize.attention import TextLayout, attention_sites  # noqa: E402

HOST = "127.0.0.1"
NUM_EXAMPLES = 6
THEME = gr.themes.Default(font=("system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


class PageError(ValueError):
    """A request the page cannot answer; the message, shown on the page, names the problem."""


@dataclasses.dataclass
class Runner:
    """A trained run loaded once, with what answering a question needs of its config."""

    cfg: CfgNode
    model: nn.Module
    weights: str
    answer_names: list[str]
    sites: list[str]
    num_heads: int
    max_pixels: int  # larger images are refused from their header, before decoding (decompression bombs)
    top_k: int

    @classmethod
    def load(cls, run_dir: str | Path, device: str, max_pixels: int, top_k: int) -> "Runner":
        from e2e_vl.visualize.run_model import answer_names, load_run

        cfg, model, weights = load_run(run_dir, device=device)
        sites = attention_sites(model)
        return cls(cfg, model, weights, answer_names(cfg, model), [s.name for s in sites],
                   min(s.num_heads for s in sites), max_pixels, top_k)

    @property
    def easy_vqa(self) -> bool:
        return self.cfg.DATASETS.TRAIN.startswith("easy_vqa")

    def regions(self, image_bgr: np.ndarray) -> np.ndarray:
        """Box 0 the whole image (the models' convention); for an easy-VQA run also the shape's box, found
        from the pixels as the run's data found it. Other runs read their boxes from an RoI store that an
        uploaded image lacks, so they get the whole image only."""
        found = shape_box(image_bgr) if self.easy_vqa else None
        boxes = np.zeros((0, 4), np.float32) if found is None else found[None]
        return pictures.whole_image_first(boxes, image_bgr.shape[1], image_bgr.shape[0])

    def ask(self, image_bgr: np.ndarray, question: str, site: str, head: int
            ) -> tuple[pictures.Look, Image.Image]:
        """The look at the image and question, and the attention picture of one site and head."""
        look = pictures.look(self.model, image_bgr, self.regions(image_bgr), question,
                             self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST, self.answer_names,
                             REGION_CLASSES, self.top_k, TextLayout.from_cfg(self.cfg))
        return look, pictures.attention_pictures(look, image_bgr, [site], [head])[f"{site}_head{head}"]

    @functools.cached_property
    def examples(self) -> list[list[str]]:
        """[image path, question] of the run's first test images (easy-VQA runs; others have none here)."""
        if not self.easy_vqa:
            return []
        import easy_vqa

        from e2e_vl.data.easy_vqa import load_questions

        paths = easy_vqa.get_test_image_paths()
        first: dict[int, str] = {}
        for q in load_questions("test"):
            first.setdefault(int(q.image_id), q.text)
            if len(first) == NUM_EXAMPLES:
                break
        return [[paths[i], text] for i, text in first.items()]


def read_upload(upload: dict[str, Any] | None, max_pixels: int) -> np.ndarray:
    """The uploaded file (Gradio's file record, unprocessed) decoded to BGR by the project's one image
    policy (`decode_image`), or PageError naming the problem."""
    if not upload or not upload.get("path"):
        raise PageError("No image: upload one or pick one of the examples.")
    name = upload.get("orig_name") or Path(upload["path"]).name
    try:
        return decode_image(Path(upload["path"]).read_bytes(), max_pixels)
    except ImageError as exc:
        raise PageError(f"{name} is not an image the page can use: {exc}.") from None
    except OSError as exc:
        raise PageError(f"{name} could not be read: {exc.strerror or exc}.") from None


def answer(runner: Runner, upload: dict[str, Any] | None, question: str, site: str, head: float
           ) -> tuple[str, Image.Image | None, dict[str, float] | None, Image.Image | None]:
    """The page's one action: (message, regions picture, answers, attention picture); on a bad request
    the message says why and the pictures are cleared, so no earlier answer passes for this one."""
    try:
        image = read_upload(upload, runner.max_pixels)
        if not question or not question.strip():
            raise PageError("No question: type one about the image.")
        look, attention = runner.ask(image, question.strip(), site, int(head))
    except PageError as exc:
        return f"**Problem:** {exc}", None, None, None
    answers = dict(look.explanation.answers)
    top = (f"answer **{look.explanation.answers[0][0]}** ({look.explanation.answers[0][1]:.2f})"
           if answers else "no answer head in this run")
    message = f"{top}; {len(look.boxes)} regions; attention of {site} head {int(head)}"
    return message, look.regions_picture, answers or None, attention


def build_page(runner: Runner, max_upload_mb: int) -> gr.Blocks:
    """The page's layout and wiring; `serve` launches it."""
    with gr.Blocks(title="e2e-vl: try a trained model", analytics_enabled=False) as page:
        gr.Markdown(f"## Try a trained model\n`{runner.weights}`: upload an image (up to {max_upload_mb} MB "
                    f"and {runner.max_pixels:,} pixels) or pick an example, then ask.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="image")
                question = gr.Textbox(label="Question", placeholder="what shape is in the image?",
                                      elem_id="question")
                with gr.Row():
                    site = gr.Dropdown(runner.sites, value=runner.sites[-1], label="Attention of layer",
                                       elem_id="site")
                    head = gr.Slider(0, runner.num_heads - 1, value=0, step=1, label="Head", elem_id="head")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                if runner.examples:
                    gr.Examples(runner.examples, [image, question], label="The run's test images")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                answers = gr.Label(num_top_classes=runner.top_k, label="Answers", elem_id="answers")
                regions = gr.Image(type="pil", format="png", label="Regions: the detector's label and score",
                                   elem_id="regions")
        overlay = gr.Image(type="pil", format="png", label="Attention: each word's share per region",
                           elem_id="attention")
        # preprocess=False: the file reaches `read_upload` as uploaded, so a file that is not an image is
        # refused with its reason rather than failing inside Gradio's own image decoding.
        gr.on([ask.click, question.submit], functools.partial(answer, runner), [image, question, site, head],
              [message, regions, answers, overlay], preprocess=False)
    return page


def serve(runner: Runner, port: int, max_upload_mb: int) -> None:
    """Serve the page on 127.0.0.1:`port` until interrupted. Gradio refuses files over `max_upload_mb`
    before storing them: in the browser, and on the server for any other client."""
    build_page(runner, max_upload_mb).launch(server_name=HOST, server_port=port, share=False, theme=THEME,
                                             max_file_size=f"{max_upload_mb}mb", footer_links=[])
