"""Text and image search over images, folders and raster tiles (RS CLIP retrieval).

``build`` embeds every source once into an index folder (:mod:`rsvl.index.store`):

* a file that is not georeferenced, or a georeferenced file no larger than one tile, is one
  image: one vector (resized and centre-cropped to the model's input, as in ``classify``);
* a georeferenced raster larger than a tile: every tile of a :class:`~rsvl.geo.tiles.TileGrid`
  (``tile``, ``overlap``, optional resampling to ``gsd``), one vector each; tiles whose
  valid (not nodata) fraction is below ``min_valid`` are skipped;
* a folder: every image in it, recursively, each handled as above.

Each vector's metadata row records its source (absolute path, size, mtime), tile row/col,
pixel window on the working grid, footprint as WKB in the source CRS and in EPSG:4326, the
CRS, the model name and the embedding dim.

``add`` embeds only sources not yet indexed with the same path, size and mtime (a changed
file replaces its old rows). ``search`` ranks the index by cosine similarity to a text
(``encode_text``) or an image (``encode_image``) query.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
import torch
from pyproj import CRS, Transformer
from rasterio.windows import Window

from rsvl.console import Advance, TaskProgress, progress_scope
from rsvl.errors import InputNotFoundError, ModelMismatchError, PromptError, RasterReadError
from rsvl.geo.gsd import resampled_size
from rsvl.geo.raster import RasterSource, open_dataset
from rsvl.geo.stream import TileBatch, map_tiles
from rsvl.geo.tiles import TileGrid, check_gsd, check_tiling
from rsvl.geo.vectors import boxes_to_polygons, write_vectors
from rsvl.index.store import (
    DEFAULT_IVF_THRESHOLD,
    EmbeddingIndex,
    IndexConfig,
    check_output,
    metadata_schema,
    write_index,
)
from rsvl.models import registry
from rsvl.models.preprocess import square_image
from rsvl.tasks.classify import load_image
from rsvl.tasks.sources import announce_resampling, check_outputs, find_images, no_images_message


def model_name(model: Any) -> str:
    return str(getattr(model, "name", None) or type(model).__name__)


# -- sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One file to index and how: ``kind`` "image" (one vector) or "raster" (tiles)."""

    path: str  # absolute
    size: int
    mtime_ns: int
    kind: str
    items: int  # vectors at most (tiles in the grid, or 1)

    @property
    def key(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


def expand_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files and folders (recursive) -> distinct absolute image/raster paths, in order."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    out: list[Path] = []
    seen: set[Path] = set()
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise InputNotFoundError(f"{p}: no such file or folder.", hint="Check the path.")
        if p.is_dir():
            files = find_images(p)
            if not files:
                raise InputNotFoundError(no_images_message(p))
        else:
            files = [p]
        for f in files:
            a = f.resolve()
            if a not in seen:
                seen.add(a)
                out.append(a)
    if not out:
        raise InputNotFoundError("no sources given.", hint="Pass images, folders or rasters.")
    return out


def plan_sources(
    sources: Sequence[str | os.PathLike[str]], *, tile: int, overlap: int = 0, gsd: float | None = None
) -> list[SourceFile]:
    """Decide for every file whether it is one image or a grid of tiles (reads metadata only)."""
    planned = []
    for path in expand_sources(sources):
        st = path.stat()
        with open_dataset(path) as ds:
            w, h, crs = ds.width, ds.height, ds.crs
            if crs is not None and gsd:
                w, h = resampled_size(ds, gsd)
        if crs is not None and (w > tile or h > tile):
            n = len(TileGrid(w, h, tile, overlap))
            planned.append(SourceFile(str(path), st.st_size, st.st_mtime_ns, "raster", n))
        else:
            planned.append(SourceFile(str(path), st.st_size, st.st_mtime_ns, "image", 1))
    return planned


# -- footprints ----------------------------------------------------------------------------


def _crs_text(crs: Any) -> str | None:
    if crs is None:
        return None
    epsg = None
    try:
        epsg = crs.to_epsg()
    except Exception:  # pragma: no cover - exotic CRSs
        epsg = None
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


class _Footprints:
    """Pixel boxes -> WKB polygons in the source CRS and in EPSG:4326 (edges densified)."""

    def __init__(self, crs: Any, transform: Any) -> None:
        self.crs, self.transform = crs, transform
        self._to_4326 = None
        if crs is not None:
            self._to_4326 = Transformer.from_crs(CRS.from_user_input(crs.to_wkt()), "EPSG:4326", always_xy=True)

    def __call__(self, box: tuple[float, float, float, float]) -> tuple[bytes | None, bytes | None]:
        if self.crs is None:
            return None, None
        poly = boxes_to_polygons([box], self.transform)[0]
        tr = self._to_4326
        side = max(abs(self.transform.a), abs(self.transform.e)) * max(box[2] - box[0], box[3] - box[1])
        dense = shapely.segmentize(poly, max(side / 8.0, 1e-12))

        def fn(xy: np.ndarray) -> np.ndarray:
            x, y = tr.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        return shapely.to_wkb(poly), shapely.to_wkb(shapely.transform(dense, fn))


# -- embedding -----------------------------------------------------------------------------


def _encode(model: Any, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        emb = model.encode_image(np.stack(images) if isinstance(images, list) else images)
    emb = emb.float().cpu().numpy() if hasattr(emb, "cpu") else np.asarray(emb, np.float32)
    return emb.astype(np.float32, copy=False)


def _embed_raster(
    model: Any, rs: RasterSource, base: dict[str, Any], *, size: int, tile: int, overlap: int,
    min_valid: float, batch_size: int, advance: Advance,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(metadata row, embedding) per tile of a raster whose valid fraction is at least
    ``min_valid``, through the streaming loop (:func:`rsvl.geo.stream.map_tiles`)."""
    foot = _Footprints(rs.crs, rs.transform)
    crs = _crs_text(rs.crs)

    def predict(batch: TileBatch) -> np.ndarray:
        imgs = batch.images if tile == size else np.stack([square_image(im, size) for im in batch.images])
        return _encode(model, imgs)

    for t in map_tiles(rs, predict, tile=tile, overlap=overlap, batch_size=batch_size, min_valid=min_valid,
                       progress=advance):
        if not t.predicted:
            continue
        r, c = t.position
        c0, r0 = int(t.window.col_off), int(t.window.row_off)
        c1, r1 = min(c0 + tile, rs.width), min(r0 + tile, rs.height)
        g, g4 = foot((c0, r0, c1, r1))
        yield ({**base, "kind": "tile", "row": r, "col": c, "win_col": c0, "win_row": r0,
                "win_width": tile, "win_height": tile, "valid_fraction": t.valid_fraction,
                "crs": crs, "geometry": g, "geometry_4326": g4}, t.result)


def embed_sources(
    model: Any,
    planned: Sequence[SourceFile],
    *,
    tile: int,
    overlap: int = 0,
    gsd: float | None = None,
    bands: Sequence[int] | None = None,
    min_valid: float = 0.5,
    batch_size: int = 16,
    advance: Advance | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Embed the planned sources: (N, D) float32 vectors and N metadata rows, in order.

    Whole images are embedded in batches of ``batch_size``; the tiles of a raster stream
    through :func:`rsvl.geo.stream.map_tiles` (read ahead, nodata tiles skipped), so what is
    kept per tile is its embedding and metadata, never pixels. ``advance(n)`` is called as
    images and tiles (skipped ones included) are done.
    """
    size = int(getattr(model, "image_size", tile))
    vecs: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    step = advance if advance is not None else (lambda n: None)

    def flush() -> None:
        if pending:
            vecs.append(_encode(model, pending))
            step(len(pending))
            pending.clear()

    for sf in planned:
        base = {"source": sf.path, "source_size": sf.size, "source_mtime_ns": sf.mtime_ns}
        try:
            with RasterSource(sf.path, bands=bands, target_gsd=gsd if sf.kind == "raster" else None) as rs:
                if sf.kind == "image":
                    foot = _Footprints(rs.crs, rs.transform)
                    rgb, valid = rs.read(Window(0, 0, rs.width, rs.height))
                    g, g4 = foot((0, 0, rs.width, rs.height))
                    rows.append({**base, "kind": "image", "row": None, "col": None, "win_col": 0, "win_row": 0,
                                 "win_width": rs.width, "win_height": rs.height,
                                 "valid_fraction": float(valid.mean()), "crs": _crs_text(rs.crs),
                                 "geometry": g, "geometry_4326": g4})
                    pending.append(square_image(rgb, size))
                    if len(pending) >= batch_size:
                        flush()
                    continue
                flush()  # rows stay in source order
                announce_resampling(rs, tile, overlap)
                for row, vec in _embed_raster(model, rs, base, size=size, tile=tile, overlap=overlap,
                                              min_valid=min_valid, batch_size=batch_size, advance=step):
                    rows.append(row)
                    vecs.append(vec[None])
        except RasterReadError as exc:
            if exc.message.startswith(sf.path):
                raise
            raise RasterReadError(f"{sf.path}: {exc.message}", hint=exc.hint) from exc
    flush()
    if not vecs:
        return np.zeros((0, 0), np.float32), rows
    return np.concatenate(vecs), rows


def _metadata_table(rows: list[dict[str, Any]], ids: Sequence[int], model: str, dim: int) -> pa.Table:
    schema = metadata_schema()
    cols: dict[str, list[Any]] = {n: [] for n in schema.names}
    for i, r in zip(ids, rows, strict=True):
        full = {**r, "id": int(i), "model": model, "dim": dim}
        for n in schema.names:
            cols[n].append(full.get(n))
    return pa.table(cols, schema=schema)


# -- build / add ---------------------------------------------------------------------------


@dataclass
class BuildResult:
    index: str
    model: str
    count: int
    added: int
    sources_added: list[str] = field(default_factory=list)
    sources_skipped: list[str] = field(default_factory=list)
    sources_replaced: list[str] = field(default_factory=list)
    tiles_skipped_nodata: int = 0
    index_type: str = "flat-ip"
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "model": self.model, "count": self.count, "added": self.added,
            "index_type": self.index_type, "sources_added": self.sources_added,
            "sources_skipped": self.sources_skipped, "sources_replaced": self.sources_replaced,
            "tiles_skipped_nodata": self.tiles_skipped_nodata, "manifest": self.manifest,
        }


def build(
    model: Any,
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    tile: int | None = None,
    overlap: int = 0,
    gsd: float | None = None,
    bands: Sequence[int] | None = None,
    min_valid: float = 0.5,
    batch_size: int = 16,
    ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
    nlist: int | None = None,
    nprobe: int | None = None,
    index_type: str = "auto",
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    overwrite: bool = False,
    progress: TaskProgress | None = None,
) -> BuildResult:
    """Embed ``sources`` (images, folders, rasters) into a new index folder ``out``.

    ``index_type`` is ``auto`` (exact up to ``ivf_threshold`` vectors, IVF above), ``flat``,
    ``ivf`` or ``hnsw`` (:class:`rsvl.index.store.IndexConfig`). ``tile`` defaults to the
    model's input size. ``progress``
    (:class:`rsvl.console.TaskProgress`) is told the number of images and tiles
    (skipped ones included).
    """
    out = Path(out)
    config = IndexConfig(ivf_threshold, nlist, nprobe, index_type, hnsw_m, ef_construction, ef_search).check()
    check_output(out, replace=overwrite)
    gsd = check_gsd(gsd) or None  # 0: the native resolution
    tile = int(tile) if tile is not None else int(getattr(model, "image_size", 224))
    check_tiling(tile, overlap, batch_size)
    check_outputs([out], expand_sources(sources))
    planned = plan_sources(sources, tile=tile, overlap=overlap, gsd=gsd)
    with progress_scope(progress, sum(p.items for p in planned)) as advance:
        vectors, rows = embed_sources(model, planned, tile=tile, overlap=overlap, gsd=gsd, bands=bands,
                                      min_valid=min_valid, batch_size=batch_size, advance=advance)
    if not rows:
        raise InputNotFoundError("nothing to index: every tile of the sources is mostly nodata.",
                                 hint="Check the sources' nodata / masks, or lower min_valid.")
    name, dim = model_name(model), int(vectors.shape[1])
    settings = {"tile": tile, "overlap": overlap, "gsd": gsd, "bands": list(bands) if bands else None,
                "min_valid": min_valid, "image_size": int(getattr(model, "image_size", tile))}
    meta = _metadata_table(rows, range(len(rows)), name, dim)
    idx = write_index(out, vectors, meta, {"model": name, "dim": dim, "settings": settings,
                                           "next_id": len(rows), "sources": len(planned)},
                      config=config, replace=overwrite)
    skipped = sum(p.items for p in planned) - len(rows)
    return BuildResult(str(out), name, idx.count, len(rows), [p.path for p in planned],
                       tiles_skipped_nodata=skipped, index_type=idx.manifest["index_type"],
                       manifest=idx.manifest)


def add(
    model: Any,
    index: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 16,
    progress: TaskProgress | None = None,
) -> BuildResult:
    """Add sources to an index; files already indexed unchanged (path, size, mtime) are skipped.

    A file indexed before whose size or mtime changed is re-embedded and replaces its rows.
    The tiling settings are the index's. The model must be the one that built the index.
    ``progress`` (:class:`rsvl.console.TaskProgress`) is told every planned image and tile;
    those already indexed count as done at once.
    """
    idx = EmbeddingIndex.open(index)
    idx.check_model(model_name(model), what="extend")
    s = idx.settings
    tile, overlap, gsd = int(s.get("tile") or model.image_size), int(s.get("overlap") or 0), s.get("gsd")
    bands, min_valid = s.get("bands"), float(s.get("min_valid", 0.5))
    known: dict[str, tuple[int, int]] = {}
    for src, size, mt in zip(idx.metadata.column("source").to_pylist(),
                             idx.metadata.column("source_size").to_pylist(),
                             idx.metadata.column("source_mtime_ns").to_pylist(), strict=True):
        known[src] = (size, mt)
    planned = plan_sources(sources, tile=tile, overlap=overlap, gsd=gsd)
    todo = [p for p in planned if known.get(p.path) != p.key]
    replaced = [p.path for p in todo if p.path in known]
    skipped = [p.path for p in planned if known.get(p.path) == p.key]
    result = BuildResult(str(idx.path), idx.model, idx.count, 0, [p.path for p in todo], skipped, replaced,
                         index_type=idx.manifest["index_type"], manifest=idx.manifest)
    with progress_scope(progress, sum(p.items for p in planned)) as advance:
        if skipped:
            advance(sum(p.items for p in planned if p.path in set(skipped)))
        if not todo:
            return result
        vectors, rows = embed_sources(model, todo, tile=tile, overlap=overlap, gsd=gsd, bands=bands,
                                      min_valid=min_valid, batch_size=batch_size, advance=advance)
    if rows and vectors.shape[1] != idx.dim:
        raise ModelMismatchError(f"model {model_name(model)} gives {vectors.shape[1]}-dim embeddings, "
                                 f"index {idx.path} holds {idx.dim}-dim ones.", hint="Rebuild the index.")
    old_vectors, old_meta = idx.vectors(), idx.metadata
    if replaced:
        keep = pc.invert(pc.is_in(old_meta.column("source"), value_set=pa.array(replaced)))
        keep_np = np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
        old_vectors, old_meta = old_vectors[keep_np], old_meta.filter(keep)
    next_id = int(idx.manifest.get("next_id", int(pc.max(old_meta.column("id")).as_py() or -1) + 1))
    new_meta = _metadata_table(rows, range(next_id, next_id + len(rows)), idx.model, idx.dim)
    all_vectors = np.concatenate([old_vectors, vectors]) if rows else old_vectors
    all_meta = pa.concat_tables([old_meta.cast(new_meta.schema), new_meta])
    m = idx.manifest
    config = IndexConfig.from_manifest(m)
    manifest = {k: v for k, v in m.items() if k not in ("files",)}
    manifest.update(next_id=next_id + len(rows), sources=len(set(all_meta.column("source").to_pylist())))
    new = write_index(idx.path, all_vectors, all_meta, manifest, config=config, replace=True)
    result.count, result.added = new.count, len(rows)
    result.index_type, result.manifest = new.manifest["index_type"], new.manifest
    result.tiles_skipped_nodata = sum(p.items for p in todo) - len(rows)
    return result


# -- search --------------------------------------------------------------------------------


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    source: str
    kind: str
    row: int | None
    col: int | None
    window: list[int]  # col_off, row_off, width, height on the (working) pixel grid
    crs: str | None
    geometry_4326: bytes | None = None
    geometry: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        bbox = None
        if self.geometry_4326 is not None:
            bbox = [round(float(v), 9) for v in shapely.from_wkb(self.geometry_4326).bounds]
        return {"rank": self.rank, "score": round(float(self.score), 6), "id": self.id,
                "source": self.source, "kind": self.kind, "row": self.row, "col": self.col,
                "window": self.window, "crs": self.crs, "bbox_4326": bbox}


@dataclass
class SearchResult:
    index: str
    model: str
    query: dict[str, Any]
    k: int
    hits: list[Hit]
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "model": self.model, "query": self.query, "k": self.k,
                "count": len(self.hits), "hits": [h.to_dict() for h in self.hits], "outputs": self.outputs}

    def to_geodataframe(self) -> gpd.GeoDataFrame:
        """Hits with a footprint, as polygons in EPSG:4326 (rank, score, source, ...)."""
        recs = [{"rank": h.rank, "score": float(h.score), "source": h.source, "kind": h.kind,
                 "row": h.row, "col": h.col, "id": h.id, "geometry": shapely.from_wkb(h.geometry_4326)}
                for h in self.hits if h.geometry_4326 is not None]
        return gpd.GeoDataFrame(recs, columns=["rank", "score", "source", "kind", "row", "col", "id", "geometry"],
                                geometry="geometry", crs="EPSG:4326")

    def write_geojson(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        out = write_vectors(self.to_geodataframe(), path, overwrite=overwrite)
        self.outputs["geojson"] = str(out)
        return out


def open_index(index: str | os.PathLike[str] | EmbeddingIndex) -> EmbeddingIndex:
    return index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.open(index)


def search(
    index: str | os.PathLike[str] | EmbeddingIndex,
    query: str | None = None,
    *,
    k: int = 10,
    image: str | os.PathLike[str] | None = None,
    model: Any = None,
    weights: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> SearchResult:
    """The ``k`` entries of the index closest to a text ``query`` or an ``image`` (path).

    ``model`` None loads the index's model through the registry (``weights``, ``device``);
    a model given must be the index's (:class:`ModelMismatchError` otherwise).
    """
    text = query.strip() if isinstance(query, str) else None
    if image is None and not text:
        raise PromptError("empty query: give a text query or an image.",
                          hint='Example: rsvl search INDEX "a stadium next to a river" (or --image PATH).')
    if image is not None and text:
        raise PromptError("give either a text query or an image, not both.")
    if k < 1:
        raise PromptError(f"k must be at least 1, got {k}.")
    if image is not None and not Path(image).exists():
        raise InputNotFoundError(f"{image}: no such file.", hint="Check the path of the query image.")
    idx = open_index(index)
    if model is None:
        model = registry.load(idx.model, weights=weights, device=device)
    idx.check_model(model_name(model))
    with torch.no_grad():
        if image is not None:
            q = model.encode_image(square_image(load_image(image), int(model.image_size))[None])
        else:
            q = model.encode_text([text])
    qv = q.float().cpu().numpy() if hasattr(q, "cpu") else np.asarray(q, np.float32)
    scores, positions = idx.search(qv, k, nprobe=nprobe, ef_search=ef_search)
    pos = [int(p) for p in positions[0] if p >= 0]
    hits = []
    for rank, (sc, r) in enumerate(zip(scores[0], idx.rows(pos), strict=False), start=1):
        window = [r["win_col"], r["win_row"], r["win_width"], r["win_height"]]
        hits.append(Hit(rank, float(sc), int(r["id"]), r["source"], r["kind"], r["row"], r["col"],
                        [int(v) for v in window], r["crs"], r["geometry_4326"], r["geometry"]))
    q_doc: dict[str, Any] = {"image": str(image)} if image is not None else {"text": text}
    return SearchResult(str(idx.path), idx.model, q_doc, k, hits)
