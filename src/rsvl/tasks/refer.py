"""Referring segmentation: "the ship closest to the bridge" -> the mask of that one object.

Works with any model of the referring interface (mini-refer, FIANet): ``image_size``,
``mean``/``std`` (0-1 scale), ``tokenize(list[str])`` and ``forward(images, text) ->
(B, 2, S, S)`` logits. A window is resized to ``image_size`` squared (bilinear, as in
training), normalised, and the softmax probability of class 1 ("referred") is resized back.

* Small inputs (both sides <= ``tile``) go through whole.
* Larger rasters are cut into tiles and streamed through the read-ahead loop of the tiled
  runner (:func:`rsvl.geo.stream.map_tiles`: memory depends on the tile, not the scene;
  tiles without a valid pixel are skipped); every tile proposes candidate objects, and the
  task returns the best one. The model only ever sees
  one tile, so "the leftmost ..." is judged within a tile.

Candidates are the 4-connected components of ``probability >= threshold`` with at least
``min_pixels`` pixels; a candidate's **score** is its mean probability. With
``keep="best"`` (default) only the best-scoring candidate is returned (a component that
touches an inner tile edge, i.e. may be cut, ranks below one that does not); with
``keep="all"`` every candidate is kept.

Outputs, named from the prefix ``out``:

* georeferenced raster: ``PREFIX_mask.tif`` (uint8, 1 = referred object, source CRS and
  transform, expression/model/score in tags), ``PREFIX.gpkg`` (or .geojson / .parquet; one
  polygon per kept object with expression, score and pixels, in the source CRS or
  ``to_crs``), ``PREFIX_overlay.png`` (a preview) and ``PREFIX.json`` (the result);
* plain image: ``PREFIX_mask.png`` (0/255), ``PREFIX_overlay.png``, ``PREFIX.geojson``
  (polygons in pixel coordinates, x right, y down) and ``PREFIX.json``.

Every file is written under a temporary name and renamed when complete. The mask GeoTIFF
is painted block by block from the kept candidates while it is written, so no
scene-sized array ever exists.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import torch
from affine import Affine
from PIL import Image
from rasterio.windows import Window
from scipy import ndimage

from rsvl.console import TaskProgress, progress_scope
from rsvl.errors import InputNotFoundError, OutputError, PromptError
from rsvl.geo.raster import RasterSource
from rsvl.geo.stream import TileBatch, map_tiles
from rsvl.geo.tiles import check_gsd, check_tiling
from rsvl.geo.vectors import mask_to_polygon, write_vectors
from rsvl.geo.writer import write_geotiff_from_array
from rsvl.io import atomic_path, write_text
from rsvl.tasks.render import overlay_png
from rsvl.tasks.sources import announce_resampling, check_outputs, check_to_crs, check_vector_format

__all__ = ["Candidate", "ReferPredictor", "ReferResult", "find_candidates", "refer"]


@dataclass
class Candidate:
    """One connected component of the thresholded probability, in working-grid pixels."""

    score: float
    pixels: int
    row0: int
    col0: int
    mask: np.ndarray  # (h, w) bool crop starting at (row0, col0)
    cut: bool = False  # touches an inner tile edge (may be part of a larger object)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1), end exclusive."""
        return self.row0, self.col0, self.row0 + self.mask.shape[0], self.col0 + self.mask.shape[1]


