"""COCO detection and instance segmentation: pycocotools AP from a detections JSON or by running a model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rsvl.data.coco import detections_to_coco, open_coco, split_ids
from rsvl.data.common import load_json
from rsvl.errors import DatasetError
from rsvl.eval.results import (
    EvalResult,
    base_settings,
    finish,
    model_settings,
    subset_indices,
)
from rsvl.io import read_rgb, write_text
from rsvl.metrics import coco_evaluate
from rsvl.models.rsprompter.transforms import to_tensor


def run_coco(
    ground_truth: str | Path, detections: str | Path, *, iou_type: str = "bbox", max_dets: int = 100
) -> EvalResult:
    """COCO AP of a detections JSON (list of results) against a COCO instances JSON."""
    t0 = time.perf_counter()
    layout = "a COCO results JSON: [{'image_id', 'category_id', 'score', 'bbox' or 'segmentation'}]"
    dets = load_json(Path(detections), "Detections file", layout)
    if not isinstance(dets, list):
        raise DatasetError(f"{detections} is not a JSON list of detections.", hint=f"Expected {layout}.")
    try:
        metrics = coco_evaluate(ground_truth, dets, iou_type, max_dets=max_dets)
    except (KeyError, ValueError) as e:
        raise DatasetError(f"Cannot evaluate {detections}: {e}.", hint=f"Expected {layout}.") from e
    settings = base_settings("coco", ground_truth)
    settings.update(
        {
            "detections": str(Path(detections).resolve()),
            "iou_type": iou_type,
            "max_dets": max_dets,
            "n_detections": len(dets),
        }
    )
    return finish("coco", metrics, settings, t0)


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
        write_text(p, json.dumps(dets))
    settings = base_settings("coco", ground_truth)
    settings.update(model_settings(net, model_name, weights))
    settings.update({"split": split, "val_fraction": val_fraction, "seed": seed,
                     "n_samples": len(ids), "n_detections": len(dets), "max_dets": max_dets,
                     "detections": None if detections_out is None else str(detections_out)})
    return finish("coco", metrics, settings, t0)
