"""Train and val crops of the shared pixel-labelled crops, for training dense models and for a
val set that was never trained on (``rsvl data semseg-split``).

The shared data holds few labelled crops (LoveDA 2, Potsdam 1, Vaihingen 1, WHU building 2
train + 2 val), so the split is by crop where there are several and by quadrant where there is
one: every dataset keeps at least one crop out for val.

* LoveDA: ``0`` -> train, ``1`` -> val (whole 1024 px crops).
* Potsdam, Vaihingen: the 512 px crop cut into 256 px quadrants; top-left, top-right and
  bottom-left -> train, bottom-right -> val.
* WHU building: its own ``train`` and ``val`` folders, masks written as 0/1 PNG.

Output (the simple layout every rsvl reader and ``rsvl eval ovss --preset`` understand)::

    OUT/train/<name>/images/<crop>.png   OUT/train/<name>/labels/<crop>.png
    OUT/val/<name>/images/<crop>.png     OUT/val/<name>/labels/<crop>.png
    OUT/split.json                       (what went where)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsvl.data.segmentation import segmentation_preset
from rsvl.errors import DatasetError, OutputError
from rsvl.io import write_text

#: datasets cut into quadrants (one crop each in the shared data): quadrant -> split
QUADRANT_SPLIT = {"tl": "train", "tr": "train", "bl": "train", "br": "val"}
#: datasets split by crop name: name -> {crop stem: split}
CROP_SPLIT = {"loveda": {"0": "train", "1": "val"}}
DATASETS = ("loveda", "potsdam", "vaihingen", "whu_building")


def _save(img: np.ndarray, lab: np.ndarray, root: Path, split: str, name: str, stem: str) -> None:
    for sub, arr in (("images", img), ("labels", lab)):
        d = root / split / name / sub
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{stem}.png")


def _raw_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def build_semseg_split(semseg: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the train / val crops of ``semseg`` (``../shared/data/semseg``) under ``out``."""
    src, dst = Path(semseg), Path(out)
    if not src.is_dir():
        raise DatasetError(f"semseg folder not found: {src}.",
                           hint="Pass the folder holding loveda/, potsdam/, vaihingen/, whu_building/.")
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} exists.", hint="Pass --overwrite to replace it, or choose another folder.")
    stats: dict[str, Any] = {"source": str(src), "rule": __doc__.split("\n\n")[2].strip(), "crops": {}}
    found = False
    for name in DATASETS:
        folder = src / name
        if not folder.is_dir():
            continue
        found = True
        if name == "whu_building":
            for split in ("train", "val"):
                ds = segmentation_preset(name, folder, split) if (folder / split).is_dir() else None
                for s in ds.samples if ds is not None else []:
                    lab = (ds.read_label(s) > 0).astype(np.uint8)
                    _save(ds.read_image(s), lab, dst, split, name, s.name)
                    stats["crops"].setdefault(name, {}).setdefault(split, []).append(s.name)
            continue
        ds = segmentation_preset(name, folder)
        for s in ds.samples:
            img, lab = ds.read_image(s), _raw_label(s.label)
            if name in CROP_SPLIT:
                split = CROP_SPLIT[name].get(s.name, "train")
                _save(img, lab, dst, split, name, s.name)
                stats["crops"].setdefault(name, {}).setdefault(split, []).append(s.name)
                continue
            h, w = lab.shape[:2]
            hy, hx = h // 2, w // 2
            quads = {"tl": (0, hy, 0, hx), "tr": (0, hy, hx, w), "bl": (hy, h, 0, hx), "br": (hy, h, hx, w)}
            for q, (y0, y1, x0, x1) in quads.items():
                split = QUADRANT_SPLIT[q]
                stem = f"{s.name}_{q}"
                _save(img[y0:y1, x0:x1], lab[y0:y1, x0:x1], dst, split, name, stem)
                stats["crops"].setdefault(name, {}).setdefault(split, []).append(stem)
    if not found:
        raise DatasetError(f"{src} has none of {', '.join(DATASETS)}.",
                           hint="Pass ../shared/data/semseg (or a folder with the same sub-folders).")
    write_text(dst / "split.json", json.dumps(stats, indent=2))
    return stats
