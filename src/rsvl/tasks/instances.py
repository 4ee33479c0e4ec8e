"""Instance segmentation of images, folders and georeferenced rasters of any size.

The model follows the torchvision detection convention (``model(images)`` in eval mode ->
one dict per image with ``boxes``, ``labels`` 1..C, ``scores``, ``masks`` (N, 1, H, W)
probabilities) and names its classes in ``model.classes``.

* A plain image (no CRS) up to 1.5 tiles wide goes through whole: a PNG overlay
  (``PREFIX_overlay.png``) and a GeoJSON of the instances in pixel coordinates
  (``PREFIX_instances.geojson``: class, score, box, polygon).
* A georeferenced raster (or a larger plain image) is cut into overlapping
  tiles. Each tile's instances become polygons in map coordinates; an object cut by a tile
  border is seen in pieces by several tiles, so the pieces are merged: two detections of
  the same class are the same object when their polygons overlap by ``merge_iou`` (IoU,
  both whole) or, when at least one touches an inner tile border (a cut piece), when their
  intersection covers ``merge_overlap`` of the smaller one. Each group of connected pieces
  becomes one polygon (their union) with the best score. Outputs: ``PREFIX_instances.gpkg``
  (or .geojson / .parquet) in the source CRS with class, score, area; optionally the
  instance-id GeoTIFF ``PREFIX_instances.tif`` (0 = background); and a PNG overview.

Tiles stream through the read-ahead loop of the tiled runner
(:func:`rsvl.geo.stream.map_tiles`; tiles without a valid pixel are skipped) and what is
kept per tile is polygons, never masks; the instance-id GeoTIFF is rasterised block by
block from the polygons while it is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
import shapely.affinity
import torch
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from rasterio.features import rasterize
from rasterio.windows import Window
from shapely.geometry import box as shapely_box
from shapely.geometry import mapping
from shapely.strtree import STRtree

from rsvl.console import Advance, TaskProgress, progress_scope
from rsvl.errors import InputNotFoundError, OutputError, PromptError, ResumeError
from rsvl.geo.journal import TileJournal, refuse_stale_journal, source_identity
from rsvl.geo.raster import RasterSource
from rsvl.geo.stream import TileBatch, map_tiles
from rsvl.geo.tiles import check_gsd, check_tiling
from rsvl.geo.vectors import mask_to_polygon, write_vectors
from rsvl.geo.writer import write_geotiff_from_array
from rsvl.io import atomic_path, write_text
from rsvl.tasks.render import class_colours
from rsvl.tasks.sources import (
    announce_resampling,
    check_outputs,
    check_to_crs,
    check_vector_format,
    find_images,
    is_georeferenced,
    no_images_message,
)


@dataclass
class TileDetections:
    """Detections of one model call on one image or tile (pixel coordinates of that tile)."""

    boxes: np.ndarray  # (N, 4) float x1, y1, x2, y2
    labels: np.ndarray  # (N,) int, 0-based index into the model's classes
    scores: np.ndarray  # (N,) float
    masks: np.ndarray  # (N, H, W) bool

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class InstancesResult:
    source: str
    classes: list[str]
    instances: int
    counts: dict[str, int]
    outputs: dict[str, str]
    tiles: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    detections: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------
# model wrapper
# --------------------------------------------------------------------------------------


def model_classes(model: Any) -> list[str]:
    names = getattr(model, "classes", None)
    if not names:
        raise PromptError(
            f"{getattr(model, 'name', type(model).__name__)} does not name its classes.",
            hint="Use an instance segmentation model (e.g. --model mini-instances).",
        )
    return list(names)


def select_classes(model: Any, wanted: Sequence[str] | str | None) -> list[int] | None:
    """0-based indices of ``wanted`` among the model's classes (None: all). Names match
    case-insensitively with spaces, '-' and '_' interchangeable."""
    if wanted is None:
        return None
    if isinstance(wanted, str):
        wanted = [w for w in wanted.split(",")]
    wanted = [w.strip() for w in wanted if w.strip()]
    if not wanted:
        raise PromptError("--classes is empty.", hint="Example: --classes airplane,ship")
    names = model_classes(model)

    def key(s: str) -> str:
        return s.strip().lower().replace(" ", "_").replace("-", "_")

    index = {key(n): i for i, n in enumerate(names)}
    unknown = [w for w in wanted if key(w) not in index]
    if unknown:
        raise PromptError(
            f"Unknown class(es) {', '.join(unknown)} for {getattr(model, 'name', 'this model')}.",
            hint=f"This model detects: {', '.join(names)}.",
        )
    return sorted({index[key(w)] for w in wanted})


class InstancePredictor:
    """``predict(list of (3, H, W) uint8) -> list[TileDetections]`` above a score threshold."""

    def __init__(self, model: Any, *, score: float = 0.5, classes: Sequence[int] | None = None,
                 mask_threshold: float = 0.5) -> None:
        self.model = model
        self.names = model_classes(model)
        self.score = float(score)
        self.keep = None if classes is None else set(int(c) for c in classes)
        self.mask_threshold = float(mask_threshold)
        self.torch = torch
        try:
            self.device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            self.device = torch.device("cpu")

    def __call__(self, images: Sequence[np.ndarray]) -> list[TileDetections]:
        torch = self.torch
        if hasattr(self.model, "eval"):
            self.model.eval()
        tensors = [torch.from_numpy(np.ascontiguousarray(im)).to(self.device).float().div_(255.0)
                   for im in images]
        with torch.inference_mode():
            outs = self.model(tensors)
        res = []
        for im, out in zip(images, outs, strict=True):
            h, w = im.shape[-2:]
            scores = out["scores"].float().cpu().numpy()
            labels = out["labels"].cpu().numpy().astype(np.int64) - 1
            ok = (scores >= self.score) & (labels >= 0) & (labels < len(self.names))
            if self.keep is not None:
                ok &= np.isin(labels, sorted(self.keep))
            idx = np.nonzero(ok)[0]
            masks = out.get("masks")
            if masks is not None and len(idx):
                m = (masks[torch.as_tensor(idx, device=masks.device)][:, 0].float()
                     > self.mask_threshold).cpu().numpy()
            else:
                m = np.zeros((len(idx), h, w), dtype=bool)
            boxes = out["boxes"].float().cpu().numpy()[idx].reshape(-1, 4)
            if masks is None:  # a box-only model: the box is the mask
                for k, (x1, y1, x2, y2) in enumerate(boxes):
                    m[k, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
            res.append(TileDetections(boxes, labels[idx], scores[idx], m))
        return res


# --------------------------------------------------------------------------------------
# cross-tile merge
# --------------------------------------------------------------------------------------


@dataclass
class Piece:
    """One detection of one tile as a polygon in map (or pixel) coordinates."""

    geometry: Any
    label: int
    score: float
    partial: bool  # touches an inner tile border: maybe cut


def touches_inner_edge(mask: np.ndarray, box: np.ndarray, window: tuple[int, int, int, int],
                       width: int, height: int, margin: int = 2) -> bool:
    """Whether a detection reaches a tile border that is not the raster border."""
    col, row, w, h = window
    x1, y1, x2, y2 = (float(v) for v in box)
    if mask.any():
        ys = np.nonzero(mask.any(1))[0]
        xs = np.nonzero(mask.any(0))[0]
        x1, x2, y1, y2 = min(x1, xs[0]), max(x2, xs[-1] + 1), min(y1, ys[0]), max(y2, ys[-1] + 1)
    left = x1 <= margin and col > 0
    top = y1 <= margin and row > 0
    right = x2 >= w - margin and col + w < width
    bottom = y2 >= h - margin and row + h < height
    return bool(left or top or right or bottom)


def merge_pieces(pieces: Sequence[Piece], *, merge_iou: float = 0.5,
                 merge_overlap: float = 0.3) -> list[Piece]:
    """Group the pieces of the same object (see module doc) and return one per group."""
    items = [p for p in pieces if p.geometry is not None and not p.geometry.is_empty]
    n = len(items)
    if n == 0:
        return []
    geoms = [shapely.make_valid(p.geometry) for p in items]
    areas = np.array([g.area for g in geoms])
    tree = STRtree(geoms)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = tree.query(geoms, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i >= j or items[i].label != items[j].label:
            continue
        inter = geoms[i].intersection(geoms[j]).area
        if inter <= 0:
            continue
        small = min(areas[i], areas[j])
        union = areas[i] + areas[j] - inter
        same = inter / max(union, 1e-12) >= merge_iou
        if not same and (items[i].partial or items[j].partial):
            same = inter / max(small, 1e-12) >= merge_overlap
        if same:
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        best = max(members, key=lambda k: items[k].score)
        geom = geoms[members[0]] if len(members) == 1 else shapely.union_all([geoms[k] for k in members])
        out.append(Piece(geom, items[best].label, items[best].score,
                         all(items[k].partial for k in members)))
    out.sort(key=lambda p: -p.score)
    return out


def detections_to_pieces(det: TileDetections, window: tuple[int, int, int, int], transform: Any,
                         width: int, height: int, valid: np.ndarray | None = None) -> list[Piece]:
    """Polygons (in ``transform``'s coordinates) of one tile's detections."""
    col, row = window[0], window[1]
    tile_transform = transform * Affine.translation(col, row)
    out = []
    for k in range(len(det)):
        m = det.masks[k]
        if valid is not None:
            m = m & valid
        if not m.any():
            continue
        geom = mask_to_polygon(m, tile_transform)
        partial = touches_inner_edge(m, det.boxes[k], window, width, height)
        out.append(Piece(geom, int(det.labels[k]), float(det.scores[k]), partial))
    return out


# --------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------


def output_paths(prefix: Path, vector_format: str, georeferenced: bool) -> dict[str, Path]:
    if prefix.suffix.lower() in (".tif", ".tiff", ".gpkg", ".png", ".geojson", ".json", ".parquet"):
        prefix = prefix.with_suffix("")
    paths = {"overlay": Path(f"{prefix}_overlay.png")}
    if georeferenced:
        paths["instances"] = Path(f"{prefix}_instances.{vector_format}")
        paths["instance_tif"] = Path(f"{prefix}_instances.tif")
    else:
        paths["instances"] = Path(f"{prefix}_instances.geojson")
    return paths


def render_instances(rgb: np.ndarray, pieces: Sequence[Piece], names: Sequence[str], path: Path,
                     scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)) -> Path:
    """PNG overlay: each instance filled in its class colour with a class/score label.
    Geometries are in pixel coordinates of the full image; ``scale`` maps them to ``rgb``."""
    colours = class_colours(list(names))
    base = Image.fromarray(np.moveaxis(rgb, 0, -1).copy())
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default()

    def pts(coords: Any) -> list[tuple[float, float]]:
        return [((x - offset[0]) * scale, (y - offset[1]) * scale) for x, y in coords]

    for p in pieces:
        c = colours[p.label]
        polys = getattr(p.geometry, "geoms", [p.geometry])
        for poly in polys:
            if poly.is_empty or poly.geom_type != "Polygon":
                continue
            ring = pts(poly.exterior.coords)
            if len(ring) >= 3:
                draw.polygon(ring, fill=(*c, 100), outline=(*c, 255))
        x0, y0 = pts([(p.geometry.bounds[0], p.geometry.bounds[1])])[0]
        draw.text((x0 + 2, y0 + 1), f"{names[p.label]} {p.score:.2f}", fill=(255, 255, 255, 255),
                  font=font, stroke_width=1, stroke_fill=(0, 0, 0, 255))
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    with atomic_path(path) as tmp:
        out.save(tmp)
    return path


def _pieces_to_records(pieces: Sequence[Piece], names: Sequence[str]) -> list[dict[str, Any]]:
    recs = []
    for i, p in enumerate(pieces):
        minx, miny, maxx, maxy = p.geometry.bounds
        recs.append({"id": i + 1, "class": names[p.label], "class_id": p.label,
                     "score": round(float(p.score), 4), "area": float(p.geometry.area),
                     "bbox": [float(minx), float(miny), float(maxx), float(maxy)],
                     "geometry": p.geometry})
    return recs


def detect_tiles(predict: Callable[[Sequence[np.ndarray]], list[TileDetections]], source: RasterSource,
                 tile: int, overlap: int, batch_size: int = 2,
                 advance: Advance | None = None,
                 transform: Any = None, journal: TileJournal | None = None) -> tuple[list[Piece], int]:
    """Run ``predict`` over the overlapping tiles of a :class:`RasterSource` through the
    streaming loop (:func:`rsvl.geo.stream.map_tiles`); pieces in ``transform``'s
    coordinates (default: the source's map coordinates).

    With a ``journal`` (opened), the tiles it already holds are replayed instead of
    predicted, and every tile's pieces are journaled as batches finish."""
    if transform is None:
        transform = source.transform

    def predict_batch(batch: TileBatch) -> list[TileDetections]:
        return predict(list(batch.images))

    pieces: list[Piece] = []
    done = journal.open() if journal is not None else []
    if done and advance is not None:
        advance(len(done))
    for _, payload in done:
        pieces += [] if payload is None else [pieces_from_json(p) for p in payload]
    n_tiles = len(done)
    for t in map_tiles(source, predict_batch, tile=tile, overlap=overlap, batch_size=batch_size, min_valid=0.0,
                       progress=advance, start=len(done)):
        n_tiles += 1
        found: list[Piece] | None = None
        if t.predicted:  # else: no valid pixel
            win = t.window
            window = (int(win.col_off), int(win.row_off), int(win.width), int(win.height))
            found = detections_to_pieces(t.result, window, transform, source.width, source.height, valid=t.valid)
            pieces += found
        if journal is not None:
            journal.add(t.position, None if found is None else [pieces_to_json(p) for p in found])
    if journal is not None:
        journal.flush()
    return pieces, n_tiles


def pieces_to_json(p: Piece) -> list[Any]:
    """One piece as journal JSON: WKB (exact coordinates), class, score, cut flag."""
    return [shapely.to_wkb(p.geometry, hex=True), int(p.label), float(p.score), bool(p.partial)]


def pieces_from_json(item: Sequence[Any]) -> Piece:
    """The inverse of :func:`pieces_to_json`."""
    wkb, label, score, partial = item
    return Piece(shapely.from_wkb(wkb), int(label), float(score), bool(partial))


class InstanceIds:
    """The (1, H, W) instance-id raster of ``pieces`` (ids 1..N in their order, 0 =
    background; a higher score wins overlapping pixels), rasterised one window at a time
    when indexed: what :func:`rsvl.geo.writer.write_geotiff_from_array` reads block by block."""

    def __init__(self, pieces: Sequence[Piece], height: int, width: int, transform: Any) -> None:
        self.pieces = list(pieces)
        self.shape = (1, height, width)
        self.dtype = np.dtype(np.uint16 if len(self.pieces) < 65535 else np.uint32)
        self.transform = transform
        self.geoms = [p.geometry for p in self.pieces]
        self.tree = STRtree(self.geoms) if self.geoms else None

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, rows, cols = key
        y0, y1, _ = rows.indices(self.shape[1])
        x0, x1, _ = cols.indices(self.shape[2])
        h, w = y1 - y0, x1 - x0
        out = np.zeros((1, h, w), self.dtype)
        if self.tree is None:
            return out
        st = self.transform * Affine.translation(x0, y0)
        corners = [st * (0, 0), st * (w, h)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        hits = self.tree.query(shapely_box(min(xs), min(ys), max(xs), max(ys)))
        if len(hits) == 0:
            return out
        # lower scores first so that higher-scoring instances win overlapping pixels
        order = sorted(hits.tolist(), key=lambda k: self.pieces[k].score)
        out[0] = rasterize(((self.geoms[k], k + 1) for k in order), out_shape=(h, w), transform=st, fill=0,
                           dtype=self.dtype)
        return out


def write_instance_tif(pieces: Sequence[Piece], path: Path, *, width: int, height: int,
                       transform: Any, crs: Any, tags: dict[str, str]) -> Path:
    """Instance ids (1..N in the order of ``pieces``, 0 = background) as a GeoTIFF,
    rasterised block by block while it is written (bounded memory, no scratch file)."""
    return write_geotiff_from_array(InstanceIds(pieces, height, width, transform), path, crs=crs,
                                    transform=transform, nodata=None, tags=tags, descriptions=["instance_id"])


def instances(
    model: Any,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | str | None = None,
    score: float = 0.5,
    tile: int = 768,
    overlap: int | None = None,
    batch_size: int = 2,
    bands: Sequence[int] | None = None,
    gsd: float | None = None,
    vector_format: str = "gpkg",
    to_crs: str | None = None,
    instance_tif: bool = False,
    merge_iou: float = 0.5,
    merge_overlap: float = 0.3,
    overwrite: bool = False,
    resume: bool = False,
    progress: TaskProgress | None = None,
    model_name: str | None = None,
) -> InstancesResult | list[InstancesResult]:
    """Instances of an image, every image of a folder (a list of results), or a raster.

    ``progress`` (:class:`rsvl.console.TaskProgress`) is told the number of images of a
    folder, or the number of tiles of a raster. ``resume`` continues an interrupted tile
    run of one raster (:mod:`rsvl.geo.journal`).
    """
    src = Path(source)
    if not src.exists():
        raise InputNotFoundError(f"{src}: no such file or folder.", hint="Check the path.")
    vector_format = check_vector_format(vector_format)
    check_to_crs(to_crs)
    gsd = check_gsd(gsd) or None  # 0: the native resolution
    check_tiling(tile, 0 if overlap is None else overlap, batch_size)
    tile = int(tile)
    overlap = int(overlap) if overlap is not None else tile // 4
    if not 0.0 <= score <= 1.0:
        raise PromptError(f"--score {score} is not between 0 and 1.", hint="Example: --score 0.5")
    keep = select_classes(model, classes)
    predict = InstancePredictor(model, score=score, classes=keep)
    if src.is_dir() and resume:
        raise ResumeError("--resume continues one raster, not a folder of images.",
                          hint="Run the folder again without --resume (with --overwrite to redo its outputs).")
    if src.is_dir():
        files = find_images(src)
        if not files:
            raise InputNotFoundError(no_images_message(src), hint="Point at a folder of images, or at one image.")
        base = Path(out) if out is not None else Path.cwd() / src.name
        base.mkdir(parents=True, exist_ok=True)
        results = []
        with progress_scope(progress, len(files)) as advance:
            for f in files:
                results.append(_one(predict, f, base / f.stem, keep=keep, score=score, tile=tile,
                                    overlap=overlap, batch_size=batch_size, bands=bands, gsd=gsd,
                                    vector_format=vector_format, to_crs=to_crs,
                                    instance_tif=instance_tif, merge_iou=merge_iou,
                                    merge_overlap=merge_overlap, overwrite=overwrite,
                                    model_name=model_name, reads=files))
                advance(1)
        return results
    prefix = Path(out) if out is not None else Path.cwd() / src.stem
    return _one(predict, src, prefix, keep=keep, score=score, tile=tile, overlap=overlap,
                batch_size=batch_size, bands=bands, gsd=gsd, vector_format=vector_format,
                to_crs=to_crs, instance_tif=instance_tif, merge_iou=merge_iou,
                merge_overlap=merge_overlap, overwrite=overwrite, resume=resume, progress=progress,
                model_name=model_name)


def _one(predict: InstancePredictor, src: Path, prefix: Path, *, keep: list[int] | None,
         score: float, tile: int, overlap: int | None, batch_size: int,
         bands: Sequence[int] | None, gsd: float | None, vector_format: str, to_crs: str | None,
         instance_tif: bool, merge_iou: float, merge_overlap: float, overwrite: bool,
         resume: bool = False, progress: TaskProgress | None = None, model_name: str | None = None,
         reads: Sequence[Path] = (),
         ) -> InstancesResult:
    t0 = time.perf_counter()
    names = predict.names
    georef = is_georeferenced(src)
    paths = output_paths(prefix, vector_format, georef)
    if not (georef and instance_tif):
        paths.pop("instance_tif", None)
    check_outputs(paths.values(), [src, *reads])
    refuse_stale_journal(paths["instances"], resume, overwrite)
    for p in paths.values():
        if p.exists() and not overwrite and not resume:
            raise OutputError(f"{p} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
        if not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
    if overlap is None:
        overlap = int(tile) // 4
    settings: dict[str, Any] = {
        "task": "instances", "model": model_name or getattr(predict.model, "name", type(predict.model).__name__),
        "classes": [names[i] for i in keep] if keep is not None else names, "score": score,
        "tile": tile, "overlap": overlap, "merge_iou": merge_iou, "merge_overlap": merge_overlap,
    }
    with RasterSource(src, bands=bands, target_gsd=gsd) as rs, ExitStack() as stack:
        settings.update(rs.settings())
        # plain images up to 1.5 tiles go through whole (as the model saw them in training)
        whole = not georef and max(rs.width, rs.height) <= 1.5 * tile
        rgb = None
        journal = None
        if whole and resume and not overwrite:
            for p in paths.values():
                if p.exists():
                    raise OutputError(f"{p} exists; a whole image has no interrupted run to resume.",
                                      hint="Pass --overwrite to replace it, or choose another output name.")
        if not whole:
            # the primary output first: it names the journal's folder and the lock
            outs = [paths["instances"], *(p for k, p in paths.items() if k != "instances")]
            run = {**settings, **source_identity(src), "batch_size": batch_size, "bands": list(bands or []),
                   "target_gsd": gsd, "to_crs": to_crs, "vector_format": vector_format,
                   "outputs": [str(p.resolve()) for p in outs]}
            journal = stack.enter_context(TileJournal(outs, run, batch_size=batch_size, resume=resume,
                                                      overwrite=overwrite))
        if whole:
            rgb, valid = rs.read(Window(0, 0, rs.width, rs.height))
            (det,) = predict([rgb])
            pieces = detections_to_pieces(det, (0, 0, rs.width, rs.height), Affine.identity(),
                                          rs.width, rs.height, valid=valid)
            n_tiles = 1
        else:
            grid_len = announce_resampling(rs, tile, overlap)
            with progress_scope(progress, grid_len) as adv:
                pieces, n_tiles = detect_tiles(predict, rs, tile, overlap, batch_size, adv,
                                               transform=rs.transform if georef else Affine.identity(),
                                               journal=journal)
            pieces = merge_pieces(pieces, merge_iou=merge_iou, merge_overlap=merge_overlap)
        pieces.sort(key=lambda p: -p.score)
        records = _pieces_to_records(pieces, names)
        # PNG overview (whole image, or a decimated preview of a large raster)
        scale = min(1.0, 2048 / max(rs.width, rs.height))
        pw, ph = max(1, round(rs.width * scale)), max(1, round(rs.height * scale))
        preview = rgb if rgb is not None and scale == 1 else rs.read_preview(pw, ph)
        if georef:
            inv = ~rs.transform
            pix = [Piece(_transform_geom(p.geometry, inv), p.label, p.score, p.partial) for p in pieces]
        else:
            pix = pieces
        render_instances(preview, pix, names, paths["overlay"], scale=pw / rs.width)
        outputs = {"overlay": str(paths["overlay"])}
        if georef:
            gdf = gpd.GeoDataFrame(
                [{**{k: v for k, v in r.items() if k != "bbox"}, "model": settings["model"]}
                 for r in records],
                columns=["id", "class", "class_id", "score", "area", "model", "geometry"],
                geometry="geometry", crs=rs.crs)
            # a resumed run may find outputs of its own interrupted final write
            write_vectors(gdf, paths["instances"], to_crs=to_crs, overwrite=overwrite or resume)
            outputs["instances"] = str(paths["instances"])
            if "instance_tif" in paths:
                write_instance_tif(pieces, paths["instance_tif"], width=rs.width, height=rs.height,
                                   transform=rs.transform, crs=rs.crs,
                                   tags={"classes": json.dumps(dict(enumerate(names))),
                                         "instances": json.dumps([[r["id"], r["class"], r["score"]] for r in records]),
                                         "rsvl_settings": json.dumps(settings)})
                outputs["instance_tif"] = str(paths["instance_tif"])
        else:
            write_text(paths["instances"], json.dumps(_feature_collection(records, settings)))
            outputs["instances"] = str(paths["instances"])
        if journal is not None:
            journal.finish()
    counts: dict[str, int] = {}
    for r in records:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    dets = [{k: v for k, v in r.items() if k != "geometry"} for r in records]
    return InstancesResult(str(src), names, len(records), counts, outputs, n_tiles,
                           round(time.perf_counter() - t0, 3), settings, dets)


def _transform_geom(geom: Any, affine: Any) -> Any:
    a, b, c, d, e, f = affine.a, affine.b, affine.c, affine.d, affine.e, affine.f
    return shapely.affinity.affine_transform(geom, [a, b, d, e, c, f])


def _feature_collection(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    feats = [{"type": "Feature", "geometry": mapping(r["geometry"]),
              "properties": {k: v for k, v in r.items() if k != "geometry"}} for r in records]
    return {"type": "FeatureCollection", "features": feats,
            "rsvl": {"coordinates": "pixels (x right, y down) of the input image", **settings}}
