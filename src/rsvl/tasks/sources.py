"""What every task asks of its input paths: the images of a folder, and whether a file is
georeferenced (which decides between pixel and map outputs); and the checks every raster
task makes of its options and output paths before the first tile is read."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyproj import CRS
from pyproj.exceptions import CRSError

from rsvl.console import state
from rsvl.errors import OutputError, RsvlError
from rsvl.geo.raster import RasterSource, open_dataset, source_files
from rsvl.geo.tiles import TileGrid
from rsvl.io import IMAGE_SUFFIXES, is_image_file, refuse_inputs_as_outputs

__all__ = [
    "announce_resampling",
    "IMAGE_SUFFIXES",
    "VECTOR_FORMATS",
    "check_outputs",
    "check_to_crs",
    "check_vector_format",
    "find_images",
    "is_georeferenced",
    "no_images_message",
]

#: vector formats the raster tasks write, by ``--vector-format`` name
VECTOR_FORMATS = ("gpkg", "geojson", "parquet")


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted by path; hidden files skipped),
    by the one suffix list of :data:`rsvl.io.IMAGE_SUFFIXES`."""
    return [p for p in sorted(Path(folder).rglob("*")) if is_image_file(p)]


def no_images_message(folder: str | os.PathLike[str]) -> str:
    return f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})."


def is_georeferenced(path: str | os.PathLike[str]) -> bool:
    """True when GDAL finds a CRS in ``path``."""
    with open_dataset(path) as ds:
        return ds.crs is not None


def check_vector_format(vector_format: str) -> str:
    """The normalised ``--vector-format`` (gpkg, geojson, parquet), or an OutputError."""
    fmt = str(vector_format).lower().lstrip(".")
    if fmt not in VECTOR_FORMATS:
        raise OutputError(f"unknown vector format {vector_format!r}.", hint="Use gpkg, geojson or parquet.")
    return fmt


def check_to_crs(to_crs: Any) -> None:
    """Raise an OutputError now, before any tile is read, if ``--to-crs`` is not a CRS."""
    if to_crs is None:
        return
    try:
        CRS.from_user_input(to_crs)
    except (CRSError, TypeError, ValueError) as exc:
        raise OutputError(
            f"--to-crs {to_crs!r} is not a coordinate reference system ({str(exc).splitlines()[0]}).",
            hint="Use an EPSG code such as EPSG:4326, EPSG:32633, or a PROJ/WKT string.",
        ) from None


def check_outputs(outputs: Iterable[str | os.PathLike[str]], sources: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse output paths that resolve to a file the run reads: each source and every
    file GDAL reads for it (sidecars, a VRT's rasters). With or without ``--overwrite``."""
    inputs: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_file():
            try:
                inputs += source_files(p)
            except RsvlError:  # not a raster GDAL opens: the file itself is still an input
                inputs.append(str(p))
        elif p.is_dir():
            inputs.append(str(p))
    refuse_inputs_as_outputs(outputs, inputs)


def announce_resampling(src: RasterSource, tile: int, overlap: int, *, default: bool = False) -> int:
    """Say on stderr, before the first tile, what resampling does to ``src`` (native ->
    working GSD, factor, working grid, tiles) and return the number of tiles. With
    ``default`` (the GSD is the model's, not the user's) an upsampling above
    :data:`rsvl.geo.gsd.MAX_DEFAULT_UPSAMPLE` is refused (a GridError naming ``--gsd 0``
    and the explicit ``--gsd`` that confirms it)."""
    plan = src.resample_plan()
    tiles = len(TileGrid(src.width, src.height, tile, overlap))
    if default:
        native = len(TileGrid(src.native_width, src.native_height, tile, overlap))
        plan.check_default(tiles, native)
    if plan.resampled:
        state.notice(plan.describe(tiles))
    return tiles
