"""Map tiles of input rasters and result layers (rio-tiler), by layer id.

A client never names a file for a tile: it names a layer id the service gave out when it
opened a raster under the roots, took an upload, or finished a job. The layers live in
``STATE/layers.json`` so their ids outlive a restart.

Kinds: ``image`` (RGB or one band; stretched to 8 bits from its 2-98 percentiles unless it
is already uint8), ``labels`` (a class raster: the classes' colours from its colour table or
:func:`rsvl.tasks.render.class_colours`, nodata transparent, nearest resampling) and
``grey`` (a one-band confidence or probability raster).
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader

from rsvl.errors import JobNotFoundError, NoCRSError, RasterReadError
from rsvl.io import write_text
from rsvl.serve.jobs import check_id, new_id
from rsvl.tasks.render import class_colours

TILE = 256


@dataclass
class Layer:
    id: str
    path: str
    kind: str  # image | labels | grey
    title: str
    georeferenced: bool = True
    bounds: list[float] | None = None  # west, south, east, north (EPSG:4326)
    minzoom: int = 0
    maxzoom: int = 22
    width: int = 0
    height: int = 0
    legend: list[dict[str, Any]] = field(default_factory=list)
    #: per-band (low, high) for the 8-bit stretch of an image layer
    stretch: list[list[float]] | None = None

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("path")
        doc.pop("stretch")
        doc["tiles"] = f"/tiles/{self.id}/{{z}}/{{x}}/{{y}}.png"
        return doc


def _legend_from(ds: Any) -> list[dict[str, Any]]:
    """Class index, name and colour from a class raster's ``classes`` tag and colour table."""
    try:
        names = {int(k): str(v) for k, v in json.loads(ds.tags().get("classes", "{}")).items()}
    except (ValueError, AttributeError):
        names = {}
    if not names:
        return []
    try:
        cmap = ds.colormap(1)
    except ValueError:
        cmap = {}
    colours = class_colours([names[k] for k in sorted(names)])
    legend = []
    for i, k in enumerate(sorted(names)):
        rgb = tuple(cmap[k][:3]) if k in cmap else colours[i]
        legend.append({"value": k, "name": names[k], "color": "#{:02x}{:02x}{:02x}".format(*rgb)})
    return legend


class LayerStore:
    """Layer ids -> rasters; ``render(id, z, x, y)`` -> PNG bytes."""

    def __init__(self, state_dir: Path) -> None:
        self.file = Path(state_dir) / "layers.json"
        self._lock = threading.Lock()
        self._layers: dict[str, Layer] = {}
        if self.file.is_file():
            try:
                for doc in json.loads(self.file.read_text(encoding="utf-8")):
                    layer = Layer(**doc)
                    self._layers[layer.id] = layer
            except (OSError, ValueError, TypeError):
                self._layers = {}

    def _save(self) -> None:
        write_text(self.file, json.dumps([asdict(v) for v in self._layers.values()]))

    def add(self, path: Path, kind: str = "image", title: str | None = None) -> Layer:
        """The layer of ``path`` (the same id for the same file and kind)."""
        path = Path(path).resolve()
        with self._lock:
            for layer in self._layers.values():
                if layer.path == str(path) and layer.kind == kind:
                    return layer
        layer = Layer(new_id(), str(path), kind, title or path.name)
        try:
            with rasterio.open(path) as ds:
                layer.width, layer.height = ds.width, ds.height
                layer.georeferenced = ds.crs is not None
                if kind == "labels":
                    layer.legend = _legend_from(ds)
            if layer.georeferenced:
                with Reader(str(path)) as r:
                    layer.bounds = [float(v) for v in r.get_geographic_bounds("epsg:4326")]
                    layer.minzoom, layer.maxzoom = int(r.minzoom), int(r.maxzoom)
                    if kind == "image":
                        layer.stretch = _stretch(r)
        except rasterio.errors.RasterioIOError as exc:
            raise RasterReadError(f"{path.name}: not a raster GDAL can read ({exc}).") from None
        with self._lock:
            self._layers[layer.id] = layer
            self._save()
        return layer

    def get(self, layer_id: str) -> Layer:
        with self._lock:
            layer = self._layers.get(check_id(layer_id, "layer"))
        if layer is None:
            raise JobNotFoundError(f"no layer {layer_id!r} on this service.",
                                   hint="Open a raster (POST /layers) or use a job's layers.")
        return layer

    def render(self, layer_id: str, z: int, x: int, y: int) -> bytes:
        """One 256 px PNG tile in Web Mercator; an empty transparent tile outside the layer."""
        layer = self.get(layer_id)
        if not layer.georeferenced:
            raise NoCRSError(f"layer {layer.title} has no CRS, so it cannot be placed on a map.",
                             hint="Open a georeferenced raster, or look at its outputs' PNG overlay.")
        try:
            with Reader(layer.path) as r:
                if not r.tile_exists(x, y, z):
                    return empty_tile()
                if layer.kind == "labels":
                    img = r.tile(x, y, z, tilesize=TILE, indexes=1)
                    return img.render(img_format="PNG", colormap=_colormap(layer))
                if layer.kind == "grey":
                    img = r.tile(x, y, z, tilesize=TILE, indexes=1)
                    return img.render(img_format="PNG")
                count = r.dataset.count
                img = r.tile(x, y, z, tilesize=TILE, indexes=(1, 2, 3) if count >= 3 else 1)
                if layer.stretch is not None:
                    img.rescale(in_range=[tuple(s) for s in layer.stretch], out_range=((0, 255),))
                return img.render(img_format="PNG")
        except TileOutsideBounds:
            return empty_tile()
        except rasterio.errors.RasterioIOError as exc:
            raise RasterReadError(f"cannot read layer {layer.title}: {exc}.") from None


def _stretch(r: Reader) -> list[list[float]] | None:
    """2-98 percentile ranges of the first three bands (None for uint8: drawn as it is)."""
    if r.dataset.dtypes[0] == "uint8":
        return None
    count = r.dataset.count
    img = r.preview(indexes=(1, 2, 3) if count >= 3 else 1, max_size=512)
    out = []
    for band in img.array:
        values = band.compressed() if np.ma.isMaskedArray(band) else np.ravel(band)
        lo, hi = (np.percentile(values, (2, 98)) if values.size else (0.0, 1.0))
        out.append([float(lo), float(hi) if hi > lo else float(lo) + 1.0])
    return out


def _colormap(layer: Layer) -> dict[int, tuple[int, int, int, int]]:
    cmap = {}
    for item in layer.legend:
        c = item["color"].lstrip("#")
        cmap[int(item["value"])] = (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), 255)
    return cmap


_EMPTY: bytes | None = None


def empty_tile() -> bytes:
    global _EMPTY
    if _EMPTY is None:
        buf = io.BytesIO()
        Image.new("RGBA", (TILE, TILE), (0, 0, 0, 0)).save(buf, format="PNG")
        _EMPTY = buf.getvalue()
    return _EMPTY
