"""The driver's merge of the items' outputs: one VRT mosaic per raster kind (optionally a
COG), one vector file with a ``source`` column, one CSV of table rows, one FAISS index.

Every merge walks the items in the run's order, so the merged files depend only on the
items' outputs, never on which worker finished first: a resumed run merges to the same
result as an uninterrupted one (the VRT byte for byte).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio.shutil
import shapely
from rasterio.dtypes import dtype_rev, typename_fwd

from rsvl.console import state
from rsvl.errors import OutputError
from rsvl.geo.raster import open_dataset
from rsvl.geo.vectors import write_vectors
from rsvl.index.store import DEFAULT_IVF_THRESHOLD, IndexConfig, metadata_schema, write_index
from rsvl.io import atomic_path, write_text

Bounds = tuple[float, float, float, float]  # left, bottom, right, top
#: tags of an item's raster that describe that item only (not copied to the mosaic)
ITEM_TAGS = frozenset({"rsvl_resume_key"})


@dataclass(frozen=True)
class Part:
    """One item's output to merge: the file, the raster it came from, the item's name, and
    (for a block) the bounds of the block's core in the source CRS."""

    path: str
    source: str
    item: str
    core: Bounds | None = None


def core_bounds(source: str, core: Sequence[int] | None) -> Bounds | None:
    """Map bounds of the pixel window ``core`` (col, row, width, height) of ``source``."""
    if core is None:
        return None
    x, y, w, h = core
    with open_dataset(source) as ds:
        t = ds.transform
    xs = (t.c + x * t.a, t.c + (x + w) * t.a)
    ys = (t.f + y * t.e, t.f + (y + h) * t.e)
    return (min(xs), min(ys), max(xs), max(ys))


# -- rasters -------------------------------------------------------------------------------


def _gdal_type(dtype: str) -> str:
    return typename_fwd[dtype_rev[dtype]]


def _fmt(v: float) -> str:
    return repr(float(v))


def _part_grid(part: Part) -> dict[str, Any]:
    with open_dataset(part.path) as ds:
        t = ds.transform
        info: dict[str, Any] = {
            "crs": ds.crs.to_wkt() if ds.crs else "", "res": (t.a, t.e), "count": ds.count,
            "dtypes": tuple(ds.dtypes), "nodata": tuple(ds.nodatavals), "width": ds.width, "height": ds.height,
            "transform": t, "tags": ds.tags(), "descriptions": tuple(ds.descriptions),
            "band_tags": [ds.tags(b) for b in range(1, ds.count + 1)],
            "colormap": None,
        }
        try:
            info["colormap"] = ds.colormap(1)
        except ValueError:  # no colour table
            info["colormap"] = None
    left, top = t.c, t.f
    right, bottom = t.c + ds.width * t.a, t.f + ds.height * t.e
    if part.core is None:
        info["window"] = (0, 0, info["width"], info["height"])
        info["bounds"] = (left, bottom, right, top)
        return info
    cl, cb, cr, ct = part.core
    c0 = int(round((cl - t.c) / t.a))
    c1 = int(round((cr - t.c) / t.a))
    r0 = int(round((ct - t.f) / t.e))
    r1 = int(round((cb - t.f) / t.e))
    c0, c1 = max(0, c0), min(info["width"], c1)
    r0, r1 = max(0, r0), min(info["height"], r1)
    info["window"] = (c0, r0, c1 - c0, r1 - r0)
    info["bounds"] = (t.c + c0 * t.a, t.f + r1 * t.e, t.c + c1 * t.a, t.f + r0 * t.e)
    return info


