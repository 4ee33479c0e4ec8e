"""Referring expressions generated from COCO instance annotations, written in RRSIS-D's layout.

There is no real referring data among rsvl's development data, so referring segmentation is
trained and tested on expressions generated from instance labels (NWPU VHR-10), which is
also how RRSIS-D's source (DIOR-RSVG) was built. Four template types:

- ``class``: "the storage tank" — the only instance of its class in the image;
- ``size``: "the largest ship" / "the smallest ship" (3+ of the class), "the large
  vehicle" / "the small vehicle" (exactly 2) — its area is at least :data:`SIZE_RATIO`
  times (or at most 1 / :data:`SIZE_RATIO` of) every other instance of the class;
- ``position``: "the airplane in the upper left", "the bridge at the bottom", "the ship on
  the left", "the tennis court in the middle" — the box centre in a third of the image
  (or a corner / the centre cell of the 3x3 grid);
- ``relation``: "the ship next to the harbor" (also "near", "beside") — the box lies within
  :data:`NEAR_FACTOR` x its longer side of an instance of another class; "the leftmost of
  the three storage tanks" (rightmost, topmost, bottommost) — its centre is the extreme one
  by at least :data:`EXTREME_MARGIN` of the image side.

An expression is emitted ONLY when it selects exactly one instance in the image, checked by
:func:`select` with the same predicates used to generate. Boundaries have a margin: the
target must satisfy the predicate *strictly* (inside by the margin) and no other instance of
its class may satisfy it *loosely* (within the margin), so that no instance sits on the edge
of what the words say. Per instance, at most one expression per template type is kept,
chosen with a seeded RNG among the unique ones.

Layout written under ``OUT`` (what FIANet / RMSIN / LAVT's ``REFER(root, 'rrsisd', 'unc')``
reads)::

    OUT/rrsisd/refs(unc).p        pickled list of refs (REFER format)
    OUT/rrsisd/instances.json     the COCO instances (images, annotations, categories)
    OUT/rrsisd/refgen.json        settings and statistics of the run
    OUT/images/rrsisd/JPEGImages/ links to the source images (when they can be found)

Each ref: ``ref_id, ann_id, image_id, split, file_name, category_id, sent_ids, sentences``
with sentences ``[{tokens, raw, sent, sent_id, template}]``. By default every ref holds one
sentence (as in RRSIS-D, where upstream conversion scripts assert one sentence per ref);
``group_sentences=True`` puts all sentences of an instance in one ref (RefCOCO style).
The split is by image: ``val_fraction`` of the images become ``val``, the rest ``train``.
Never anything else: NWPU's own test images are not ours to use.

Run: ``rsvl data refgen --coco ../shared/data/nwpu_vhr10/instances_train.json
--out DIR --val-fraction 0.15 --seed 0``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsvl.data.refer_text import word_tokenize
from rsvl.errors import DatasetError, InputNotFoundError, OutputError
from rsvl.io import write_bytes

__all__ = [
    "EXTREME_MARGIN",
    "NEAR_FACTOR",
    "POSITION_MARGIN",
    "SIZE_RATIO",
    "TEMPLATE_TYPES",
    "Expression",
    "GenerationResult",
    "Instance",
    "Spec",
    "class_phrase",
    "expressions_for_image",
    "generate",
    "load_coco",
    "default_image_dir",
    "format_stats",
    "select",
    "split_images",
    "write_rrsisd",
]

#: size templates: the target's area vs every other instance of its class
SIZE_RATIO = 1.5
#: position templates: margin around the thirds of the image, as a fraction of its side
POSITION_MARGIN = 0.04
#: "next to": box gap <= NEAR_FACTOR * the instance's longer box side (others: <= 2x that)
NEAR_FACTOR = 0.5
#: "leftmost of ...": the centre beats the runner-up by this fraction of the image side
EXTREME_MARGIN = 0.05

TEMPLATE_TYPES = ("class", "size", "position", "relation")

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve "
                 "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()

#: position phrases: (horizontal band, vertical band) -> words. None = any.
POSITION_PHRASES: dict[tuple[str | None, str | None], str] = {
    ("left", None): "on the left",
    ("right", None): "on the right",
    (None, "top"): "at the top",
    (None, "bottom"): "at the bottom",
    ("left", "top"): "in the upper left",
    ("right", "top"): "in the upper right",
    ("left", "bottom"): "in the lower left",
    ("right", "bottom"): "in the lower right",
    ("center", "middle"): "in the middle",
}
NEAR_WORDS = ("next to", "near", "beside")
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")


# --------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instance:
    """One annotated object: COCO box ``(x, y, w, h)`` in pixels and its mask area."""

    ann_id: int
    category_id: int
    name: str
    bbox: tuple[float, float, float, float]
    area: float

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2.0, y + h / 2.0


@dataclass(frozen=True)
class Spec:
    """What an expression means, independent of its wording.

    ``kind`` is one of ``class``, ``size``, ``position``, ``near``, ``extreme``; ``value``
    is the size word (largest/smallest), the position key ``"h,v"``, the other class
    (near) or the direction (extreme).
    """

    kind: str
    name: str
    value: str = ""


@dataclass(frozen=True)
class Expression:
    """A generated expression: its text, template type, meaning and referred annotation."""

    text: str
    template: str
    spec: Spec
    ann_id: int


def class_phrase(name: str, plural: bool = False) -> str:
    """COCO category name -> words: ``storage_tank`` -> "storage tank(s)"."""
    words = name.replace("_", " ").replace("-", " ").strip().lower()
    if not plural:
        return words
    if words.endswith(("s", "x", "ch", "sh")):
        return words + "es"
    return words + "s"


# --------------------------------------------------------------------------------------
# Predicates (shared by generation and the uniqueness check)
# --------------------------------------------------------------------------------------

def _band(value: float, band: str, margin: float) -> bool:
    """Is a normalised coordinate in ``band``? ``margin`` > 0 widens, < 0 narrows it."""
    if band in ("left", "top"):
        return value < 1 / 3 + margin
    if band in ("right", "bottom"):
        return value > 2 / 3 - margin
    # center / middle
    return 1 / 3 - margin <= value <= 2 / 3 + margin


def _gap(a: Instance, b: Instance) -> float:
    ax, ay, aw, ah = a.bbox
    bx, by, bw, bh = b.bbox
    dx = max(0.0, max(ax, bx) - min(ax + aw, bx + bw))
    dy = max(0.0, max(ay, by) - min(ay + ah, by + bh))
    return math.hypot(dx, dy)


def _holds(spec: Spec, inst: Instance, same: Sequence[Instance], others: Sequence[Instance],
           width: float, height: float, strict: bool) -> bool:
    """Does ``inst`` satisfy ``spec``? ``same`` = all instances of its class (itself included)."""
    rest = [o for o in same if o.ann_id != inst.ann_id]
    if spec.kind == "class":
        return True
    if spec.kind == "size":
        if spec.value in ("largest", "large"):
            return all(inst.area >= SIZE_RATIO * o.area for o in rest)
        return all(inst.area * SIZE_RATIO <= o.area for o in rest)
    if spec.kind == "position":
        h, v = spec.value.split(",")
        m = -POSITION_MARGIN if strict else POSITION_MARGIN
        cx, cy = inst.center
        ok = True
        if h != "any":
            ok = ok and _band(cx / width, h, m)
        if v != "any":
            ok = ok and _band(cy / height, v, m)
        return ok
    if spec.kind == "near":
        x, y, w, h = inst.bbox
        limit = NEAR_FACTOR * max(w, h) * (1.0 if strict else 2.0)
        return any(_gap(inst, o) <= limit for o in others if o.name == spec.value)
    if spec.kind == "extreme":
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1),
                      "topmost": (1, 1), "bottommost": (1, -1)}[spec.value]
        side = width if axis == 0 else height
        margin = EXTREME_MARGIN * side
        c = inst.center[axis] * sign
        if strict:
            return all(c + margin <= o.center[axis] * sign for o in rest)
        return all(c - margin < o.center[axis] * sign for o in rest)
    raise ValueError(f"unknown spec kind {spec.kind!r}")


def select(spec: Spec, instances: Sequence[Instance], width: float, height: float,
           target: int | None = None) -> set[int]:
    """Annotation ids an expression could refer to in an image.

    With ``target`` given, the target counts only if it satisfies the predicate strictly
    and any other instance of the class that satisfies it loosely counts too: the result
    is ``{target}`` exactly when the expression is unambiguous for it. Without a target
    the loose predicate is used for all.
    """
    same = [i for i in instances if i.name == spec.name]
    others = [i for i in instances if i.name != spec.name]
    if spec.kind == "size" and len(same) < 2:
        return set()
    if spec.kind == "extreme" and len(same) < 2:
        return set()
    out: set[int] = set()
    for inst in same:
        strict = target is not None and inst.ann_id == target
        if _holds(spec, inst, same, others, width, height, strict=strict):
            out.add(inst.ann_id)
    return out


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------

def _count_words(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _candidates(inst: Instance, instances: Sequence[Instance]) -> list[tuple[str, Spec, list[str]]]:
    """(template, spec, possible wordings) of every expression type for ``inst``."""
    same = [i for i in instances if i.name == inst.name]
    n = len(same)
    cls = class_phrase(inst.name)
    out: list[tuple[str, Spec, list[str]]] = [("class", Spec("class", inst.name), [f"the {cls}"])]
    for word in ("largest", "smallest"):
        text_word = word if n >= 3 else {"largest": "large", "smallest": "small"}[word]
        out.append(("size", Spec("size", inst.name, word), [f"the {text_word} {cls}"]))
    for (h, v), phrase in POSITION_PHRASES.items():
        key = f"{h or 'any'},{v or 'any'}"
        out.append(("position", Spec("position", inst.name, key), [f"the {cls} {phrase}"]))
    counts = Counter(i.name for i in instances)
    for other in sorted({i.name for i in instances if i.name != inst.name}):
        det = "the" if counts[other] == 1 else "a"
        texts = [f"the {cls} {w} {det} {class_phrase(other)}" for w in NEAR_WORDS]
        out.append(("relation", Spec("near", inst.name, other), texts))
    for ext in EXTREMES:
        texts = [f"the {ext} of the {_count_words(n)} {class_phrase(inst.name, plural=True)}"]
        out.append(("relation", Spec("extreme", inst.name, ext), texts))
    return out


def expressions_for_image(instances: Sequence[Instance], width: float, height: float,
                          rng: random.Random) -> list[Expression]:
    """Unambiguous expressions for the instances of one image (at most one per type each)."""
    result: list[Expression] = []
    for inst in sorted(instances, key=lambda i: i.ann_id):
        by_type: dict[str, list[tuple[Spec, list[str]]]] = defaultdict(list)
        for template, spec, texts in _candidates(inst, instances):
            if select(spec, instances, width, height, target=inst.ann_id) == {inst.ann_id}:
                by_type[template].append((spec, texts))
        for template in TEMPLATE_TYPES:
            options = by_type.get(template)
            if not options:
                continue
            spec, texts = options[rng.randrange(len(options))]
            text = texts[rng.randrange(len(texts))]
            result.append(Expression(text=text, template=template, spec=spec,
                                     ann_id=inst.ann_id))
    return result


def load_coco(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a COCO instances file, checking the keys the generator needs."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"COCO instances file not found: {p}",
                                 hint="Pass --coco PATH to an instances JSON file.")
    try:
        coco = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read COCO instances {p}: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DatasetError(f"{p} is not COCO instances: no '{key}' key",
                               hint="Expected {'images': [...], 'annotations': [...], "
                                    "'categories': [...]}.")
    return coco


def _instances_by_image(coco: dict[str, Any]) -> dict[int, list[Instance]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out: dict[int, list[Instance]] = defaultdict(list)
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue
        cat = a.get("category_id", a.get("categories_id"))
        if cat not in names:
            raise DatasetError(f"annotation {a.get('id')} has unknown category {cat!r}")
        x, y, w, h = (float(v) for v in a["bbox"])
        area = float(a.get("area") or w * h)
        out[a["image_id"]].append(Instance(int(a["id"]), int(cat), names[cat], (x, y, w, h),
                                           area))
    return out


def split_images(image_ids: Iterable[int], val_fraction: float, seed: int) -> dict[int, str]:
    """Image id -> 'train' | 'val': a seeded shuffle, the first ``val_fraction`` is val."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(set(image_ids))
    random.Random(f"refgen-split:{seed}").shuffle(ids)
    n_val = int(round(len(ids) * val_fraction))
    return {i: ("val" if k < n_val else "train") for k, i in enumerate(ids)}


