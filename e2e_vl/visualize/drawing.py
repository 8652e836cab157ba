"""PIL drawing shared by the pictures (boxes with labels and a legend, attention overlays, line charts,
contact sheets). Plain PIL so the pictures need nothing beyond what the detector already installs.
Images are HxWx3 uint8 RGB arrays or PIL images; small images are scaled up so labels stay readable."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detector.atomic import atomic_write

# Distinct, readable colours (RGB), cycled over boxes.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
MIN_SIDE = 480  # pictures are scaled up until their short side is at least this
FONT_SIZE = 14


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """PIL's built-in scalable font (Pillow >= 10.1); older Pillow has only its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.ascontiguousarray(image, np.uint8))


def display_scale(width: int, height: int, min_side: int = MIN_SIDE) -> float:
    """How much to enlarge an image so its short side reaches `min_side` (never shrunk)."""
    return max(1.0, min_side / max(1, min(width, height)))


@dataclasses.dataclass(frozen=True)
class DrawnBox:
    """A box as drawn: its colour, label and corners in the picture's pixels."""

    color: tuple[int, int, int]
    label: str
    xyxy: tuple[int, int, int, int]


def draw_boxes(image: np.ndarray | Image.Image, boxes: np.ndarray, labels: Sequence[str],
               min_side: int = MIN_SIDE, legend: bool = True) -> tuple[Image.Image, list[DrawnBox]]:
    """The image scaled up to `min_side`, each box outlined in its palette colour with a label tag, and a
    legend below (colour swatch + label per box). Returns the picture and the boxes drawn."""
    base = to_pil(image)
    scale = display_scale(*base.size, min_side)
    pic = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.NEAREST)
    fnt = font()
    width = max(2, round(min(pic.size) / 200))
    drawn = []
    canvas = ImageDraw.Draw(pic)
    for i, (box, label) in enumerate(zip(np.asarray(boxes, dtype=float), labels)):
        color = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(v * scale)) for v in box)
        canvas.rectangle((x1, y1, x2, y2), outline=color, width=width)
        tag = f"{i}"
        tw, th = _text_size(canvas, tag, fnt)
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        canvas.rectangle((x1, ty, x1 + tw + 4, ty + th + 4), fill=color)
        canvas.text((x1 + 2, ty + 1), tag, fill=(0, 0, 0), font=fnt)
        drawn.append(DrawnBox(color, label, (x1, y1, x2, y2)))
    if legend and drawn:
        pic = add_legend(pic, [(d.color, f"{i}: {d.label}") for i, d in enumerate(drawn)])
    return pic, drawn


