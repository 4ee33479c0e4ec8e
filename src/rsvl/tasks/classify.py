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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window

from rsvl.console import TaskProgress, progress_scope
from rsvl.data.classes import ClassSpec, format_class_list
from rsvl.errors import (
    BandSelectionError,
    InputNotFoundError,
    OutputError,
    PromptError,
    RasterReadError,
)
from rsvl.geo.journal import TileJournal, refuse_stale_journal, source_identity
from rsvl.geo.raster import RasterSource
from rsvl.geo.stream import TileBatch, map_tiles
from rsvl.geo.tiles import TileGrid, check_batch_size, check_gsd, check_tiling
from rsvl.geo.vectors import boxes_to_polygons, write_vectors
from rsvl.geo.writer import write_geotiff_from_array
from rsvl.models.preprocess import square_image
from rsvl.models.zeroshot import ZeroShotClassifier
from rsvl.tasks.render import colormap_for
from rsvl.tasks.sources import (
    announce_resampling,
    check_outputs,
    find_images,
    is_georeferenced,
    no_images_message,
)

#: tiles whose valid (not nodata) fraction is below this are not classified
MIN_VALID = 0.5


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


def top_k_predictions(classes: Sequence[ClassSpec], sources: Sequence[str], probs: np.ndarray,
                      k: int) -> list[Prediction]:
    """One :class:`Prediction` per row of ``probs`` (B, K): the best label and the top ``k``."""
    names = [c.name for c in classes]
    out = []
    for src, p in zip(sources, probs, strict=True):
        order = np.argsort(-p)[: max(1, k)]
        out.append(Prediction(src, names[order[0]], float(p[order[0]]),
                              [(names[i], round(float(p[i]), 6)) for i in order]))
    return out


def load_image(path: str | os.PathLike[str], bands: Sequence[int] | None = None) -> np.ndarray:
    """A whole image as (3, H, W) uint8 RGB, through the same band plan and stretch as rasters."""
    with RasterSource(path, bands=bands) as src:
        rgb, _ = src.read(Window(0, 0, src.width, src.height))
    return rgb


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
    resume: bool = False,
    progress: TaskProgress | None = None,
) -> ClassifyResult:
    """Classify an image, a folder of images, or the tiles of a raster (see module doc).

    ``progress`` (:class:`rsvl.console.TaskProgress`) is told the number of images or tiles.
    ``resume`` continues an interrupted tile run of a raster (:mod:`rsvl.geo.journal`).
    """
    src = Path(source)
    if not src.exists():
        raise InputNotFoundError(f"{src}: no such file or folder.", hint="Check the path.")
    check_batch_size(batch_size)
    gsd = check_gsd(gsd) or None  # 0: the native resolution
    if tile is not None:
        check_tiling(tile, 0)
    clf = ZeroShotClassifier(model, classes, templates)
    names = [c.name for c in classes]
    settings = {"task": "classify", "model": getattr(model, "name", type(model).__name__),
                "prompt": format_class_list(classes), "templates": list(clf.templates)}
    if src.is_dir():
        files = find_images(src)
        if not files:
            raise InputNotFoundError(no_images_message(src))
        preds: list[Prediction] = []
        with progress_scope(progress, len(files)) as advance:
            for i in range(0, len(files), batch_size):
                chunk = files[i : i + batch_size]
                imgs = []
                for f in chunk:
                    try:
                        imgs.append(square_image(load_image(f, bands), model.image_size))
                    except RasterReadError as exc:
                        raise RasterReadError(f"{f}: {exc.message}", hint=exc.hint) from exc
                preds += top_k_predictions(clf.classes, [str(f) for f in chunk], clf.scores(np.stack(imgs)), top_k)
                advance(len(chunk))
        return ClassifyResult(names, preds, settings=settings)
    if tile is None and not is_georeferenced(src):
        img = square_image(load_image(src, bands), model.image_size)
        with progress_scope(progress, 1) as advance:
            preds = top_k_predictions(clf.classes, [str(src)], clf.scores(img[None]), top_k)
            advance(1)
        return ClassifyResult(names, preds, settings=settings)
    return _classify_raster(clf, src, names, settings, tile=int(tile) if tile is not None else int(model.image_size), top_k=top_k,
                            batch_size=batch_size, bands=bands, gsd=gsd, out=out, overwrite=overwrite,
                            resume=resume, progress=progress)


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
    if not len(images):
        raise PromptError("no images given.", hint="Pass one or more (H, W, 3) uint8 arrays.")
    clf = ZeroShotClassifier(model, classes, templates)
    chw = [_as_chw(np.asarray(im), i) for i, im in enumerate(images)]
    sources = list(names) if names is not None else [f"image[{i}]" for i in range(len(chw))]
    preds: list[Prediction] = []
    for i in range(0, len(chw), batch_size):
        batch = np.stack([square_image(a, model.image_size) for a in chw[i : i + batch_size]])
        preds += top_k_predictions(clf.classes, sources[i : i + batch_size], clf.scores(batch), top_k)
    settings = {"task": "classify", "model": getattr(model, "name", type(model).__name__),
                "prompt": format_class_list(classes), "templates": list(clf.templates)}
    return ClassifyResult([c.name for c in classes], preds, settings=settings)


