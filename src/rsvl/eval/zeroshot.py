"""Zero-shot scene classification: FarSLIP's protocol (templates averaged per class, top-1/top-5, per-class accuracy).

With ``templates="farslip"`` the whole protocol is FarSLIP's: its two templates and scores
``softmax(100 x cosine)`` (:data:`~rsvl.models.zeroshot.FARSLIP_LOGIT_SCALE`), not the
checkpoint's own logit scale; other templates score with the model's scale. Either way the
ranking (top-1, top-5, per-class accuracy) is the same; the scale used is recorded in the
settings (``logit_scale``, ``logit_scale_source``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsvl.data.classes import ClassSpec
from rsvl.data.scenes import SceneCsvDataset, SceneFolderDataset, UCMJsonDataset, read_class_names
from rsvl.errors import DatasetError, PromptError
from rsvl.eval.results import (
    EvalResult,
    Progress,
    base_settings,
    finish,
    load_square,
    model_settings,
    prompt_name,
    sample_settings,
    subset_indices,
)
from rsvl.metrics import zeroshot_report
from rsvl.models.zeroshot import FARSLIP_LOGIT_SCALE, ZeroShotClassifier

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
    logit_scale: float | None = None,
) -> EvalResult:
    """Zero-shot scene classification (FarSLIP / SkyScript protocol); see module doc.

    ``logit_scale`` None = the protocol's: 100 with ``templates="farslip"``, else the model's.
    """
    t0 = time.perf_counter()
    ds, layout, used_split = open_scene_dataset(dataset_path, split, classes_file)
    prompts = [prompt_name(c) for c in ds.classes]
    dup = {p for p in prompts if prompts.count(p) > 1}
    if dup:
        raise PromptError(f"Two classes have the same prompt name {sorted(dup)[0]!r}.")
    specs = [ClassSpec(p, (p,)) for p in prompts]
    if logit_scale is not None:
        scale_source = "given"
    elif isinstance(templates, str) and templates.strip().lower() == "farslip":
        logit_scale, scale_source = FARSLIP_LOGIT_SCALE, "farslip protocol (fixed 100 x cosine)"
    else:
        scale_source = "model"
    clf = ZeroShotClassifier(model, specs, templates, logit_scale=logit_scale)
    idx = subset_indices(len(ds), limit)
    samples = [ds.samples[i] for i in idx]
    ds_labels = np.asarray([s.label for s in samples], np.int64)
    size = int(model.image_size)
    scores = np.zeros((len(samples), len(specs)), np.float32)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        imgs = np.stack([load_square(s.image, size) for s in chunk])
        scores[start : start + len(chunk)] = clf.scores(imgs)
        if progress:
            progress(len(chunk))
    report = zeroshot_report(scores, ds_labels, list(ds.classes))
    pred = scores.argmax(axis=1)
    report["correct"] = int((pred == ds_labels).sum())
    settings = base_settings("zeroshot", dataset_path)
    settings.update(model_settings(model, model_name, weights))
    settings.update(
        {
            "layout": layout,
            "split": used_split,
            "classes": list(ds.classes),
            "prompt_names": prompts,
            "templates": list(clf.templates),
            "logit_scale": clf.logit_scale,
            "logit_scale_source": scale_source,
            "image_size": size,
            "preprocess": "short side resized to image_size (bilinear, antialias), centre crop",
        }
    )
    settings.update(sample_settings(len(samples), len(ds), limit, batch_size))
    return finish("zeroshot", report, settings, t0)
