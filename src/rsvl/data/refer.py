"""Readers of the referring-segmentation benchmarks FIANet uses: RRSIS-D and RefSegRS.

Both yield :class:`ReferSample` records: image path, ``(H, W)`` bool mask, sentence and ids.

RRSIS-D (REFER format, as read by ``REFER(root, 'rrsisd', 'unc')`` in LAVT / RMSIN /
FIANet)::

    ROOT/rrsisd/refs(unc).p          pickled list of refs: ref_id, ann_id, image_id, split,
                                     file_name, category_id, sent_ids,
                                     sentences [{tokens, raw, sent, sent_id}]
    ROOT/rrsisd/instances.json       COCO: images (id, file_name, height, width),
                                     annotations (id, image_id, segmentation, ...)
    ROOT/images/rrsisd/JPEGImages/   the images, by the instances' file_name

The mask is the referred annotation's segmentation (polygons, a list of RLEs as RRSIS-D
stores it, or one RLE) decoded with pycocotools. Upstream sums the decoded parts and keeps
pixels equal to 1 (``mask_rule="upstream"``, pixels covered by two parts drop out);
``mask_rule="union"`` keeps any covered pixel. :func:`rsvl.data.refgen` writes this layout.

RefSegRS (as read by FIANet's ``build_rsris_batches``)::

    ROOT/images/<name>.tif
    ROOT/masks/<name>.tif            foreground where the grey value is > 50
    ROOT/output_phrase_{train,val,test}.txt   one "<name> <sentence ...>" per line

One non-empty line is one sample; its ``ref_id`` and ``sent_id`` are its 0-based position.
A colour mask is converted to grey (ITU-R 601 luma, as OpenCV's grey read does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from rsvl.errors import DatasetError
from rsvl.io import read_plain_pickle

__all__ = ["RRSISD_LAYOUT", "REFSEGRS_LAYOUT", "ReferSample", "RefSegRS", "RRSISD",
           "decode_segmentation"]

RRSISD_LAYOUT = ("ROOT/rrsisd/refs(unc).p, ROOT/rrsisd/instances.json and the images in "
                 "ROOT/images/rrsisd/JPEGImages/")
REFSEGRS_LAYOUT = ("ROOT/images/<name>.tif, ROOT/masks/<name>.tif and "
                   "ROOT/output_phrase_{train,val,test}.txt with lines '<name> <sentence>'")


@dataclass
class ReferSample:
    """One (image, mask, sentence) triplet of a referring-segmentation dataset."""

    image_path: Path
    mask: np.ndarray
    sentence: str
    ref_id: int
    sent_id: int
    image_id: int | str
    split: str
    ann_id: int | None = None
    category_id: int | None = None
    #: the expression's type when the data says it (``rsvl data refgen`` writes ``template``:
    #: class, size, position, relation...); None for human-written data
    expression_type: str | None = None


def decode_segmentation(segmentation: Any, height: int, width: int,
                        mask_rule: Literal["upstream", "union"] = "upstream") -> np.ndarray:
    """COCO segmentation (polygons, RLE, or a list of RLEs) -> ``(H, W)`` bool mask."""
    if isinstance(segmentation, dict):
        parts = [segmentation]
    elif isinstance(segmentation, list) and segmentation and isinstance(segmentation[0], list):
        parts = mask_utils.frPyObjects(segmentation, height, width)  # polygons
    elif isinstance(segmentation, list) and segmentation and isinstance(segmentation[0], dict):
        parts = list(segmentation)
    elif isinstance(segmentation, list) and not segmentation:
        return np.zeros((height, width), dtype=bool)
    else:
        raise DatasetError(f"unrecognised segmentation of type {type(segmentation).__name__}",
                           hint="Expected COCO polygons, an RLE dict or a list of RLE dicts.")
    rles = []
    for p in parts:
        if isinstance(p.get("counts"), list):  # uncompressed RLE
            p = mask_utils.frPyObjects(p, *p["size"])
        elif isinstance(p.get("counts"), str):
            p = {"size": p["size"], "counts": p["counts"].encode("ascii")}
        if list(p["size"]) != [height, width]:
            raise DatasetError(f"RLE size {list(p['size'])} differs from the image size "
                               f"{[height, width]}")
        rles.append(p)
    decoded = mask_utils.decode(rles)  # (H, W, N)
    total = decoded.astype(np.int32).sum(axis=2)
    if mask_rule == "upstream":
        return total.astype(np.uint8) == 1
    if mask_rule == "union":
        return total > 0
    raise ValueError(f"mask_rule must be 'upstream' or 'union', not {mask_rule!r}")


class RRSISD:
    """RRSIS-D (or any REFER-format set, e.g. :mod:`rsvl.data.refgen` output).

    ``len()`` and indexing count (ref, sentence) pairs of the split, in ref order; masks
    are decoded when a sample is accessed. ``split=None`` takes every split.
    """

    def __init__(self, root: str | os.PathLike[str], split: str | None = "train", *,
                 dataset: str = "rrsisd", split_by: str = "unc",
                 image_dir: str | os.PathLike[str] | None = None,
                 mask_rule: Literal["upstream", "union"] = "upstream") -> None:
        self.root = Path(root)
        self.split = split
        self.mask_rule = mask_rule
        ddir = self.root / dataset
        refs_path = ddir / f"refs({split_by}).p"
        inst_path = ddir / "instances.json"
        self.image_dir = Path(image_dir) if image_dir else self.root / "images" / dataset / \
            "JPEGImages"
        layout = RRSISD_LAYOUT.replace("rrsisd", dataset).replace("(unc)", f"({split_by})")
        for path in (refs_path, inst_path):
            if not path.is_file():
                raise DatasetError(f"{path} not found: not a REFER-format dataset root",
                                   hint=f"Expected {layout}.")
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} not found",
                               hint=f"Expected {layout}.")
        # REFER's format is a pickle: read as plain data only (lists, dicts, str, numbers),
        # so a crafted file cannot run code
        refs = read_plain_pickle(refs_path, what="REFER refs file", error=DatasetError,
                                 hint=f"Expected {layout}; regenerate the refs file "
                                 "(`rsvl data refgen`) or take it from the dataset's release.")
        try:
            instances = json.loads(inst_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"cannot read {inst_path}: {exc}",
                               hint=f"Expected {layout}.") from exc
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs) \
                or not isinstance(instances, dict) or "images" not in instances \
                or "annotations" not in instances:
            raise DatasetError(f"{ddir} does not hold REFER refs and COCO instances",
                               hint=f"Expected {layout}.")
        self.images = {im["id"]: im for im in instances["images"]}
        self.anns = {a["id"]: a for a in instances["annotations"]}
        self.refs = [r for r in refs if split is None or r.get("split") == split]
        self.pairs: list[tuple[dict[str, Any], dict[str, Any]]] = [
            (r, s) for r in self.refs for s in r["sentences"]]
        if split is not None and not self.refs:
            splits = sorted({str(r.get("split")) for r in refs})
            raise DatasetError(f"no refs of split {split!r} in {refs_path}",
                               hint=f"Splits present: {', '.join(splits) or 'none'}.")

    def __len__(self) -> int:
        return len(self.pairs)

    def mask(self, ref: dict[str, Any]) -> np.ndarray:
        """The (H, W) bool mask of a ref's annotation."""
        ann = self.anns.get(ref["ann_id"])
        if ann is None:
            raise DatasetError(f"ref {ref['ref_id']} points to missing annotation {ref['ann_id']}")
        im = self.images[ref["image_id"]]
        return decode_segmentation(ann["segmentation"], int(im["height"]), int(im["width"]),
                                   self.mask_rule)

    def __getitem__(self, index: int) -> ReferSample:
        ref, sent = self.pairs[index]
        im = self.images.get(ref["image_id"])
        if im is None:
            raise DatasetError(f"ref {ref['ref_id']} points to missing image {ref['image_id']}")
        ann = self.anns.get(ref["ann_id"], {})
        cat = ref.get("category_id", ann.get("category_id", ann.get("categories_id")))
        return ReferSample(
            image_path=self.image_dir / im["file_name"],
            mask=self.mask(ref),
            sentence=sent["raw"],
            ref_id=int(ref["ref_id"]),
            sent_id=int(sent["sent_id"]),
            image_id=ref["image_id"],
            split=str(ref.get("split")),
            ann_id=int(ref["ann_id"]),
            category_id=None if cat is None else int(cat),
            expression_type=sent.get("template") if isinstance(sent.get("template"), str) else None,
        )

    def __iter__(self) -> Iterator[ReferSample]:
        for i in range(len(self)):
            yield self[i]


