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
temporary name and renamed into place. After each tile row the scratch is flushed and a
checkpoint is saved: one file (``checkpoint.npz``: next row, resume key and the carried
overlap together, written under a temporary name and renamed), so a kill at any moment
leaves the previous checkpoint or the new one, never a position with another row's carry;
an interrupted run resumes where it stopped. ``--resume`` always compares the run's key
(input, settings, outputs) with the checkpoint's, or, when nothing was interrupted, with the
key recorded in the finished outputs' tags.

One run at a time per output: the run holds an ``flock`` on ``.NAME.rsvl-lock`` beside the
partial folder (released by the kernel however the holder dies), and a second run is told
who holds it instead of deleting the first run's work. Outputs that resolve to a file the
run reads (the source, its sidecars, a VRT's rasters) are refused.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from rsvl import __version__
from rsvl.errors import OutputError, PredictorError, ResumeError
from rsvl.geo.raster import RasterSource, source_files
from rsvl.geo.stream import (
    Predictor,
    TileBatch,
    TileStream,
    drain,
    release_freed_memory,
    subset_batch,
)
from rsvl.geo.tiles import TileGrid, blend_weights, check_tiling
from rsvl.geo.writer import Scratch, write_geotiff_from_array
from rsvl.io import OutputLock, atomic_path, refuse_inputs_as_outputs

#: version 2: the checkpoint is one file (state and carry together, one atomic rename)
STATE_VERSION = 2
#: the one checkpoint file in the partial folder
CHECKPOINT = "checkpoint.npz"
#: output tag holding the resume key of the run that wrote the output
KEY_TAG = "rsvl_resume_key"


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


def partial_dir_for(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent / f".{p.name}.rsvl-partial"


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
        check_tiling(tile, overlap, batch_size)
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
        refuse_inputs_as_outputs([o.path for o in self.outputs], source_files(source.path)
                                 if os.path.exists(source.path) else [])
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
        for o in self.outputs:
            if not Path(o.path).parent.exists():
                raise OutputError(f"{Path(o.path).parent}: output folder does not exist.", hint="Create it first.")
        with OutputLock(self.outputs[0].path):
            return self._run_locked()

    def _complete_outputs_match(self, key: str) -> bool:
        """With --resume and nothing interrupted: True when every output exists and was
        written by a run with this very key; a ResumeError when one was not (other
        settings, other input, or written before keys were recorded)."""
        if not all(Path(o.path).exists() for o in self.outputs):
            return False
        for o in self.outputs:
            try:
                with rasterio.open(o.path) as ds:
                    found = ds.tags().get(KEY_TAG)
            except rasterio.errors.RasterioIOError:
                found = None
            if found != key:
                raise ResumeError(
                    f"{o.path} exists but was not written by a run with these settings and this input; "
                    "there is nothing to resume.",
                    hint="Pass --overwrite to replace it with a new run, or choose another output name.",
                )
        return True

    def _run_locked(self) -> RunResult:
        t_start = time.perf_counter()
        key = self._key = self._resume_key()
        state = self._load_state(key)
        if self.resume and state is None and self._complete_outputs_match(key):
            # Nothing was interrupted: the outputs of this very run are already complete.
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
            if start_row < grid.n_rows and start_row > 0 and grid.overlap > 0:
                self._carry = state["carry"]
                if self._carry is None:
                    raise ResumeError(f"the saved state in {self.partial} has no carried overlap.",
                                      hint="Run again without --resume to start over.")
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
        """The checkpoint: one file holding the position, the key and the carried overlap
        together, so what it says and the carry it holds always belong to one tile row."""
        ckpt = self.partial / CHECKPOINT
        if not self.resume:
            return None
        if not ckpt.exists():
            if (self.partial / "state.json").exists():
                raise ResumeError(
                    f"the interrupted run in {self.partial} was saved by an older rsvl and cannot be resumed safely.",
                    hint="Run again without --resume (add --overwrite if outputs exist) to start over.",
                )
            return None
        try:
            with np.load(ckpt, allow_pickle=False) as z:
                state = json.loads(str(z["state"]))
                state["carry"] = np.array(z["carry"]) if "carry" in z.files else None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
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
        state = {"version": STATE_VERSION, "key": key, "next_row": next_row, "channels": self.channels}
        arrays: dict[str, np.ndarray] = {"state": np.array(json.dumps(state))}
        if self._carry is not None:
            arrays["carry"] = self._carry
        # One file, one rename: a kill leaves either the previous checkpoint or this one.
        with atomic_path(self.partial / CHECKPOINT) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

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
            drain(blend_q, blender)

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
        sub = batch if len(idx) == len(batch) else subset_batch(batch, idx)
        t0 = time.perf_counter()
        result = self.predict(sub)
        self.stats["predict"] += time.perf_counter() - t0
        release_freed_memory()  # the predictor's freed activations: back to the OS
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
                tags={"rsvl_settings": json.dumps(settings, sort_keys=True), KEY_TAG: self._key, **o.tags},
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


def _as_array(result: Any) -> np.ndarray:
    if hasattr(result, "detach"):  # a torch tensor, without importing torch here
        result = result.detach().float().cpu().numpy()
    return np.asarray(result)

