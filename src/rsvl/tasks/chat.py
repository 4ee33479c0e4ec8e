"""Chat about an image or a georeferenced raster of any size: ``rsvl chat``.

Works with any :class:`rsvl.models.chat.ChatModel` (VHM, GeoChat, mini-chat).

* An image file (no CRS) or an in-memory array (H, W, 3): one ``model.chat`` call on the
  whole image. The result holds the answer text, its boxes in pixel coordinates of the
  image (x right, y down) and, by the question's kind, the number or yes/no it gives.
* A georeferenced raster (or any file with an explicit ``tile``): windows of the model's
  ``image_size`` (or ``tile``) pixels, at the model's training GSD (``model.preferred_gsd``;
  ``gsd`` overrides it, 0 keeps the native resolution, the same rules and resampling line
  as the other raster tasks), streamed through the read-ahead loop of the tiled runner
  (:func:`rsvl.geo.stream.map_tiles`); the question is asked once per window (windows
  without a valid pixel are skipped) and the model sees the part of the window inside the
  raster. The answers are then combined by the question's kind
  (:func:`rsvl.tasks.chat_answers.question_kind`):

  - ``count``: the windows' counts are summed. When windows overlap and the answers carry
    boxes, every box goes to map coordinates and boxes of different windows with IoU >=
    ``iou`` count once (a window that gave a number but no boxes adds its number). Without
    boxes, each window's count is weighted by its *core* share: the fraction of its valid
    pixels that no nearer window owns (the overlaps are split down the middle), so an
    object in an overlap is counted once on average; the sum is rounded.
  - ``yesno``: any-yes; the windows that said yes are listed.
  - ``grounding``: every box in map coordinates (the window's transform), grouped across
    overlaps by IoU (``group``), written as GeoPackage / GeoJSON / GeoParquet with window
    id, label and answer.
  - ``describe`` / ``other``: one answer per window with the window's bounds in map
    coordinates, nothing merged.

  ``ChatResult.combined`` says in one line how the answer was combined.

Boxes are the model's axis-aligned boxes (fractions of the array it saw) taken through the
window's transform; an oriented box's angle (GeoChat's ``|θ``) is kept as an attribute,
not applied to the geometry.

``out`` (optional): ``.gpkg`` / ``.geojson`` / ``.parquet`` writes the boxes (grounding,
and counts that carry boxes) or else the windows as polygons with their answers; ``.csv``
writes one row per window. Every file is written under a temporary name and renamed when
complete; an input is never an output; an existing file needs ``overwrite``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine
from rasterio.windows import Window

from rsvl.console import TaskProgress, progress_scope, state
from rsvl.errors import BandSelectionError, InputNotFoundError, OutputError, PromptError
from rsvl.geo.raster import RasterSource
from rsvl.geo.stream import TileBatch, map_tiles
from rsvl.geo.tiles import TileGrid, check_gsd, check_tiling
from rsvl.geo.vectors import boxes_to_polygons, write_vectors
from rsvl.io import write_text
from rsvl.models.chat import TASK_KINDS, ChatAnswer, ChatModel
from rsvl.tasks.chat_answers import dedupe_boxes, parse_number, parse_yesno, question_kind
from rsvl.tasks.sources import announce_resampling, check_outputs, is_georeferenced

__all__ = [
    "OUTPUT_SUFFIXES",
    "ChatResult",
    "ChatSession",
    "chat",
    "check_generation",
    "check_iou",
    "check_output",
    "check_question",
]

#: what ``out`` may be: vectors (boxes or windows) or a CSV table of the windows
OUTPUT_SUFFIXES = (".gpkg", ".geojson", ".json", ".parquet", ".csv")

#: a history: earlier (question, answer) turns; for a raster optionally one per window id
History = Sequence[tuple[str, str]] | Mapping[int, Sequence[tuple[str, str]]]


@dataclass
class ChatResult:
    """The answer to one question about an image or raster."""

    question: str
    #: count | yesno | grounding | describe | other (see rsvl.tasks.chat_answers)
    kind: str
    #: the answer: the model's text for an image; the combined answer for a raster
    answer: str
    #: one line: how the answer was combined (e.g. "summed over 12 windows, ...")
    combined: str
    #: the count (count questions), None when no answer gave a number
    number: int | float | None = None
    #: yes / no (yes-no questions), None when no answer said either
    yes: bool | None = None
    #: boxes: pixel coordinates of an image, or map coordinates (the CRS's units) of a raster
    boxes: list[dict[str, Any]] = field(default_factory=list)
    #: one entry per window of a raster (empty for an image)
    windows: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_question(question: str | None) -> str:
    """The question with its whitespace collapsed; a PromptError when it is empty."""
    if question is None or not str(question).strip():
        raise PromptError("the question is empty.", hint='Ask something, e.g. "How many airplanes are there?".')
    return " ".join(str(question).split())


def check_generation(max_new_tokens: int, temperature: float, task: str | None = None) -> None:
    """Refuse generation settings no model can use, before anything is read or loaded."""
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens must be a whole number >= 1, got {max_new_tokens}.",
                          hint="E.g. --max-new-tokens 256.")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise PromptError(f"--temperature must be >= 0, got {temperature}.",
                          hint="0 is greedy decoding (the same answer every time).")
    if task is not None and task not in TASK_KINDS:
        raise PromptError(f"unknown task kind {task!r}.", hint=f"Use one of {', '.join(TASK_KINDS)}.")


def check_iou(iou: float) -> None:
    """Refuse an ``iou`` (boxes of two windows this similar are one object) outside (0, 1]."""
    if not 0.0 < float(iou) <= 1.0:
        raise PromptError(f"--iou must be in (0, 1], got {iou}.", hint="The default 0.5 is the usual choice.")


def check_output(out: str | os.PathLike[str] | None, sources: Sequence[str | os.PathLike[str]] = (), *,
                 overwrite: bool = False) -> Path | None:
    """``out`` as a Path after the checks every output gets: a known suffix, an existing
    folder, not one of the files the run reads, not an existing file without ``overwrite``."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"{path}: unknown output format {path.suffix or '(no suffix)'}.",
                          hint="Use .gpkg, .geojson or .parquet (boxes or windows as vectors), or .csv (a table).")
    if not path.parent.exists():
        raise OutputError(f"{path.parent}: output folder does not exist.", hint="Create it first.")
    check_outputs([path], [s for s in sources if s is not None])
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists.", hint="Pass --overwrite to replace it, or choose another name.")
    return path