def _text_size(canvas: ImageDraw.ImageDraw, text: str, fnt: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = canvas.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def add_legend(pic: Image.Image, entries: Sequence[tuple[tuple[int, int, int], str]]) -> Image.Image:
    """`pic` with a white strip below: one line per entry, a colour swatch then the text."""
    fnt = font()
    line = FONT_SIZE + 6
    cols = max(1, pic.width // 240)
    rows = math.ceil(len(entries) / cols)
    out = Image.new("RGB", (pic.width, pic.height + rows * line + 8), "white")
    out.paste(pic, (0, 0))
    canvas = ImageDraw.Draw(out)
    col_w = pic.width // cols
    for i, (color, text) in enumerate(entries):
        x, y = (i % cols) * col_w + 6, pic.height + 4 + (i // cols) * line
        canvas.rectangle((x, y + 2, x + FONT_SIZE, y + 2 + FONT_SIZE), fill=color, outline=(0, 0, 0))
        canvas.text((x + FONT_SIZE + 4, y), text, fill=(0, 0, 0), font=fnt)
    return out


def attention_overlay(image: np.ndarray | Image.Image, boxes: np.ndarray, weights: np.ndarray, title: str,
                      min_side: int = MIN_SIDE) -> Image.Image:
    """The image with every region tinted by the attention it gets (`weights` [K], summed where regions
    overlap, the strongest at full tint) and outlined, its weight written in it; `title` above."""
    base = to_pil(image)
    scale = display_scale(*base.size, min_side)
    pic = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.NEAREST)
    heat = np.zeros((pic.height, pic.width), np.float32)
    scaled = [tuple(int(round(v * scale)) for v in box) for box in np.asarray(boxes, dtype=float)]
    for (x1, y1, x2, y2), w in zip(scaled, weights):
        heat[max(0, y1):y2, max(0, x1):x2] += float(w)
    heat /= max(float(heat.max()), 1e-12)
    rgb = np.asarray(pic, np.float32)
    tint = np.array([255.0, 40.0, 0.0], np.float32)
    alpha = 0.6 * heat[..., None]
    pic = Image.fromarray((rgb * (1 - alpha) + tint * alpha).astype(np.uint8))
    canvas = ImageDraw.Draw(pic)
    fnt = font()
    for (x1, y1, x2, y2), w in zip(scaled, weights):
        canvas.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=1)
        canvas.text((x1 + 3, y1 + 2), f"{float(w):.2f}", fill=(255, 255, 255), font=fnt, stroke_width=2,
                    stroke_fill=(0, 0, 0))
    return with_title(pic, title)


def with_title(pic: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (pic.width, pic.height + FONT_SIZE + 10), "white")
    out.paste(pic, (0, FONT_SIZE + 10))
    ImageDraw.Draw(out).text((6, 4), title, fill=(0, 0, 0), font=font())
    return out


def contact_sheet(pictures: Sequence[Image.Image], columns: int = 4, cell: int = 320) -> Image.Image:
    """Many pictures in one: each fitted into a `cell`-wide square cell (aspect kept), `columns` a row."""
    if not pictures:
        raise ValueError("contact sheet: no pictures")
    columns = max(1, min(columns, len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, pic in enumerate(pictures):
        f = min(cell / pic.width, cell / pic.height)
        small = pic.resize((max(1, round(pic.width * f)), max(1, round(pic.height * f))),
                           Image.Resampling.LANCZOS)
        sheet.paste(small, ((i % columns) * cell, (i // columns) * cell))
    return sheet


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str,
               size: tuple[int, int] = (560, 300), x_label: str = "step",
               y_range: tuple[float, float] | None = None, x_range: tuple[float, float] | None = None,
               x_ticks: Sequence[tuple[float, str]] = ()) -> Image.Image:
    """A small line chart: one polyline per named (xs, ys) series, axes with min/max ticks (or the given
    `x_ticks`: (x, label) pairs), a legend below."""
    width, height = size
    left, right, top, bottom = 60, 12, 26, 58  # the legend goes below the x axis, outside the plot
    pic = Image.new("RGB", size, "white")
    canvas = ImageDraw.Draw(pic)
    fnt = font(12)
    canvas.text((left, 4), title, fill=(0, 0, 0), font=font())
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        canvas.text((left, height // 2), "no data", fill=(0, 0, 0), font=fnt)
        return pic
    x0, x1 = x_range or (min(p[0] for p in points), max(p[0] for p in points))
    y0, y1 = y_range or (min(p[1] for p in points), max(p[1] for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pw, ph = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    canvas.rectangle((left, top, left + pw, top + ph), outline=(0, 0, 0))
    for value, (px, py) in ((y0, at(x0, y0)), (y1, at(x0, y1))):
        canvas.text((4, py - 7), f"{value:.3g}", fill=(0, 0, 0), font=fnt)
    for value, label in x_ticks or [(x0, f"{x0:.4g}"), (x1, f"{x1:.4g}")]:
        px, _ = at(value, y0)
        half = _text_size(canvas, label, fnt)[0] / 2
        canvas.text((px - half, top + ph + 4), label, fill=(0, 0, 0), font=fnt)
    canvas.text((left + pw // 2 - 10, top + ph + 18), x_label, fill=(0, 0, 0), font=fnt)
    lx, ly = left, top + ph + 38
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [at(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            canvas.line(pts, fill=color, width=2)
        for px, py in pts if len(pts) < 40 else ():
            canvas.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        canvas.line((lx, ly + 7, lx + 16, ly + 7), fill=color, width=3)
        canvas.text((lx + 20, ly), name, fill=(0, 0, 0), font=fnt)
        lx += 20 + _text_size(canvas, name, fnt)[0] + 14
    return pic


def stack(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures one below the other."""
    out = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for p in pictures:
        out.paste(p, (0, y))
        y += p.height
    return out


def save_png(pic: Image.Image, path: str | Path) -> Path:
    """Write `pic` as PNG atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: pic.save(f, format="PNG"))
    return path
