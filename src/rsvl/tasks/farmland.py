"""Language-guided segmentation of rasters of any size (FSVLM, LISA, mini-fsvlm).

"This is a 1 m image of irrigated fields in late summer. Please segment the farmland." ->
a mask of the farmland over the whole raster. Works with any
:class:`rsvl.models.segchat.SegChatModel`.

The raster goes through the tiled runner in windows of the model's ``image_size``: every
window gets the same request, with the answer teacher-forced to ``"[SEG]."`` (LISA's
validation protocol: one forward pass of the language model per window instead of a
generation). The model's own answer is generated once, on the first window with valid
pixels, and recorded in the outputs' tags; when that answer has no ``[SEG]`` the run says so
(the model did not read the request as a segmentation request) and goes on with the forced
one. The sigmoid of the mask logits is blended across overlapping windows; ``> threshold``
(0.5 = logit 0, upstream's rule) is the class raster.

Outputs, named from the prefix ``out``: ``PREFIX_classes.tif`` (uint8 0 background / 1 the
requested class, colour table, request/answer/model in tags; nodata 255),
``PREFIX_probability.tif`` (uint8, probability x 254), ``PREFIX_classes.gpkg`` (one polygon
per region of the requested class with its score = mean probability, area in m² and
hectares when the CRS is projected), ``PREFIX_overlay.png``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from rsvl.console import TaskProgress, progress_scope, state
from rsvl.errors import OutputError, PromptError
from rsvl.geo.raster import RasterSource
from rsvl.geo.runner import RasterOutput, TiledRunner
from rsvl.geo.stream import TileBatch
from rsvl.geo.tiles import check_gsd, check_tiling
from rsvl.geo.vectors import polygonize_raster, write_vectors
from rsvl.tasks.render import colormap_for, overlay_png, preview_arrays
from rsvl.tasks.segment import NODATA, POLYGONIZE_STRIP_PIXELS, class_counts
from rsvl.tasks.sources import announce_resampling, check_outputs, check_to_crs, check_vector_format

_TARGET = re.compile(r"\bsegment(?:ation of)?\s+(?:all\s+|the\s+|every\s+|any\s+)*(.+?)"
                     r"(?:\s+in\s+(?:this|the)\s+(?:image|scene|picture))?\s*[.?!]*\s*$", re.IGNORECASE)


def request_target(request: str) -> str:
    """What a request asks for: "Please segment the storage tanks." -> "storage tanks";
    FSVLM's question templates -> "farmland"; anything else -> "target"."""
    text = " ".join(request.split())
    if re.search(r"\bfarmland\b", text, re.IGNORECASE):
        return "farmland"
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", text) if re.search(r"\bsegment", s, re.IGNORECASE)]
    m = _TARGET.search(sentences[-1]) if sentences else None
    return m.group(1).strip().lower()[:60] if m else "target"


def check_request(request: str | None) -> str:
    if request is None or not str(request).strip():
        raise PromptError("the segmentation request is empty.",
                          hint='Ask e.g. "This is a 1 m image of irrigated fields. Please segment the farmland."')
    return " ".join(str(request).split())


@dataclass
class FarmlandResult:
    request: str
    target: str
    answer: str
    outputs: dict[str, str]
    fraction: float
    polygons: int
    hectares: float | None
    tiles: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SegChatPredictor:
    """``predict(TileBatch) -> (B, 2, T, T)``: (1 - p, p) with p the mask probability."""

    def __init__(self, model: Any, request: str) -> None:
        self.model = model
        self.request = request
        self.answer: str | None = None

    def __call__(self, batch: TileBatch | np.ndarray) -> np.ndarray:
        images = batch.images if isinstance(batch, TileBatch) else batch
        out = np.zeros((images.shape[0], 2, *images.shape[-2:]), np.float32)
        for b, chw in enumerate(images):
            hwc = np.ascontiguousarray(np.transpose(chw, (1, 2, 0)))
            if self.answer is None and hwc.any():
                first = self.model.seg_chat(hwc, self.request)
                self.answer = first.text
                if first.logits is None:
                    state.warn(f"the model answered {first.text!r} without [SEG] on the first window; "
                               "segmenting with the answer forced to \"[SEG].\".")
            ans = self.model.seg_chat(hwc, self.request, force_seg=True)
            logits = ans.logits
            if logits is None:  # pragma: no cover - a model that ignores force_seg
                raise PromptError(f"{getattr(self.model, 'name', 'the model')} gave no mask for the request.")
            p = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float32), -30, 30)))
            out[b, 0], out[b, 1] = 1.0 - p, p
        return out


