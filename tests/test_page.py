"""The local page to try a trained model (issue 32, item 4), as a person uses it: tools/serve_page.py
serves conftest's trained run on a free port of 127.0.0.1, and Debian's chromium (which `make test`
installs) uploads images and asks questions through Playwright. Every request the browser makes must stay
on this machine, so the page works with the network closed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
# What the server is started with: small limits, so that the files that break them are small too.
MAX_UPLOAD_MB = 1
MAX_PIXELS = 5_000  # a 64x64 easy-VQA image (4,096 pixels) passes
QUESTION = "what shape is in the image?"
TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                 "(`make test` installs it: apt-get install chromium chromium-driver)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(trained_run):
    """The page of `trained_run`, served by the tool in a subprocess until the module's tests end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve_page.py"), str(trained_run),
                               "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB),
                               "--max-pixels", str(MAX_PIXELS)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert server.poll() is None, f"the server stopped: {server.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def browser_page(page_url):
    """A fresh headless chromium (a new profile each launch) on the page; after the test, every URL the
    browser asked for must be on 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(page_url)
            page.wait_for_selector("#ask")
            yield page
        finally:
            browser.close()
    outside = sorted({u for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")
                      and urlparse(u).hostname != "127.0.0.1"})
    assert not outside, f"the page fetched from outside this machine: {outside}"


def upload(page, path: Path) -> None:
    page.set_input_files("#image input[type=file]", str(path))


def ask(page, question: str) -> None:
    page.fill("#question textarea", question)
    page.click("#ask")


def test_the_page_answers_as_the_model_does_and_survives_bad_uploads(browser_page, trained_run, tmp_path,
                                                                     one_thread):
    from playwright.sync_api import expect

    from e2e_vl.data.easy_vqa import REGION_CLASSES, EasyVQAImages
    from e2e_vl.visualize import pictures
    from e2e_vl.visualize.attention import TextLayout
    from e2e_vl.visualize.run_model import answer_names, load_run

    page = browser_page
    image, boxes = EasyVQAImages("test", [3])(3)  # boxes: the whole image and the shape's, as in training
    cfg, model, _ = load_run(trained_run)
    look = pictures.look(model, image, boxes, QUESTION, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST,
                         answer_names(cfg, model), REGION_CLASSES, 5, TextLayout.from_cfg(cfg))
    best, probability = look.explanation.answers[0]
    shape = tmp_path / "shape.png"
    Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(shape)

    # a good request: the model's answer, its top answers, the regions and the attention picture
    upload(page, shape)
    page.wait_for_selector("#image img[src*='shape.png']")
    ask(page, QUESTION)
    message = page.locator("#message")
    expect(message).to_contain_text(f"answer {best} ({probability:.2f}); 2 regions")
    expect(page.locator("#answers")).to_contain_text(look.explanation.answers[1][0])
    for picture in ("#regions img", "#attention img"):
        page.wait_for_function(f"document.querySelector({picture!r})?.naturalWidth >= 480")

    # an empty question, a file that is not an image, one over the pixel limit: a message each, and the
    # earlier answer's pictures are gone
    ask(page, "   ")
    expect(message).to_contain_text("No question")
    expect(page.locator("#regions img")).to_have_count(0)
    fake = tmp_path / "holiday.png"
    fake.write_text("these are notes, not a picture\n")
    upload(page, fake)
    page.wait_for_selector("#image img[src*='holiday.png']")
    ask(page, QUESTION)
    expect(message).to_contain_text("holiday.png is not an image the page can use: not a decodable image")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (100, 100), "white").save(wide)
    upload(page, wide)
    page.wait_for_selector("#image img[src*='wide.png']")
    ask(page, QUESTION)
    expect(message).to_contain_text(f"image too large: 100x100 = 10000 pixels > --max-pixels {MAX_PIXELS}")

    # refused in the browser before the upload: a file of another type, a file over the size limit
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    upload(page, notes)
    expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible()
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_MB * 1024 * 1024))
    upload(page, big)
    expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible()
    expect(page.get_by_text('"big.png"')).to_be_visible()

    # the server still serves: one of the run's test images, picked from the examples, is answered
    page.get_by_text("what is the red shape?", exact=True).first.click()
    expect(page.locator("#question textarea")).to_have_value("what is the red shape?")
    page.click("#ask")
    expect(message).to_contain_text("; 2 regions;")
    page.wait_for_function("document.querySelector('#regions img')?.naturalWidth >= 480")
