"""PNG overlays a person can open: the image, the classes in colour, and a legend."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling

from rsvl.io import atomic_path

#: distinct, colour-blind-friendly-ish colours for up to 20 classes (RGB)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (34, 139, 34), (0, 114, 178), (204, 121, 167), (128, 128, 128),
    (213, 94, 0), (86, 180, 233), (240, 228, 66), (0, 158, 115), (153, 79, 0),
    (106, 61, 154), (255, 127, 127), (31, 120, 180), (178, 223, 138), (251, 154, 153),
    (227, 26, 28), (253, 191, 111), (202, 178, 214), (255, 255, 153), (177, 89, 40),
)

#: colours chosen by class name where the name says what it is
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "water": (30, 110, 220), "river": (30, 110, 220), "lake": (30, 110, 220), "sea": (20, 80, 180),
    "forest": (20, 120, 40), "trees": (20, 120, 40), "tree": (20, 120, 40),
    "farmland": (230, 200, 60), "cropland": (230, 200, 60), "agriculture": (230, 200, 60), "agricultural": (230, 200, 60),
    "buildings": (220, 50, 50), "building": (220, 50, 50), "houses": (220, 50, 50), "residential": (220, 50, 50),
    "roads": (90, 90, 90), "road": (90, 90, 90), "grass": (140, 210, 90), "bare soil": (170, 120, 80),
    "barren": (170, 120, 80), "background": (0, 0, 0), "car": (255, 0, 255), "low vegetation": (140, 210, 90),
}


def class_colours(names: Sequence[str]) -> list[tuple[int, int, int]]:
    used: set[tuple[int, int, int]] = set()
    out = []
    spare = iter(PALETTE)
    for n in names:
        c = NAMED_COLOURS.get(n.strip().lower())
        if c is None or c in used:
            c = next(c for c in spare if c not in used)
        used.add(c)
        out.append(c)
    return out


def colormap_for(names: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    """GeoTIFF colour table: class index -> RGBA."""
    return {i: (*c, 255) for i, c in enumerate(class_colours(names))}


def overlay_png(
    rgb: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    nodata: int | None = 255,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Write ``rgb`` (3, H, W) uint8 with ``labels`` (H, W) blended in colour and a legend."""
    colours = np.array(class_colours(names) + [(0, 0, 0)], dtype=np.float32)
    lab = labels.astype(np.int64)
    invalid = (lab < 0) | (lab >= len(names))
    if nodata is not None:
        invalid |= labels == nodata
    lab = np.where(invalid, len(names), lab)
    base = np.moveaxis(rgb, 0, -1).astype(np.float32)
    col = colours[lab]
    out = np.where(invalid[..., None], base * 0.6, base * (1 - alpha) + col * alpha)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    # Legend to the right of the image.
    font = ImageFont.load_default()
    row_h, pad = 18, 8
    present = np.bincount(lab[~invalid].ravel(), minlength=len(names))[: len(names)]
    total = max(int(present.sum()), 1)
    lines = [f"{n}  {100.0 * present[i] / total:.1f}%" for i, n in enumerate(names)]
    legend_w = max(140, 12 + max(int(ImageDraw.Draw(img).textlength(s, font=font)) for s in lines) + 3 * pad)
    height = max(img.height, pad * 2 + row_h * (len(names) + (1 if title else 0)))
    canvas = Image.new("RGB", (img.width + legend_w, height), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((img.width + pad, y), title, fill=(0, 0, 0), font=font)
        y += row_h
    for i, line in enumerate(lines):
        c = tuple(int(v) for v in colours[i])
        draw.rectangle([img.width + pad, y + 2, img.width + pad + 12, y + 14], fill=c, outline=(0, 0, 0))
        draw.text((img.width + pad + 18, y + 2), line, fill=(0, 0, 0), font=font)
        y += row_h
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def preview_arrays(source: Any, label_path: str | os.PathLike[str], max_side: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A decimated RGB (through the source's band plan and stretch) and label raster,
    read without loading the full-resolution scene."""
    # At the source's own resolution (the labels may be on a coarser working grid), capped.
    W, H = source.native_width, source.native_height
    factor = max(W, H) / max_side
    w = max(1, int(round(W / max(factor, 1.0))))
    h = max(1, int(round(H / max(factor, 1.0))))
    with rasterio.open(label_path) as lab:
        labels = lab.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    rgb = source.read_preview(w, h)
    return rgb, labels