@dataclass
class GenerationResult:
    """Refs in REFER format plus the statistics of the run."""

    refs: list[dict[str, Any]]
    expressions: list[tuple[int, Expression]]
    stats: dict[str, Any]


def generate(coco: dict[str, Any], *, val_fraction: float = 0.15, seed: int = 0,
             group_sentences: bool = False) -> GenerationResult:
    """Generate refs (REFER format) for every image of ``coco``; deterministic in ``seed``."""

    images = {im["id"]: im for im in coco["images"]}
    by_image = _instances_by_image(coco)
    split = split_images(images, val_fraction, seed)
    refs: list[dict[str, Any]] = []
    exprs: list[tuple[int, Expression]] = []
    sent_id = 0
    for image_id in sorted(images):
        im = images[image_id]
        insts = by_image.get(image_id, [])
        if not insts:
            continue
        rng = random.Random(f"refgen:{seed}:{image_id}")
        found = expressions_for_image(insts, float(im["width"]), float(im["height"]), rng)
        groups: dict[int, list[Expression]] = defaultdict(list)
        for e in found:
            groups[e.ann_id].append(e)
            exprs.append((image_id, e))
        cat_of = {i.ann_id: i.category_id for i in insts}
        for ann_id in sorted(groups):
            bundles = [groups[ann_id]] if group_sentences else [[e] for e in groups[ann_id]]
            for bundle in bundles:
                sentences = []
                for e in bundle:
                    sentences.append({"tokens": word_tokenize(e.text), "raw": e.text,
                                      "sent": e.text, "sent_id": sent_id,
                                      "template": e.template})
                    sent_id += 1
                refs.append({
                    "ref_id": len(refs),
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "split": split[image_id],
                    "file_name": im["file_name"],
                    "category_id": cat_of[ann_id],
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                })
    stats = _stats(refs, exprs, by_image, split, images)
    stats["settings"] = {"val_fraction": val_fraction, "seed": seed,
                         "group_sentences": group_sentences, "size_ratio": SIZE_RATIO,
                         "position_margin": POSITION_MARGIN, "near_factor": NEAR_FACTOR,
                         "extreme_margin": EXTREME_MARGIN}
    return GenerationResult(refs=refs, expressions=exprs, stats=stats)