@dataclass
class ReferResult:
    expression: str
    found: bool
    score: float
    pixels: int
    #: (minx, miny, maxx, maxy) of the kept object(s) in CRS units (pixels for plain images)
    bounds: list[float] | None
    candidates: int
    tiles: int
    outputs: dict[str, str]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReferPredictor:
    """``predict(uint8 (B, 3, H, W)) -> (B, H, W)`` float32 probability of "referred"."""

    def __init__(self, model: Any, expression: str, device: str | None = None) -> None:
        self.torch = torch
        self.model = model
        self.expression = check_expression(expression)
        self.text = model.tokenize([self.expression])
        self.size = int(model.image_size)
        self.device = torch.device(device) if device else _model_device(model)
        self.mean = torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        F = torch.nn.functional
        x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
        b, _, h, w = x.shape
        if (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = ((x - self.mean) / self.std).to(self.device)
        text = {k: v.expand(b, *v.shape[1:]).to(self.device) for k, v in self.text.items()}
        with torch.no_grad():
            logits = self.model(x, text).float()
            if tuple(logits.shape[-2:]) != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            prob = logits.softmax(1)[:, 1]
        return prob.cpu().numpy().astype(np.float32)


def _model_device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_expression(expression: str | None) -> str:
    """The stripped expression; a PromptError when it is empty."""
    if expression is None or not str(expression).strip():
        raise PromptError("The referring expression is empty.",
                          hint='Describe one object, e.g. "the ship closest to the bridge".')
    return " ".join(str(expression).split())


def find_candidates(prob: np.ndarray, valid: np.ndarray | None = None, *, threshold: float = 0.5,
                    min_pixels: int = 16, row0: int = 0, col0: int = 0,
                    inner_edges: tuple[bool, bool, bool, bool] = (False, False, False, False)) -> list[Candidate]:
    """Connected components (4-connectivity) of ``prob >= threshold`` within ``valid``.

    ``inner_edges`` = (top, bottom, left, right): which sides of this window are inside the
    raster (a component touching one of them is marked ``cut``).
    """
    fg = prob >= threshold
    if valid is not None:
        fg &= valid
    labels, n = ndimage.label(fg)
    out: list[Candidate] = []
    if n == 0:
        return out
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n + 1)
    h, w = prob.shape
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or counts[i] < min_pixels:
            continue
        ys, xs = sl
        top, bottom, left, right = inner_edges
        cut = (top and ys.start == 0) or (bottom and ys.stop == h) or (left and xs.start == 0) \
            or (right and xs.stop == w)
        out.append(Candidate(score=float(sums[i] / counts[i]), pixels=int(counts[i]),
                             row0=row0 + ys.start, col0=col0 + xs.start,
                             mask=labels[sl] == i, cut=bool(cut)))
    return out


def _rank(c: Candidate) -> tuple[bool, float, int]:
    return (not c.cut, c.score, c.pixels)


def output_prefix(out: str | os.PathLike[str]) -> Path:
    """``out`` without a suffix rsvl itself would add (``x.tif`` -> ``x``)."""
    prefix = Path(out)
    if prefix.suffix.lower() in (".tif", ".tiff", ".png", ".gpkg", ".geojson", ".json"):
        prefix = prefix.with_suffix("")
    return prefix


def output_paths(out: str | os.PathLike[str], vector_format: str, georeferenced: bool) -> dict[str, Path]:
    """The files :func:`refer` writes for the output prefix ``out``."""
    prefix = output_prefix(out)
    vec_suffix = {"gpkg": ".gpkg", "geojson": ".geojson", "parquet": ".parquet"}.get(vector_format.lower())
    if vec_suffix is None:
        raise OutputError(f"unknown vector format {vector_format!r}.", hint="Use gpkg, geojson or parquet.")
    if not georeferenced:
        vec_suffix = ".geojson"
    return {"mask": prefix.with_name(prefix.name + ("_mask.tif" if georeferenced else "_mask.png")),
            "vector": prefix.with_name(prefix.name + vec_suffix),
            "overlay": prefix.with_name(prefix.name + "_overlay.png"),
            "json": prefix.with_name(prefix.name + ".json")}