def _as_chw(a: np.ndarray, i: int) -> np.ndarray:
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


def raster_output_paths(src: str | os.PathLike[str], out: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The GeoPackage and label GeoTIFF that classifying the tiles of raster ``src`` writes."""
    prefix = Path(out) if out is not None else Path.cwd() / Path(src).stem
    if prefix.suffix.lower() in (".gpkg", ".tif"):
        prefix = prefix.with_suffix("")
    return Path(f"{prefix}_tiles.gpkg"), Path(f"{prefix}_tiles.tif")


def _classify_raster(clf: ZeroShotClassifier, src: Path, names: list[str], settings: dict[str, Any], *,
                     tile: int, top_k: int, batch_size: int, bands: Sequence[int] | None, gsd: float | None,
                     out: str | os.PathLike[str] | None, overwrite: bool, resume: bool,
                     progress: TaskProgress | None) -> ClassifyResult:
    """Non-overlapping tiles through the streaming loop (:func:`rsvl.geo.stream.map_tiles`):
    what is kept per tile is its prediction and footprint, plus one label pixel per tile.

    Each tile's scores are journaled as batches finish (:class:`rsvl.geo.journal.TileJournal`):
    an interrupted run continues with ``resume`` and writes what an uninterrupted one would."""
    gpkg, label_tif = raster_output_paths(src, out)
    check_outputs([gpkg, label_tif], [src])
    if not gpkg.parent.exists():
        raise OutputError(f"{gpkg.parent}: output folder does not exist.", hint="Create it first.")
    refuse_stale_journal(gpkg, resume, overwrite)
    if not resume:
        for p in (gpkg, label_tif):
            if p.exists() and not overwrite:
                raise OutputError(f"{p} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
    size = int(clf.model.image_size)

    def predict(batch: TileBatch) -> np.ndarray:
        imgs = batch.images if tile == size else np.stack([square_image(im, size) for im in batch.images])
        return clf.scores(imgs)

    records: list[dict[str, Any]] = []
    preds: list[Prediction] = []
    with RasterSource(src, bands=bands, target_gsd=gsd) as rs:
        announce_resampling(rs, tile, 0)
        settings = {**settings, **rs.resample_plan().tags()}
        grid = TileGrid(rs.width, rs.height, tile, 0)
        labels = np.full((1, grid.n_rows, grid.n_cols), 255, np.uint8)

        def keep(position: tuple[int, int], scores: np.ndarray | None) -> None:
            if scores is None:  # mostly nodata: not classified
                return
            r, c = position
            (pred,) = top_k_predictions(clf.classes, [f"{src.name}:{r},{c}"], scores[None], top_k)
            preds.append(pred)
            labels[0, r, c] = names.index(pred.label)
            win = grid.window(r, c)
            poly = boxes_to_polygons([[win.col_off, win.row_off, win.col_off + tile, win.row_off + tile]],
                                     rs.transform)[0]
            records.append({"row": r, "col": c, "label": pred.label, "score": pred.score,
                            "topk": json.dumps(pred.topk), "geometry": poly})

        run = {**settings, **rs.settings(), **source_identity(src), "tile": tile, "top_k": top_k,
               "batch_size": batch_size, "min_valid": MIN_VALID, "grid": [grid.n_rows, grid.n_cols],
               "outputs": [str(gpkg.resolve()), str(label_tif.resolve())]}
        with TileJournal([gpkg, label_tif], run, batch_size=batch_size, resume=resume,
                         overwrite=overwrite) as journal:
            done = journal.open()
            with progress_scope(progress, len(grid)) as advance:
                if done:
                    advance(len(done))
                for position, payload in done:
                    keep(position, None if payload is None else np.asarray(payload["scores"], dtype=payload["dtype"]))
                for t in map_tiles(rs, predict, tile=tile, overlap=0, batch_size=batch_size, min_valid=MIN_VALID,
                                   progress=advance, start=len(done)):
                    scores = np.asarray(t.result) if t.predicted else None
                    keep(t.position, scores)
                    journal.add(t.position, None if scores is None else
                                {"dtype": str(scores.dtype), "scores": scores.tolist()})
                journal.flush()
            crs, transform = rs.crs, rs.transform @ Affine.scale(tile)
            import geopandas as gpd  # lazy: 0.8 s at import; classifying chips never needs it

            gdf = gpd.GeoDataFrame(records, columns=["row", "col", "label", "score", "topk", "geometry"],
                                   geometry="geometry", crs=crs)
            # a resumed run may find outputs of its own interrupted final write
            write_vectors(gdf, gpkg, overwrite=overwrite or resume)
            write_geotiff_from_array(labels, label_tif, crs=crs, transform=transform, nodata=255,
                                     tags={"classes": json.dumps(dict(enumerate(names))),
                                           "rsvl_settings": json.dumps(settings)},
                                     colormap=colormap_for(names), descriptions=["label"])
            journal.finish()
    return ClassifyResult(names, preds, outputs={"tiles": str(gpkg), "labels": str(label_tif)}, settings=settings)
