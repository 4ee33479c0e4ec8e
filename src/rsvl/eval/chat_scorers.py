"""RSEvalKit's chat scorers, each twice: as upstream computes it and corrected.

RSEvalKit (``model_eval_mp.py``, the VHM evaluation kit) scores one kind of answer per task
file. rsvl re-implements every scorer from the description of its behaviour in
``../shared/reference/vhm-rsprompter.md`` A7 (no upstream code is copied) and reports two
numbers where upstream's scorer is wrong:

- the **upstream** number reproduces upstream's behaviour, bugs included, so a result can be
  compared with a published table. Where upstream raises (an unparsable count, a multiple
  choice without a letter, a missing polygon, a zero ground truth in a MAPE), there is no
  upstream number: the value is None and ``error`` says what upstream would have raised;
- the **corrected** number (the plain keys of ``metrics``) fixes exactly the bugs listed
  for each scorer below, and counts the answers it could not read as wrong (``unparsable``).

Scorers (the kinds of :data:`rsvl.eval.chat.SCORERS`):

presence
    upstream: yes = ``'yes' in pred.lower()``; no = ``'no'`` or ``'false'`` in the raw,
    case-sensitive text; both or neither -> unknown. A bare "No" is missed and "not",
    "know", "north" read as no. Corrected: the whole words yes / no / false, any case.
mc
    upstream: the first character of the output that is one of ``ABCDE`` ("Answer: B" is
    A), compared with ``pred.lower() in answer.lower()``; no such character raises.
    Corrected: the first capital A-E standing alone (not inside a word), compared with the
    choice letter of the ground truth read the same way; none -> wrong, unparsable.
cls, vqa
    spaces removed, lower case, score = prediction is a substring of the ground truth, so an
    empty prediction passes upstream. Corrected: an empty prediction fails.
color
    fraction of the comma-separated ground-truth colours found in the prediction (spaces
    removed, lower case). No bug: both numbers agree.
counting
    the first run of digits, else an English number word 0-99 (split on whitespace).
    Accuracy, MAE, MAPE and the accuracy per ground-truth range (0,2] (2,6] (6,12] (12,inf).
    Upstream raises on a prediction without a number, and on a zero ground truth in the MAPE;
    its per-range accuracies are percentages, -1 for an empty range. Corrected: no number ->
    wrong and unparsable (left out of MAE / MAPE); MAPE over non-zero ground truths.
mae
    the numbers (``[-+]?\\d*\\.?\\d+``) of prediction and ground truth; equal counts give one
    absolute error and one APE per number, other counts a parse failure that upstream leaves
    out silently (and raises when nothing parsed or a ground truth is 0). Corrected: the
    same MAE / MAPE with the parse failures reported (count and ratio), zero ground truths
    left out of the MAPE, None instead of a crash.
bbox
    ground truth: numbers between the first '[' and the last ']' of the answer, absolute
    pixels. Upstream reads the prediction's text the same way, scales it by w/1000, h/1000
    with ``h, w = size`` (the ``size`` recorded for the entry, which upstream fills from PIL
    as (w, h) when the JSON has none: axes swapped on non-square images), and raises on a
    prediction with 1-3 numbers, a ground truth with other than 4, and a prediction without a
    box before any other prediction had one (it logs an IoU not yet assigned). Corrected: the model's first :class:`~rsvl.models.chat.Box`
    (image fractions) times the image's true width and height. A hit is IoU >= 0.5;
    ``acc@0.5`` overall and per ground-truth area S (<= 32^2) / M (<= 96^2) / L.
ciou
    building polygons, flat 0-1000 lists, rasterised with pycocotools; IoU of the masks and
    C-IoU = IoU * (1 - |N - N_gt| / (N + N_gt)). Upstream de-normalises y with the width too
    (with ``h, w = size``), gives a missing polygon None (which breaks its mean) and hands
    pycocotools a 4-number list as a box. Corrected: y with the height, a missing or
    degenerate (< 3 points) polygon scores 0 and counts as unparsable.
ml
    multi-label: the class list is the query after ':' with its last character dropped,
    split on ','; a class is in a text when it is a substring of it; the metric is the
    mean per-class precision (a class never predicted counts 0). Corrected: the class list
    with only trailing punctuation removed, whole-phrase case-insensitive matching ("tree"
    is not in "street"), classes never predicted left out of the mean; CR and CF1 added.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rsvl.models.chat import Box

#: upstream's number pattern (mae, bbox, ciou)
NUMBER = re.compile(r"[-+]?\d*\.?\d+")
#: counting ranges: upper bounds of (0,2] (2,6] (6,12] (12,inf)
COUNT_RANGES: tuple[float, ...] = (2, 6, 12, float("inf"))
COUNT_RANGE_NAMES: tuple[str, ...] = ("(0, 2]", "(2, 6]", "(6, 12]", "(12, inf)")
#: bbox size classes by ground-truth area (COCO's small / medium / large bounds)
AREA_RANGES: tuple[float, ...] = (32.0**2, 96.0**2, float("inf"))
AREA_NAMES: tuple[str, ...] = ("S", "M", "L")

_ONES = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words() -> dict[str, int]:
    words = {"zero": 0}
    for i in range(1, 100):
        if i < 20:
            words[_ONES[i - 1]] = i
        elif i % 10 == 0:
            words[_TENS[i // 10 - 2]] = i
        else:
            words[f"{_TENS[i // 10 - 2]}-{_ONES[i % 10 - 1]}"] = i
    return words


#: English number words 0-99 as upstream spells them ("twenty-one")
NUMBER_WORDS: dict[str, int] = _number_words()


@dataclass
class ChatItem:
    """One scored answer: what the scorers read."""

    #: the question (``<image>`` marker removed)
    query: str
    #: the ground truth (the gpt turn)
    answer: str
    #: the model's text
    pred: str
    #: the boxes the model named, image fractions (corrected bbox scorer)
    boxes: list[Box] = field(default_factory=list)
    #: the entry's ``size`` as upstream records it: the JSON's, else PIL's (w, h)
    size: tuple[int, int] | None = None
    #: the image's true (height, width)
    hw: tuple[int, int] | None = None


@dataclass
class Scored:
    """A scorer's result: corrected ``metrics``, ``upstream`` numbers, per-item details."""

    metrics: dict[str, Any]
    upstream: dict[str, Any]
    #: per item: the parsed prediction and its (corrected) score
    items: list[dict[str, Any]] = field(default_factory=list)


