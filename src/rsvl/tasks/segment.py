"""Open-vocabulary semantic segmentation of images and rasters of any size.

For every tile, the model's dense features (``dense_features``: per-location embeddings in
the joint image-text space) are compared with one text query per class synonym; the
cosine similarities, times the model's logit scale, are upsampled to the tile, max-pooled
over the synonyms of each class and softmaxed over the classes. The tiled runner blends
these class probabilities across overlapping tiles; the argmax is the class raster.

Outputs (next to each other, named from ``out`` = a prefix):
``PREFIX_classes.tif`` (uint8 class index, colour table, class names and settings in tags;
nodata 255), ``PREFIX_confidence.tif`` (uint8, the winning probability x 255),
``PREFIX_classes.gpkg`` (one polygon per connected region, with class, score = mean
confidence, and the prompt), ``PREFIX_overlay.png``, and with ``probabilities=True``
``PREFIX_probabilities.tif`` (float32, one band per class).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from rsvl.console import TaskProgress, progress_scope, state
from rsvl.data.classes import ClassSpec, format_class_list
from rsvl.errors import OutputError, PromptError
from rsvl.geo.raster import RasterSource, open_dataset
from rsvl.geo.runner import RasterOutput, TiledRunner
from rsvl.geo.stream import TileBatch
from rsvl.geo.tiles import check_gsd, check_tiling
from rsvl.geo.vectors import polygonize_raster, write_vectors
from rsvl.models.zeroshot import pool_synonyms, resolve_templates, text_classifier
from rsvl.tasks.render import colormap_for, overlay_png, preview_arrays
from rsvl.tasks.sources import announce_resampling, check_outputs, check_to_crs, check_vector_format

NODATA = 255
#: pixels per strip when the class raster is polygonised (strips span the scene's width, so
#: their height is chosen from it: memory stays the same for any scene size)
POLYGONIZE_STRIP_PIXELS = 4 * 1024 * 1024


@dataclass
class SegmentResult:
    classes: list[str]
    outputs: dict[str, str]
    class_fractions: dict[str, float]
    polygons: int
    tiles: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DensePredictor:
    """``predict(TileBatch) -> (B, K, T, T)`` class probabilities from an image-text model.

    ``cls_lambda`` (SegEarth-OV's ``cls_token_lambda``; its default is -0.3) adds
    ``cls_lambda * cos(CLS, query)`` to every location's logits: with a negative lambda it
    removes the image-global bias that makes one class win everywhere. It needs a model whose
    ``dense_features`` can return the CLS embedding (ViT CLIPs). ``extra_background`` appends
    one class channel with probability 0: the class that the low-confidence threshold assigns
    when the class list has no background class of its own.

    ``other``: use the model's learned "other" cosine (``model.other_threshold()``, mini-clip
    heads trained on real pixel labels) for the pixels that are none of the classes: one more
    query channel, constant at every location, of the class named ``background`` (or
    "other", "clutter", "background" when no class has that name or synonym), so it merges
    into that class; with no such class and ``append_other`` an extra class named
    ``background`` is appended to :attr:`classes`, otherwise it is not used. ``None``: when
    the model has one; ``True``: required (an error for models without one); ``False``: never.
    """

    def __init__(
        self,
        model: Any,
        classes: Sequence[ClassSpec],
        templates: str | Sequence[str] | None = None,
        logit_scale: float | None = None,
        device: str | None = None,
        cls_lambda: float = 0.0,
        extra_background: bool = False,
        other: bool | None = False,
        background: str = "background",
        append_other: bool = True,
    ) -> None:
        self.model = model
        self.classes = list(classes)
        self.templates = resolve_templates(templates, model)
        self.queries, self.index = text_classifier(model, self.classes, self.templates)
        #: index of the class the learned "other" channel belongs to, and its cosine (None: not used)
        self.other_class: int | None = None
        self.other_cos: float | None = None
        cos = learned_other(model, other)
        if cos is not None:
            idx = find_background(self.classes, background)
            for name in OTHER_NAMES:
                idx = find_background(self.classes, name) if idx is None else idx
            if idx is None and append_other:
                if not background.strip():
                    raise PromptError("--background needs a class name.", hint='E.g. --background "background".')
                idx = len(self.classes)
                self.classes.append(ClassSpec(background.strip(), (background.strip(),)))
            if idx is not None:
                self.other_class, self.other_cos = idx, float(cos)
                self.index = [*self.index, idx]
        self.scale = float(
            logit_scale if logit_scale is not None else getattr(model, "dense_logit_scale", model.logit_scale)
        )
        self.cls_lambda = float(cls_lambda)
        self.extra_background = bool(extra_background)
        if self.cls_lambda:
            check_cls_support(model)
        self.torch = torch

    def dense_logits(self, images: np.ndarray) -> Any:
        """(B, P, h, w) cosine similarities of every location with every query, plus the
        CLS correction when ``cls_lambda`` is set (before the logit scale, as SegEarth-OV), then
        the learned "other" cosine as one more constant channel when it is used."""
        torch = self.torch
        q = self.queries
        if self.cls_lambda:
            feats, cls = self.model.dense_features(images, return_cls=True)
            feats, cls, q = feats.float(), cls.float(), q.to(feats.device)
            logits = torch.einsum("bdhw,pd->bphw", feats, q)
            logits = logits + self.cls_lambda * (cls @ q.T)[:, :, None, None]
        else:
            feats = self.model.dense_features(images).float()  # (B, D, h, w)
            logits = torch.einsum("bdhw,pd->bphw", feats, q.to(feats.device))
        if self.other_cos is not None:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], 1, *logits.shape[2:]), self.other_cos)], 1)
        return logits

    def __call__(self, batch: TileBatch | np.ndarray) -> np.ndarray:
        torch = self.torch
        images = batch.images if isinstance(batch, TileBatch) else batch
        size = images.shape[-2:]
        with torch.no_grad():
            logits = self.dense_logits(images) * self.scale
            logits = torch.nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            # Max over synonyms first, then softmax over classes: the argmax is the same as
            # upstream's softmax-over-queries-then-max, and the result is a probability per
            # class (synonyms do not split the mass between them).
            logits = pool_synonyms(logits, self.index, len(self.classes), dim=1)
            probs = logits.softmax(dim=1)
            if self.extra_background:
                probs = torch.cat([probs, probs.new_zeros((probs.shape[0], 1, *probs.shape[2:]))], dim=1)
        return probs.cpu().numpy()


#: class names that the learned "other" channel joins when no class has the ``background`` name
OTHER_NAMES = ("other", "background", "clutter")


def learned_other(model: Any, other: bool | None) -> Any:
    """The model's learned "other" cosine as ``other`` asks (see :class:`DensePredictor`)."""
    if other is False:
        return None
    get = getattr(model, "other_threshold", None)
    query = get() if callable(get) else None
    if query is None and other:
        name = getattr(model, "name", type(model).__name__)
        raise PromptError(f"{name} has no learned 'other' class.",
                          hint="Use --no-other with this model (mini-clip heads trained by "
                          "`rsvl train mini-clip-dense` have one), or add a background class to the list.")
    return query


