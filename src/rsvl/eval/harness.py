"""Evaluation harness: benchmark protocols run end to end on a model and a dataset.

Each ``run_*`` function opens a dataset in one of the supported layouts, runs the model as
the protocol says, scores it with :mod:`rsvl.metrics`, and returns an
:class:`EvalResult` holding every number and the full settings (model, weights and their
sha256, templates, class names, split, protocol parameters, rsvl version, dataset path,
number of samples, seconds). Nothing is random: samples are taken in the reader's order
and ``limit`` keeps an evenly spaced, deterministic subset.

Protocols (see ``../shared/reference/farslip-fsvlm-fianet.md`` 1.4, 1.5 and 3.4):

- zero-shot classification: resize the short side, centre crop (``_square``), class-name
  embeddings averaged over templates; top-1, top-5, per-class accuracy and its mean.
- retrieval: images deduplicated by path, texts by string; R@1/5/10 both directions and
  mean recall (:func:`rsvl.metrics.retrieval_recall`).
- OVSS: mmseg ``Resize(scale, keep_ratio=True)``, sliding windows (crop, stride, windows
  clamped to the image edge), per-query cosine logits averaged over windows, bilinear
  upsampling to the label size, ``x logit_scale``, softmax over the queries, max over the
  synonyms of each class, optional ``prob_thd`` -> ``bg_idx``; mmseg ``IoUMetric`` with
  background counted and 255 ignored (``reduce_zero_label`` where the preset says so).
- referring: LAVT / FIANet per-sample IoU, mIoU, oIoU, Pr@X on predicted mask files.
- COCO: pycocotools AP on a detections JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsvl.data.classes import ClassSpec
from rsvl.errors import DatasetError, PromptError

__all__ = [
    "OVSS_PROTOCOLS",
    "PROMPT_NAMES",
    "EvalResult",
    "OvssProtocol",
    "model_settings",
    "open_caption_dataset",
    "open_scene_dataset",
    "open_segmentation_dataset",
    "prompt_name",
    "run_coco",
    "run_coco_model",
    "run_ovss",
    "run_refer",
    "run_refer_model",
    "run_retrieval",
    "run_zeroshot",
    "subset_indices",
    "write_result",
]

Progress = Callable[[int], None] | None

# ----------------------------------------------------------------------------------------
# Class names as prompts
# ----------------------------------------------------------------------------------------

#: Dataset class names written without spaces -> the words used in prompts. The one place
#: where benchmark folder names become readable (UC Merced, AID, NWPU-RESISC45, PatternNet).
PROMPT_NAMES: dict[str, str] = {
    "baseballdiamond": "baseball diamond",
    "denseresidential": "dense residential",
    "golfcourse": "golf course",
    "mediumresidential": "medium residential",
    "mobilehomepark": "mobile home park",
    "parkinglot": "parking lot",
    "sparseresidential": "sparse residential",
    "storagetanks": "storage tanks",
    "tenniscourt": "tennis court",
    "bareland": "bare land",
    "baseballfield": "baseball field",
    "railwaystation": "railway station",
    "storagetank": "storage tank",
    "basketballcourt": "basketball court",
    "footballfield": "football field",
    "oiltank": "oil tank",
    "oilgasfield": "oil gas field",
    "closedroad": "closed road",
    "crosswalk": "crosswalk",
    "ferryterminal": "ferry terminal",
    "christmastreefarm": "christmas tree farm",
    "coastalmansion": "coastal mansion",
    "nursinghome": "nursing home",
    "shippingyard": "shipping yard",
    "solarpanel": "solar panel",
    "swimmingpool": "swimming pool",
    "transformerstation": "transformer station",
    "wastewatertreatmentplant": "wastewater treatment plant",
}

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def prompt_name(name: str) -> str:
    """The readable form of a dataset class name: ``PROMPT_NAMES``, else ``_``/``-`` and
    CamelCase split into words (``BaseballField`` -> ``baseball field``)."""
    key = name.strip()
    if key.lower() in PROMPT_NAMES:
        return PROMPT_NAMES[key.lower()]
    words = _CAMEL.sub(" ", key).replace("_", " ").replace("-", " ")
    return " ".join(words.split()).lower()


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluation: ``metrics`` (every number) and ``settings`` (how it was run)."""

    task: str
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _finite({"task": self.task, "metrics": self.metrics, "settings": self.settings})


