"""Rasters, tile grids, the streaming tiled runner and vectors. No torch, no models here."""

from rsvl.geo.raster import RasterInfo, RasterSource, open_dataset, plan_bands
from rsvl.geo.runner import RasterOutput, RunResult, TiledRunner
from rsvl.geo.stream import TileBatch, TileOutput, TileStream, map_tiles
from rsvl.geo.tiles import TileGrid, blend_weights
from rsvl.geo.vectors import (
    boxes_to_polygons,
    mask_to_polygon,
    masks_to_polygons,
    polygonize_array,
    polygonize_raster,
    write_vectors,
)
from rsvl.geo.writer import write_geotiff_from_array

__all__ = [
    "RasterInfo",
    "RasterOutput",
    "RasterSource",
    "RunResult",
    "TileBatch",
    "TileGrid",
    "TileOutput",
    "TileStream",
    "TiledRunner",
    "blend_weights",
    "boxes_to_polygons",
    "map_tiles",
    "mask_to_polygon",
    "masks_to_polygons",
    "open_dataset",
    "plan_bands",
    "polygonize_array",
    "polygonize_raster",
    "write_geotiff_from_array",
    "write_vectors",
]