def _stats(refs: list[dict[str, Any]], exprs: list[tuple[int, Expression]],
           by_image: dict[int, list[Instance]], split: dict[int, str],
           images: dict[int, Any]) -> dict[str, Any]:
    per_type = Counter(e.template for _, e in exprs)
    per_kind = Counter(e.spec.kind for _, e in exprs)
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    for _, e in exprs:
        per_class[e.spec.name][e.template] += 1
    instances = sum(len(v) for v in by_image.values())
    referred = {e.ann_id for _, e in exprs}
    per_split_expr = Counter(split[i] for i, _ in exprs)
    per_split_img = Counter(split[i] for i in images)
    per_split_refs = Counter(r["split"] for r in refs)
    return {
        "expressions": len(exprs),
        "refs": len(refs),
        "instances": instances,
        "instances_referred": len(referred),
        "images": len(images),
        "per_template": {t: per_type.get(t, 0) for t in TEMPLATE_TYPES},
        "per_kind": dict(sorted(per_kind.items())),
        "per_class": {k: dict(sorted(v.items())) | {"total": sum(v.values())}
                      for k, v in sorted(per_class.items())},
        "per_split": {s: {"images": per_split_img.get(s, 0), "refs": per_split_refs.get(s, 0),
                          "expressions": per_split_expr.get(s, 0)} for s in ("train", "val")},
    }


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def write_rrsisd(result: GenerationResult, coco: dict[str, Any], out: str | os.PathLike[str],
                 *, image_dir: str | os.PathLike[str] | None = None, link: str = "symlink",
                 overwrite: bool = False) -> Path:
    """Write ``result`` in RRSIS-D's layout under ``out``; returns ``out/rrsisd``.

    ``image_dir`` holds the COCO images; each referred image is linked (``link="symlink"``),
    copied (``"copy"``) or left alone (``"none"``) under ``out/images/rrsisd/JPEGImages``.
    """
    root = Path(out)
    ddir = root / "rrsisd"
    refs_path = ddir / "refs(unc).p"
    if refs_path.exists() and not overwrite:
        raise OutputError(f"{refs_path} exists", hint="Pass --overwrite or choose another --out.")
    if link not in ("symlink", "copy", "none"):
        raise OutputError(f"link must be symlink, copy or none, not {link!r}")
    ddir.mkdir(parents=True, exist_ok=True)
    write_bytes(ddir / "instances.json", json.dumps(coco).encode())
    write_bytes(refs_path, pickle.dumps(result.refs, protocol=4))
    write_bytes(ddir / "refgen.json", json.dumps(result.stats, indent=2).encode())
    if image_dir is not None and link != "none":
        src_dir = Path(image_dir)
        dst_dir = root / "images" / "rrsisd" / "JPEGImages"
        dst_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted({r["file_name"] for r in result.refs}):
            src, dst = src_dir / name, dst_dir / name
            if not src.is_file():
                raise InputNotFoundError(f"image {src} of the COCO file is missing",
                                         hint="Pass --images DIR holding the COCO images.")
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            if link == "symlink":
                dst.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, dst)
    return ddir


