"""Open-vocabulary semantic segmentation: the FarSLIP, SegEarth-OV and rsvl protocols."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsvl.console import state
from rsvl.data.classes import ClassSpec
from rsvl.data.segmentation import SegmentationDataset, segmentation_preset
from rsvl.errors import DatasetError, PromptError
from rsvl.eval.results import (
    EvalResult,
    Progress,
    base_settings,
    finish,
    model_settings,
    sample_settings,
    subset_indices,
)
from rsvl.metrics import ConfusionMatrix, segmentation_report
from rsvl.models.zeroshot import pool_synonyms
from rsvl.tasks.segment import DensePredictor, check_cls_support


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


def rescale_size(h: int, w: int, scale: tuple[int, int] | None) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: fit (long, short) edges."""
    if scale is None:
        return h, w
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def sliding_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
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

    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
    h0, w0 = x.shape[-2:]
    h, w = rescale_size(h0, w0, proto.resize)
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    img = x.round().clamp(0, 255).to(torch.uint8)
    n_q = len(predictor.index)  # the queries, and the learned "other" channel when used
    logits = torch.zeros((n_q, h, w), dtype=torch.float32)
    count = torch.zeros((1, h, w), dtype=torch.float32)
    wins = sliding_windows(h, w, proto.crop, proto.stride)
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
    other: bool | None = None,
) -> EvalResult:
    """Open-vocabulary semantic segmentation, RS-OVSS / SegEarth-OV protocol; see module doc.

    ``other`` (default: when the model has one): the model's learned "other" channel joins the
    dataset's background class ("background", "other" or "clutter"); datasets without one
    are scored without it."""
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

        try:
            check_cls_support(model)
        except PromptError as e:

            state.warn(f"{e.message} The protocol's cls_lambda={cls_lambda} is not applied.")
            cls_lambda = 0.0
    predictor = DensePredictor(model, specs, proto.templates, logit_scale=proto.logit_scale, cls_lambda=cls_lambda,
                               other=other, append_other=False)
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
    settings = base_settings("ovss", dataset_path)
    settings.update(model_settings(model, model_name, weights))
    settings.update(proto.to_dict())
    settings["logit_scale"] = predictor.scale
    settings["cls_lambda"] = predictor.cls_lambda
    settings["learned_other"] = names[predictor.other_class] if predictor.other_class is not None else None
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
        }
    )
    settings.update(sample_settings(len(idx), len(ds), limit, batch_size))
    return finish("ovss", report, settings, t0)
