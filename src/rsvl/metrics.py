"""Evaluation metrics, defined exactly as the research systems rsvl is measured against.

- Zero-shot scene classification: top-k accuracy (open_clip / SkyScript / FarSLIP), per-class
  accuracy and its mean.
- Image-text retrieval: recall@k in both directions as FarSLIP's / SkyScript's
  ``test_retrieval``: a query is a hit when ANY of its ground-truth items is among the top k;
  per-direction ``mean`` = mean of R@1/5/10; ``mean_recall`` = mean of the six (the "mR" of
  the RS retrieval literature).
- Semantic segmentation: mmseg ``IoUMetric`` (per-class ΣI/ΣU over the whole split, mIoU =
  nanmean over classes, background classes included, ignore index 255, ``reduce_zero_label``),
  accumulated in a streaming confusion matrix.
- Referring segmentation: LAVT / FIANet / RMSIN (per-sample IoU, mIoU = mean of per-sample
  IoU, oIoU = ΣI/ΣU, Pr@X = fraction of samples with IoU >= X).
- Language-guided segmentation: FSVLM's two-class ``Evaluator`` (Acc, Acc_class, mIoU over
  background and target, FWIoU, dice, precision) and LISA's gIoU / cIoU.
- Instance segmentation / detection: pycocotools ``COCOeval`` (AP, AP50, AP75, APs/m/l and
  per-class AP as mmdet's ``classwise`` table).

All values are fractions in [0, 1] (multiply by 100 for the papers' tables). Inputs may be
numpy arrays or torch tensors (converted without importing torch here).

Ties in a ranking are broken by index (a stable sort of the negated scores): a constant
score vector ranks the item with the lowest index first, so a degenerate model can never
score better than chance by tying everything.

One module on purpose (about 600 lines): these are the definitions every protocol, trainer
and test scores with, each written next to the upstream scorer it reproduces; none imports
another layer of rsvl.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rsvl.errors import DatasetError

__all__ = [
    "BinarySegAccumulator",
    "ConfusionMatrix",
    "ReferringAccumulator",
    "coco_evaluate",
    "per_class_accuracy",
    "reduce_zero_label",
    "retrieval_ground_truth",
    "retrieval_recall",
    "segmentation_report",
    "topk_accuracy",
    "zeroshot_report",
]


def _np(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (no torch import)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------------
# Ranking helper
# ----------------------------------------------------------------------------------------


def _best_positive_rank(
    scores: np.ndarray, pos_rows: np.ndarray, pos_cols: np.ndarray
) -> np.ndarray:
    """0-based rank of the best-ranked positive of each row, under a stable descending sort.

    ``scores`` (q, m); positives are the (row, col) pairs given. Rows without a positive get
    rank ``m`` (never a hit). Rank of item j in row i = #{s > s_j} + #{s == s_j, index < j},
    which is its position in ``np.argsort(-s, kind="stable")``.
    """
    q, m = scores.shape
    # compare in the scores' own float dtype: no (q, m) float64 copy of a float32 block
    dt = scores.dtype if np.issubdtype(scores.dtype, np.floating) else np.float64
    s = scores.astype(dt, copy=False)
    vals = s[pos_rows, pos_cols]
    best = np.full(q, -np.inf, dtype=dt)
    np.maximum.at(best, pos_rows, vals)
    # lowest index among the positives that reach the best score
    jstar = np.full(q, m, dtype=np.int64)
    at_best = vals == best[pos_rows]
    np.minimum.at(jstar, pos_rows[at_best], pos_cols[at_best])
    greater = (s > best[:, None]).sum(axis=1)
    ties_before = ((s == best[:, None]) & (np.arange(m)[None, :] < jstar[:, None])).sum(axis=1)
    rank = greater + ties_before
    rank[jstar == m] = m
    return rank


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or infinite values")


# ----------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------


def _label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    n, c = scores.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got [{labels.min()}, {labels.max()}]")
    _check_finite(scores, "scores")
    rows = np.arange(n)
    return _best_positive_rank(scores, rows, labels.astype(np.int64))


def topk_accuracy(scores: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of class scores (N, C) against integer labels (N,).

    Returns ``{"top1": ..., "top5": ...}``. A k larger than C counts every sample as a hit
    (as open_clip would if it could take the top k of fewer than k classes).
    """
    s = _np(scores)
    y = _np(labels).astype(np.int64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {s.shape}")
    if len(s) == 0:
        return {f"top{k}": float("nan") for k in ks}
    rank = _label_ranks(s, y)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


def per_class_accuracy(
    scores_or_preds: Any, labels: Any, num_classes: int | None = None
) -> np.ndarray:
    """Accuracy (recall) of each class: (C,) float array, NaN for a class with no sample.

    ``scores_or_preds`` is either class scores (N, C) (argmax, first index wins ties) or
    predicted class indices (N,).
    """
    p = _np(scores_or_preds)
    y = _np(labels).astype(np.int64)
    if p.ndim == 2:
        if num_classes is None:
            num_classes = p.shape[1]
        _check_finite(p, "scores")
        p = p.argmax(axis=1)
    elif p.ndim != 1:
        raise ValueError(f"expected scores (N, C) or predictions (N,), got shape {p.shape}")
    if num_classes is None:
        num_classes = int(max(p.max(initial=-1), y.max(initial=-1)) + 1)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
    total = np.bincount(y, minlength=num_classes)[:num_classes].astype(np.float64)
    correct = np.bincount(y[p == y], minlength=num_classes)[:num_classes].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def zeroshot_report(scores: Any, labels: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Zero-shot classification report.

    ``{"n", "top1", "top5", "per_class": {name: acc or NaN}, "mean_per_class"}``;
    ``mean_per_class`` is the mean over the classes that have at least one sample.
    """
    s = _np(scores)
    if s.ndim != 2 or s.shape[1] != len(class_names):
        raise ValueError(f"scores must be (N, {len(class_names)}), got shape {s.shape}")
    report: dict[str, Any] = {"n": int(len(s))}
    report.update(topk_accuracy(s, labels, ks=(1, 5)))
    pc = per_class_accuracy(s, labels, num_classes=len(class_names))
    report["per_class"] = {name: float(v) for name, v in zip(class_names, pc, strict=True)}
    report["mean_per_class"] = float(np.nanmean(pc)) if np.any(~np.isnan(pc)) else float("nan")
    return report


# ----------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------


def retrieval_ground_truth(
    image_keys: Sequence[Any], captions: Sequence[str]
) -> tuple[list[Any], list[str], np.ndarray, np.ndarray]:
    """Deduplicate (image, caption) pairs as FarSLIP / SkyScript ``test_retrieval`` does.

    Images are unique by key (path), texts unique by string (a caption shared by several
    images is one text whose ground truth is all of them). Returns
    ``(images, texts, pair_image_index, pair_text_index)`` in first-appearance order; pass
    ``pairs=(pair_image_index, pair_text_index)`` to :func:`retrieval_recall`.
    """
    if len(image_keys) != len(captions):
        raise ValueError("image_keys and captions must have the same length (one row per pair)")
    img_idx: dict[Any, int] = {}
    txt_idx: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    pi: list[int] = []
    pt: list[int] = []
    for key, cap in zip(image_keys, captions, strict=True):
        i = img_idx.setdefault(key, len(img_idx))
        t = txt_idx.setdefault(cap, len(txt_idx))
        if (i, t) not in seen:
            seen.add((i, t))
            pi.append(i)
            pt.append(t)
    return list(img_idx), list(txt_idx), np.asarray(pi, np.int64), np.asarray(pt, np.int64)


def retrieval_recall(
    sim: Any,
    text_to_image: Any = None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    pairs: tuple[Any, Any] | None = None,
    chunk: int = 512,
) -> dict[str, float]:
    """Image-text retrieval recall@k, FarSLIP / SkyScript / open_clip protocol.

    ``sim`` is the (n_images, n_texts) similarity matrix. Ground truth is either
    ``text_to_image`` (n_texts,) = index of each text's image (one image per text, e.g.
    5 captions per image), or ``pairs=(image_index, text_index)``, the many-to-many relation
    after deduplication (:func:`retrieval_ground_truth`).

    - ``img2text_R@k``: fraction of images with ANY of their texts in the top k texts;
    - ``text2img_R@k``: fraction of texts with ANY of their images in the top k images;
    - ``img2text_mean`` / ``text2img_mean``: mean over ``ks`` (FarSLIP's ``*_mean`` with
      ks=(1, 5, 10));
    - ``mean_recall``: mean of all 2·len(ks) recalls (mR).

    Queries without any ground truth (distractor images, say) are left out of their
    direction's denominator; ``n_image_queries`` / ``n_text_queries`` say how many counted.
    """
    s = _np(sim)
    if s.ndim != 2:
        raise ValueError(f"sim must be (n_images, n_texts), got shape {s.shape}")
    n_img, n_txt = s.shape
    _check_finite(s, "sim")
    if (text_to_image is None) == (pairs is None):
        raise ValueError("give exactly one of text_to_image or pairs")
    if pairs is not None:
        gi = _np(pairs[0]).astype(np.int64).ravel()
        gt = _np(pairs[1]).astype(np.int64).ravel()
    else:
        gi = _np(text_to_image).astype(np.int64).ravel()
        if gi.shape != (n_txt,):
            raise ValueError(f"text_to_image must have shape ({n_txt},), got {gi.shape}")
        gt = np.arange(n_txt, dtype=np.int64)
    if gi.shape != gt.shape:
        raise ValueError("pairs must be two arrays of the same length")
    if len(gi) and (gi.min() < 0 or gi.max() >= n_img or gt.min() < 0 or gt.max() >= n_txt):
        raise ValueError("ground-truth indices out of range of sim")

    def ranks(mat: np.ndarray, q_of_pair: np.ndarray, c_of_pair: np.ndarray, nq: int) -> np.ndarray:
        out = np.empty(nq, dtype=np.int64)
        order = np.argsort(q_of_pair, kind="stable")
        qs, cs = q_of_pair[order], c_of_pair[order]
        for start in range(0, nq, chunk):
            stop = min(start + chunk, nq)
            lo, hi = np.searchsorted(qs, [start, stop])
            block = np.ascontiguousarray(mat[start:stop])
            out[start:stop] = _best_positive_rank(block, qs[lo:hi] - start, cs[lo:hi])
        return out

    r_i2t = ranks(s, gi, gt, n_img)
    r_t2i = ranks(s.T, gt, gi, n_txt)
    has_i = np.bincount(gi, minlength=n_img) > 0
    has_t = np.bincount(gt, minlength=n_txt) > 0
    r_i2t, r_t2i = r_i2t[has_i], r_t2i[has_t]

    res: dict[str, float] = {}
    for k in ks:
        res[f"img2text_R@{k}"] = float(np.mean(r_i2t < k)) if len(r_i2t) else float("nan")
    for k in ks:
        res[f"text2img_R@{k}"] = float(np.mean(r_t2i < k)) if len(r_t2i) else float("nan")
    res["img2text_mean"] = float(np.mean([res[f"img2text_R@{k}"] for k in ks]))
    res["text2img_mean"] = float(np.mean([res[f"text2img_R@{k}"] for k in ks]))
    res["mean_recall"] = float(
        np.mean([res[f"img2text_R@{k}"] for k in ks] + [res[f"text2img_R@{k}"] for k in ks])
    )
    res["n_image_queries"] = int(has_i.sum())
    res["n_text_queries"] = int(has_t.sum())
    return res


# ----------------------------------------------------------------------------------------
# Semantic segmentation (mmseg IoUMetric)
# ----------------------------------------------------------------------------------------


def reduce_zero_label(label: Any, ignore_index: int = 255) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> ignore (255), every other value -1, 255 stays 255.

    For datasets whose label 0 means "no data / boundary" (LoveDA, ISPRS Potsdam/Vaihingen
    in mmseg's converted form). Returns an int64 array.
    """
    g = _np(label).astype(np.int64)
    out = g - 1
    out[(g == 0) | (g == ignore_index)] = ignore_index
    return out


class ConfusionMatrix:
    """Streaming pixel confusion matrix with mmseg ``IoUMetric`` semantics.

    ``update(pred, gt)`` takes one image (or a batch) of class indices at a time, so a
    dataset never sits in memory. Pixels whose ground truth is ``ignore_index`` are dropped.
    With ``reduce_zero_label=True`` the ground truth is first mapped as mmseg does
    (0 -> 255, others -1). Ground-truth or predicted values outside [0, C) (other than the
    ignore index) are kept in an extra "other" row/column: like mmseg's ``histc`` they count
    in the other side's area but never as an intersection.

    ``matrix`` is (C, C), rows = ground truth, columns = prediction.
    """
    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self._m = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        self._m[:] = 0

    def update(self, pred: Any, gt: Any) -> None:
        p = _np(pred)
        g = _np(gt)
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
        g = (
            reduce_zero_label(g, self.ignore_index)
            if self.reduce_zero_label
            else g.astype(np.int64)
        )
        valid = g != self.ignore_index
        g = g[valid]
        p = p[valid].astype(np.int64)
        c = self.num_classes
        g = np.where((g >= 0) & (g < c), g, c)
        p = np.where((p >= 0) & (p < c), p, c)
        self._m += np.bincount(g * (c + 1) + p, minlength=(c + 1) ** 2).reshape(c + 1, c + 1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix (e.g. from another worker) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices with different class counts")
        self._m += other._m
        return self

    @property
    def matrix(self) -> np.ndarray:
        """(C, C) counts, rows = ground truth, columns = prediction."""
        return self._m[: self.num_classes, : self.num_classes].copy()

    @property
    def full_matrix(self) -> np.ndarray:
        """(C+1, C+1) counts including the out-of-range "other" row and column."""
        return self._m.copy()

    def report(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return segmentation_report(self, class_names)


def segmentation_report(
    conf: ConfusionMatrix | Any, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-class IoU / Acc / Dice and mIoU, mAcc, mDice, aAcc (mmseg ``IoUMetric``).

    ``conf`` is a :class:`ConfusionMatrix` or a (C, C) array (rows = ground truth). Per class:
    IoU = I / (area_pred + area_label - I), Acc = I / area_label, Dice = 2I / (area_pred +
    area_label); NaN where the denominator is 0. Means are nanmeans over all classes
    (background classes included); aAcc = ΣI / Σarea_label.
    """
    if isinstance(conf, ConfusionMatrix):
        full = conf.full_matrix.astype(np.float64)
        c = conf.num_classes
    else:
        m = _np(conf).astype(np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"a confusion matrix must be square, got shape {m.shape}")
        c = m.shape[0]
        full = np.zeros((c + 1, c + 1))
        full[:c, :c] = m
    inter = np.diag(full)[:c]
    area_label = full[:c, :].sum(axis=1)
    area_pred = full[:, :c].sum(axis=0)
    union = area_label + area_pred - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_label
        dice = 2 * inter / (area_label + area_pred)
        aacc = inter.sum() / area_label.sum() if area_label.sum() > 0 else np.nan
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a {c}-class confusion matrix")

    def nanmean(a: np.ndarray) -> float:
        return float(np.nanmean(a)) if np.any(~np.isnan(a)) else float("nan")

    return {
        "aAcc": float(aacc),
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "mDice": nanmean(dice),
        "IoU": {n: float(v) for n, v in zip(names, iou, strict=True)},
        "Acc": {n: float(v) for n, v in zip(names, acc, strict=True)},
        "Dice": {n: float(v) for n, v in zip(names, dice, strict=True)},
        "pixels": int(area_label.sum()),
    }


# ----------------------------------------------------------------------------------------
# Referring segmentation (LAVT / FIANet / RMSIN)
# ----------------------------------------------------------------------------------------


def _intersection_union(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Boolean masks of a prediction and its ground truth (same shape), |P ∧ G| and |P ∨ G|."""
    p = _np(pred).astype(bool)
    g = _np(gt).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    return p, g, int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


class ReferringAccumulator:
    """Streaming referring-segmentation metrics, exactly as LAVT's ``test.py`` (FIANet, RMSIN).

    Per sample (one expression): I = |P ∧ G|, U = |P ∨ G|, IoU = I/U, and 0 when U = 0.
    ``mIoU`` = mean of per-sample IoU; ``oIoU`` = ΣI / ΣU over the split; ``Pr@X`` =
    fraction of samples with IoU >= X (LAVT compares with ``>=``) for X in 0.5..0.9.
    Masks are foreground booleans (anything non-zero is foreground), compared at whatever
    resolution they are given (LAVT/FIANet: 480x480).
    """
    def __init__(self, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        self.ious: list[float] = []
        self.cum_i = 0
        self.cum_u = 0

    def update(self, pred: Any, gt: Any) -> float:
        """Add one sample; returns its IoU."""
        _, _, i, u = _intersection_union(pred, gt)
        iou = i / u if u > 0 else 0.0
        self.ious.append(iou)
        self.cum_i += i
        self.cum_u += u
        return iou

    def update_batch(self, preds: Any, gts: Any) -> list[float]:
        """Add a batch (B, H, W) of samples; returns their IoUs."""
        p, g = _np(preds), _np(gts)
        if p.shape != g.shape or p.ndim < 1:
            raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
        return [self.update(p[b], g[b]) for b in range(p.shape[0])]

    def merge(self, other: ReferringAccumulator) -> ReferringAccumulator:
        self.ious.extend(other.ious)
        self.cum_i += other.cum_i
        self.cum_u += other.cum_u
        return self

    def compute(self) -> dict[str, float]:
        n = len(self.ious)
        arr = np.asarray(self.ious, dtype=np.float64)
        res: dict[str, float] = {
            "n": n,
            "mIoU": float(arr.mean()) if n else float("nan"),
            "oIoU": self.cum_i / self.cum_u if self.cum_u > 0 else float("nan"),
        }
        for t in self.thresholds:
            res[f"Pr@{t:g}"] = float(np.mean(arr >= t)) if n else float("nan")
        return res


# ----------------------------------------------------------------------------------------
# Language-guided (binary) segmentation: FSVLM's Evaluator(2) and LISA's gIoU / cIoU
# ----------------------------------------------------------------------------------------


class BinarySegAccumulator:
    """Streaming metrics of FSVLM's ``test.py`` / ``validate()`` on binary masks.

    One pixel confusion matrix over the whole split, rows = ground truth, columns =
    prediction, classes {0 background, 1 target} (FSVLM's ``Evaluator(2)``):

    - ``acc``: overall pixel accuracy; ``acc_class``: nanmean of per-class recall;
    - ``miou``: nanmean of the two classes' IoU (background included, as upstream);
    - ``fwiou``: frequency-weighted IoU; ``dice``: mean over the two classes of 2I/(row+col);
    - ``precision``: mean over the two classes of diag/colsum (upstream prints it as
      "recall"; it is precision).

    And LISA's per-sample numbers on the target class: ``giou`` = mean per-sample IoU with an
    empty union counted as 1 (a correct "nothing here"), ``ciou`` = ΣI / ΣU.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((2, 2), dtype=np.int64)
        self.ious: list[float] = []
        self.cum_i = 0
        self.cum_u = 0

    def update(self, pred: Any, gt: Any) -> float:
        """Add one sample (boolean masks, anything non-zero is the target); returns its IoU."""
        p, g, i, u = _intersection_union(pred, gt)
        gp = int(np.count_nonzero(g))
        pp = int(np.count_nonzero(p))
        self.confusion += np.array([[p.size - u, pp - i], [gp - i, i]], dtype=np.int64)
        self.cum_i += i
        self.cum_u += u
        iou = i / u if u else 1.0
        self.ious.append(iou)
        return iou

    def merge(self, other: BinarySegAccumulator) -> BinarySegAccumulator:
        self.confusion += other.confusion
        self.ious.extend(other.ious)
        self.cum_i += other.cum_i
        self.cum_u += other.cum_u
        return self

    def compute(self) -> dict[str, float]:
        cm = self.confusion.astype(np.float64)
        diag, rows, cols, total = np.diag(cm), cm.sum(1), cm.sum(0), cm.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = diag / (rows + cols - diag)
            freq = rows / total if total else np.full(2, np.nan)
            out = {
                "n": len(self.ious),
                "acc": float(diag.sum() / total) if total else float("nan"),
                "acc_class": float(np.nanmean(diag / rows)) if total else float("nan"),
                "miou": float(np.nanmean(iou)) if total else float("nan"),
                "fwiou": float(np.nansum(freq * iou)) if total else float("nan"),
                "dice": float(np.nanmean(2 * diag / (rows + cols))) if total else float("nan"),
                "precision": float(np.nanmean(diag / cols)) if total else float("nan"),
                "iou_background": float(iou[0]),
                "iou_target": float(iou[1]),
                "giou": float(np.mean(self.ious)) if self.ious else float("nan"),
                "ciou": self.cum_i / self.cum_u if self.cum_u else float("nan"),
            }
        return out


# ----------------------------------------------------------------------------------------
# COCO (pycocotools)
# ----------------------------------------------------------------------------------------

_COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet() -> contextlib.AbstractContextManager[Any]:
    return contextlib.redirect_stdout(io.StringIO())


def _load_gt(gt: Any) -> Any:

    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, str | Path):
        path = Path(gt)
        if not path.is_file():

            raise DatasetError(
                f"COCO annotation file not found: {path}.",
                hint="Give the path of a COCO instances JSON (images, annotations, categories).",
            )
        with open(path, encoding="utf-8") as f:
            gt = json.load(f)
    if not isinstance(gt, Mapping):
        raise TypeError("gt must be a COCO object, a COCO dict or the path of a COCO JSON file")
    data = dict(gt)
    for key in ("images", "annotations", "categories"):
        if key not in data:

            raise DatasetError(
                f"The COCO ground truth has no {key!r} list.",
                hint="A COCO instances JSON needs 'images', 'annotations' and 'categories'.",
            )
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    anns = []
    for a in data["annotations"]:
        a = dict(a)
        a.setdefault("iscrowd", 0)
        if "area" not in a and "bbox" in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        anns.append(a)
    data["annotations"] = anns
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def _to_rle(seg: Any, h: int, w: int) -> dict[str, Any]:

    if isinstance(seg, Mapping):
        rle = dict(seg)
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, h, w)
    elif isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:  # binary mask array
        m = np.asfortranarray(_np(seg).astype(np.uint8))
        if m.shape != (h, w):
            raise ValueError(f"mask shape {m.shape} does not match its image ({h}, {w})")
        rle = mask_utils.encode(m)
    if isinstance(rle.get("counts"), bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_evaluate(
    gt: Any,
    detections: Any,
    iou_type: str = "bbox",
    *,
    max_dets: int = 100,
) -> dict[str, Any]:
    """COCO AP of detections / instance masks against a COCO ground truth (pycocotools).

    ``gt``: a ``pycocotools.coco.COCO``, a COCO dict, or the path of a COCO JSON.
    ``detections``: a list of result dicts (``image_id``, ``category_id``, ``score``, and
    ``bbox`` [x, y, w, h] for "bbox" or ``segmentation`` for "segm": RLE, polygons or a
    binary (H, W) mask), or the path of such a JSON list. Category ids are the ground
    truth's (1-based for NWPU VHR-10 / RSPrompter data).

    Returns ``AP, AP50, AP75, APs, APm, APl`` (NaN where COCOeval reports -1, i.e. no ground
    truth of that size), ``per_class`` {category name: AP over IoU .50:.95, area all,
    ``max_dets``}, and ``stats`` (the 12 COCOeval numbers, -1 kept).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    coco_gt = _load_gt(gt)
    if isinstance(detections, str | Path):
        with open(detections, encoding="utf-8") as f:
            detections = json.load(f)
    dets = []
    img_ids = set(coco_gt.getImgIds())
    for d in detections:
        d = dict(d)
        if d["image_id"] not in img_ids:

            raise DatasetError(
                f"A detection refers to image_id {d['image_id']}, which the ground truth lacks.",
                hint="Use the image ids of the ground-truth JSON.",
            )
        if iou_type == "segm":
            if "segmentation" not in d:
                raise ValueError("segm evaluation needs a 'segmentation' in every detection")
            info = coco_gt.imgs[d["image_id"]]
            d["segmentation"] = _to_rle(d["segmentation"], int(info["height"]), int(info["width"]))
            d.pop("bbox", None)  # loadRes derives it from the mask
        else:
            d["bbox"] = [float(v) for v in _np(d["bbox"]).ravel()[:4]]
            d.pop("segmentation", None)
        d["score"] = float(d["score"])
        d["category_id"] = int(d["category_id"])
        dets.append(d)

    cats = coco_gt.loadCats(coco_gt.getCatIds())
    empty: dict[str, Any] = {k: 0.0 for k in _COCO_STATS}
    if not dets:
        empty["per_class"] = {c["name"]: 0.0 for c in cats}
        empty["stats"] = [0.0] * 12
        return empty

    with _quiet():
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(x) for x in ev.stats]
    res: dict[str, Any] = {
        k: (v if v >= 0 else float("nan")) for k, v in zip(_COCO_STATS, stats[:6], strict=True)
    }
    # precision: [T iou thresholds, R recall points, K categories, A areas, M maxDets]
    precision = ev.eval["precision"]
    per_class = {}
    for k_idx, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k_idx, 0, -1]
        p = p[p > -1]
        name = coco_gt.cats[cat_id]["name"]
        per_class[name] = float(p.mean()) if p.size else float("nan")
    res["per_class"] = per_class
    res["stats"] = stats
    return res
