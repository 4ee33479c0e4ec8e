"""Language-guided segmentation (FSVLM, LISA, mini-fsvlm) on a FarmSeg-VL / FIT-layout folder.

FSVLM's ``test.py`` protocol: every image of the split gets one request, the model generates
its answer greedily, and the mask that its ``[SEG]`` prompts (logit > 0) is compared at the
label's size with the label (non-zero = the target). The request is FSVLM's fixed test
question (``"This is a remote sensing image. Please segment farmland"``; upstream does not
use the per-image description) unless ``question="description"`` puts the image's
``img_description_eg`` in front of the farmland question; a label json's ``question``
(``"Please segment the storage tanks."``) replaces the request for that image, so the same
command scores any "segment the X" folder. An answer without ``[SEG]`` predicts nothing.

Metrics: :class:`rsvl.metrics.BinarySegAccumulator` (FSVLM's ``Evaluator(2)`` plus LISA's
gIoU and cIoU), over the whole split and per ``source`` (the json's ``source``, e.g. the
dataset a "segment the X" request came from), plus the share of requests answered with
``[SEG]``.

:class:`ClassProbabilityBaseline` turns an open-vocabulary CLIP (mini-clip) into the same
interface: the target named by the request against a fixed list of other land-cover
classes, and the target's class probability thresholded. It is the baseline a language-
guided model has to beat.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rsvl.data.classes import parse_class_list
from rsvl.data.farmseg import TEST_QUESTION, farmland_question, read_split
from rsvl.errors import DatasetError, PromptError
from rsvl.eval.results import (
    EvalResult,
    Progress,
    base_settings,
    finish,
    model_settings,
    subset_indices,
)
from rsvl.metrics import BinarySegAccumulator
from rsvl.models.segchat import SegAnswer
from rsvl.tasks.farmland import request_target
from rsvl.tasks.segment import DensePredictor

QUESTION_MODES = ("test", "description")
#: the classes a target competes with in :class:`ClassProbabilityBaseline`
BASELINE_OTHERS = ("farmland|cropland", "forest|trees", "water", "buildings|houses", "roads",
                   "bare land|barren", "grass|meadow")


def _request(sample: Any, mode: str) -> str:
    if sample.question:
        return sample.question
    if mode == "description" and sample.description:
        return farmland_question(sample.description)
    return TEST_QUESTION


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def run_farmland(
    model: Any,
    data: str | Path,
    *,
    split: str = "test",
    question: str = "test",
    force_seg: bool = False,
    max_new_tokens: int = 32,
    limit: int | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = None,
) -> EvalResult:
    """Run a :class:`rsvl.models.segchat.SegChatModel` on ``data/split`` and score it as
    FSVLM's ``test.py`` (see the module doc). ``force_seg`` teacher-forces ``[SEG]`` (LISA's
    validation) instead of generating; ``limit`` scores N evenly spaced images only."""
    if question not in QUESTION_MODES:
        raise PromptError(f"unknown question mode {question!r}", hint=f"Use one of {', '.join(QUESTION_MODES)}.")
    if not hasattr(model, "seg_chat"):
        name = model_name or getattr(model, "name", type(model).__name__)
        raise PromptError(f"{name} is not a language-guided segmentation model.",
                          hint="Use mini-fsvlm, fsvlm-7b, lisa-7b-v1 (see `rsvl models`).")
    t0 = time.perf_counter()
    samples = read_split(data, split)
    idx = subset_indices(len(samples), limit)
    total = BinarySegAccumulator()
    by_source: dict[str, BinarySegAccumulator] = defaultdict(BinarySegAccumulator)
    per_sample: dict[str, dict[str, Any]] = {}
    answered = 0
    for i in idx:
        s = samples[int(i)]
        gt = s.read_label().astype(bool)
        image = _read_image(s.image)
        request = _request(s, question)
        answer: SegAnswer = model.seg_chat(image, request, max_new_tokens=max_new_tokens, force_seg=force_seg)
        if answer.masks:
            answered += 1
            logit = torch.from_numpy(np.asarray(answer.masks[0], dtype=np.float32))
            if tuple(logit.shape) != gt.shape:
                logit = F.interpolate(logit[None, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
            pred = logit.numpy() > 0
        else:
            pred = np.zeros_like(gt)
        iou = total.update(pred, gt)
        by_source[s.source].update(pred, gt)
        per_sample[s.name] = {"iou": iou, "source": s.source, "answer": answer.text, "seg": bool(answer.masks)}
        if progress is not None:
            progress(1)
    metrics: dict[str, Any] = dict(total.compute())
    metrics["seg_rate"] = answered / max(1, len(idx))
    metrics["per_source"] = {k: v.compute() for k, v in sorted(by_source.items())}
    metrics["per_sample"] = per_sample
    settings = base_settings("farmland", data)
    settings.update(model_settings(model, model_name, weights))
    settings.update({
        "split": split,
        "question": question,
        "request": TEST_QUESTION if question == "test" else "description + " + farmland_question(""),
        "answer": "teacher-forced [SEG]" if force_seg else f"generated greedily (max {max_new_tokens} new tokens)",
        "threshold": "mask logit > 0, at the label's size",
        "n_samples": len(idx),
        "limit": limit,
    })
    return finish("farmland", metrics, settings, t0)


class ClassProbabilityBaseline:
    """An open-vocabulary CLIP as a :class:`rsvl.models.segchat.SegChatModel`: the target of
    the request (:func:`rsvl.tasks.farmland.request_target`) against :data:`BASELINE_OTHERS`
    (those naming the target left out), dense class probabilities at the image's size, and
    the mask logit ``logit(p_target) - logit(threshold)``."""

    def __init__(self, clip: Any, *, others: Sequence[str] = BASELINE_OTHERS, threshold: float = 0.5,
                 name: str | None = None) -> None:
        if not 0.0 < threshold < 1.0:
            raise PromptError(f"threshold {threshold} is not in (0, 1).")
        self.clip = clip
        self.others = tuple(others)
        self.threshold = float(threshold)
        self.name = name or f"{getattr(clip, 'name', type(clip).__name__)}-threshold"
        self._predictors: dict[str, DensePredictor] = {}

    def _predictor(self, target: str) -> DensePredictor:
        if target not in self._predictors:
            others = [o for o in self.others if target not in [w.strip() for w in o.split("|")]]
            classes = parse_class_list(", ".join([target, *others]))
            self._predictors[target] = DensePredictor(self.clip, classes)
        return self._predictors[target]

    def seg_chat(self, image: np.ndarray, prompt: str, **kwargs: Any) -> SegAnswer:
        target = request_target(prompt)
        if target == "target":
            raise PromptError(f"the baseline cannot tell what {prompt!r} asks to segment.",
                              hint='Phrase it as "Please segment the X."')
        pred = self._predictor(target)
        x = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))[None]
        p = np.clip(pred(x)[0, 0], 1e-6, 1 - 1e-6)
        logit = np.log(p / (1 - p)) - math.log(self.threshold / (1 - self.threshold))
        return SegAnswer(text="[SEG].", masks=[logit.astype(np.float32)])


__all__ = ["BASELINE_OTHERS", "QUESTION_MODES", "ClassProbabilityBaseline", "run_farmland"]