class UpstreamCrash(Exception):
    """Raised inside an upstream re-implementation where upstream itself raises."""


def _upstream(fn: Callable[[], dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``fn()``, or every key None plus ``error`` when upstream would have raised."""
    try:
        return fn()
    except UpstreamCrash as exc:
        return {**dict.fromkeys(keys), "error": str(exc)}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# --------------------------------------------------------------------------- presence

_WORDS = re.compile(r"[a-z]+")


def presence_upstream(pred: str) -> str:
    """yes / no / unknown exactly as upstream reads them (see the module docstring)."""
    yes = "yes" in pred.lower()
    no = any(w in pred for w in ("no", "false"))
    return "yes" if yes and not no else "no" if no and not yes else "unknown"


def presence_corrected(pred: str) -> str:
    """yes / no / unknown from whole words, any case."""
    words = set(_WORDS.findall(pred.lower()))
    yes = "yes" in words
    no = bool(words & {"no", "false"})
    return "yes" if yes and not no else "no" if no and not yes else "unknown"


def score_presence(items: Sequence[ChatItem]) -> Scored:
    up = [presence_upstream(it.pred) == it.answer.lower() for it in items]
    rows = []
    for it in items:
        p = presence_corrected(it.pred)
        rows.append({"parsed": p, "score": float(p == it.answer.strip().lower())})
    return Scored(
        {"accuracy": _mean([r["score"] for r in rows]), "unknown": sum(r["parsed"] == "unknown" for r in rows)},
        {"accuracy": _mean([float(s) for s in up])},
        rows,
    )


# --------------------------------------------------------------------------- multiple choice

_LETTER = re.compile(r"(?<![A-Za-z])[A-E](?![A-Za-z])")


def mc_upstream(pred: str) -> str | None:
    """The first character of ``pred`` in 'ABCDE' (upstream's rule), else None."""
    return next((c for c in pred if c in "ABCDE"), None)


def mc_corrected(text: str) -> str | None:
    """The first capital A-E standing alone ("Answer: B" -> B, "(C)" -> C), else None."""
    m = _LETTER.search(text)
    return m.group(0) if m else None


def score_mc(items: Sequence[ChatItem]) -> Scored:
    def upstream() -> dict[str, Any]:
        hits = []
        for i, it in enumerate(items):
            p = mc_upstream(it.pred)
            if p is None:
                raise UpstreamCrash(f"item {i}: no letter A-E in the prediction {it.pred!r} (None.lower())")
            hits.append(float(p.lower() in it.answer.lower()))
        return {"accuracy": _mean(hits)}

    rows = []
    for it in items:
        p = mc_corrected(it.pred)
        gt = mc_corrected(it.answer) or it.answer.strip()
        rows.append({"parsed": p, "score": float(p is not None and p == gt)})
    return Scored(
        {"accuracy": _mean([r["score"] for r in rows]), "unparsable": sum(r["parsed"] is None for r in rows)},
        _upstream(upstream, ["accuracy"]),
        rows,
    )


# --------------------------------------------------------------------------- cls / vqa / color


def _squash(text: str) -> str:
    return str(text).replace(" ", "").lower()


def score_cls_vqa(items: Sequence[ChatItem]) -> Scored:
    up = [float(_squash(it.pred) in _squash(it.answer)) for it in items]
    rows = []
    for it in items:
        p = _squash(it.pred)
        rows.append({"parsed": p, "score": float(bool(p) and p in _squash(it.answer))})
    return Scored(
        {"accuracy": _mean([r["score"] for r in rows]), "empty": sum(not r["parsed"] for r in rows)},
        {"accuracy": _mean(up)},
        rows,
    )


def score_color(items: Sequence[ChatItem]) -> Scored:
    rows = []
    for it in items:
        p = _squash(it.pred)
        colours = _squash(it.answer).split(",")
        rows.append({"parsed": p, "score": sum(c in p for c in colours) / len(colours)})
    acc = _mean([r["score"] for r in rows])
    return Scored({"accuracy": acc}, {"accuracy": acc}, rows)


# --------------------------------------------------------------------------- counting


def parse_count(text: str) -> int | None:
    """Upstream's count: the first run of digits, else the first whitespace-separated word
    that is an English number 0-99; None when there is neither (upstream: ``int('')``)."""
    m = re.search(r"\d+", text)
    if m:
        return int(m.group())
    for word in text.split():
        if word.lower() in NUMBER_WORDS:
            return NUMBER_WORDS[word.lower()]
    return None


def count_range(n: int) -> int:
    """Index in :data:`COUNT_RANGES` of a ground-truth count (0 falls in the first)."""
    k = 0
    while n > COUNT_RANGES[k]:
        k += 1
    return k


def score_counting(items: Sequence[ChatItem]) -> Scored:
    gts = [int(it.answer.strip()) for it in items]
    preds = [parse_count(it.pred) for it in items]

    def upstream() -> dict[str, Any]:
        hits, total = np.zeros(len(COUNT_RANGES)), np.zeros(len(COUNT_RANGES))
        ae, ape = [], []
        for i, (g, p) in enumerate(zip(gts, preds, strict=True)):
            if p is None:
                raise UpstreamCrash(f"item {i}: no number in the prediction {items[i].pred!r} (int(''))")
            k = count_range(g)
            total[k] += 1
            hits[k] += g == p
            ae.append(abs(p - g))
            if g == 0:
                raise UpstreamCrash(f"item {i}: ground truth 0 in the MAPE (division by zero)")
            ape.append(abs((p - g) / g))
        if not ae:
            raise UpstreamCrash("no items (division by zero)")
        per = {n: (100.0 * hits[k] / total[k] if total[k] else -1.0) for k, n in enumerate(COUNT_RANGE_NAMES)}
        return {"mae": sum(ae) / len(ae), "mape": sum(ape) / len(ape), "per_range_percent": per}

    rows = []
    hits, total = np.zeros(len(COUNT_RANGES)), np.zeros(len(COUNT_RANGES))
    ae, ape = [], []
    for g, p in zip(gts, preds, strict=True):
        ok = p is not None and p == g
        k = count_range(g)
        total[k] += 1
        hits[k] += ok
        if p is not None:
            ae.append(abs(p - g))
            if g:
                ape.append(abs(p - g) / g)
        rows.append({"parsed": p, "score": float(ok)})
    metrics = {
        "accuracy": _mean([r["score"] for r in rows]),
        "mae": _mean(ae),
        "mape": _mean(ape),
        "per_range": {n: (float(hits[k] / total[k]) if total[k] else None) for k, n in enumerate(COUNT_RANGE_NAMES)},
        "per_range_count": {n: int(total[k]) for k, n in enumerate(COUNT_RANGE_NAMES)},
        "unparsable": sum(p is None for p in preds),
    }
    return Scored(metrics, _upstream(upstream, ["mae", "mape", "per_range_percent"]), rows)


# --------------------------------------------------------------------------- mae (GSD, measurement)


def score_mae(items: Sequence[ChatItem]) -> Scored:
    ae: list[float] = []
    ape: list[float] = []
    zero_gt = 0
    failures = 0
    rows = []
    for it in items:
        a = [float(x) for x in NUMBER.findall(str(it.answer))]
        p = [float(x) for x in NUMBER.findall(str(it.pred))]
        if len(a) != len(p):
            failures += 1
            rows.append({"parsed": p, "score": None})
            continue
        errs = [abs(x - y) for x, y in zip(p, a, strict=True)]
        ae.extend(errs)
        for x, y in zip(p, a, strict=True):
            if y == 0:
                zero_gt += 1
            else:
                ape.append(abs(x - y) / abs(y))
        rows.append({"parsed": p, "score": _mean(errs)})

    def upstream() -> dict[str, Any]:
        if not ae:
            raise UpstreamCrash("no prediction parsed (division by zero)")
        if zero_gt:
            raise UpstreamCrash("a ground-truth number is 0 in the MAPE (division by zero)")
        return {"mae": sum(ae) / len(ae), "mape": sum(ape) / len(ape)}

    metrics = {
        "mae": _mean(ae),
        "mape": _mean(ape),
        "unparsable": failures,
        "unparsable_ratio": failures / len(items) if items else None,
    }
    return Scored(metrics, _upstream(upstream, ["mae", "mape"]), rows)


# --------------------------------------------------------------------------- bbox


def bracket_numbers(text: str) -> list[float] | None:
    """The numbers between the first '[' and the last ']' (upstream's box and polygon
    reader), or None when there is no such pair."""
    i, j = text.find("["), text.rfind("]")
    if i == -1 or j == -1:
        return None
    return [float(x) for x in NUMBER.findall(text[i : j + 1])]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (0 when they do not overlap)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    if x1 >= x2 or y1 >= y2:
        return 0.0
    inter = (x2 - x1) * (y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def gt_box(answer: str) -> list[float]:
    """The ground-truth box (absolute pixels, xyxy) of a grounding answer."""
    nums = bracket_numbers(str(answer))
    if nums is None or len(nums) < 4:
        raise ValueError(f"no [x1, y1, x2, y2] box in the ground truth {answer!r}")
    return nums[:4]


def _area_class(box: Sequence[float]) -> int:
    area = (box[2] - box[0]) * (box[3] - box[1])
    k = 0
    while area > AREA_RANGES[k]:
        k += 1
    return k


def _acc_by_area(hits: np.ndarray, total: np.ndarray) -> dict[str, float | None]:
    return {n: (float(hits[k] / total[k]) if total[k] else None) for k, n in enumerate(AREA_NAMES)}


def score_bbox(items: Sequence[ChatItem], threshold: float = 0.5) -> Scored:
    gts = [gt_box(it.answer) for it in items]

    def upstream() -> dict[str, Any]:
        hits, total = np.zeros(3), np.zeros(3)
        scored_once = False  # upstream logs the last IoU per item: unbound until a box was read
        for i, (it, g) in enumerate(zip(items, gts, strict=True)):
            if it.size is None:
                raise UpstreamCrash(f"item {i}: no size")
            n_gt = len(bracket_numbers(str(it.answer)) or [])
            if n_gt != 4:
                raise UpstreamCrash(f"item {i}: {n_gt} numbers in the ground-truth box (unpacking ValueError)")
            h, w = it.size  # upstream's unpacking, whatever order the size is in
            k = _area_class(g)
            total[k] += 1
            p = bracket_numbers(it.pred)
            if p:
                if len(p) < 4:
                    raise UpstreamCrash(f"item {i}: {len(p)} numbers in the predicted box (IndexError)")
                box = [p[0] * w / 1000.0, p[1] * h / 1000.0, p[2] * w / 1000.0, p[3] * h / 1000.0]
                hits[k] += box_iou(g, box) >= threshold
                scored_once = True
            elif not scored_once:
                raise UpstreamCrash(f"item {i}: no predicted box before any other was read (UnboundLocalError)")
        return {"acc@0.5": float(hits.sum() / total.sum()) if total.sum() else None,
                "by_area": _acc_by_area(hits, total)}

    hits, total = np.zeros(3), np.zeros(3)
    rows = []
    for it, g in zip(items, gts, strict=True):
        k = _area_class(g)
        total[k] += 1
        iou = 0.0
        box = None
        if it.boxes and it.hw is not None:
            h, w = it.hw
            b = it.boxes[0]
            box = [b.x1 * w, b.y1 * h, b.x2 * w, b.y2 * h]
            iou = box_iou(g, box)
        hits[k] += iou >= threshold
        rows.append({"parsed": box, "iou": iou, "score": float(iou >= threshold)})
    metrics = {
        "acc@0.5": float(hits.sum() / total.sum()) if total.sum() else None,
        "by_area": _acc_by_area(hits, total),
        "by_area_count": {n: int(total[k]) for k, n in enumerate(AREA_NAMES)},
        "mean_iou": _mean([r["iou"] for r in rows]),
        "unparsable": sum(r["parsed"] is None for r in rows),
    }
    return Scored(metrics, _upstream(upstream, ["acc@0.5", "by_area"]), rows)


# --------------------------------------------------------------------------- ciou


def polygon_mask(points: Sequence[float], h: int, w: int) -> np.ndarray:
    """A flat [x1, y1, ...] polygon (pixels) rasterised by pycocotools as an (h, w) bool mask.
    Like upstream, a 4-number list reaches pycocotools as is (which reads it as a box)."""
    rle = mask_utils.frPyObjects([list(points)], h, w)
    return mask_utils.decode(rle).reshape(h, w) != 0


def _ciou_parts(mask: np.ndarray, gt: np.ndarray, n: int, n_gt: int, eps: float) -> tuple[float, float]:
    union = np.logical_or(mask, gt).sum()
    iou = 1.0 if union == 0 else float(np.logical_and(mask, gt).sum() / (union + eps))
    return iou, iou * (1 - abs(n - n_gt) / (n + n_gt + eps))


def score_ciou(items: Sequence[ChatItem]) -> Scored:
    def upstream() -> dict[str, Any]:
        ious, cious = [], []
        for i, it in enumerate(items):
            if it.size is None:
                raise UpstreamCrash(f"item {i}: no size")
            h, w = (int(v) for v in it.size)
            a = bracket_numbers(str(it.answer)) or []
            gt_pts = [v * w / 1000.0 for v in a]  # x and y both with w: upstream's bug
            try:
                gt = polygon_mask(gt_pts, h, w)
                p = bracket_numbers(str(it.pred))
                if not p:
                    raise UpstreamCrash(f"item {i}: no polygon in the prediction (None breaks np.mean)")
                pts = [v * w / 1000.0 for v in p]
                iou, ciou = _ciou_parts(polygon_mask(pts, h, w), gt, len(pts) // 2, len(gt_pts) // 2, 1e-9)
            except UpstreamCrash:
                raise
            except Exception as exc:  # pycocotools refuses fewer than 4 numbers
                raise UpstreamCrash(f"item {i}: pycocotools: {exc}") from exc
            ious.append(iou)
            cious.append(ciou)
        if not ious:
            raise UpstreamCrash("no items")
        return {"mean_iou": float(np.mean(ious)), "c_iou": float(np.mean(cious))}

    rows = []
    for it in items:
        if it.hw is None:
            raise ValueError("the corrected ciou scorer needs the image size")
        h, w = it.hw
        a = bracket_numbers(str(it.answer)) or []
        a = a[: len(a) // 2 * 2]
        gt_pts = [v * (w if k % 2 == 0 else h) / 1000.0 for k, v in enumerate(a)]
        gt = polygon_mask(gt_pts, h, w) if len(gt_pts) >= 6 else np.zeros((h, w), bool)
        p = bracket_numbers(str(it.pred)) or []
        p = p[: len(p) // 2 * 2]
        if len(p) < 6:
            rows.append({"parsed": None, "iou": 0.0, "score": 0.0})
            continue
        pts = [v * (w if k % 2 == 0 else h) / 1000.0 for k, v in enumerate(p)]
        iou, ciou = _ciou_parts(polygon_mask(pts, h, w), gt, len(pts) // 2, len(gt_pts) // 2, 0.0)
        rows.append({"parsed": len(pts) // 2, "iou": iou, "score": ciou})
    metrics = {
        "mean_iou": _mean([r["iou"] for r in rows]),
        "c_iou": _mean([r["score"] for r in rows]),
        "unparsable": sum(r["parsed"] is None for r in rows),
    }
    return Scored(metrics, _upstream(upstream, ["mean_iou", "c_iou"]), rows)


# --------------------------------------------------------------------------- multi-label


def ml_classes_upstream(query: str) -> list[str]:
    """Upstream's class list: after the first ':' (the whole text when there is none), the
    last character dropped, split on ','."""
    i = query.find(":")
    return [c.strip() for c in query[i + 1 : -1].split(",")]


def ml_classes(query: str) -> list[str]:
    """The class list after the first ':', trailing punctuation removed, split on ','."""
    i = query.find(":")
    return [c.strip() for c in query[i + 1 :].strip().rstrip(".?!;").split(",") if c.strip()]


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])", text.lower()) is not None


def score_ml(items: Sequence[ChatItem]) -> Scored:
    def upstream() -> dict[str, Any]:
        if not items:
            raise UpstreamCrash("no items")
        names = ml_classes_upstream(items[0].query)
        gt, pr = [], []
        for i, it in enumerate(items):
            if ml_classes_upstream(it.query) != names:
                raise UpstreamCrash(f"item {i}: another class list than item 0's (AssertionError)")
            gt.append([n in it.answer for n in names])
            pr.append([n in it.pred for n in names])
        g, p = np.array(gt), np.array(pr)
        with np.errstate(divide="ignore", invalid="ignore"):
            cp = (g & p).sum(0) / p.sum(0)
        return {"average_cp": float(np.nan_to_num(cp).mean())}

    tp: Counter[str] = Counter()
    npred: Counter[str] = Counter()
    ngt: Counter[str] = Counter()
    rows = []
    for it in items:
        names = ml_classes(it.query)
        g = {n for n in names if _mentions(it.answer, n)}
        p = {n for n in names if _mentions(it.pred, n)}
        tp.update(g & p)
        npred.update(p)
        ngt.update(g)
        rows.append({"parsed": sorted(p), "score": len(g & p) / len(p) if p else 0.0})
    cp = _mean([tp[n] / npred[n] for n in npred])
    cr = _mean([tp[n] / ngt[n] for n in ngt])
    cf1 = 2 * cp * cr / (cp + cr) if cp is not None and cr is not None and cp + cr > 0 else None
    metrics = {"average_cp": cp, "average_cr": cr, "cf1": cf1, "classes": sorted(set(npred) | set(ngt))}
    return Scored(metrics, _upstream(upstream, ["average_cp"]), rows)
