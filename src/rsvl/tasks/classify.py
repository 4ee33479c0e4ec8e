"""Zero-shot scene classification of images, folders of images, and tiles of rasters.

Scores follow the CLIP zero-shot protocol: each class synonym's text embedding is the
renormalised mean over templates; scores = softmax over classes of ``logit_scale x cosine``
after max-pooling the synonyms of each class.

* An image (or a raster without CRS and no ``tile``) is classified whole.
* A folder: every image in it (recursively), one row each.
* A georeferenced raster (or any raster with ``tile``): a grid of non-overlapping tiles,
  each classified; written as a GeoPackage of tile polygons (label, score, top-k) and a
  label GeoTIFF with one pixel per tile.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsvl.data.classes import ClassSpec, format_class_list
from rsvl.errors import InputNotFoundError, OutputError, RasterReadError
from rsvl.tasks.text import pool_synonyms, resolve_templates, text_classifier

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".jp2", ".bmp", ".webp", ".vrt"}


@dataclass
class Prediction:
    source: str
    label: str
    score: float
    topk: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "score": self.score,
                "topk": [{"label": lab, "score": s} for lab, s in self.topk]}


@dataclass
class ClassifyResult:
    classes: list[str]
    predictions: list[Prediction]
    outputs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "predictions": [p.to_dict() for p in self.predictions],
                "outputs": self.outputs, "settings": self.settings}


class ZeroShotClassifier:
    """Embeds the class prompts once; ``scores(images uint8 (B,3,H,W)) -> (B, K)`` probabilities."""

    def __init__(self, model: Any, classes: Sequence[ClassSpec], templates: str | Sequence[str] | None = None) -> None:
        self.model = model
        self.classes = list(classes)
        self.templates = resolve_templates(templates, model)
        self.queries, self.index = text_classifier(model, self.classes, self.templates)

    def scores(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = self.model.encode_image(images).float()
            logits = emb @ self.queries.to(emb.device).T * float(self.model.logit_scale)
            logits = pool_synonyms(logits, self.index, len(self.classes), dim=1)
            return logits.softmax(dim=1).cpu().numpy()

    def predictions(self, sources: Sequence[str], probs: np.ndarray, k: int) -> list[Prediction]:
        names = [c.name for c in self.classes]
        out = []
        for src, p in zip(sources, probs, strict=True):
            order = np.argsort(-p)[: max(1, k)]
            out.append(Prediction(src, names[order[0]], float(p[order[0]]),
                                  [(names[i], round(float(p[i]), 6)) for i in order]))
        return out


def load_image(path: str | os.PathLike[str], bands: Sequence[int] | None = None) -> np.ndarray:
    """A whole image as (3, H, W) uint8 RGB, through the same band plan and stretch as rasters."""
    from rasterio.windows import Window

    from rsvl.geo.raster import RasterSource

    with RasterSource(path, bands=bands) as src:
        rgb, _ = src.read(Window(0, 0, src.width, src.height))
    return rgb


def iter_images(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            yield p


def _is_georeferenced(path: Path) -> bool:
    from rsvl.geo.raster import open_dataset

    with open_dataset(path) as ds:
        return ds.crs is not None


def classify(
    model: Any,
    source: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    *,
    templates: str | Sequence[str] | None = None,
    top_k: int = 5,
    batch_size: int = 16,
    bands: Sequence[int] | None = None,
    tile: int | None = None,
    gsd: float | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Any = None,
) -> ClassifyResult:
    """Classify an image, a folder of images, or the tiles of a raster (see module doc)."""
    src = Path(source)
    if not src.exists():
        raise InputNotFoundError(f"{src}: no such file or folder.", hint="Check the path.")
    clf = ZeroShotClassifier(model, classes, templates)
    names = [c.name for c in classes]
    settings = {"task": "classify", "model": getattr(model, "name", type(model).__name__),
                "prompt": format_class_list(classes), "templates": list(clf.templates)}
    if src.is_dir():
        files = list(iter_images(src))
        if not files:
            raise InputNotFoundError(f"{src}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
        preds: list[Prediction] = []
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            imgs = []
            for f in chunk:
                try:
                    imgs.append(_square(load_image(f, bands), model.image_size))
                except RasterReadError as exc:
                    raise RasterReadError(f"{f}: {exc.message}", hint=exc.hint) from exc
            preds += clf.predictions([str(f) for f in chunk], clf.scores(np.stack(imgs)), top_k)
            if progress:
                progress(len(chunk))
        return ClassifyResult(names, preds, settings=settings)
    if tile is None and not _is_georeferenced(src):
        img = _square(load_image(src, bands), model.image_size)
        return ClassifyResult(names, clf.predictions([str(src)], clf.scores(img[None]), top_k), settings=settings)
    return _classify_raster(clf, src, names, settings, tile=tile or model.image_size, top_k=top_k,
                            batch_size=batch_size, bands=bands, gsd=gsd, out=out, overwrite=overwrite,
                            progress=progress)


def classify_arrays(
    model: Any,
    images: Sequence[np.ndarray],
    classes: Sequence[ClassSpec],
    *,
    templates: str | Sequence[str] | None = None,
    top_k: int = 5,
    batch_size: int = 16,
    names: Sequence[str] | None = None,
) -> ClassifyResult:
    """Classify in-memory images: uint8 arrays (H, W, 3) or (3, H, W), or PIL images."""
    from rsvl.errors import PromptError

    if not len(images):
        raise PromptError("no images given.", hint="Pass one or more (H, W, 3) uint8 arrays.")
    clf = ZeroShotClassifier(model, classes, templates)
    chw = [_as_chw(np.asarray(im), i) for i, im in enumerate(images)]
    sources = list(names) if names is not None else [f"image[{i}]" for i in range(len(chw))]
    preds: list[Prediction] = []
    for i in range(0, len(chw), batch_size):
        batch = np.stack([_square(a, model.image_size) for a in chw[i : i + batch_size]])
        preds += clf.predictions(sources[i : i + batch_size], clf.scores(batch), top_k)
    settings = {"task": "classify", "model": getattr(model, "name", type(model).__name__),
                "prompt": format_class_list(classes), "templates": list(clf.templates)}
    return ClassifyResult([c.name for c in classes], preds, settings=settings)


def _as_chw(a: np.ndarray, i: int) -> np.ndarray:
    from rsvl.errors import BandSelectionError

    if a.ndim == 2:
        a = np.repeat(a[None], 3, axis=0)
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (3, 4):
        a = a[..., :3].transpose(2, 0, 1)
    elif a.ndim == 3 and a.shape[0] == 4:
        a = a[:3]
    if a.ndim != 3 or a.shape[0] != 3:
        raise BandSelectionError(f"image {i} has shape {a.shape}, not (H, W, 3) or (3, H, W).",
                                 hint="Pass RGB images; select three bands of multispectral data first.")
    if a.dtype != np.uint8:
        raise BandSelectionError(f"image {i} is {a.dtype}, not uint8.",
                                 hint="Scale it to 0-255 uint8 first, or pass a file path and let rsvl stretch it.")
    return np.ascontiguousarray(a)


def _square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Images of any shape -> (3, size, size): resize the short side, centre crop (CLIP's way)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(rgb).float()[None]
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return x[0].round().clamp(0, 255).to(torch.uint8).numpy()


def _classify_raster(clf, src: Path, names, settings, *, tile, top_k, batch_size, bands, gsd, out, overwrite, progress):
    import geopandas as gpd
    from affine import Affine

    from rsvl.geo.raster import RasterSource
    from rsvl.geo.runner import write_geotiff_from_array
    from rsvl.geo.tiles import TileGrid
    from rsvl.geo.vectors import boxes_to_polygons, write_vectors
    from rsvl.tasks.render import colormap_for

    prefix = Path(out) if out is not None else Path.cwd() / src.stem
    if prefix.suffix.lower() in (".gpkg", ".tif"):
        prefix = prefix.with_suffix("")
    gpkg, label_tif = Path(f"{prefix}_tiles.gpkg"), Path(f"{prefix}_tiles.tif")
    for p in (gpkg, label_tif):
        if p.exists() and not overwrite:
            raise OutputError(f"{p} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
    records: list[dict[str, Any]] = []
    preds: list[Prediction] = []
    with RasterSource(src, bands=bands, target_gsd=gsd) as rs:
        grid = TileGrid(rs.width, rs.height, tile, 0)
        labels = np.full((1, grid.n_rows, grid.n_cols), 255, np.uint8)
        scores = np.zeros((1, grid.n_rows, grid.n_cols), np.float32)
        tiles = list(grid)
        with rs.reader() as reader:
            for i in range(0, len(tiles), batch_size):
                chunk = tiles[i : i + batch_size]
                imgs, keep = [], []
                for _, _, win in chunk:
                    rgb, valid = reader.read(win)
                    imgs.append(rgb)
                    keep.append(valid.mean() >= 0.5)  # mostly nodata: not classified
                probs = clf.scores(np.stack(imgs))
                for (r, c, win), p, k in zip(chunk, probs, keep, strict=True):
                    if not k:
                        continue
                    name = f"{src.name}:{r},{c}"
                    (pred,) = clf.predictions([name], p[None], top_k)
                    preds.append(pred)
                    labels[0, r, c] = names.index(pred.label)
                    scores[0, r, c] = pred.score
                    poly = boxes_to_polygons([[win.col_off, win.row_off, win.col_off + tile, win.row_off + tile]], rs.transform)[0]
                    records.append({"row": r, "col": c, "label": pred.label, "score": pred.score,
                                    "topk": json.dumps(pred.topk), "geometry": poly})
                if progress:
                    progress(len(chunk))
        crs, transform = rs.crs, rs.transform @ Affine.scale(tile)
    gdf = gpd.GeoDataFrame(records, columns=["row", "col", "label", "score", "topk", "geometry"], geometry="geometry", crs=crs)
    write_vectors(gdf, gpkg, overwrite=overwrite)
    write_geotiff_from_array(labels, label_tif, crs=crs, transform=transform, nodata=255,
                             tags={"classes": json.dumps(dict(enumerate(names))), "rsvl_settings": json.dumps(settings)},
                             colormap=colormap_for(names), descriptions=["label"])
    return ClassifyResult(names, preds, outputs={"tiles": str(gpkg), "labels": str(label_tif)}, settings=settings)
