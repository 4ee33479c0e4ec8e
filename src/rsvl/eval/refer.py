"""Referring segmentation: LAVT / FIANet IoU, mIoU, oIoU and Pr@X, from mask files or by running a model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rsvl.data.common import require_dir
from rsvl.data.refer import RRSISD, RefSegRS
from rsvl.errors import DatasetError
from rsvl.eval.results import (
    EvalResult,
    Progress,
    base_settings,
    finish,
    model_settings,
    subset_indices,
)
from rsvl.io import IMAGE_SUFFIXES, is_image_file
from rsvl.metrics import ReferringAccumulator

MASK_LAYOUT = "two folders of single-band masks matched by file name stem (non-zero = foreground)"


def _mask_files(folder: Path, what: str) -> dict[str, Path]:

    require_dir(folder, what, MASK_LAYOUT)
    files = {f.stem: f for f in sorted(folder.iterdir()) if is_image_file(f, IMAGE_SUFFIXES + (".npy",))}
    if not files:
        raise DatasetError(f"No mask file in {folder}.", hint=f"Expected {MASK_LAYOUT}.")
    return files


def _read_mask(path: Path, size: int | None) -> np.ndarray:

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
    settings = base_settings("refer", ground_truth)
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
    return finish("refer", metrics, settings, t0)


REFER_DATA_LAYOUT = ("a REFER-format root (RRSIS-D layout: ROOT/rrsisd/refs(unc).p, "
                     "ROOT/rrsisd/instances.json, ROOT/images/rrsisd/JPEGImages/; e.g. written by "
                     "rsvl data refgen) or a RefSegRS root (images/, masks/, "
                     "output_phrase_<split>.txt)")


def open_refer_dataset(path: str | Path, split: str = "val") -> Any:
    """An RRSIS-D (REFER) or RefSegRS dataset of ``split``, told apart by the layout."""
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
    by_type: dict[str, ReferringAccumulator] = {}
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
            if s.expression_type is not None:
                by_type.setdefault(s.expression_type, ReferringAccumulator(thresholds)).update(pred, gt)
        if progress is not None:
            progress(len(samples))
    metrics: dict[str, Any] = dict(acc.compute())
    # per expression type, when the data records it (generated expressions do)
    metrics["by_type"] = {t: a.compute() for t, a in sorted(by_type.items())}
    metrics["per_sample"] = per_sample
    settings = base_settings("refer", data)
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
    return finish("refer", metrics, settings, t0)
