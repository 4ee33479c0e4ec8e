"""Open-vocabulary semantic segmentation of images and rasters of any size.

For every tile, the model's dense features (``dense_features``: per-location embeddings in
the joint image-text space) are compared with one text query per class synonym; the
cosine similarities, times the model's logit scale, are upsampled to the tile, max-pooled
over the synonyms of each class and softmaxed over the classes. The tiled runner blends
these class probabilities across overlapping tiles; the argmax is the class raster.

Outputs (next to each other, named from ``out`` = a prefix):
``PREFIX_classes.tif`` (uint8 class index, colour table, class names and settings in tags;
nodata 255), ``PREFIX_confidence.tif`` (uint8, the winning probability x 255),
``PREFIX_classes.gpkg`` (one polygon per connected region, with class, score = mean
confidence, and the prompt), ``PREFIX_overlay.png``, and with ``probabilities=True``
``PREFIX_probabilities.tif`` (float32, one band per class).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsvl.data.classes import ClassSpec, format_class_list
from rsvl.errors import OutputError, PromptError
from rsvl.geo.raster import RasterSource
from rsvl.geo.runner import RasterOutput, TileBatch, TiledRunner
from rsvl.tasks.render import colormap_for, overlay_png, preview_arrays
from rsvl.tasks.text import pool_synonyms, resolve_templates, text_classifier

NODATA = 255


@dataclass
class SegmentResult:
    classes: list[str]
    outputs: dict[str, str]
    class_fractions: dict[str, float]
    polygons: int
    tiles: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DensePredictor:
    """``predict(TileBatch) -> (B, K, T, T)`` class probabilities from an image-text model."""

    def __init__(
        self,
        model: Any,
        classes: Sequence[ClassSpec],
        templates: str | Sequence[str] | None = None,
        logit_scale: float | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        self.model = model
        self.classes = list(classes)
        self.templates = resolve_templates(templates, model)
        self.queries, self.index = text_classifier(model, self.classes, self.templates)
        self.scale = float(
            logit_scale if logit_scale is not None else getattr(model, "dense_logit_scale", model.logit_scale)
        )
        self.torch = torch

    def __call__(self, batch: TileBatch | np.ndarray) -> np.ndarray:
        torch = self.torch
        images = batch.images if isinstance(batch, TileBatch) else batch
        size = images.shape[-2:]
        with torch.no_grad():
            feats = self.model.dense_features(images).float()  # (B, D, h, w)
            q = self.queries.to(feats.device)
            logits = torch.einsum("bdhw,pd->bphw", feats, q) * self.scale
            logits = torch.nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            # Max over synonyms first, then softmax over classes: the argmax is the same as
            # upstream's softmax-over-queries-then-max, and the result is a probability per
            # class (synonyms do not split the mass between them).
            logits = pool_synonyms(logits, self.index, len(self.classes), dim=1)
            probs = logits.softmax(dim=1)
        return probs.cpu().numpy()


def _argmax_labels(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return values.argmax(axis=0).astype(np.uint8)


def _confidence(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values.max(axis=0), 0, 1) * 254).astype(np.uint8)


def _default_gsd(model: Any, source: str | os.PathLike[str]) -> float | None:
    """The model's training resolution when the raster has a CRS to resample with."""
    preferred = getattr(model, "preferred_gsd", None)
    if preferred is None:
        return None
    from rsvl.geo.raster import open_dataset

    with open_dataset(source) as ds:
        return float(preferred) if ds.crs is not None else None


def _class_counts(path: Path, n: int) -> np.ndarray:
    """Pixels per class of a class raster, read block by block."""
    import rasterio

    counts = np.zeros(256, np.int64)
    with rasterio.open(path) as ds:
        for _, window in ds.block_windows(1):
            counts += np.bincount(ds.read(1, window=window).ravel(), minlength=256)
    return counts[:n]


def output_paths(out: str | os.PathLike[str], probabilities: bool, vector_format: str) -> dict[str, Path]:
    prefix = Path(out)
    if prefix.suffix.lower() in (".tif", ".tiff", ".gpkg", ".png"):
        prefix = prefix.with_suffix("")
    paths = {
        "classes": Path(f"{prefix}_classes.tif"),
        "confidence": Path(f"{prefix}_confidence.tif"),
        "polygons": Path(f"{prefix}_classes.{vector_format}"),
        "overlay": Path(f"{prefix}_overlay.png"),
    }
    if probabilities:
        paths["probabilities"] = Path(f"{prefix}_probabilities.tif")
    return paths