# --------------------------------------------------------------------------------------
# report (``rsvl data refgen`` prints it)
# --------------------------------------------------------------------------------------

def format_stats(stats: dict[str, Any]) -> str:
    """Plain-text report of a run's statistics."""
    lines = [
        f"images {stats['images']}, instances {stats['instances']}, referred "
        f"{stats['instances_referred']}, expressions {stats['expressions']}, refs {stats['refs']}",
        "per template: " + ", ".join(f"{k} {v}" for k, v in stats["per_template"].items()),
        "per kind:     " + ", ".join(f"{k} {v}" for k, v in stats["per_kind"].items()),
        "per split:    " + ", ".join(
            f"{s} {d['images']} images / {d['refs']} refs / {d['expressions']} expressions"
            for s, d in stats["per_split"].items()),
        f"{'class':<20}" + "".join(f"{t:>10}" for t in (*TEMPLATE_TYPES, "total")),
    ]
    for name, row in stats["per_class"].items():
        lines.append(f"{name:<20}" + "".join(f"{row.get(t, 0):>10}"
                                             for t in (*TEMPLATE_TYPES, "total")))
    return "\n".join(lines)


def default_image_dir(coco_path: str | os.PathLike[str]) -> Path | None:
    """The ``images`` folder beside a COCO file, if there is one."""
    guess = Path(coco_path).parent / "images"
    return guess if guess.is_dir() else None