def output_paths(out: str | os.PathLike[str], vector_format: str) -> dict[str, Path]:
    prefix = Path(out)
    if prefix.suffix.lower() in (".tif", ".tiff", ".gpkg", ".png"):
        prefix = prefix.with_suffix("")
    return {"classes": Path(f"{prefix}_classes.tif"), "probability": Path(f"{prefix}_probability.tif"),
            "polygons": Path(f"{prefix}_classes.{vector_format}"), "overlay": Path(f"{prefix}_overlay.png")}


def segment_request(
    model: Any,
    source: str | os.PathLike[str],
    request: str,
    out: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    gsd: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    threshold: float = 0.5,
    min_pixels: int = 16,
    simplify: float = 0.0,
    vector_format: str = "gpkg",
    to_crs: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: TaskProgress | None = None,
    model_name: str | None = None,
) -> FarmlandResult:
    """Segment what ``request`` asks for over ``source``; see the module doc."""
    request = check_request(request)
    vector_format = check_vector_format(vector_format)
    check_to_crs(to_crs)
    gsd = check_gsd(gsd)
    if not 0.0 < threshold < 1.0:
        raise PromptError(f"threshold {threshold} is not a probability in (0, 1).", hint="0.5 is upstream's rule (logit > 0).")
    tile = int(tile) if tile is not None else int(getattr(model, "image_size", 384))
    overlap = int(overlap) if overlap is not None else tile // 4
    check_tiling(tile, overlap, 1)
    t0 = time.perf_counter()
    paths = output_paths(out, vector_format)
    check_outputs(paths.values(), [source])
    if not overwrite and not resume:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputError(f"{existing[0]} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
    target = request_target(request)
    names = ["background", target]
    predictor = SegChatPredictor(model, request)
    name = model_name or getattr(model, "name", type(model).__name__)
    settings = {"task": "farmland", "model": name, "request": request, "target": target, "threshold": threshold}
    tags = {"classes": json.dumps({"0": names[0], "1": names[1]}), "request": request}

    def classes(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return (values[1] > threshold).astype(np.uint8)[None]

    def probability(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return np.rint(np.clip(values[1], 0, 1) * 254).astype(np.uint8)[None]

    outputs = [
        RasterOutput(paths["classes"], 1, "uint8", nodata=NODATA, finalize=classes, colormap=colormap_for(names),
                     tags=tags, descriptions=["class"]),
        RasterOutput(paths["probability"], 1, "uint8", nodata=NODATA, finalize=probability,
                     descriptions=[f"{target} probability"], tags={"scale": "probability x 254", **tags}),
    ]
    with RasterSource(source, bands=bands, target_gsd=gsd if gsd else None) as src:
        for w in src.warnings:
            state.warn(w)
        total = announce_resampling(src, tile, overlap, default=False)
        with progress_scope(progress, total) as advance:
            runner = TiledRunner(src, predictor, outputs, tile=tile, overlap=overlap, batch_size=1,
                                 settings=settings, overwrite=overwrite, resume=resume, progress=advance)
            res = runner.run()
        answer = predictor.answer or ""
        gdf = polygonize_raster(paths["classes"], classes={1: target}, min_pixels=min_pixels, simplify=simplify,
                                confidence_path=paths["probability"], attributes={"request": request},
                                strip_rows=max(64, POLYGONIZE_STRIP_PIXELS // max(src.width, 1)))
        gdf["score"] = gdf["score"].astype(float) / 254.0
        hectares = None
        if gdf.crs is not None and gdf.crs.is_projected:
            gdf["area_m2"] = gdf.geometry.area * float(gdf.crs.axis_info[0].unit_conversion_factor) ** 2
            gdf["area_ha"] = gdf["area_m2"] / 10_000.0
            hectares = round(float(gdf["area_ha"].sum()), 4)
        write_vectors(gdf, paths["polygons"], to_crs=to_crs, overwrite=True)
        rgb, labels = preview_arrays(src, paths["classes"])
    overlay_png(rgb, labels, names, paths["overlay"], nodata=NODATA, title=f"{name}: {target}")
    _record_answer(paths["classes"], answer)
    counts = class_counts(paths["classes"], 2)
    return FarmlandResult(request=request, target=target, answer=answer,
                          outputs={k: str(v) for k, v in paths.items()},
                          fraction=round(float(counts[1]) / max(int(counts.sum()), 1), 4), polygons=len(gdf),
                          hectares=hectares, tiles=res.tiles, seconds=round(time.perf_counter() - t0, 3),
                          settings={**res.settings, "answer": answer})


def _record_answer(path: Path, answer: str) -> None:
    """The model's text answer into the class raster's tags (known only after the first window)."""
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(answer=answer)


__all__ = ["FarmlandResult", "SegChatPredictor", "check_request", "output_paths", "request_target", "segment_request"]