def _vrt_text(grids: list[dict[str, Any]], paths: list[str], vrt: Path) -> str:
    first = grids[0]
    xres, yres = first["res"]
    minx = min(g["bounds"][0] for g in grids)
    maxx = max(g["bounds"][2] for g in grids)
    miny = min(g["bounds"][1] for g in grids)
    maxy = max(g["bounds"][3] for g in grids)
    width = int(round((maxx - minx) / abs(xres)))
    height = int(round((maxy - miny) / abs(yres)))
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">']
    if first["crs"]:
        lines.append(f"  <SRS>{escape(first['crs'])}</SRS>")
    lines.append(f"  <GeoTransform>{_fmt(minx)}, {_fmt(xres)}, 0.0, {_fmt(maxy)}, 0.0, {_fmt(yres)}</GeoTransform>")
    tags = {k: v for k, v in first["tags"].items() if k not in ITEM_TAGS}
    if tags:
        lines.append("  <Metadata>")
        lines += [f'    <MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in sorted(tags.items())]
        lines.append("  </Metadata>")
    for b in range(first["count"]):
        nodata = first["nodata"][b]
        lines.append(f'  <VRTRasterBand dataType="{_gdal_type(first["dtypes"][b])}" band="{b + 1}">')
        if first["descriptions"][b]:
            lines.append(f"    <Description>{escape(first['descriptions'][b])}</Description>")
        if nodata is not None:
            lines.append(f"    <NoDataValue>{_fmt(nodata)}</NoDataValue>")
        if b == 0 and first["colormap"]:
            lines.append("    <ColorInterp>Palette</ColorInterp>")
            lines.append("    <ColorTable>")
            cmap = first["colormap"]
            lines += [f'      <Entry c1="{c[0]}" c2="{c[1]}" c3="{c[2]}" c4="{c[3]}"/>'
                      for c in (cmap.get(i, (0, 0, 0, 0)) for i in range(max(cmap) + 1))]
            lines.append("    </ColorTable>")
        for g, p in zip(grids, paths, strict=True):
            x, y, w, h = g["window"]
            dx = int(round((g["bounds"][0] - minx) / abs(xres)))
            dy = int(round((maxy - g["bounds"][3]) / abs(yres)))
            kind = "ComplexSource" if nodata is not None else "SimpleSource"
            rel = os.path.relpath(p, vrt.parent)
            lines += [
                f"    <{kind}>",
                f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                f"      <SourceBand>{b + 1}</SourceBand>",
                f'      <SrcRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>',
                f'      <DstRect xOff="{dx}" yOff="{dy}" xSize="{w}" ySize="{h}"/>',
            ]
            if nodata is not None:
                lines.append(f"      <NODATA>{_fmt(nodata)}</NODATA>")
            lines.append(f"    </{kind}>")
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def mosaic_vrt(parts: Sequence[Part], out: str | os.PathLike[str]) -> list[Path]:
    """Write a VRT mosaic of ``parts`` at ``out`` (paths relative to it, blocks cropped to
    their cores). Parts on different grids (CRS, resolution, bands, data type) cannot share
    one VRT: each further grid gets its own, ``NAME-2.vrt``, ... with a warning."""
    out = Path(out)
    groups: dict[tuple[Any, ...], tuple[list[dict[str, Any]], list[str]]] = {}
    for part in parts:
        g = _part_grid(part)
        if g["window"][2] <= 0 or g["window"][3] <= 0:
            continue
        key = (g["crs"], g["res"], g["count"], g["dtypes"])
        groups.setdefault(key, ([], []))
        groups[key][0].append(g)
        groups[key][1].append(str(Path(part.path).resolve()))
    written = []
    for i, (grids, paths) in enumerate(groups.values()):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        write_text(path, _vrt_text(grids, paths, path))
        written.append(path)
    if len(written) > 1:
        state.warn(f"{out.name}: the items are on {len(written)} different grids (CRS or resolution); "
                   f"wrote one mosaic per grid: {', '.join(p.name for p in written)}")
    return written


def to_cog(vrt: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Copy a mosaic to a Cloud-Optimised GeoTIFF (deflate, overviews), atomically."""
    with open_dataset(vrt) as ds, atomic_path(out) as tmp:
        rasterio.shutil.copy(ds, tmp, driver="COG", COMPRESS="DEFLATE", BIGTIFF="IF_SAFER")
    return Path(out)


# -- vectors -------------------------------------------------------------------------------


def _keep_in_core(gdf: gpd.GeoDataFrame, core: Bounds, rule: str) -> gpd.GeoDataFrame:
    left, bottom, right, top = core
    if rule == "clip":
        geoms = gdf.geometry.intersection(shapely.box(*core))
        gdf = gdf.set_geometry(geoms)
        return gdf[np.array([g is not None and not g.is_empty for g in geoms], dtype=bool)]
    pts = gdf.geometry.representative_point()
    x, y = pts.x, pts.y
    inside = (x >= left) & (x < right) & (y > bottom) & (y <= top)  # half-open: one owner per point
    return gdf[inside.to_numpy()]


def merge_vectors(parts: Sequence[Part], out: str | os.PathLike[str], *, rule: str = "clip",
                  to_crs: Any = None) -> Path | None:
    """Join the parts' features into one file with ``source`` (the raster) and ``item``
    columns first, in item order; blocks keep only their core (``rule``: clip or centre).
    Features are reprojected to ``to_crs``, else to the first part's CRS."""
    frames = []
    target = to_crs
    for part in parts:
        gdf = gpd.read_file(part.path)
        if target is None:
            target = gdf.crs
        if gdf.crs is None and target is not None:
            state.warn(f"{part.item}: its features have no CRS; left out of {Path(out).name}")
            continue
        if part.core is not None and len(gdf):
            gdf = _keep_in_core(gdf, part.core, rule)
        if target is not None and gdf.crs != target:
            gdf = gdf.to_crs(target)
        gdf.insert(0, "item", part.item)
        gdf.insert(0, "source", part.source)
        frames.append(gdf)
    if not frames:
        return None
    merged = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=target)
    return write_vectors(merged, out, overwrite=True)


# -- tables --------------------------------------------------------------------------------


def merge_tables(files: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path | None:
    """The rows of the items' JSON files, in order, as one CSV (columns in first-seen order)."""
    rows: list[dict[str, Any]] = []
    for f in files:
        rows += json.loads(Path(f).read_text(encoding="utf-8"))
    if not rows:
        return None
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return Path(out)


# -- index ---------------------------------------------------------------------------------


def merge_index(parts: Sequence[tuple[str, str]], out: str | os.PathLike[str], options: dict[str, Any]) -> Path:
    """One index folder from the items' (vectors ``.npy``, rows ``.parquet``) pairs, vectors
    added in item order and numbered 0..N-1, exactly as one ``rsvl index build`` numbers them."""
    vecs: list[np.ndarray] = []
    tables: list[pa.Table] = []
    model, image_size = None, None
    for vec_path, rows_path in parts:
        table = pq.read_table(rows_path)
        meta = table.schema.metadata or {}
        model = model or meta.get(b"model", b"").decode() or None
        image_size = image_size or int(meta.get(b"image_size", b"0") or 0) or None
        if table.num_rows:
            vecs.append(np.load(vec_path, allow_pickle=False))
            tables.append(table.replace_schema_metadata(None))
    if not tables:
        raise OutputError("nothing to index: no item gave a vector (every tile mostly nodata, or every item failed).",
                          hint="Check the sources and the run's errors (run.json).")
    vectors = np.concatenate(vecs).astype(np.float32, copy=False)
    table = pa.concat_tables(tables)
    n, dim = table.num_rows, int(vectors.shape[1])
    table = table.append_column("id", pa.array(np.arange(n), pa.int64()))
    table = table.append_column("model", pa.array([model] * n, pa.string()))
    table = table.append_column("dim", pa.array([dim] * n, pa.int32()))
    table = table.select(metadata_schema().names)
    tile = options.get("tile") or image_size
    settings = {"tile": tile, "overlap": int(options.get("overlap") or 0), "gsd": options.get("gsd") or None,
                "bands": options.get("bands") or None, "min_valid": float(options.get("min_valid", 0.5)),
                "image_size": image_size}
    config = IndexConfig(int(options.get("ivf_threshold") or DEFAULT_IVF_THRESHOLD), options.get("nlist"),
                         options.get("nprobe"), str(options.get("index_type") or "auto"), options.get("hnsw_m"),
                         options.get("ef_construction"), options.get("ef_search"))
    manifest = {"model": model, "dim": dim, "settings": settings, "next_id": n,
                "sources": len(set(table.column("source").to_pylist()))}
    write_index(out, vectors, table, manifest, config=config, replace=True)
    return Path(out)
