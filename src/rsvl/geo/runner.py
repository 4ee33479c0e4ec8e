"""The streaming tiled runner: any ``predict(batch) -> array`` over a raster of any size.

How it keeps memory flat
------------------------
Tiles are visited in row-major order on a grid of stride ``S = tile - overlap``. Each tile's
prediction is multiplied by a smooth weight window (:func:`rsvl.geo.tiles.blend_weights`)
and added to a per-tile accumulator together with the weights. After tile ``(r, c)`` the
top-left ``S x S`` block of its accumulator can receive no further contributions (the next
tile to the right starts ``S`` pixels later, the next row ``S`` pixels lower), so it is
normalised, finalised (e.g. argmax to labels) and written out at once. What overlaps the
next tile is carried: the right ``overlap`` columns to the next tile in the row, the bottom
``overlap`` rows to the next tile row. Live memory is therefore a few tiles, the batches in
flight, and one ``overlap``-row strip of the carried sums — never the scene.

Finished blocks go to a raw scratch file next to the output (positioned writes, not a
memory map, so the scene never counts towards resident memory); at the end the
scratch is written window by window to a tiled, compressed GeoTIFF (or COG) under a
temporary name and renamed into place. After each tile row the scratch is flushed and the
carry and position are saved, so an interrupted run resumes where it stopped.

A background thread reads (and converts) the next windows while the predictor runs.

Tasks whose per-tile results are vectors, not blended rasters (classify per tile, index
build, refer, instances), use the same reading machinery through :func:`map_tiles`: the
read-ahead thread and bounded queue of :class:`TileStream`, the same validity rule (tiles
below ``min_valid`` never reach the predictor) and the same ``progress`` callable. Their
results are small (labels, embeddings, candidate masks, polygons); scene-sized rasters
they write are produced block by block through :func:`write_geotiff_from_array`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window

from rsvl import __version__
from rsvl.errors import OutputError, PredictorError, ResumeError
from rsvl.geo.raster import RasterSource
from rsvl.geo.tiles import TileGrid, blend_weights
from rsvl.io import atomic_path, write_text

STATE_VERSION = 1


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


Predictor = Callable[[TileBatch], Any]
Advance = Callable[[int], None]
Finalize = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class RasterOutput:
    """One raster the run writes.

    ``finalize(values (C, h, w) float32, valid (h, w) bool) -> (count, h, w)`` turns the
    blended predictor channels of a block into what is stored (e.g. argmax labels); None
    stores the blended channels themselves (``count`` must then equal the channel count).
    Pixels that are invalid in the source get ``nodata``.
    """

    path: str | os.PathLike[str]
    count: int
    dtype: str = "float32"
    finalize: Finalize | None = None
    nodata: float | None = None
    cog: bool | None = None  # None: COG when the suffix is .cog.tif or the name contains "cog"
    compress: str = "deflate"
    descriptions: Sequence[str] | None = None
    colormap: dict[int, tuple[int, int, int, int]] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    overview_resampling: str = "nearest"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.cog is None:
            name = self.path.name.lower()
            self.cog = name.endswith(".cog.tif") or name.endswith(".cog.tiff")
        if self.path.suffix.lower() not in (".tif", ".tiff"):
            raise OutputError(
                f"{self.path}: raster outputs are GeoTIFF/COG files.", hint="Use a .tif name (or .cog.tif for a COG)."
            )

    def spec(self) -> dict[str, Any]:
        return {
            "path": str(Path(self.path).resolve()),
            "count": self.count,
            "dtype": self.dtype,
            "nodata": self.nodata,
            "cog": self.cog,
        }


@dataclass
class RunResult:
    outputs: list[Path]
    tiles: int
    tiles_skipped: int
    tiles_resumed: int
    channels: int
    wall_seconds: float
    predict_seconds: float
    read_wait_seconds: float
    finalize_seconds: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["outputs"] = [str(p) for p in self.outputs]
        return d


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


def partial_dir_for(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent / f".{p.name}.rsvl-partial"


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
    ) -> None:
        if batch_size < 1:
            raise PredictorError(f"batch size must be at least 1, got {batch_size}.")
        self.source = source
        self.grid = grid
        self.batch_size = batch_size
        self.start_row = start_row
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
        _drain(self._queue, self._thread)

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
) -> Iterator[TileOutput]:
    """Run ``predict`` over the tiles of ``source`` and yield one :class:`TileOutput` per tile,
    in row-major order: the streaming loop of tasks whose per-tile results are not blended
    rasters (classify per tile, index build, refer, instances).

    ``predict(TileBatch)`` returns one result per tile of the batch it is given (an array
    with a leading batch axis or a sequence); tiles that :func:`tile_keep` rejects are not
    sent and come back with ``result`` None. ``progress(n)`` is called as tiles are done.
    Tiles are read ahead on a background thread (:class:`TileStream`), so reading overlaps
    prediction and memory holds a few batches, never the scene.
    """
    grid = TileGrid(source.width, source.height, tile, overlap)
    with TileStream(source, grid, batch_size=batch_size, prefetch=prefetch, min_valid=min_valid) as stream:
        for batch, keep in stream:
            idx = np.flatnonzero(keep)
            results: list[Any] = [None] * len(batch)
            if len(idx):
                sub = batch if len(idx) == len(batch) else _subset(batch, idx)
                out = predict(sub)
                if len(out) != len(idx):
                    raise PredictorError(
                        f"the predictor returned {len(out)} result(s) for a batch of {len(idx)} tile(s)."
                    )
                for j, i in enumerate(idx):
                    results[i] = out[j]
            for i in range(len(batch)):
                yield TileOutput(batch.positions[i], batch.windows[i], batch.transforms[i], batch.valid[i], results[i])
            if progress is not None:
                progress(len(batch))


class TiledRunner:
    """Run ``predict`` over every tile of ``source`` and write blended outputs.

    Parameters
    ----------
    tile, overlap: tile side and overlap in working-grid pixels.
    batch_size: tiles per predictor call.
    prefetch: batches read ahead by the background reader.
    skip_empty: tiles with no valid pixel are not sent to the predictor.
    settings: recorded in every output's tags (model, prompt, thresholds...) and part of the
        resume key: a run resumes only with identical settings.
    """

    def __init__(
        self,
        source: RasterSource,
        predict: Predictor,
        outputs: Sequence[RasterOutput],
        *,
        tile: int = 512,
        overlap: int = 64,
        batch_size: int = 4,
        prefetch: int = 2,
        skip_empty: bool = True,
        settings: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise PredictorError(f"batch size must be at least 1, got {batch_size}.")
        if not outputs:
            raise OutputError("a tiled run needs at least one output.")
        self.source = source
        self.predict = predict
        self.outputs = list(outputs)
        self.grid = TileGrid(source.width, source.height, tile, overlap)
        self.batch_size = batch_size
        self.prefetch = max(1, prefetch)
        self.skip_empty = skip_empty
        self.user_settings = dict(settings or {})
        self.overwrite = overwrite
        self.resume = resume
        self.progress = progress
        self.weights = blend_weights(tile, overlap)
        names = [str(Path(o.path).resolve()) for o in self.outputs]
        if len(set(names)) != len(names):
            raise OutputError("two outputs of one run have the same path.")
        self.partial = partial_dir_for(self.outputs[0].path)

    # -- settings and resume -------------------------------------------------------------

    def run_settings(self) -> dict[str, Any]:
        return {
            **self.user_settings,
            **self.source.settings(),
            "tile": self.grid.tile,
            "overlap": self.grid.overlap,
            "blend": "raised-cosine",
            "width": self.source.width,
            "height": self.source.height,
            "rsvl_version": __version__,
        }

    def _resume_key(self) -> str:
        st = os.stat(self.source.path) if os.path.exists(self.source.path) else None
        payload = {
            "source": os.path.realpath(self.source.path),
            "size": st.st_size if st else None,
            "mtime": int(st.st_mtime) if st else None,
            "settings": {k: v for k, v in self.run_settings().items() if k != "rsvl_version"},
            "outputs": [o.spec() for o in self.outputs],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _check_outputs(self, resuming: bool) -> None:
        for o in self.outputs:
            p = Path(o.path)
            if not p.parent.exists():
                raise OutputError(f"{p.parent}: output folder does not exist.", hint="Create it first.")
            if p.exists() and not self.overwrite and not resuming:
                raise OutputError(f"{p} exists.", hint="Pass --overwrite to replace it, or choose another name.")
            if not os.access(p.parent, os.W_OK):
                raise OutputError(f"{p.parent}: no permission to write here.")

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        t_start = time.perf_counter()
        key = self._resume_key()
        state = self._load_state(key)
        if self.resume and state is None and all(Path(o.path).exists() for o in self.outputs):
            # Nothing was interrupted: the outputs of this run are already complete.
            return RunResult([Path(o.path) for o in self.outputs], len(self.grid), 0, len(self.grid),
                             0, time.perf_counter() - t_start, 0.0, 0.0, 0.0, self.run_settings())
        self._check_outputs(resuming=state is not None)
        start_row = state["next_row"] if state else 0
        channels = state["channels"] if state else None
        grid = self.grid
        if state and start_row >= grid.n_rows:
            pass  # all tiles done; only the final write remains
        elif not state:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
        self._scratch: list[Scratch] = []
        self.channels = channels
        self._carry: np.ndarray | None = None
        if state and channels is not None:
            self._open_scratch(create=False)
            carry_path = self.partial / "carry.npy"
            if start_row < grid.n_rows and start_row > 0 and grid.overlap > 0:
                self._carry = np.load(carry_path)
        self.stats = {"predict": 0.0, "read_wait": 0.0, "finalize": 0.0, "skipped": 0}
        tiles_resumed = start_row * grid.n_cols
        if self.progress and tiles_resumed:
            self.progress(tiles_resumed)
        if start_row < grid.n_rows:
            self._process(start_row, key)
        t_final = time.perf_counter()
        written = self._write_outputs()
        self.stats["finalize"] += time.perf_counter() - t_final
        shutil.rmtree(self.partial, ignore_errors=True)
        return RunResult(
            outputs=written,
            tiles=len(grid),
            tiles_skipped=int(self.stats["skipped"]),
            tiles_resumed=tiles_resumed,
            channels=int(self.channels or 0),
            wall_seconds=time.perf_counter() - t_start,
            predict_seconds=self.stats["predict"],
            read_wait_seconds=self.stats["read_wait"],
            finalize_seconds=self.stats["finalize"],
            settings=self.run_settings(),
        )

    def _load_state(self, key: str) -> dict[str, Any] | None:
        state_path = self.partial / "state.json"
        if not self.resume:
            return None
        if not state_path.exists():
            return None
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ResumeError(
                f"cannot read the saved state in {self.partial} ({exc}).",
                hint="Run again without --resume to start over.",
            ) from exc
        if state.get("version") != STATE_VERSION or state.get("key") != key:
            raise ResumeError(
                f"the interrupted run in {self.partial} used other settings or another input.",
                hint="Run with the same input, model and options to resume, or without --resume to start over.",
            )
        return state

    def _save_state(self, key: str, next_row: int) -> None:
        for m in self._scratch:
            m.flush()
        if self._carry is not None:
            with atomic_path(self.partial / "carry.npy") as tmp:
                np.save(tmp, self._carry)
        state = {"version": STATE_VERSION, "key": key, "next_row": next_row, "channels": self.channels}
        write_text(self.partial / "state.json", json.dumps(state))

    def _open_scratch(self, create: bool) -> None:
        H, W = self.source.height, self.source.width
        self._scratch = []
        for i, o in enumerate(self.outputs):
            path = self.partial / f"scratch{i}.raw"
            self._scratch.append(Scratch(path, (o.count, H, W), o.dtype, create))

    def _init_channels(self, channels: int) -> None:
        self.channels = channels
        for o in self.outputs:
            if o.finalize is None and o.count != channels:
                raise PredictorError(
                    f"the predictor returns {channels} channel(s) but output {o.path} stores {o.count} "
                    "without a finalize function."
                )
        self._open_scratch(create=True)

    def _process(self, start_row: int, key: str) -> None:
        """Three stages in flight at once: the reader thread reads and converts windows,
        this thread runs the predictor, the blender thread blends, finalises and writes."""
        blend_q: queue.Queue[Any] = queue.Queue(maxsize=2)
        stop = threading.Event()
        blend_error: list[BaseException] = []
        blender = threading.Thread(
            target=self._blend_loop, args=(key, blend_q, stop, blend_error), name="rsvl-tile-blender", daemon=True
        )
        stream = TileStream(self.source, self.grid, batch_size=self.batch_size, prefetch=self.prefetch,
                            start_row=start_row, min_valid=0.0 if self.skip_empty else None)
        blender.start()
        try:
            try:
                with stream:
                    for batch, keep in stream:
                        if blend_error:
                            raise blend_error[0]
                        preds = self._run_predictor(batch, keep)
                        _put(blend_q, (batch, preds), stop, lambda: bool(blend_error))
            except BaseException:
                # Interrupted (predictor error, Ctrl-C): let the blender write and checkpoint
                # what was already predicted, so a resume redoes as little as possible.
                if blender.is_alive() and not blend_error:
                    _put(blend_q, None, stop, lambda: bool(blend_error))
                    blender.join()
                raise
            finally:
                self.stats["read_wait"] += stream.read_wait
            _put(blend_q, None, stop, lambda: bool(blend_error))
            blender.join()
            if blend_error:
                raise blend_error[0]
        finally:
            stop.set()
            # Unblock the blender if it waits on a full queue, then let it finish.
            _drain(blend_q, blender)

    def _blend_loop(self, key: str, inbox: queue.Queue[Any], stop: threading.Event, errors: list[BaseException]) -> None:
        try:
            grid = self.grid
            T, O, S = grid.tile, grid.overlap, grid.stride
            width_padded = (grid.n_cols - 1) * S + T
            vcarry = None
            h_consumed = 0
            while not stop.is_set():
                try:
                    item = inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    return
                batch, preds = item
                for i, (r, c) in enumerate(batch.positions):
                    if c == 0:
                        h_consumed = 0
                    C = self.channels
                    assert C is not None
                    if self._carry is None and O > 0 and grid.n_rows > 1:
                        self._carry = np.zeros((C + 2, O, width_padded), dtype=np.float32)
                    local = np.zeros((C + 2, T, T), dtype=np.float32)
                    pred = preds[i]
                    if pred is not None:
                        np.multiply(pred, self.weights, out=local[:C])
                        local[C] = self.weights
                        local[C + 1] = batch.valid[i]
                    if c > 0 and O > 0 and vcarry is not None:
                        local[:, :, :O] += vcarry
                    x = c * S
                    if r > 0 and O > 0 and self._carry is not None:
                        a, b = max(h_consumed, x), x + T
                        if b > a:
                            local[:, :O, a - x :] += self._carry[:, :, a:b]
                        h_consumed = max(h_consumed, b)
                    last_row, last_col = r == grid.n_rows - 1, c == grid.n_cols - 1
                    rows_final = T if last_row else S
                    cols_final = T if last_col else S
                    t1 = time.perf_counter()
                    self._emit_block(local[:, :rows_final, :cols_final], r * S, x)
                    self.stats["finalize"] += time.perf_counter() - t1
                    if not last_row and O > 0 and self._carry is not None:
                        self._carry[:, :, x : x + cols_final] = local[:, S:T, :cols_final]
                    if not last_col and O > 0:
                        vcarry = local[:, :, S:T].copy()
                    if last_col:
                        self._save_state(key, r + 1)
                    if self.progress:
                        self.progress(1)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    def _run_predictor(self, batch: TileBatch, keep: np.ndarray) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(batch)
        idx = np.flatnonzero(keep)
        self.stats["skipped"] += len(batch) - len(idx)
        if len(idx) == 0:
            if self.channels is None:
                # Nothing valid seen yet: the channel count is still unknown. Ask the
                # predictor anyway so the output layout is fixed.
                idx = np.arange(len(batch))
            else:
                return out
        sub = batch if len(idx) == len(batch) else _subset(batch, idx)
        t0 = time.perf_counter()
        result = self.predict(sub)
        self.stats["predict"] += time.perf_counter() - t0
        arr = _as_array(result)
        T = self.grid.tile
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4 or arr.shape[0] != len(idx) or arr.shape[2:] != (T, T):
            raise PredictorError(
                f"the predictor returned an array of shape {tuple(arr.shape)}; expected "
                f"({len(idx)}, C, {T}, {T}) or ({len(idx)}, {T}, {T}) for a batch of {len(idx)} tiles of {T} px."
            )
        if self.channels is None:
            self._init_channels(int(arr.shape[1]))
        elif arr.shape[1] != self.channels:
            raise PredictorError(
                f"the predictor returned {arr.shape[1]} channels after returning {self.channels} before."
            )
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise PredictorError("the predictor returned NaN or infinite values.")
        for j, i in enumerate(idx):
            out[i] = arr[j]
        return out

    def _emit_block(self, block: np.ndarray, y: int, x: int) -> None:
        C = self.channels
        assert C is not None
        H, W = self.source.height, self.source.width
        h = min(block.shape[1], H - y)
        w = min(block.shape[2], W - x)
        if h <= 0 or w <= 0:
            return
        block = block[:, :h, :w]
        wsum = block[C]
        valid = block[C + 1] > 0
        values = block[:C] / np.maximum(wsum, 1e-12)
        for o, m in zip(self.outputs, self._scratch, strict=True):
            data = o.finalize(values, valid) if o.finalize is not None else values
            data = np.asarray(data)
            if data.ndim == 2:
                data = data[None]
            if data.shape != (o.count, h, w):
                raise PredictorError(
                    f"finalize for {o.path} returned shape {data.shape}, expected {(o.count, h, w)}."
                )
            data = data.astype(o.dtype, copy=False)
            if o.nodata is not None and not valid.all():
                data = data.copy()
                data[:, ~valid] = o.nodata
            m.write(y, x, data)

    # -- final write --------------------------------------------------------------------------

    def _write_outputs(self) -> list[Path]:
        written = []
        settings = self.run_settings()
        staged: list[tuple[Path, Path]] = []
        for i, (o, m) in enumerate(zip(self.outputs, self._scratch, strict=True)):
            tmp = self.partial / f"final{i}.tif"
            write_geotiff_from_array(
                m,
                tmp,
                crs=self.source.crs,
                transform=self.source.transform,
                nodata=o.nodata,
                compress=o.compress,
                cog=bool(o.cog),
                tags={"rsvl_settings": json.dumps(settings, sort_keys=True), **o.tags},
                descriptions=o.descriptions,
                colormap=o.colormap,
                overview_resampling=o.overview_resampling,
                work_dir=self.partial,
            )
            staged.append((tmp, Path(o.path)))
        for m in self._scratch:
            m.close()
        # Everything is complete: only now do the final names appear.
        for tmp, final in staged:
            os.replace(tmp, final)
            written.append(final)
        self._scratch = []
        return written


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event, failed: Callable[[], bool]) -> None:
    """Put with a timeout loop, so a failure elsewhere never leaves a thread blocked."""
    while not stop.is_set() and not failed():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue[Any], thread: threading.Thread) -> None:
    """Empty ``q`` until ``thread`` (blocked on putting into it) has finished."""
    while thread.is_alive():
        try:
            q.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=0.05)


def _subset(batch: TileBatch, idx: np.ndarray) -> TileBatch:
    return TileBatch(
        batch.images[idx],
        batch.valid[idx],
        [batch.windows[i] for i in idx],
        [batch.transforms[i] for i in idx],
        [batch.positions[i] for i in idx],
    )


def _as_array(result: Any) -> np.ndarray:
    if hasattr(result, "detach"):  # a torch tensor, without importing torch here
        result = result.detach().float().cpu().numpy()
    return np.asarray(result)


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
