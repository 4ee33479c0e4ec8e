"""What every task asks of its input paths: the images of a folder, and whether a file is
georeferenced (which decides between pixel and map outputs)."""

from __future__ import annotations

import os
from pathlib import Path

from rsvl.geo.raster import open_dataset
from rsvl.io import IMAGE_SUFFIXES, is_image_file

__all__ = ["IMAGE_SUFFIXES", "find_images", "is_georeferenced", "no_images_message"]


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