def check_cls_support(model: Any) -> None:
    """Raise a PromptError unless ``model.dense_features`` takes ``return_cls``."""
    try:
        params = inspect.signature(model.dense_features).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        params = {}
    if "return_cls" not in params:
        name = getattr(model, "name", type(model).__name__)
        raise PromptError(
            f"{name} has no CLS embedding for the SegEarth CLS correction.",
            hint="Use --cls-lambda 0 with this model (it applies to ViT CLIP models such as farslip2-vit-b16).",
        )


def find_background(classes: Sequence[ClassSpec], name: str) -> int | None:
    """Index of the class named ``name`` (or having it as a synonym), case-insensitive."""
    key = name.strip().lower()
    for i, c in enumerate(classes):
        if any(s.strip().lower() == key for s in c.synonyms):
            return i
    return None


def _argmax_labels(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return values.argmax(axis=0).astype(np.uint8)


def thresholded_labels(threshold: float, background: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A finalize function: argmax, but pixels whose best probability is below
    ``threshold`` get class ``background`` (SegEarth-OV's ``prob_thd`` / ``bg_idx``)."""

    def finalize(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        labels = values.argmax(axis=0).astype(np.uint8)
        labels[values.max(axis=0) < threshold] = background
        return labels

    return finalize


def _confidence(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values.max(axis=0), 0, 1) * 254).astype(np.uint8)


def _default_gsd(model: Any, source: str | os.PathLike[str]) -> float | None:
    """The model's training resolution when the raster has a CRS to resample with."""
    preferred = getattr(model, "preferred_gsd", None)
    if preferred is None:
        return None
    with open_dataset(source) as ds:
        return float(preferred) if ds.crs is not None else None


def class_counts(path: Path, n: int) -> np.ndarray:
    """Pixels per class of a class raster, read block by block."""
    counts = np.zeros(256, np.int64)
    with rasterio.open(path) as ds:
        for _, window in ds.block_windows(1):
            counts += np.bincount(ds.read(1, window=window).ravel(), minlength=256)
    return counts[:n]


def output_paths(out: str | os.PathLike[str], probabilities: bool, vector_format: str) -> dict[str, Path]:
    prefix = Path(out)
    if prefix.suffix.lower() in (".tif", ".tiff", ".gpkg", ".png"):
        prefix = prefix.with_suffix("")
    paths = {
        "classes": Path(f"{prefix}_classes.tif"),
        "confidence": Path(f"{prefix}_confidence.tif"),
        "polygons": Path(f"{prefix}_classes.{vector_format}"),
        "overlay": Path(f"{prefix}_overlay.png"),
    }
    if probabilities:
        paths["probabilities"] = Path(f"{prefix}_probabilities.tif")
    return paths


def segment(
    model: Any,
    source: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    out: str | os.PathLike[str],
    *,
    templates: str | Sequence[str] | None = None,
    bands: Sequence[int] | None = None,
    gsd: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    probabilities: bool = False,
    min_pixels: int = 16,
    simplify: float = 0.0,
    vector_format: str = "gpkg",
    to_crs: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: TaskProgress | None = None,
    model_name: str | None = None,
    cls_lambda: float = 0.0,
    threshold: float = 0.0,
    background: str = "background",
    other: bool | None = None,
) -> SegmentResult:
    """Segment ``source`` (any raster or image GDAL reads) into ``classes``; see module doc.

    ``other`` (default: when the model has one): the model's learned "other" query takes the
    pixels that are none of the classes; they go to the class named ``background`` (or
    "other"/"clutter"), else to an extra class ``background`` appended to the list (see
    :class:`DensePredictor`). With a ``threshold`` the low-confidence pixels go there too.

    SegEarth-OV's variant: ``cls_lambda=-0.3`` subtracts the CLS-token bias from every
    location; ``threshold`` > 0 gives pixels whose best class probability is below it the
    class ``background`` (a class of the list with that name or synonym, else an extra
    class of that name appended to the list, with no text query).
    ``progress`` (:class:`rsvl.console.TaskProgress`) is told the number of tiles.
    """
    if not classes:
        raise PromptError("no classes given.", hint='Pass e.g. "forest|trees, water, buildings".')
    if len(classes) > 254:
        raise PromptError(f"{len(classes)} classes: at most 254 fit a uint8 class raster.")
    # Every option is checked here, before the model sees a tile: a bad one must not fail
    # after hours of work.
    vector_format = check_vector_format(vector_format)
    check_to_crs(to_crs)
    gsd = check_gsd(gsd)
    tile = int(tile) if tile is not None else int(getattr(model, "preferred_tile", 256))
    overlap = int(overlap) if overlap is not None else tile // 4
    check_tiling(tile, overlap, batch_size)
    t0 = time.perf_counter()
    paths = output_paths(out, probabilities, vector_format)
    check_outputs(paths.values(), [source])
    if not overwrite and not resume:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputError(f"{existing[0]} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
    if not 0.0 <= threshold < 1.0:
        raise PromptError(f"threshold {threshold} is not a probability in [0, 1).",
                          hint="SegEarth-OV uses 0.1-0.4 depending on the dataset; 0 turns it off.")
    prompt = format_class_list(classes)
    predictor = DensePredictor(model, classes, templates, cls_lambda=cls_lambda, other=other, background=background)
    names = [c.name for c in predictor.classes]
    bg_idx = None
    if threshold > 0:
        bg_idx = predictor.other_class if predictor.other_class is not None else find_background(classes, background)
    extra_background = threshold > 0 and bg_idx is None
    predictor.extra_background = extra_background
    if extra_background:
        if not background.strip():
            raise PromptError("--background needs a class name.", hint='E.g. --background "background".')
        bg_idx = len(names)
        names.append(background.strip())
    if len(names) > 254:
        raise PromptError(f"{len(names)} classes: at most 254 fit a uint8 class raster.")
    settings = {
        "task": "segment",
        "model": model_name or getattr(model, "name", type(model).__name__),
        "prompt": prompt,
        "templates": list(predictor.templates),
        "logit_scale": predictor.scale,
        "cls_lambda": predictor.cls_lambda,
        "threshold": threshold,
        "background": names[bg_idx] if bg_idx is not None else None,
        "learned_other": names[predictor.other_class] if predictor.other_class is not None else None,
    }
    class_tags = {
        "classes": json.dumps({str(i): n for i, n in enumerate(names)}),
        "prompt": prompt,
    }
    outputs = [
        RasterOutput(paths["classes"], 1, "uint8", nodata=NODATA,
                     finalize=thresholded_labels(threshold, bg_idx) if bg_idx is not None else _argmax_labels,
                     colormap=colormap_for(names), tags=class_tags, descriptions=["class"]),
        RasterOutput(paths["confidence"], 1, "uint8", finalize=_confidence, nodata=NODATA, descriptions=["confidence"],
                     tags={"scale": "probability x 254"}),
    ]
    if probabilities:
        outputs.append(RasterOutput(paths["probabilities"], len(names), "float32", nodata=-1.0,
                                    descriptions=names, tags=class_tags, overview_resampling="average"))
    default_gsd = gsd is None  # the model's training GSD, not asked for: refused above 4x upsampling
    if gsd is None:
        gsd = _default_gsd(model, source)
    elif gsd == 0:
        gsd = None  # native resolution
    with RasterSource(source, bands=bands, target_gsd=gsd) as src:
        for w in src.warnings:
            state.warn(w)
        total = announce_resampling(src, tile, overlap, default=default_gsd)
        with progress_scope(progress, total) as advance:
            runner = TiledRunner(src, predictor, outputs, tile=tile, overlap=overlap, batch_size=batch_size,
                                 settings=settings, overwrite=overwrite, resume=resume, progress=advance)
            res = runner.run()
        gdf = polygonize_raster(paths["classes"], classes=dict(enumerate(names)), min_pixels=min_pixels,
                                simplify=simplify, confidence_path=paths["confidence"],
                                attributes={"prompt": prompt},
                                strip_rows=max(64, POLYGONIZE_STRIP_PIXELS // max(src.width, 1)))
        # An empty layer is still written: "no polygons" is an answer.
        gdf["score"] = gdf["score"].astype(float) / 254.0
        write_vectors(gdf, paths["polygons"], to_crs=to_crs, overwrite=True)
        rgb, labels = preview_arrays(src, paths["classes"])
    overlay_png(rgb, labels, names, paths["overlay"], nodata=NODATA, title=settings["model"])
    counts = class_counts(paths["classes"], len(names))
    total = max(int(counts.sum()), 1)
    return SegmentResult(
        classes=names,
        outputs={k: str(v) for k, v in paths.items()},
        class_fractions={n: round(float(counts[i]) / total, 4) for i, n in enumerate(names)},
        polygons=len(gdf),
        tiles=res.tiles,
        seconds=round(time.perf_counter() - t0, 3),
        settings=res.settings,
    )
