"""Writing scene-sized rasters block by block: the scratch file the runner accumulates into,
and a tiled, compressed GeoTIFF / COG written window by window under a temporary name."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window

from rsvl.errors import ResumeError
from rsvl.io import atomic_path


class Scratch:
    """A raw (count, H, W) array in a file, written and read with positioned I/O.

    Not a memory map on purpose: mapped pages count towards the process's resident memory,
    and this array is as large as the scene.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: str, create: bool) -> None:
        self.path = Path(path)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        count, h, w = shape
        size = count * h * w * self.dtype.itemsize
        if create:
            with open(self.path, "wb") as f:
                f.truncate(size)
        elif not self.path.exists() or self.path.stat().st_size != size:
            raise ResumeError(
                f"the scratch file {self.path} is missing or has the wrong size.",
                hint="Run again without --resume to start over.",
            )
        self._fd = os.open(self.path, os.O_RDWR)

    def _offset(self, band: int, row: int, col: int) -> int:
        _, h, w = self.shape
        return ((band * h + row) * w + col) * self.dtype.itemsize

    def write(self, y: int, x: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=self.dtype)
        for b in range(data.shape[0]):
            for i in range(data.shape[1]):
                os.pwrite(self._fd, data[b, i].tobytes(), self._offset(b, y + i, x))

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, rows, cols = key
        count = self.shape[0]
        y0, y1, _ = rows.indices(self.shape[1])
        x0, x1, _ = cols.indices(self.shape[2])
        out = np.empty((count, y1 - y0, x1 - x0), self.dtype)
        nbytes = (x1 - x0) * self.dtype.itemsize
        for b in range(count):
            for i, y in enumerate(range(y0, y1)):
                buf = os.pread(self._fd, nbytes, self._offset(b, y, x0))
                out[b, i] = np.frombuffer(buf, self.dtype)
        return out

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_geotiff_from_array(
    array: np.ndarray,
    path: str | os.PathLike[str],
    *,
    crs: Any,
    transform: Affine,
    nodata: float | None = None,
    compress: str = "deflate",
    cog: bool = False,
    tags: dict[str, str] | None = None,
    descriptions: Sequence[str] | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
    overview_resampling: str = "nearest",
    block: int = 512,
    work_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a (count, H, W) array (e.g. a memmap) to a tiled compressed GeoTIFF or COG,
    window by window, so the array never needs to be in memory at once.

    The file appears under ``path`` only when complete.
    """
    path = Path(path)
    count, H, W = array.shape
    block = 256 if max(H, W) <= 1024 else block
    dtype = np.dtype(array.dtype).name
    profile = {
        "driver": "GTiff",
        "width": W,
        "height": H,
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": compress,
        "BIGTIFF": "IF_SAFER",
    }
    if compress.lower() in ("deflate", "lzw", "zstd"):
        profile["predictor"] = 3 if np.issubdtype(array.dtype, np.floating) else 2
    work = Path(work_dir) if work_dir is not None else path.parent
    with atomic_path(path) as final_tmp:
        stage = work / f".{path.name}.gtiff.tmp" if cog else final_tmp
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(stage, "w", **profile) as dst:
                    for y in range(0, H, block):
                        h = min(block, H - y)
                        for x in range(0, W, block):
                            w = min(block, W - x)
                            dst.write(np.asarray(array[:, y : y + h, x : x + w]), window=Window(x, y, w, h))
                    if tags:
                        dst.update_tags(**tags)
                    if descriptions:
                        for i, d in enumerate(descriptions, start=1):
                            dst.set_band_description(i, d)
                    if colormap and count == 1 and dtype == "uint8":
                        dst.write_colormap(1, colormap)
                if cog:
                    rio_copy(
                        stage,
                        final_tmp,
                        driver="COG",
                        compress=compress,
                        overview_resampling=overview_resampling,
                        BIGTIFF="IF_SAFER",
                    )
        finally:
            if cog:
                Path(stage).unlink(missing_ok=True)
    return path