class RefSegRS:
    """RefSegRS: tif images and masks, one ``<name> <sentence>`` line per sample."""

    def __init__(self, root: str | os.PathLike[str], split: str = "train", *,
                 threshold: int = 50) -> None:
        self.root = Path(root)
        self.split = split
        self.threshold = threshold
        phrase_file = self.root / f"output_phrase_{split}.txt"
        for path in (self.root / "images", self.root / "masks"):
            if not path.is_dir():
                raise DatasetError(f"{path} not found: not a RefSegRS root",
                                   hint=f"Expected {REFSEGRS_LAYOUT}.")
        if not phrase_file.is_file():
            raise DatasetError(f"{phrase_file} not found",
                               hint=f"Expected {REFSEGRS_LAYOUT}.")
        self.samples: list[tuple[str, str]] = []
        for n, line in enumerate(phrase_file.read_text().splitlines()):
            if not line.strip():
                continue
            name, _, sentence = line.partition(" ")
            if not sentence.strip():
                raise DatasetError(f"{phrase_file}:{n + 1}: no sentence after the name",
                                   hint="Each line is '<name> <sentence>'.")
            self.samples.append((name, sentence.strip()))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ReferSample:
        name, sentence = self.samples[index]
        image_path = self.root / "images" / f"{name}.tif"
        mask_path = self.root / "masks" / f"{name}.tif"
        for path in (image_path, mask_path):
            if not path.is_file():
                raise DatasetError(f"{path} not found (listed in output_phrase_{self.split}.txt)",
                                   hint=f"Expected {REFSEGRS_LAYOUT}.")
        try:
            with Image.open(mask_path) as im:
                arr = np.asarray(im if im.mode in ("L", "I", "I;16", "F") else im.convert("L"))
        except OSError as exc:
            raise DatasetError(f"cannot read mask {mask_path}: {exc}") from exc
        if arr.ndim == 3:
            arr = arr[..., 0]
        return ReferSample(image_path=image_path, mask=arr.astype(np.float64) > self.threshold,
                           sentence=sentence, ref_id=index, sent_id=index, image_id=name,
                           split=self.split)

    def __iter__(self) -> Iterator[ReferSample]:
        for i in range(len(self)):
            yield self[i]
