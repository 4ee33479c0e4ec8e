"""The read-ahead tile loop every raster task shares.

:class:`TileStream` reads (and converts) the windows of a :class:`~rsvl.geo.tiles.TileGrid`
on a background thread into a bounded queue while the caller predicts, and marks which tiles
hold enough valid pixels to be worth predicting (:func:`tile_keep`). :func:`map_tiles` runs a
``predict`` over it and yields one small :class:`TileOutput` per tile: what the vector tasks
(classify per tile, index build, refer, instances) keep. The blended raster tasks use the
same stream through :class:`rsvl.geo.runner.TiledRunner`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window

from rsvl.errors import PredictorError
from rsvl.geo.raster import RasterSource
from rsvl.geo.tiles import TileGrid, check_tiling


@dataclass
class TileBatch:
    """What a predictor receives: up to ``batch_size`` tiles of the working grid."""

    images: np.ndarray  # (B, 3, T, T) uint8 RGB, zero outside the raster / where invalid
    valid: np.ndarray  # (B, T, T) bool
    windows: list[Window]  # pixel windows in the working grid
    transforms: list[Affine]  # each tile's affine transform (CRS units)
    positions: list[tuple[int, int]]  # (row, col) in the tile grid

    def __len__(self) -> int:
        return len(self.windows)


#: ``predict(batch) -> array or sequence``, one result per tile of the batch
Predictor = Callable[[TileBatch], Any]
#: ``advance(n)``: n more tiles are done
Advance = Callable[[int], None]


def tile_keep(valid: np.ndarray, min_valid: float | None) -> np.ndarray:
    """Which tiles of a (B, T, T) validity stack go to the predictor.

    ``min_valid`` None: every tile. A fraction: tiles with at least one valid pixel whose
    valid fraction (padding outside the raster counts as invalid) is at least ``min_valid``.
    """
    flat = valid.reshape(len(valid), -1)
    if min_valid is None:
        return np.ones(len(valid), dtype=bool)
    return flat.any(axis=1) & (flat.mean(axis=1) >= min_valid)


class TileStream:
    """Reads the tiles of ``grid`` in row-major order on a background thread, ``prefetch``
    batches ahead, into a bounded queue; iterating yields ``(TileBatch, keep)`` where
    ``keep`` (bool per tile, see :func:`tile_keep`) says which tiles to predict.

    Use as a context manager: leaving it (normally, on an error or on Ctrl-C) stops and
    joins the reader thread. ``read_wait`` is the time the consumer waited for tiles.
    """

    def __init__(
        self,
        source: RasterSource,
        grid: TileGrid,
        *,
        batch_size: int = 4,
        prefetch: int = 2,
        start_row: int = 0,
        min_valid: float | None = 0.0,
        start_tile: int = 0,
    ) -> None:
        check_tiling(grid.tile, grid.overlap, batch_size)
        self.source = source
        self.grid = grid
        self.batch_size = batch_size
        # the first tile read: row start_row, or tile start_tile in row-major order if later
        self.start_row = max(start_row, start_tile // grid.n_cols)
        self.start_tile = max(start_tile, start_row * grid.n_cols)
        self.min_valid = min_valid
        self.read_wait = 0.0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="rsvl-tile-reader", daemon=True)

    def __enter__(self) -> TileStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        drain(self._queue, self._thread)

    def __iter__(self) -> Iterator[tuple[TileBatch, np.ndarray]]:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.read_wait += time.perf_counter() - t0
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            grid, T = self.grid, self.grid.tile
            base = self.source.transform
            with self.source.reader() as reader:
                images, valids, windows, transforms, positions = [], [], [], [], []

                def flush() -> bool:
                    batch = TileBatch(
                        np.stack(images), np.stack(valids), list(windows), list(transforms), list(positions)
                    )
                    for lst in (images, valids, windows, transforms, positions):
                        lst.clear()
                    return self._put((batch, tile_keep(batch.valid, self.min_valid)))

                for r in range(self.start_row, grid.n_rows):
                    for c in range(grid.n_cols):
                        if self._stop.is_set():
                            return
                        if r * grid.n_cols + c < self.start_tile:
                            continue
                        win = grid.window(r, c)
                        rgb, valid = reader.read(win)
                        assert rgb.shape == (3, T, T)
                        images.append(rgb)
                        valids.append(valid)
                        windows.append(win)
                        transforms.append(base @ Affine.translation(win.col_off, win.row_off))
                        positions.append((r, c))
                        if len(images) == self.batch_size and not flush():
                            return
                if images and not flush():
                    return
            self._put(None)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)


@dataclass
class TileOutput:
    """One tile of a :func:`map_tiles` run and what the predictor said about it."""

    position: tuple[int, int]  # (row, col) in the tile grid
    window: Window  # in the working grid
    transform: Affine  # the tile's own affine transform (CRS units)
    valid: np.ndarray  # (T, T) bool
    result: Any  # the predictor's output for this tile; None when it was not predicted

    @property
    def predicted(self) -> bool:
        return self.result is not None

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean())


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (Linux), or None elsewhere (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the OS (glibc ``malloc_trim(0)``; nothing
    elsewhere). Called after each predicted batch: tensors of a few MB are freed into glibc's
    heap, whose threshold for serving them from ``mmap`` rises after such frees, so without
    this the resident size of a long run keeps the high-water mark of every batch's
    fragments, and grows with the number of batches (measured in ``BENCHMARKS.md``: +15 %
    from 2k² to 8k² for ``index build``, flat with it)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def map_tiles(
    source: RasterSource,
    predict: Predictor,
    *,
    tile: int,
    overlap: int = 0,
    batch_size: int = 4,
    prefetch: int = 2,
    min_valid: float | None = 0.0,
    progress: Advance | None = None,
    start: int = 0,
) -> Iterator[TileOutput]:
    """Run ``predict`` over the tiles of ``source`` and yield one :class:`TileOutput` per tile,
    in row-major order: the streaming loop of tasks whose per-tile results are not blended
    rasters (classify per tile, index build, refer, instances).

    ``predict(TileBatch)`` returns one result per tile of the batch it is given (an array
    with a leading batch axis or a sequence); tiles that :func:`tile_keep` rejects are not
    sent and come back with ``result`` None. ``progress(n)`` is called as tiles are done.
    Tiles are read ahead on a background thread (:class:`TileStream`), so reading overlaps
    prediction and memory holds a few batches, never the scene.

    ``start``: the number of tiles (in row-major order) a resumed run already has; they are
    neither read nor predicted nor yielded, and batches are counted from there.
    """
    grid = TileGrid(source.width, source.height, tile, overlap)
    with TileStream(source, grid, batch_size=batch_size, prefetch=prefetch, min_valid=min_valid,
                    start_tile=start) as stream:
        for batch, keep in stream:
            idx = np.flatnonzero(keep)
            results: list[Any] = [None] * len(batch)
            if len(idx):
                sub = batch if len(idx) == len(batch) else subset_batch(batch, idx)
                out = predict(sub)
                if len(out) != len(idx):
                    raise PredictorError(
                        f"the predictor returned {len(out)} result(s) for a batch of {len(idx)} tile(s)."
                    )
                for j, i in enumerate(idx):
                    results[i] = out[j]
                del out, sub
                release_freed_memory()
            for i in range(len(batch)):
                yield TileOutput(batch.positions[i], batch.windows[i], batch.transforms[i], batch.valid[i], results[i])
            if progress is not None:
                progress(len(batch))


def drain(q: queue.Queue[Any], thread: threading.Thread) -> None:
    """Empty ``q`` until ``thread`` (blocked on putting into it) has finished."""
    while thread.is_alive():
        try:
            q.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=0.05)


def subset_batch(batch: TileBatch, idx: np.ndarray) -> TileBatch:
    return TileBatch(
        batch.images[idx],
        batch.valid[idx],
        [batch.windows[i] for i in idx],
        [batch.transforms[i] for i in idx],
        [batch.positions[i] for i in idx],
    )

