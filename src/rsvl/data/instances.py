"""Instances from binary masks: WHU building labels -> COCO instances, as RSPrompter does.

RSPrompter's ``whu2coco.py`` turns every building label tile into instances by 4-connected
components of the building pixels (``cv2.connectedComponentsWithStats(connectivity=4)``),
one RLE instance per component, ``category_id`` 1 ("building"), bbox from the RLE. This is
the same rule written with scipy (no OpenCV dependency):

    from rsvl.data.instances import whu_to_coco, write_coco
    write_coco(whu_to_coco("../shared/data/semseg/whu_building", "train"), "whu_train.json")

Layout: ``ROOT/<split>/image/NAME.tif`` and ``ROOT/<split>/label/NAME.tif`` (the same name).
Which label value means "building" differs between copies of WHU (255 in the original
release, 1 in some converted copies): pass ``building_value``; the default 255 follows the
original release.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from rsvl.data.common import require_dir
from rsvl.errors import DatasetError
from rsvl.geo.raster import open_dataset
from rsvl.io import IMAGE_SUFFIXES, write_text

__all__ = ["mask_instances", "whu_to_coco", "write_coco"]

WHU_LAYOUT = "ROOT/<split>/image/NAME.tif with ROOT/<split>/label/NAME.tif (binary building masks)"


def mask_instances(mask: np.ndarray, connectivity: int = 4, min_pixels: int = 1) -> list[np.ndarray]:
    """Binary (H, W) mask -> one boolean mask per connected component (4- or 8-connected),
    in raster order of each component's first pixel."""
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    lab, n = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)
    out = []
    for k in range(1, n + 1):
        m = lab == k
        if m.sum() >= min_pixels:
            out.append(m)
    return out


def _read_band(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain tiles have no georeference
        with open_dataset(path) as ds:  # a raw-band VRT is refused here too
            return ds.read(1)


def whu_to_coco(root: str | os.PathLike[str], split: str, *, building_value: int = 255,
                connectivity: int = 4, min_pixels: int = 1,
                image_suffixes: Iterable[str] = IMAGE_SUFFIXES) -> dict[str, Any]:
    """A COCO instances dict (RLE segmentations, 1-based ids) of one WHU split."""
    base = require_dir(Path(root) / split, f"WHU split {split!r}", WHU_LAYOUT)
    img_dir = require_dir(base / "image", "WHU image folder", WHU_LAYOUT)
    lab_dir = require_dir(base / "label", "WHU label folder", WHU_LAYOUT)
    suffixes = tuple(s.lower() for s in image_suffixes)
    names = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in suffixes)
    if not names:
        raise DatasetError(f"No images in {img_dir}.", hint=f"Expected layout: {WHU_LAYOUT}")
    images, anns = [], []
    for img_id, img_path in enumerate(names, start=1):
        lab_path = lab_dir / img_path.name
        if not lab_path.is_file():
            raise DatasetError(f"No label for {img_path.name} in {lab_dir}.",
                               hint=f"Expected layout: {WHU_LAYOUT}")
        label = _read_band(lab_path)
        h, w = label.shape
        images.append({"id": img_id, "file_name": img_path.name, "width": int(w), "height": int(h)})
        for m in mask_instances(label == building_value, connectivity, min_pixels):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": bbox})
    return {"info": {"description": f"WHU building {split}: 4-connected components",
                     "building_value": building_value, "connectivity": connectivity},
            "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "building", "supercategory": "building"}]}


def write_coco(coco: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a COCO dict as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(coco))