def as_rgb(image: Any) -> np.ndarray:
    """An in-memory image as a contiguous (H, W, 3) uint8 array: (H, W, 3), (3, H, W),
    (H, W) grey or a PIL image; a BandSelectionError for anything else."""
    a = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = a[:3].transpose(1, 2, 0)
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise BandSelectionError(f"the image has shape {a.shape}, not (H, W, 3).",
                                 hint="Pass an RGB array; select three bands of multispectral data first.")
    if a.dtype != np.uint8:
        raise BandSelectionError(f"the image is {a.dtype}, not uint8.",
                                 hint="Scale it to 0-255 uint8 first, or pass a file path and let rsvl stretch it.")
    return np.ascontiguousarray(a)


def _default_gsd(model: Any, georeferenced: bool) -> float | None:
    """The model's training resolution when the raster has a CRS to resample with."""
    preferred = getattr(model, "preferred_gsd", None)
    return float(preferred) if preferred is not None and georeferenced else None


def _turns(history: History | None, window: int | None) -> list[tuple[str, str]]:
    if not history:
        return []
    if isinstance(history, Mapping):
        return [tuple(t) for t in history.get(window, ())] if window is not None else []
    return [tuple(t) for t in history]


def chat(
    model: ChatModel,
    source: str | os.PathLike[str] | Any,
    question: str,
    *,
    history: History | None = (),
    out: str | os.PathLike[str] | None = None,
    gsd: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    bands: Sequence[int] | None = None,
    iou: float = 0.5,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    task: str | None = None,
    overwrite: bool = False,
    progress: TaskProgress | None = None,
    model_name: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> ChatResult:
    """Ask ``question`` about ``source`` (an image or raster path, or an (H, W, 3) array).

    ``history``: earlier (question, answer) turns; for a raster also a mapping window id ->
    turns (what :class:`ChatSession` keeps). ``tile`` / ``overlap``: window size and overlap
    in pixels (default: the model's ``image_size`` and an eighth of it: every window is one
    generation, seconds each). ``gsd``: None the model's training GSD (refused above 4x
    upsampling), 0 native, else metres per pixel. ``iou``: boxes of two windows at least
    this similar are one object. ``on_text`` streams the answer of a single image.
    ``progress`` (:class:`rsvl.console.TaskProgress`) is told the number of windows.
    """
    t0 = time.perf_counter()
    question = check_question(question)
    check_generation(max_new_tokens, temperature, task)
    check_iou(iou)
    gsd = check_gsd(gsd)
    if tile is not None:
        check_tiling(tile, overlap if overlap is not None else 0)
    kind = question_kind(question)
    name = model_name or getattr(model, "name", type(model).__name__)
    ask = {"task": task, "max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}
    settings: dict[str, Any] = {"task": "chat", "model": name, "question": question, "kind": kind,
                                "chat_task": task, "max_new_tokens": int(max_new_tokens),
                                "temperature": float(temperature)}

    if not isinstance(source, (str, os.PathLike)):  # an in-memory image
        out_path = check_output(out, overwrite=overwrite)
        rgb = as_rgb(source)
        result = _ask_image(model, rgb, question, kind, _turns(history, None), ask, settings, on_text)
        settings.update({"source": None, "width": rgb.shape[1], "height": rgb.shape[0], "windowed": False})
        return _finish(result, out_path, None, overwrite, t0)

    path = Path(source)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file.", hint="Check the path of the image or raster.")
    if path.is_dir():
        raise InputNotFoundError(f"{path} is a folder.", hint="Ask about one image or raster at a time.")
    out_path = check_output(out, [path], overwrite=overwrite)
    georef = is_georeferenced(path)
    windowed = georef or tile is not None
    default_gsd = gsd is None
    target = _default_gsd(model, georef) if gsd is None else (gsd or None)
    with RasterSource(path, bands=bands, target_gsd=target) as src:
        for w in src.warnings if windowed else ():
            state.warn(w)
        settings.update({"source": str(path.resolve()), "crs": src.crs.to_string() if georef else None,
                         "width": src.width, "height": src.height, "windowed": windowed, **src.settings()})
        if not windowed:
            rgb, _ = src.read(Window(0, 0, src.width, src.height))
            with progress_scope(progress, 1) as advance:
                result = _ask_image(model, np.ascontiguousarray(rgb.transpose(1, 2, 0)), question, kind,
                                    _turns(history, None), ask, settings, on_text)
                advance(1)
            return _finish(result, out_path, None, overwrite, t0)
        size = int(tile) if tile is not None else int(model.image_size)
        ov = int(overlap) if overlap is not None else size // 8
        check_tiling(size, ov, 1)
        settings.update({"tile": size, "overlap": ov, "iou": iou})
        n = announce_resampling(src, size, ov, default=default_gsd and target is not None)
        grid = TileGrid(src.width, src.height, size, ov)
        windows = _ask_windows(model, src, grid, question, history, ask, progress, n)
        result, geoms = _combine(windows, question, kind, iou=iou, crs=src.crs if georef else None,
                                 settings=settings)
        return _finish(result, out_path, src.crs if georef else None, overwrite, t0, geoms)


def _ask_image(model: ChatModel, rgb: np.ndarray, question: str, kind: str, history: list[tuple[str, str]],
               ask: dict[str, Any], settings: dict[str, Any], on_text: Callable[[str], None] | None) -> ChatResult:
    ans = model.chat(rgb, question, history=history, on_text=on_text, **ask)
    h, w = rgb.shape[:2]
    boxes = [{"x1": b.x1 * w, "y1": b.y1 * h, "x2": b.x2 * w, "y2": b.y2 * h, "angle": b.angle, "label": b.label}
             for b in ans.boxes]
    number = parse_number(ans.text) if kind == "count" else None
    yes = parse_yesno(ans.text) if kind == "yesno" else None
    if kind == "count" and number is None and boxes:
        number = len(boxes)
    settings["tokens"] = {"prompt": ans.prompt_tokens, "new": ans.new_tokens,
                          "first_token_s": round(ans.first_token_s, 4), "total_s": round(ans.total_s, 4)}
    return ChatResult(question, kind, ans.text, "one answer for the whole image", number, yes, boxes,
                      settings=settings)


@dataclass
class _Window:
    """One window's answer, with what the combination needs."""

    id: int
    row: int
    col: int
    transform: Affine  # of the window's pixel (0, 0) in the working grid
    width: int  # pixels inside the raster
    height: int
    core: float  # share of its valid pixels no other window owns
    answer: ChatAnswer

    def footprint(self) -> Any:
        return boxes_to_polygons([(0, 0, self.width, self.height)], self.transform)[0]

    def box_polygons(self) -> list[Any]:
        """The answer's boxes (fractions of the window the model saw) in map coordinates."""
        px = [(b.x1 * self.width, b.y1 * self.height, b.x2 * self.width, b.y2 * self.height)
              for b in self.answer.boxes]
        return boxes_to_polygons(px, self.transform) if px else []


def _core_share(grid: TileGrid, row: int, col: int, valid: np.ndarray, width: int, height: int) -> float:
    """The fraction of a window's valid pixels in its core: overlaps split down the middle."""
    s, half = grid.stride, grid.overlap // 2

    def span(i: int, n: int, size: int) -> slice:
        start = 0 if i == 0 else i * s + half
        stop = size if i == n - 1 else (i + 1) * s + half
        return slice(start - i * s, stop - i * s)

    v = valid[:height, :width]
    total = int(v.sum())
    if total == 0:
        return 0.0
    core = v[span(row, grid.n_rows, grid.height), span(col, grid.n_cols, grid.width)]
    return float(core.sum()) / total


def _ask_windows(model: ChatModel, src: RasterSource, grid: TileGrid, question: str, history: History | None,
                 ask: dict[str, Any], progress: TaskProgress | None, n: int) -> list[_Window]:
    """Ask the question once per window with a valid pixel, streaming the windows."""

    def predict(batch: TileBatch) -> list[ChatAnswer]:
        answers = []
        for img, win, (r, c) in zip(batch.images, batch.windows, batch.positions, strict=True):
            h = min(grid.tile, src.height - int(win.row_off))
            w = min(grid.tile, src.width - int(win.col_off))
            rgb = np.ascontiguousarray(img[:, :h, :w].transpose(1, 2, 0))
            answers.append(model.chat(rgb, question, history=_turns(history, r * grid.n_cols + c), **ask))
        return answers

    out: list[_Window] = []
    with progress_scope(progress, n) as advance:
        for t in map_tiles(src, predict, tile=grid.tile, overlap=grid.overlap, batch_size=1, min_valid=0.0,
                           progress=advance):
            if not t.predicted:  # no valid pixel: not asked
                continue
            r, c = t.position
            h = min(grid.tile, src.height - int(t.window.row_off))
            w = min(grid.tile, src.width - int(t.window.col_off))
            out.append(_Window(r * grid.n_cols + c, r, c, t.transform, w, h,
                               _core_share(grid, r, c, t.valid, w, h), t.result))
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('x') else 's'}"


def _ids(ws: Sequence[_Window]) -> str:
    shown = ", ".join(str(w.id) for w in ws[:10])
    return shown + (f" and {len(ws) - 10} more" if len(ws) > 10 else "")


def _combine(windows: list[_Window], question: str, kind: str, *, iou: float, crs: Any,
             settings: dict[str, Any]) -> tuple[ChatResult, dict[str, list[Any]]]:
    """The combined answer of the windows for the question's kind (see the module doc), and
    the box and window polygons in map coordinates (for the vector output)."""
    n = len(windows)
    if n == 0:
        settings["windows_asked"] = 0
        return ChatResult(question, kind, "no answer: no window has a valid pixel",
                          "no window of the raster has a valid pixel (all nodata)", settings=settings), \
            {"boxes": [], "windows": []}
    overlap = int(settings.get("overlap") or 0)
    numbers = {w.id: parse_number(w.answer.text) for w in windows} if kind == "count" else {}
    yeses = {w.id: parse_yesno(w.answer.text) for w in windows} if kind == "yesno" else {}
    boxes: list[dict[str, Any]] = []
    geoms: list[Any] = []
    for w in windows:
        for b, g in zip(w.answer.boxes, w.box_polygons(), strict=True):
            geoms.append(g)
            minx, miny, maxx, maxy = g.bounds
            boxes.append({"window": w.id, "x1": minx, "y1": miny, "x2": maxx, "y2": maxy, "angle": b.angle,
                          "label": b.label, "answer": w.answer.text})
    groups = dedupe_boxes(geoms, [b["window"] for b in boxes], iou=iou)
    for b, g in zip(boxes, groups, strict=True):
        b["group"] = g
    distinct = max(groups) + 1 if groups else 0
    number: int | float | None = None
    yes: bool | None = None
    if kind == "count":
        boxed = [w for w in windows if w.answer.boxes]
        unparsed = [w for w in windows if numbers[w.id] is None and not w.answer.boxes]
        if overlap > 0 and boxed:
            extra = [w for w in windows if not w.answer.boxes and numbers[w.id]]
            number = distinct + sum(numbers[w.id] for w in extra)
            combined = (f"summed over {_plural(n, 'window')}, {_plural(len(boxes) - distinct, 'duplicate')} "
                        f"across overlaps removed by box IoU >= {iou:g}")
            if extra:
                combined += f"; {_plural(len(extra), 'window')} gave a number without boxes (added as is)"
        elif overlap > 0:
            raw = sum(numbers[w.id] * w.core for w in windows if numbers[w.id] is not None)
            number = int(round(raw))
            combined = (f"summed over {_plural(n, 'window')} using only each window's core (overlaps split "
                        f"down the middle; the answers carry no boxes): {raw:.3g} -> {number}")
        else:
            number = sum(numbers[w.id] if numbers[w.id] is not None else len(w.answer.boxes) for w in windows)
            combined = f"summed over {_plural(n, 'window')} (no overlap)"
        if unparsed:
            combined += f"; {_plural(len(unparsed), 'answer')} without a number ignored (windows {_ids(unparsed)})"
        if all(numbers[w.id] is None for w in windows) and not boxes:
            number = None
        answer = str(number) if number is not None else "no count in the answers"
    elif kind == "yesno":
        said = [w for w in windows if yeses[w.id]]
        known = [w for w in windows if yeses[w.id] is not None]
        yes = True if said else (False if known else None)
        answer = {True: "yes", False: "no", None: "unknown"}[yes]
        combined = f"any-yes over {_plural(n, 'window')}: "
        combined += f"{len(said)} said yes (windows {_ids(said)})" if said else "none said yes"
        if len(known) < n:
            combined += f"; {_plural(n - len(known), 'answer')} said neither"
    elif kind == "grounding":
        hit = len({b["window"] for b in boxes})
        answer = f"{_plural(len(boxes), 'box')} in {hit} of {_plural(n, 'window')}"
        where = f"map coordinates ({crs.to_string()})" if crs is not None else "pixel coordinates"
        combined = (f"boxes of {_plural(n, 'window')} in {where}; {distinct} distinct after grouping "
                    f"across overlaps by box IoU >= {iou:g}")
    else:
        answer = windows[0].answer.text if n == 1 else "\n".join(f"[window {w.id}] {w.answer.text}" for w in windows)
        combined = f"one answer per window ({_plural(n, 'window')}), not merged"
    rows = []
    for w in windows:
        minx, miny, maxx, maxy = w.footprint().bounds
        rows.append({"window": w.id, "row": w.row, "col": w.col, "minx": minx, "miny": miny, "maxx": maxx,
                     "maxy": maxy, "answer": w.answer.text, "number": numbers.get(w.id),
                     "yes": yeses.get(w.id), "boxes": len(w.answer.boxes), "core": round(w.core, 4)})
    settings["tokens"] = {"prompt": sum(w.answer.prompt_tokens for w in windows),
                          "new": sum(w.answer.new_tokens for w in windows),
                          "total_s": round(sum(w.answer.total_s for w in windows), 4)}
    result = ChatResult(question, kind, answer, combined, number, yes, boxes, rows, settings=settings)
    result.settings["windows_asked"] = n
    return result, {"boxes": geoms, "windows": [w.footprint() for w in windows]}


def _finish(result: ChatResult, out: Path | None, crs: Any, overwrite: bool, t0: float,
            geoms: dict[str, list[Any]] | None = None) -> ChatResult:
    if out is not None:
        _write(result, out, crs, overwrite, geoms)
        result.outputs["table" if out.suffix.lower() == ".csv" else "vectors"] = str(out)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _write(result: ChatResult, out: Path, crs: Any, overwrite: bool, geoms: dict[str, list[Any]] | None) -> None:
    """Boxes or windows as vectors, or the windows as a CSV table (see the module doc).
    ``geoms``: the polygons of a raster's boxes and windows (exact also under a rotated
    transform); an image's boxes are pixel rectangles."""
    model = result.settings.get("model")
    if out.suffix.lower() == ".csv":
        rows = result.windows or [{"window": 0, "answer": result.answer, "number": result.number,
                                   "yes": result.yes, "boxes": len(result.boxes)}]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*rows[0].keys(), "question", "model"], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "question": result.question, "model": model})
        write_text(out, buf.getvalue())
        return
    use_boxes = not result.windows or result.kind == "grounding" or (result.kind == "count" and bool(result.boxes))
    if use_boxes:
        records = [{"window": b.get("window", 0), "label": b["label"], "angle": b["angle"],
                    "group": b.get("group", i), "answer": b.get("answer", result.answer),
                    "question": result.question, "model": model,
                    "geometry": geoms["boxes"][i] if geoms else shapely.box(b["x1"], b["y1"], b["x2"], b["y2"])}
                   for i, b in enumerate(result.boxes)]
        columns = ["window", "label", "angle", "group", "answer", "question", "model", "geometry"]
    else:
        records = [{**{k: r[k] for k in ("window", "row", "col", "answer", "number", "yes", "boxes")},
                    "question": result.question, "model": model,
                    "geometry": geoms["windows"][i] if geoms else shapely.box(r["minx"], r["miny"], r["maxx"], r["maxy"])}
                   for i, r in enumerate(result.windows)]
        columns = ["window", "row", "col", "answer", "number", "yes", "boxes", "question", "model", "geometry"]
    gdf = gpd.GeoDataFrame(records, columns=columns, geometry="geometry", crs=crs)
    with warnings.catch_warnings():  # plain images: pixel coordinates, no CRS on purpose
        warnings.filterwarnings("ignore", message=".*crs.*was not provided", category=UserWarning)
        write_vectors(gdf, out, overwrite=overwrite)


class ChatSession:
    """A conversation about one image or raster: each :meth:`ask` sees the earlier turns.

    For an image the history is the list of (question, answer) turns; for a raster each
    window keeps its own turns (its earlier questions and *its* answers), since the model
    only ever saw that window. Options are those of :func:`chat`.
    """

    def __init__(self, model: ChatModel, source: Any, **options: Any) -> None:
        self.model = model
        self.source = source
        self.options = options
        self.turns: list[tuple[str, str]] = []
        self.window_turns: dict[int, list[tuple[str, str]]] = {}
        self.results: list[ChatResult] = []

    def ask(self, question: str) -> ChatResult:
        history: History = self.window_turns if self.window_turns else self.turns
        result = chat(self.model, self.source, question, history=history, **self.options)
        if result.windows:
            for w in result.windows:
                self.window_turns.setdefault(w["window"], []).append((result.question, w["answer"]))
        self.turns.append((result.question, result.answer))
        self.results.append(result)
        return result