def segment(
    model: Any,
    source: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    out: str | os.PathLike[str],
    *,
    templates: str | Sequence[str] | None = None,
    bands: Sequence[int] | None = None,
    gsd: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    probabilities: bool = False,
    min_pixels: int = 16,
    simplify: float = 0.0,
    vector_format: str = "gpkg",
    to_crs: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Any = None,  # progress(total) -> context manager yielding advance(n)
    model_name: str | None = None,
) -> SegmentResult:
    """Segment ``source`` (any raster or image GDAL reads) into ``classes``; see module doc."""
    import time

    from rsvl.geo.vectors import polygonize_raster, write_vectors

    if not classes:
        raise PromptError("no classes given.", hint='Pass e.g. "forest|trees, water, buildings".')
    if len(classes) > 254:
        raise PromptError(f"{len(classes)} classes: at most 254 fit a uint8 class raster.")
    vector_format = vector_format.lower().lstrip(".")
    if vector_format not in ("gpkg", "geojson", "parquet"):
        raise OutputError(f"unknown vector format {vector_format!r}.", hint="Use gpkg, geojson or parquet.")
    t0 = time.perf_counter()
    paths = output_paths(out, probabilities, vector_format)
    if not overwrite and not resume:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputError(f"{existing[0]} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
    tile = int(tile or getattr(model, "preferred_tile", 256))
    overlap = int(overlap if overlap is not None else tile // 4)
    names = [c.name for c in classes]
    prompt = format_class_list(classes)
    predictor = DensePredictor(model, classes, templates)
    settings = {
        "task": "segment",
        "model": model_name or getattr(model, "name", type(model).__name__),
        "prompt": prompt,
        "templates": list(predictor.templates),
        "logit_scale": predictor.scale,
    }
    class_tags = {
        "classes": json.dumps({str(i): n for i, n in enumerate(names)}),
        "prompt": prompt,
    }
    outputs = [
        RasterOutput(paths["classes"], 1, "uint8", finalize=_argmax_labels, nodata=NODATA,
                     colormap=colormap_for(names), tags=class_tags, descriptions=["class"]),
        RasterOutput(paths["confidence"], 1, "uint8", finalize=_confidence, nodata=NODATA, descriptions=["confidence"],
                     tags={"scale": "probability x 254"}),
    ]
    if probabilities:
        outputs.append(RasterOutput(paths["probabilities"], len(classes), "float32", nodata=-1.0,
                                    descriptions=names, tags=class_tags, overview_resampling="average"))
    if gsd is None:
        gsd = _default_gsd(model, source)
    elif gsd <= 0:
        gsd = None  # native resolution
    with RasterSource(source, bands=bands, target_gsd=gsd) as src:
        for w in src.warnings:
            from rsvl.console import state

            state.warn(w)
        from contextlib import nullcontext

        from rsvl.geo.tiles import TileGrid

        total = len(TileGrid(src.width, src.height, tile, overlap))
        with progress(total) if progress is not None else nullcontext(None) as advance:
            runner = TiledRunner(src, predictor, outputs, tile=tile, overlap=overlap, batch_size=batch_size,
                                 settings=settings, overwrite=overwrite, resume=resume, progress=advance)
            res = runner.run()
        gdf = polygonize_raster(paths["classes"], classes=dict(enumerate(names)), min_pixels=min_pixels,
                                simplify=simplify, confidence_path=paths["confidence"],
                                attributes={"prompt": prompt})
        # An empty layer is still written: "no polygons" is an answer.
        gdf["score"] = gdf["score"].astype(float) / 254.0
        write_vectors(gdf, paths["polygons"], to_crs=to_crs, overwrite=True)
        rgb, labels = preview_arrays(src, paths["classes"])
    overlay_png(rgb, labels, names, paths["overlay"], nodata=NODATA, title=settings["model"])
    counts = _class_counts(paths["classes"], len(names))
    total = max(int(counts.sum()), 1)
    return SegmentResult(
        classes=names,
        outputs={k: str(v) for k, v in paths.items()},
        class_fractions={n: round(float(counts[i]) / total, 4) for i, n in enumerate(names)},
        polygons=len(gdf),
        tiles=res.tiles,
        seconds=round(time.perf_counter() - t0, 3),
        settings=res.settings,
    )