def refer(
    model: Any,
    source: str | os.PathLike[str],
    expression: str,
    out: str | os.PathLike[str],
    *,
    tile: int = 1280,
    overlap: int = 256,
    batch_size: int = 1,
    threshold: float = 0.5,
    min_pixels: int = 16,
    keep: str = "best",
    bands: Sequence[int] | None = None,
    gsd: float | None = None,
    vector_format: str = "gpkg",
    to_crs: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    model_name: str | None = None,
    progress: TaskProgress | None = None,
    predictor: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ReferResult:
    """Find the object ``expression`` refers to in ``source`` and write mask, polygon, overlay.

    ``progress`` (:class:`rsvl.console.TaskProgress`) is told the number of tiles.
    """
    t0 = time.perf_counter()
    expression = check_expression(expression)
    if keep not in ("best", "all"):
        raise PromptError(f"keep must be 'best' or 'all', not {keep!r}.")
    if not 0.0 < threshold < 1.0:
        raise PromptError(f"threshold must be between 0 and 1, got {threshold}.")
    path = Path(source)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file.", hint="Check the path of the image or raster.")
    prefix = output_prefix(out)
    if not prefix.parent.exists():
        raise OutputError(f"{prefix.parent}: output folder does not exist.", hint="Create it first.")
    vector_format = check_vector_format(vector_format)
    check_to_crs(to_crs)
    gsd = check_gsd(gsd) or None  # 0: the native resolution
    check_tiling(tile, overlap, batch_size)
    tile, overlap = int(tile), int(overlap)
    predict = predictor if predictor is not None else ReferPredictor(model, expression, device)

    src = RasterSource(path, bands=bands, target_gsd=gsd)
    try:
        georef = src.crs is not None
        paths = output_paths(prefix, vector_format, georef)
        check_outputs(paths.values(), [path])
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise OutputError(f"{existing[0]} exists.", hint="Pass --overwrite or choose another -o prefix.")

        W, H = src.width, src.height
        whole = W <= tile and H <= tile
        candidates: list[Candidate] = []
        n_tiles = announce_resampling(src, tile, overlap)  # 1 when whole
        if whole:
            rgb, valid = src.read(Window(0, 0, W, H))
            with progress_scope(progress, 1) as advance:
                prob = np.asarray(predict(rgb[None]))[0]
                advance(1)
            candidates = find_candidates(prob, valid, threshold=threshold, min_pixels=min_pixels)
        else:

            def predict_batch(batch: TileBatch) -> np.ndarray:
                return np.asarray(predict(batch.images))

            with progress_scope(progress, n_tiles) as advance:
                for t in map_tiles(src, predict_batch, tile=tile, overlap=overlap, batch_size=batch_size,
                                   min_valid=0.0, progress=advance):
                    if not t.predicted:  # no valid pixel: no candidate
                        continue
                    r0, c0 = int(t.window.row_off), int(t.window.col_off)
                    edges = (r0 > 0, r0 + tile < H, c0 > 0, c0 + tile < W)
                    found = find_candidates(t.result, t.valid, threshold=threshold, min_pixels=min_pixels,
                                            row0=r0, col0=c0, inner_edges=edges)
                    if keep == "best" and found:
                        found = [max(found + candidates, key=_rank)]
                        candidates = []
                    candidates.extend(found)
        n_candidates = len(candidates)
        kept = sorted(candidates, key=_rank, reverse=True)[:1] if keep == "best" else candidates
        if keep == "best" and not whole:
            n_candidates = len(kept)  # tiles only keep their running best
        outputs = _write_outputs(src, kept, paths, expression, georef, to_crs=to_crs,
                                 model_name=model_name or getattr(model, "name", None),
                                 threshold=threshold, tile=tile, overlap=overlap, overwrite=overwrite)
        transform = src.transform
        bounds = None
        if kept:
            r0 = min(c.row0 for c in kept)
            c0 = min(c.col0 for c in kept)
            r1 = max(c.bounds[2] for c in kept)
            c1 = max(c.bounds[3] for c in kept)
            if georef:
                xs, ys = zip(transform * (c0, r0), transform * (c1, r1), strict=True)
                bounds = [min(xs), min(ys), max(xs), max(ys)]
            else:
                bounds = [float(c0), float(r0), float(c1), float(r1)]
        total = sum(c.pixels for c in kept)
        score = float(sum(c.score * c.pixels for c in kept) / total) if total else 0.0
        result = ReferResult(
            expression=expression, found=bool(kept), score=score, pixels=int(total), bounds=bounds,
            candidates=n_candidates, tiles=n_tiles, outputs={k: str(v) for k, v in outputs.items()},
            seconds=round(time.perf_counter() - t0, 3),
            settings={"model": model_name or getattr(model, "name", None), "source": str(path.resolve()),
                      "crs": src.crs.to_string() if georef else None, "width": W, "height": H,
                      "tile": tile, "overlap": overlap, "tiled": not whole, "threshold": threshold,
                      "min_pixels": min_pixels, "keep": keep, "gsd": gsd, "bands": list(bands) if bands else None,
                      "image_size": getattr(model, "image_size", None), **src.resample_plan().tags()},
        )
        _write_json(result.to_dict(), paths["json"])
        result.outputs["json"] = str(paths["json"])
        return result
    finally:
        src.close()


def _write_json(doc: dict[str, Any], path: Path) -> None:
    write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


class PaintedMask:
    """The (1, H, W) uint8 mask of the kept candidates, painted one window at a time when
    indexed (what :func:`rsvl.geo.writer.write_geotiff_from_array` reads block by block)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, kept: Sequence[Candidate], height: int, width: int) -> None:
        self.kept = list(kept)
        self.shape = (1, height, width)

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, rows, cols = key
        y0, y1, _ = rows.indices(self.shape[1])
        x0, x1, _ = cols.indices(self.shape[2])
        out = np.zeros((1, y1 - y0, x1 - x0), np.uint8)
        for c in self.kept:
            r0, c0, r1, c1 = c.bounds
            a, b = max(r0, y0), min(r1, y1)
            e, f = max(c0, x0), min(c1, x1)
            if a < b and e < f:
                out[0, a - y0 : b - y0, e - x0 : f - x0] |= c.mask[a - r0 : b - r0, e - c0 : f - c0].astype(np.uint8)
        return out


def _paint(target: np.ndarray, kept: Sequence[Candidate], scale: float = 1.0) -> None:
    """Write the kept masks into ``target`` (value 1), optionally downscaled by ``scale``."""
    for c in kept:
        if scale == 1.0:
            r0, c0, r1, c1 = c.bounds
            target[r0:r1, c0:c1] |= c.mask.astype(target.dtype)
            continue
        ys, xs = np.nonzero(c.mask)
        ty = np.clip(((ys + c.row0) * scale).astype(int), 0, target.shape[0] - 1)
        tx = np.clip(((xs + c.col0) * scale).astype(int), 0, target.shape[1] - 1)
        target[ty, tx] = 1


def _write_outputs(src: Any, kept: Sequence[Candidate], paths: dict[str, Path], expression: str,
                   georef: bool, *, to_crs: str | None, model_name: str | None, threshold: float,
                   tile: int, overlap: int, overwrite: bool) -> dict[str, Path]:
    W, H = src.width, src.height
    transform = src.transform if georef else Affine.identity()
    if georef:
        tags = {"rsvl_task": "refer", "expression": expression, "model": str(model_name),
                "threshold": str(threshold), "tile": str(tile), "overlap": str(overlap),
                "score": f"{_score(kept):.4f}", "values": "0 = other, 1 = referred object"}
        write_geotiff_from_array(PaintedMask(kept, H, W), paths["mask"], crs=src.crs, transform=src.transform,
                                 tags=tags, descriptions=[f"referred: {expression}"])
    else:  # a plain image: PNG needs the whole array (plain images are image-sized)
        full = np.zeros((H, W), dtype=np.uint8)
        _paint(full, kept)
        with atomic_path(paths["mask"]) as tmp:
            Image.fromarray(full * 255).save(tmp, format="PNG")
    # polygons
    rows, geoms = [], []
    for rank, c in enumerate(sorted(kept, key=_rank, reverse=True)):
        r0, c0, _, _ = c.bounds
        geoms.append(mask_to_polygon(c.mask, transform * Affine.translation(c0, r0)))
        rows.append({"expression": expression, "score": round(c.score, 6), "pixels": c.pixels,
                     "rank": rank, "model": model_name})
    gdf = gpd.GeoDataFrame(rows, geometry=geoms, crs=src.crs if georef else None) if rows else \
        gpd.GeoDataFrame({"expression": [], "score": [], "pixels": [], "rank": [], "model": []},
                         geometry=[], crs=src.crs if georef else None)
    with warnings.catch_warnings():  # plain images: pixel coordinates, no CRS on purpose
        warnings.filterwarnings("ignore", message=".*crs.*was not provided", category=UserWarning)
        write_vectors(gdf, paths["vector"], to_crs=to_crs if georef else None, overwrite=overwrite)
    # overlay (the whole image, or a preview of at most 1024 pixels for large rasters)
    scale = min(1.0, 1024.0 / max(W, H))
    pw, ph = max(1, round(W * scale)), max(1, round(H * scale))
    if scale == 1.0:
        rgb, _ = src.read(Window(0, 0, W, H))
    else:
        rgb = src.read_preview(pw, ph)
    small = np.zeros((ph, pw), dtype=np.uint8)
    _paint(small, kept, scale)
    labels = np.where(small > 0, 0, 255).astype(np.uint8)
    title = expression if len(expression) <= 40 else expression[:37] + "..."
    overlay_png(rgb, labels, [title], paths["overlay"], nodata=255, alpha=0.55,
                title=f"score {_score(kept):.2f}" if kept else "not found")
    return {k: v for k, v in paths.items() if k != "json"}


def _score(kept: Sequence[Candidate]) -> float:
    total = sum(c.pixels for c in kept)
    return float(sum(c.score * c.pixels for c in kept) / total) if total else 0.0
