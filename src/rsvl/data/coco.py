"""COCO instance datasets (NWPU VHR-10, SSDD, WHU as RSPrompter ships them) via pycocotools.

Category ids are kept as the file has them (1-based for these datasets); ``label_of``
gives the contiguous 0-based index a model head uses, ``cat_id_of`` maps it back.
:func:`open_coco` and :func:`split_ids` are what training and evaluation share: the
dataset with errors that say what to do, and the seeded train / val image split;
:func:`detections_to_coco` turns torchvision-style detections into COCO results.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from rsvl.data.common import check_image, load_json, require_dir
from rsvl.data.refgen import split_images
from rsvl.errors import DatasetError, InputNotFoundError

__all__ = [
    "CocoInstanceDataset",
    "CocoSample",
    "detections_to_coco",
    "open_coco",
    "split_ids",
]

COCO_LAYOUT = (
    "ROOT/instances_<split>.json (COCO: 'images', 'annotations', 'categories') with the images in "
    "ROOT/images/ or ROOT/imgs/ (or pass image_dir)"
)


@dataclass(frozen=True)
class CocoSample:
    """One image and its annotations (dicts as in the JSON: bbox xywh, segmentation, category_id)."""

    image: Path
    image_id: int
    width: int
    height: int
    annotations: tuple[dict[str, Any], ...]


class CocoInstanceDataset(Sequence[CocoSample]):
    """A COCO instances JSON plus its image folder; images are read by the caller."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path | None = None):
        ann_file = Path(ann_file)
        data = load_json(ann_file, "COCO annotation file", COCO_LAYOUT)
        if not isinstance(data, dict) or any(
            not isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise DatasetError(
                f"{ann_file} lacks an 'images', 'annotations' or 'categories' list.",
                hint=f"Expected layout: {COCO_LAYOUT}",
            )
        for k, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or not {"image_id", "category_id"} <= a.keys():
                raise DatasetError(
                    f"Annotation {k} of {ann_file} lacks 'image_id' or 'category_id'.",
                    hint=f"Expected layout: {COCO_LAYOUT}",
                )
            a.setdefault("iscrowd", 0)
            if "area" not in a and "bbox" in a:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
        if image_dir is None:
            for cand in ("images", "imgs"):
                if (ann_file.parent / cand).is_dir():
                    image_dir = ann_file.parent / cand
                    break
            else:
                raise DatasetError(
                    f"No image folder (images/ or imgs/) next to {ann_file}.",
                    hint="Pass image_dir= the folder holding the images.",
                )
        self.image_dir = require_dir(Path(image_dir), "Image folder", COCO_LAYOUT)
        self.ann_file = ann_file
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        unknown = {a["category_id"] for a in data["annotations"]} - set(coco.cats)
        if unknown:
            raise DatasetError(
                f"{ann_file} has annotations of undeclared categories {sorted(unknown)}.",
                hint="Every category_id must appear in 'categories'.",
            )
        self.coco = coco
        self.cat_ids: list[int] = sorted(coco.cats)
        self.classes: list[str] = [coco.cats[c]["name"] for c in self.cat_ids]
        self._label = {c: i for i, c in enumerate(self.cat_ids)}
        self.image_ids: list[int] = sorted(coco.imgs)

    # -- categories ----------------------------------------------------------------------

    def label_of(self, cat_id: int) -> int:
        """Contiguous 0-based class index of a (1-based) category id."""
        return self._label[cat_id]

    def cat_id_of(self, label: int) -> int:
        return self.cat_ids[label]

    @property
    def categories(self) -> list[dict[str, Any]]:
        return [self.coco.cats[c] for c in self.cat_ids]

    # -- sequence ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def _sample(self, image_id: int) -> CocoSample:
        info = self.coco.imgs[image_id]
        anns = tuple(dict(a) for a in self.coco.imgToAnns.get(image_id, []))
        path = check_image(self.image_dir / info["file_name"], COCO_LAYOUT)
        return CocoSample(path, int(image_id), int(info["width"]), int(info["height"]), anns)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._sample(self.image_ids[i])

    def __iter__(self) -> Iterator[CocoSample]:
        for image_id in self.image_ids:
            yield self._sample(image_id)

    def by_id(self, image_id: int) -> CocoSample:
        if image_id not in self.coco.imgs:
            raise DatasetError(
                f"No image with id {image_id} in {self.ann_file}.", hint="Use an id from 'images'."
            )
        return self._sample(image_id)

    # -- targets -------------------------------------------------------------------------

    def boxes_xyxy(self, sample: CocoSample) -> np.ndarray:
        """(N, 4) float32 boxes x1, y1, x2, y2 in pixels."""
        b = np.asarray([a["bbox"] for a in sample.annotations], dtype=np.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        return b

    def labels(self, sample: CocoSample) -> np.ndarray:
        """(N,) int64 contiguous 0-based class indices."""
        return np.asarray(
            [self._label[a["category_id"]] for a in sample.annotations], dtype=np.int64
        )

    def masks(self, sample: CocoSample) -> np.ndarray:
        """(N, H, W) bool instance masks decoded from polygons / RLE."""
        if not sample.annotations:
            return np.zeros((0, sample.height, sample.width), dtype=bool)
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.stack([self.coco.annToMask(a).astype(bool) for a in sample.annotations])

    def subset(self, image_ids: Sequence[int]) -> dict[str, Any]:
        """A COCO dict restricted to some images (for evaluating on a split)."""
        keep = set(image_ids)
        d = self.coco.dataset
        return {
            **{k: v for k, v in d.items() if k not in ("images", "annotations")},
            "images": [im for im in d["images"] if im["id"] in keep],
            "annotations": [a for a in d["annotations"] if a["image_id"] in keep],
        }


def open_coco(data: str | Path, images: str | Path | None = None) -> Any:
    """A :class:`rsvl.data.coco.CocoInstanceDataset`, with errors that say what to do."""
    data = Path(data)
    if not data.is_file():
        raise InputNotFoundError(
            f"COCO annotation file not found: {data}.",
            hint="Pass --data the path of a COCO instances JSON (e.g. "
            "../shared/data/nwpu_vhr10/instances_train.json).",
        )
    if images is not None and not Path(images).is_dir():
        raise InputNotFoundError(
            f"Image folder not found: {images}.", hint="Pass --images the folder holding the images."
        )
    return CocoInstanceDataset(data, images)


def split_ids(image_ids: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, val ids): the image split the referring data generator uses too."""
    split = split_images(image_ids, val_fraction, seed)
    train = sorted(i for i, s in split.items() if s == "train")
    val = sorted(i for i, s in split.items() if s == "val")
    return train, val


def detections_to_coco(outputs: Sequence[Mapping[str, Any]], image_ids: Sequence[int],
                       cat_ids: Sequence[int], mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision outputs (tensors, or anything with their methods) -> COCO results (bbox xywh + RLE segmentation); labels 1..C map to
    ``cat_ids[label - 1]``."""
    res: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().float().cpu().numpy()
        scores = out["scores"].detach().float().cpu().numpy()
        labels = out["labels"].detach().cpu().numpy()
        masks = out.get("masks")
        binm = None
        if masks is not None:
            binm = (masks.detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for k in range(len(scores)):
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            d: dict[str, Any] = {"image_id": int(image_id),
                                 "category_id": int(cat_ids[int(labels[k]) - 1]),
                                 "score": float(scores[k]), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if binm is not None:
                rle = mask_utils.encode(np.asfortranarray(binm[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                d["segmentation"] = rle
            res.append(d)
    return res
