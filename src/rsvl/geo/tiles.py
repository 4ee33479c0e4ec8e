"""The tile grid: square tiles of side ``tile`` every ``stride = tile - overlap`` pixels.

Tiles start at 0 and step by the stride; the last row and column of tiles may extend past
the raster, where they are padded (zero-filled, marked invalid) rather than dropped or
shifted, so every tile is seen with the same geometry and every pixel is covered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from rsvl.errors import GridError


@dataclass(frozen=True)
class TileGrid:
    width: int
    height: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        check_tiling(self.tile, self.overlap)
        if self.width < 1 or self.height < 1:
            raise GridError(f"empty raster ({self.width} x {self.height}).")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def n_cols(self) -> int:
        return _count(self.width, self.tile, self.stride)

    @property
    def n_rows(self) -> int:
        return _count(self.height, self.tile, self.stride)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def window(self, row: int, col: int) -> Window:
        return Window(col * self.stride, row * self.stride, self.tile, self.tile)

    def __iter__(self) -> Iterator[tuple[int, int, Window]]:
        """Tiles in row-major order: ``(row, col, window)``."""
        for r in range(self.n_rows):
            for c in range(self.n_cols):
                yield r, c, self.window(r, c)


#: largest tile side accepted: a (C+2) x tile x tile float32 accumulator per tile in flight
#: stays in the hundreds of MB below it
MAX_TILE = 8192


def check_tiling(tile: int, overlap: int, batch_size: int | None = None) -> None:
    """Raise :class:`GridError` unless ``tile``, ``overlap`` (and ``batch_size``) make a grid.

    Every raster task calls this with the user's values before the first tile is read; an
    explicit 0 or negative value is refused, never replaced by a default.
    """
    if not _whole(tile) or not 16 <= tile <= MAX_TILE:
        raise GridError(f"tile size must be a whole number of pixels from 16 to {MAX_TILE}, got {tile}.",
                        hint="Leave --tile out to use the model's tile size.")
    if not _whole(overlap) or not 0 <= overlap < tile:
        raise GridError(
            f"overlap must be >= 0 and smaller than the tile size ({tile}), got {overlap}.",
            hint="A common choice is an overlap of 1/8 to 1/4 of the tile.",
        )
    if batch_size is not None:
        check_batch_size(batch_size)


def check_batch_size(batch_size: int) -> None:
    """Raise :class:`GridError` unless ``batch_size`` is a whole number >= 1."""
    if not _whole(batch_size) or batch_size < 1:
        raise GridError(f"batch size must be a whole number, at least 1, got {batch_size}.",
                        hint="Leave --batch-size out to use the default.")


def _whole(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and float(x).is_integer()


def check_gsd(gsd: float | None) -> float | None:
    """The working GSD in metres for a user's ``gsd``: None stays None (the task's default),
    0 means the native resolution (None); a negative or non-finite value is a GridError."""
    if gsd is None:
        return None
    value = float(gsd)
    if not math.isfinite(value) or value < 0:
        raise GridError(f"GSD must be a positive number of metres per pixel (or 0 for native), got {gsd}.",
                        hint="E.g. --gsd 0.5, or --gsd 0 to keep the raster's own resolution.")
    return value


def _count(size: int, tile: int, stride: int) -> int:
    return 1 if size <= tile else math.ceil((size - tile) / stride) + 1


def blend_weights(tile: int, overlap: int, floor: float = 1e-3) -> np.ndarray:
    """(tile, tile) float32 weights: 1 in the middle, a raised-cosine ramp over the overlap.

    Overlapping predictions are averaged with these weights, so a seam fades in over the
    overlap instead of jumping. Weights never reach zero, so a pixel covered by one tile
    only (at the raster's edge) keeps that tile's value exactly.
    """
    ramp = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
        up = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = up
        ramp[tile - overlap :] = np.minimum(ramp[tile - overlap :], up[::-1])
    ramp = np.maximum(ramp, floor)
    return np.outer(ramp, ramp).astype(np.float32)