def _finite(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_result(result: EvalResult, path: str | Path, overwrite: bool = True) -> Path:
    """Write ``result.to_dict()`` as JSON, atomically (temporary name, then rename)."""
    from rsvl.errors import OutputError

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists.", hint="Pass --overwrite or choose another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _base_settings(task: str, dataset: str | Path) -> dict[str, Any]:
    from rsvl import __version__

    return {"task": task, "rsvl_version": __version__, "dataset": str(Path(dataset).resolve())}


def model_settings(model: Any, model_name: str | None = None, weights: str | Path | None = None) -> dict[str, Any]:
    """Model name, weights file and sha256 (explicit ``weights``, else the model card's file
    when it is available offline; None when unknown)."""
    name = model_name or getattr(model, "name", None) or type(model).__name__
    path: Path | None = Path(weights) if weights is not None else None
    if path is None:
        try:
            from rsvl.models.registry import get_card
            from rsvl.models.weights import is_available_offline, resolve_weights

            card = get_card(name)
            if is_available_offline(card):
                path = resolve_weights(card)
        except Exception:  # a test model, or a card without a file: no weights to record
            path = None
    sha = None
    if path is not None and path.is_file():
        from rsvl.models.weights import sha256_file

        sha = sha256_file(path)
    return {"model": name, "weights": None if path is None else str(path.resolve()), "weights_sha256": sha}


def subset_indices(n: int, limit: int | None) -> np.ndarray:
    """``limit`` evenly spaced indices of ``range(n)`` (all when ``limit`` is None or >= n).

    Readers list samples grouped by class, so the first N would be one class; evenly spaced
    indices cover them all and are the same on every run.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError("limit must be >= 1")
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def _load_square(path: Path, size: int) -> np.ndarray:
    from rsvl.data.scenes import read_rgb
    from rsvl.models.preprocess import square_image

    return square_image(np.ascontiguousarray(read_rgb(path).transpose(2, 0, 1)), size)


# ----------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------

SCENE_LAYOUTS = (
    "a ucm.json index (or a folder holding one): {'classes': [...], 'samples': [{'image', 'label', "
    "'split', 'captions'}]}; a folder with one sub-folder of images per class; or a SkyScript CSV "
    "'filepath,label' with a class-name file (--classes-file, default classnames.txt next to the CSV)"
)


def open_scene_dataset(
    path: str | Path, split: str | None = "val", classes_file: str | Path | None = None
) -> tuple[Any, str, str | None]:
    """Open a scene-classification dataset; returns ``(dataset, layout, split used)``.

    ``ucm.json`` (file or folder holding it): ``split`` filters. A CSV: the class-name file
    is ``classes_file`` or ``classnames.txt`` next to it; no split. A folder of class
    folders: ``ROOT/<split>`` when that folder exists, else the whole folder.
    """
    from rsvl.data.scenes import SceneCsvDataset, SceneFolderDataset, UCMJsonDataset

    p = Path(path)
    if not p.exists():
        raise DatasetError(f"Dataset not found: {p}.", hint=f"Expected {SCENE_LAYOUTS}.")
    if p.is_file() and p.suffix.lower() == ".json" or p.is_dir() and (p / "ucm.json").is_file():
        return UCMJsonDataset(p, split=split), "ucm.json", split
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        names = Path(classes_file) if classes_file is not None else p.parent / "classnames.txt"
        if not names.is_file():
            raise DatasetError(
                f"No class-name file for {p} (looked for {names}).",
                hint="Pass --classes-file with one class name per line, in label-index order.",
            )
        sep = "\t" if p.suffix.lower() == ".tsv" else ","
        return SceneCsvDataset(p, names, sep=sep), "csv", None
    if p.is_dir():
        root = p / split if split and (p / split).is_dir() else p
        classes = None
        if classes_file is not None:
            from rsvl.data.scenes import read_class_names

            classes = read_class_names(classes_file)
        ds = SceneFolderDataset(root, classes=classes)
        return ds, "folder", split if root != p else None
    raise DatasetError(f"{p} is not a scene-classification dataset.", hint=f"Expected {SCENE_LAYOUTS}.")


def run_zeroshot(
    model: Any,
    dataset_path: str | Path,
    *,
    split: str | None = "val",
    classes_file: str | Path | None = None,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = None,
) -> EvalResult:
    """Zero-shot scene classification (FarSLIP / SkyScript protocol); see module doc."""
    from rsvl.metrics import zeroshot_report
    from rsvl.models.zeroshot import ZeroShotClassifier

    t0 = time.perf_counter()
    ds, layout, used_split = open_scene_dataset(dataset_path, split, classes_file)
    prompts = [prompt_name(c) for c in ds.classes]
    dup = {p for p in prompts if prompts.count(p) > 1}
    if dup:
        raise PromptError(f"Two classes have the same prompt name {sorted(dup)[0]!r}.")
    specs = [ClassSpec(p, (p,)) for p in prompts]
    clf = ZeroShotClassifier(model, specs, templates)
    idx = subset_indices(len(ds), limit)
    samples = [ds.samples[i] for i in idx]
    ds_labels = np.asarray([s.label for s in samples], np.int64)
    size = int(model.image_size)
    scores = np.zeros((len(samples), len(specs)), np.float32)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        imgs = np.stack([_load_square(s.image, size) for s in chunk])
        scores[start : start + len(chunk)] = clf.scores(imgs)
        if progress:
            progress(len(chunk))
    report = zeroshot_report(scores, ds_labels, list(ds.classes))
    pred = scores.argmax(axis=1)
    report["correct"] = int((pred == ds_labels).sum())
    settings = _base_settings("zeroshot", dataset_path)
    settings.update(model_settings(model, model_name, weights))
    settings.update(
        {
            "layout": layout,
            "split": used_split,
            "classes": list(ds.classes),
            "prompt_names": prompts,
            "templates": list(clf.templates),
            "logit_scale": float(model.logit_scale),
            "image_size": size,
            "preprocess": "short side resized to image_size (bilinear, antialias), centre crop",
            "n_samples": len(samples),
            "n_dataset": len(ds),
            "limit": limit,
            "subset": "evenly spaced" if len(samples) < len(ds) else "all",
            "batch_size": batch_size,
        }
    )
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("zeroshot", report, settings)


# ----------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------

CAPTION_LAYOUTS = (
    "a ucm.json index (samples with 'captions'); a Karpathy dataset_<name>.json ({'images': "
    "[{'filename', 'split', 'sentences'}]}) next to images/ or imgs/; or a FarSLIP "
    "<name>_img_txt_pairs_<split>.csv (columns filepath and title)"
)


def open_caption_dataset(
    path: str | Path, split: str | None = None, caption_key: str = "title"
) -> tuple[Any, str, str | None]:
    """Open a retrieval dataset; returns ``(dataset, layout, split used)``.

    Default split: ``val`` for ucm.json, ``test`` for a Karpathy JSON; CSVs have none.
    """
    from rsvl.data.captions import KarpathyCaptionDataset, RetrievalCsvDataset
    from rsvl.data.scenes import UCMJsonDataset

    p = Path(path)
    if not p.exists():
        raise DatasetError(f"Dataset not found: {p}.", hint=f"Expected {CAPTION_LAYOUTS}.")
    if p.is_dir() and (p / "ucm.json").is_file():
        p = p / "ucm.json"
    if p.is_file() and p.suffix.lower() == ".json":
        from rsvl.data._common import load_json

        data = load_json(p, "Caption index", CAPTION_LAYOUTS)
        if isinstance(data, dict) and "samples" in data:
            s = split or "val"
            return UCMJsonDataset(p, split=s), "ucm.json", s
        if isinstance(data, dict) and "images" in data:
            s = split or "test"
            return KarpathyCaptionDataset(p, split=s), "karpathy", s
        raise DatasetError(f"{p} is neither a ucm.json nor a Karpathy caption JSON.", hint=f"Expected {CAPTION_LAYOUTS}.")
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        sep = "\t" if p.suffix.lower() == ".tsv" else ","
        return RetrievalCsvDataset(p, caption_key=caption_key, sep=sep), "csv", None
    raise DatasetError(f"{p} is not a retrieval dataset.", hint=f"Expected {CAPTION_LAYOUTS}.")


def run_retrieval(
    model: Any,
    dataset_path: str | Path,
    *,
    split: str | None = None,
    caption_prefix: str = "",
    caption_key: str = "title",
    dedup_texts: bool = True,
    batch_size: int = 32,
    limit: int | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = None,
) -> EvalResult:
    """Image-text retrieval, FarSLIP / SkyScript protocol; ``limit`` keeps that many images."""
    import torch

    from rsvl.data.captions import RetrievalSet
    from rsvl.metrics import retrieval_recall

    t0 = time.perf_counter()
    ds, layout, used_split = open_caption_dataset(dataset_path, split, caption_key)
    samples = list(ds.samples)
    idx = subset_indices(len(samples), limit)
    samples = [samples[i] for i in idx]
    pairs = [(s.image, c) for s in samples for c in s.captions]
    if not pairs:
        raise DatasetError("The selected samples have no captions.", hint=f"Expected {CAPTION_LAYOUTS}.")
    rs = RetrievalSet.from_pairs(pairs, caption_prefix=caption_prefix, dedup_texts=dedup_texts)
    size = int(model.image_size)
    img_emb: list[torch.Tensor] = []
    for start in range(0, len(rs.images), batch_size):
        chunk = rs.images[start : start + batch_size]
        imgs = np.stack([_load_square(p, size) for p in chunk])
        with torch.no_grad():
            img_emb.append(torch.nn.functional.normalize(model.encode_image(imgs).float().cpu(), dim=-1))
        if progress:
            progress(len(chunk))
    txt_emb: list[torch.Tensor] = []
    for start in range(0, len(rs.texts), 256):
        with torch.no_grad():
            e = model.encode_text(list(rs.texts[start : start + 256])).float().cpu()
        txt_emb.append(torch.nn.functional.normalize(e, dim=-1))
    sim = (torch.cat(img_emb) @ torch.cat(txt_emb).T).numpy()
    metrics = retrieval_recall(sim, pairs=rs.pairs, ks=(1, 5, 10))
    metrics["n_images"] = len(rs.images)
    metrics["n_texts"] = len(rs.texts)
    metrics["n_pairs"] = int(len(rs.pair_image))
    settings = _base_settings("retrieval", dataset_path)
    settings.update(model_settings(model, model_name, weights))
    settings.update(
        {
            "layout": layout,
            "split": used_split,
            "caption_prefix": caption_prefix,
            "caption_key": caption_key if layout == "csv" else None,
            "dedup_texts": dedup_texts,
            "image_size": size,
            "preprocess": "short side resized to image_size (bilinear, antialias), centre crop",
            "n_samples": len(samples),
            "n_dataset": len(ds.samples),
            "limit": limit,
            "subset": "evenly spaced" if len(samples) < len(ds.samples) else "all",
            "ks": [1, 5, 10],
            "batch_size": batch_size,
        }
    )
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("retrieval", metrics, settings)


# ----------------------------------------------------------------------------------------
# Open-vocabulary semantic segmentation
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OvssProtocol:
    """Sliding-window OVSS parameters.

    ``resize``: mmseg ``Resize(scale=resize, keep_ratio=True)``: the image is scaled by
    ``min(max(resize) / long side, min(resize) / short side)`` (``(448, 448)``: long side
    448; ``(2048, 448)``: short side 448); None keeps the native size. The label stays at
    its original size (predictions are upsampled to it). ``logit_scale`` None = the
    model's dense scale. ``prob_thd`` > 0: pixels whose best class probability is below it
    become ``bg_idx`` (original SegEarth-OV). ``templates``: see ``resolve_templates``.
    """

    name: str
    resize: tuple[int, int] | None = (448, 448)
    crop: int = 224
    stride: int = 112
    logit_scale: float | None = 50.0
    prob_thd: float = 0.0
    bg_idx: int = 0
    templates: str | None = "imagenet"
    cls_lambda: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "resize": list(self.resize) if self.resize else None,
            "crop": self.crop,
            "stride": self.stride,
            "logit_scale": self.logit_scale,
            "prob_thd": self.prob_thd,
            "bg_idx": self.bg_idx,
            "cls_lambda": self.cls_lambda,
        }


#: ``farslip``: RS-OVSS as FarSLIP evaluates (no threshold, background only from the text
#: classes). ``segearth``: SegEarth-OV's per-dataset ``prob_thd`` / ``bg_idx`` (applied by
#: :func:`ovss_protocol` from the preset) and its CLS-token term ``cls_lambda=-0.3`` (models
#: without a CLS embedding run without it, and the settings say so); no FeatUp upsampler. ``rsvl``: rsvl's own defaults for its models (native
#: resolution, windows of the model's preferred tile, the model's dense logit scale).
OVSS_PROTOCOLS: dict[str, OvssProtocol] = {
    "farslip": OvssProtocol("farslip"),
    "segearth": OvssProtocol("segearth", cls_lambda=-0.3),
    "rsvl": OvssProtocol("rsvl", resize=None, crop=256, stride=192, logit_scale=None, templates=None),
}

#: SegEarth-OV per-dataset (prob_thd, bg_idx) from its configs.
SEGEARTH_THRESHOLDS: dict[str, tuple[float, int]] = {
    "openearthmap": (0.1, 0),
    "loveda": (0.3, 0),
    "isaid": (0.4, 0),
    "potsdam": (0.1, 5),
    "vaihingen": (0.1, 5),
    "udd5": (0.4, 4),
    "vdd": (0.3, 0),
    "uavid": (0.3, 0),
}


def ovss_protocol(name: str, preset: str | None = None, **overrides: Any) -> OvssProtocol:
    """The named protocol, with SegEarth's per-dataset threshold for ``preset`` and any
    non-None ``overrides`` (resize, crop, stride, logit_scale, prob_thd, bg_idx, templates)."""
    from dataclasses import replace

    key = name.lower()
    if key not in OVSS_PROTOCOLS:
        raise PromptError(f"Unknown OVSS protocol {name!r}.", hint=f"Use one of {sorted(OVSS_PROTOCOLS)}.")
    proto = OVSS_PROTOCOLS[key]
    if key == "segearth" and preset is not None and preset.lower() in SEGEARTH_THRESHOLDS:
        thd, bg = SEGEARTH_THRESHOLDS[preset.lower()]
        proto = replace(proto, prob_thd=thd, bg_idx=bg)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "resize" in given and given["resize"] in (0, (0, 0)):
        given["resize"] = None
    proto = replace(proto, **given)
    if proto.crop < 1 or proto.stride < 1 or proto.stride > proto.crop:
        raise PromptError(
            f"Window {proto.crop} with stride {proto.stride} is not a sliding window.",
            hint="Use a crop >= 1 and 1 <= stride <= crop.",
        )
    return proto


SEG_LAYOUTS = (
    "ROOT/images/<name>.<ext> + ROOT/labels/<name>.png (index masks), or the mmseg layout "
    "ROOT/img_dir/<split>/ + ROOT/ann_dir/<split>/"
)


def open_segmentation_dataset(
    path: str | Path,
    preset: str | None = None,
    split: str | None = "val",
    reduce_zero_label: bool = False,
) -> Any:
    """Open a segmentation dataset (preset: its label encoding; else layout detection)."""
    from rsvl.data.segmentation import SegmentationDataset, segmentation_preset

    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"Dataset folder not found: {p}.", hint=f"Expected {SEG_LAYOUTS}.")
    if preset is not None:
        return segmentation_preset(preset, p, split)
    if (p / "images").is_dir() and (p / "labels").is_dir():
        return SegmentationDataset.simple(p, reduce_zero_label=reduce_zero_label)
    if (p / "img_dir").is_dir():
        return SegmentationDataset.mmseg(p, split or "val", reduce_zero_label=reduce_zero_label)
    raise DatasetError(f"{p} has no recognised segmentation layout.", hint=f"Expected {SEG_LAYOUTS}.")


def _rescale_size(h: int, w: int, scale: tuple[int, int] | None) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: fit (long, short) edges."""
    if scale is None:
        return h, w
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def _windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg ``slide_inference`` windows (y1, y2, x1, x2), clamped to the image edge."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append((y1, y2, x1, x2))
    return out


def ovss_predict(
    predictor: Any, rgb: np.ndarray, out_size: tuple[int, int], proto: OvssProtocol, batch_size: int = 8
) -> np.ndarray:
    """Class index map (H, W) of one (H0, W0, 3) uint8 image, sliding-window protocol.

    ``predictor`` is a :class:`rsvl.tasks.segment.DensePredictor` (its per-window cosine
    logits with its CLS correction, synonym index and scale are used).
    """
    import torch
    import torch.nn.functional as F

    from rsvl.models.zeroshot import pool_synonyms

    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
    h0, w0 = x.shape[-2:]
    h, w = _rescale_size(h0, w0, proto.resize)
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    img = x.round().clamp(0, 255).to(torch.uint8)
    n_q = predictor.queries.shape[0]
    logits = torch.zeros((n_q, h, w), dtype=torch.float32)
    count = torch.zeros((1, h, w), dtype=torch.float32)
    wins = _windows(h, w, proto.crop, proto.stride)
    with torch.no_grad():
        for start in range(0, len(wins), batch_size):
            chunk = wins[start : start + batch_size]
            # edge windows of an image smaller than the crop differ in size: group by shape
            by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
            for win in chunk:
                by_shape.setdefault((win[1] - win[0], win[3] - win[2]), []).append(win)
            for (ch, cw), group in by_shape.items():
                crops = torch.cat([img[..., y1:y2, x1:x2] for y1, y2, x1, x2 in group]).numpy()
                lg = predictor.dense_logits(crops).float().cpu()
                lg = F.interpolate(lg, size=(ch, cw), mode="bilinear", align_corners=False)
                for k, (y1, y2, x1, x2) in enumerate(group):
                    logits[:, y1:y2, x1:x2] += lg[k]
                    count[:, y1:y2, x1:x2] += 1
        logits = logits / count
        if (h, w) != tuple(out_size):
            logits = F.interpolate(logits[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        probs = (logits * predictor.scale).softmax(dim=0)
        probs = pool_synonyms(probs[None], predictor.index, len(predictor.classes), dim=1)[0]
        best, pred = probs.max(dim=0)
        if proto.prob_thd > 0:
            pred[best < proto.prob_thd] = proto.bg_idx
    return pred.numpy().astype(np.uint8)


def run_ovss(
    model: Any,
    dataset_path: str | Path,
    classes: Sequence[ClassSpec],
    *,
    preset: str | None = None,
    protocol: OvssProtocol | str = "farslip",
    split: str | None = "val",
    reduce_zero_label: bool = False,
    class_source: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = None,
) -> EvalResult:
    """Open-vocabulary semantic segmentation, RS-OVSS / SegEarth-OV protocol; see module doc."""
    from rsvl.metrics import ConfusionMatrix, segmentation_report
    from rsvl.tasks.segment import DensePredictor

    t0 = time.perf_counter()
    proto = ovss_protocol(protocol, preset) if isinstance(protocol, str) else protocol
    ds = open_segmentation_dataset(dataset_path, preset, split, reduce_zero_label)
    specs = list(classes)
    if ds.classes is not None and len(ds.classes) != len(specs):
        raise PromptError(
            f"{len(specs)} classes given for a dataset with {len(ds.classes)} classes ({', '.join(ds.classes)}).",
            hint="Give one class (with its synonyms) per dataset class, in label order.",
        )
    if proto.prob_thd > 0 and not 0 <= proto.bg_idx < len(specs):
        raise PromptError(f"bg_idx {proto.bg_idx} is not a class index.", hint=f"Use 0..{len(specs) - 1}.")
    names = list(ds.classes) if ds.classes is not None else [c.name for c in specs]
    cls_lambda = proto.cls_lambda
    if cls_lambda:
        from rsvl.tasks.segment import check_cls_support

        try:
            check_cls_support(model)
        except PromptError as e:
            from rsvl.console import state

            state.warn(f"{e.message} The protocol's cls_lambda={cls_lambda} is not applied.")
            cls_lambda = 0.0
    predictor = DensePredictor(model, specs, proto.templates, logit_scale=proto.logit_scale, cls_lambda=cls_lambda)
    idx = subset_indices(len(ds), limit)
    conf = ConfusionMatrix(len(specs), ignore_index=ds.ignore_index)
    for i in idx:
        s = ds.samples[int(i)]
        gt = ds.read_label(s)
        rgb = ds.read_image(s)
        pred = ovss_predict(predictor, rgb, gt.shape, proto, batch_size)
        conf.update(pred, gt)
        if progress:
            progress(1)
    report = segmentation_report(conf, names)
    report["confusion"] = conf.matrix.tolist()
    settings = _base_settings("ovss", dataset_path)
    settings.update(model_settings(model, model_name, weights))
    settings.update(proto.to_dict())
    settings["logit_scale"] = predictor.scale
    settings["cls_lambda"] = predictor.cls_lambda
    settings.update(
        {
            "preset": preset,
            "split": split if (Path(dataset_path) / "img_dir").is_dir() else None,
            "layout": ds.layout,
            "classes": names,
            "class_source": class_source,
            "prompts": [list(c.synonyms) for c in specs],
            "templates": list(predictor.templates),
            "reduce_zero_label": ds.reduce_zero_label,
            "binary_labels": ds.binary,
            "ignore_index": ds.ignore_index,
            "background_counted": True,
            "n_samples": len(idx),
            "n_dataset": len(ds),
            "limit": limit,
            "subset": "evenly spaced" if len(idx) < len(ds) else "all",
            "batch_size": batch_size,
        }
    )
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("ovss", report, settings)


# ----------------------------------------------------------------------------------------
# Referring segmentation and COCO, from prediction files
# ----------------------------------------------------------------------------------------

MASK_LAYOUT = "two folders of single-band masks matched by file name stem (non-zero = foreground)"


def _mask_files(folder: Path, what: str) -> dict[str, Path]:
    from rsvl.data._common import IMAGE_EXTENSIONS, is_image, require_dir

    require_dir(folder, what, MASK_LAYOUT)
    files = {f.stem: f for f in sorted(folder.iterdir()) if is_image(f, IMAGE_EXTENSIONS + (".npy",))}
    if not files:
        raise DatasetError(f"No mask file in {folder}.", hint=f"Expected {MASK_LAYOUT}.")
    return files


def _read_mask(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    if path.suffix.lower() == ".npy":
        a = np.load(path, allow_pickle=False)
        im = Image.fromarray((np.asarray(a) > 0).astype(np.uint8) * 255)
    else:
        with Image.open(path) as f:
            im = f.convert("L") if f.mode not in ("L", "1", "P", "I", "I;16") else f.copy()
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.NEAREST)
    a = np.asarray(im)
    if a.ndim != 2:
        raise DatasetError(f"Mask {path} is not single-band.", hint=f"Expected {MASK_LAYOUT}.")
    return a > 0


def run_refer(
    predictions: str | Path,
    ground_truth: str | Path,
    *,
    size: int | None = 480,
    thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
) -> EvalResult:
    """LAVT / FIANet referring metrics of predicted masks against ground-truth masks.

    Both are folders of masks matched by stem; ``size`` resizes both (NEAREST) to
    size x size before comparing (LAVT compares at 480); None keeps the GT size, and then
    the prediction must have the same size. A GT without a prediction counts as an empty
    prediction (IoU 0), as a model that answered nothing.
    """
    from rsvl.metrics import ReferringAccumulator

    t0 = time.perf_counter()
    pred_files = _mask_files(Path(predictions), "Prediction folder")
    gt_files = _mask_files(Path(ground_truth), "Ground-truth folder")
    acc = ReferringAccumulator(thresholds)
    missing = []
    per_sample = {}
    for stem, gpath in gt_files.items():
        gt = _read_mask(gpath, size)
        if stem in pred_files:
            pred = _read_mask(pred_files[stem], size)
            if pred.shape != gt.shape:
                raise DatasetError(
                    f"Prediction {pred_files[stem]} is {pred.shape}, ground truth {gpath} is {gt.shape}.",
                    hint="Pass --size to compare both at one size (LAVT: 480).",
                )
        else:
            missing.append(stem)
            pred = np.zeros_like(gt)
        per_sample[stem] = acc.update(pred, gt)
    metrics: dict[str, Any] = dict(acc.compute())
    metrics["missing_predictions"] = len(missing)
    metrics["per_sample"] = per_sample
    settings = _base_settings("refer", ground_truth)
    settings.update(
        {
            "predictions": str(Path(predictions).resolve()),
            "size": size,
            "thresholds": list(thresholds),
            "n_samples": len(gt_files),
            "extra_predictions": len(set(pred_files) - set(gt_files)),
            "missing": missing,
        }
    )
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("refer", metrics, settings)


REFER_DATA_LAYOUT = ("a REFER-format root (RRSIS-D layout: ROOT/rrsisd/refs(unc).p, "
                     "ROOT/rrsisd/instances.json, ROOT/images/rrsisd/JPEGImages/; e.g. written by "
                     "python -m rsvl.data.refgen) or a RefSegRS root (images/, masks/, "
                     "output_phrase_<split>.txt)")


def open_refer_dataset(path: str | Path, split: str = "val") -> Any:
    """An RRSIS-D (REFER) or RefSegRS dataset of ``split``, told apart by the layout."""
    from rsvl.data.refer import RRSISD, RefSegRS

    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder.", hint=f"Expected {REFER_DATA_LAYOUT}.")
    if (root / "output_phrase_train.txt").is_file() or (root / f"output_phrase_{split}.txt").is_file():
        return RefSegRS(root, split)
    return RRSISD(root, split)


def run_refer_model(
    model: Any,
    data: str | Path,
    *,
    split: str = "val",
    size: int | None = 480,
    batch_size: int = 8,
    limit: int | None = None,
    thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
    model_name: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = None,
) -> EvalResult:
    """Run a referring model on a dataset split and score it as LAVT / FIANet's ``test.py``.

    Each image is resized to ``model.image_size`` squared (bilinear) and normalised with the
    model's mean/std; the 2-class logits are bilinearly resized to the comparison size and
    arg-maxed. ``size`` = 480 compares at 480x480 with the ground truth NEAREST-resized
    (upstream); None compares at each image's original size. One sentence is one sample;
    mIoU, oIoU and Pr@X come from :class:`rsvl.metrics.ReferringAccumulator`.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from rsvl.metrics import ReferringAccumulator

    t0 = time.perf_counter()
    ds = open_refer_dataset(data, split)
    idx = subset_indices(len(ds), limit)
    if len(idx) == 0:
        raise DatasetError(f"{data}: split {split!r} has no samples.", hint=f"Expected {REFER_DATA_LAYOUT}.")
    S = int(model.image_size)
    mean = torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1)
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    acc = ReferringAccumulator(thresholds)
    per_sample: dict[str, float] = {}
    if hasattr(model, "eval"):
        model.eval()
    for start in range(0, len(idx), batch_size):
        samples = [ds[int(i)] for i in idx[start : start + batch_size]]
        images = []
        for s in samples:
            try:
                with Image.open(s.image_path) as im:
                    rgb = im.convert("RGB").resize((S, S), Image.BILINEAR)
            except (FileNotFoundError, OSError) as exc:
                raise DatasetError(f"cannot read image {s.image_path}: {exc}",
                                   hint=f"Expected {REFER_DATA_LAYOUT}.") from exc
            images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
        x = ((torch.stack(images).float() / 255.0 - mean) / std).to(device)
        text = {k: v.to(device) for k, v in model.tokenize([s.sentence for s in samples]).items()}
        with torch.no_grad():
            logits = model(x, text).float().cpu()
        for s, lg in zip(samples, logits, strict=True):
            if size is None:
                target = tuple(s.mask.shape)
                gt = s.mask
            else:
                target = (size, size)
                gt = np.asarray(Image.fromarray(s.mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0
            if tuple(lg.shape[-2:]) != target:
                lg = F.interpolate(lg[None], size=target, mode="bilinear", align_corners=False)[0]
            pred = lg.argmax(0).numpy().astype(bool)
            per_sample[f"{s.ref_id}:{s.sent_id}"] = acc.update(pred, gt)
        if progress is not None:
            progress(len(samples))
    metrics: dict[str, Any] = dict(acc.compute())
    metrics["per_sample"] = per_sample
    settings = _base_settings("refer", data)
    settings.update(model_settings(model, model_name, weights))
    settings.update({
        "split": split,
        "size": size,
        "compare": "at size x size, ground truth NEAREST-resized (LAVT/FIANet)" if size else
        "at each image's original size (logits bilinearly upsampled)",
        "image_size": S,
        "image_resize": "bilinear to image_size x image_size",
        "mean": list(model.mean),
        "std": list(model.std),
        "thresholds": list(thresholds),
        "n_samples": len(idx),
        "limit": limit,
        "batch_size": batch_size,
    })
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("refer", metrics, settings)


def run_coco(
    ground_truth: str | Path, detections: str | Path, *, iou_type: str = "bbox", max_dets: int = 100
) -> EvalResult:
    """COCO AP of a detections JSON (list of results) against a COCO instances JSON."""
    from rsvl.data._common import load_json
    from rsvl.metrics import coco_evaluate

    t0 = time.perf_counter()
    layout = "a COCO results JSON: [{'image_id', 'category_id', 'score', 'bbox' or 'segmentation'}]"
    dets = load_json(Path(detections), "Detections file", layout)
    if not isinstance(dets, list):
        raise DatasetError(f"{detections} is not a JSON list of detections.", hint=f"Expected {layout}.")
    try:
        metrics = coco_evaluate(ground_truth, dets, iou_type, max_dets=max_dets)
    except (KeyError, ValueError) as e:
        raise DatasetError(f"Cannot evaluate {detections}: {e}.", hint=f"Expected {layout}.") from e
    settings = _base_settings("coco", ground_truth)
    settings.update(
        {
            "detections": str(Path(detections).resolve()),
            "iou_type": iou_type,
            "max_dets": max_dets,
            "n_detections": len(dets),
        }
    )
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("coco", metrics, settings)


def run_coco_model(
    model: Any,
    ground_truth: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "val",
    val_fraction: float = 0.15,
    seed: int = 0,
    limit: int | None = None,
    max_dets: int = 100,
    model_name: str | None = None,
    weights: str | Path | None = None,
    detections_out: str | Path | None = None,
    progress: Any = None,
) -> EvalResult:
    """Run an instance model (torchvision detection convention) over the images of a COCO
    JSON and score it with pycocotools, bbox and segm. ``split``: "val" or "train" of the
    seeded image split that ``rsvl train instances`` holds out
    (:func:`rsvl.data.refgen.split_images`), or "all". Metrics are ``bbox`` and ``segm``
    dicts as :func:`rsvl.metrics.coco_evaluate` returns them."""
    import torch

    from rsvl.metrics import coco_evaluate
    from rsvl.train.instances import detections_to_coco, open_coco, read_rgb, split_ids, to_tensor

    t0 = time.perf_counter()
    if split not in ("val", "train", "all"):
        raise DatasetError(f"--split {split!r} is not val, train or all.",
                           hint="val is the split `rsvl train instances` never trains on.")
    ds = open_coco(ground_truth, images)
    train_ids, val_ids = split_ids(ds.image_ids, val_fraction, seed)
    ids = {"val": val_ids, "train": train_ids, "all": list(ds.image_ids)}[split]
    ids = [ids[i] for i in subset_indices(len(ids), limit)]
    if not ids:
        raise DatasetError(f"No images in the {split} split of {ground_truth}.",
                           hint="Check --val-fraction, or use --split all.")
    net = getattr(model, "module", model)
    if hasattr(net, "eval"):
        net.eval()
    try:
        device = next(net.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    dets: list[dict[str, Any]] = []
    with torch.inference_mode():
        for image_id in ids:
            sample = ds.by_id(image_id)
            out = net([to_tensor(read_rgb(sample.image)).to(device)])
            dets += detections_to_coco(out, [image_id], ds.cat_ids)
            if progress is not None:
                progress(1)
    gt = ds.subset(ids)
    metrics = {iou: coco_evaluate(gt, dets, iou, max_dets=max_dets) for iou in ("bbox", "segm")}
    if detections_out is not None:
        p = Path(detections_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.tmp"
        tmp.write_text(json.dumps(dets), encoding="utf-8")
        os.replace(tmp, p)
    settings = _base_settings("coco", ground_truth)
    settings.update(model_settings(net, model_name, weights))
    settings.update({"split": split, "val_fraction": val_fraction, "seed": seed,
                     "n_samples": len(ids), "n_detections": len(dets), "max_dets": max_dets,
                     "detections": None if detections_out is None else str(detections_out)})
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult("coco", metrics, settings)
