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
        if self.tile < 16:
            raise GridError(f"tile size must be at least 16 pixels, got {self.tile}.")
        if not 0 <= self.overlap < self.tile:
            raise GridError(
                f"overlap must be >= 0 and smaller than the tile size ({self.tile}), got {self.overlap}.",
                hint="A common choice is an overlap of 1/8 to 1/4 of the tile.",
            )
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
