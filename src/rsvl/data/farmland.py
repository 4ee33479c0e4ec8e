"""``rsvl data farmland``: language-guided segmentation data in FSVLM's FIT layout, built from
the real pixel labels rsvl's users have (``../shared/data``).

Layout (FarmSeg-VL / FIT, what ``rsvl train fsvlm`` and ``rsvl eval farmland`` read)::

    OUT/{train,val,test}/img/NAME.png   RGB
    OUT/{train,val,test}/lbl/NAME.png   0 background, 1 the requested class (any non-zero)
    OUT/{train,val,test}/json/NAME.json {"img_description_eg": "...", "question": "..."?,
                                         "source": "...", "gsd": ...}

No ``question`` key means FSVLM's farmland request; other requests carry their own
("Please segment the storage tanks."), which replaces the farmland question for that image.

Sources, and where each goes:

* **UCM mosaics** (farmland, the headline): g x g grids (g = 1, 2 or 3) of UCM scenes with a
  random flip or rotation per cell, resized to ``size`` px, so the ground sampling distance
  varies from 0.2 to 0.6 m; a cell is farmland when its scene is ``agricultural``. The other
  cells are the other UCM classes and, when ``aid`` is given, AID's landscapes (meadow,
  bare land, forest, desert...: the look-alikes that matter). About one mosaic in five has no
  farmland at all. The description names the GSD and what the mosaic shows, or is one of the
  scenes' human captions, or is empty (FSVLM's descriptions are optional). UCM's own split;
  AID's seeded split of :func:`rsvl.data.chat_items.aid_split`.
* **NWPU VHR-10** ("Please segment the storage tanks."): one request per image and class
  present, the label the union of that class's instance polygons; the images' refgen split
  (the same as ``rsvl data refgen`` and ``rsvl data chat``: val images unseen by every
  built-in model).
* **WHU building** ("Please segment the buildings."): its train/val folders.
* **LoveDA crops** -> ``test`` only (never trained on or selected on): 512 px tiles of the
  1024 px crops, farmland = LoveDA's agriculture class (7); LoveDA's no-data (0) counts as
  background, as FSVLM's loader would read it.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsvl.data.chat_items import aid_class_name, aid_split, clean_caption, ucm_class_name
from rsvl.data.refgen import class_phrase, load_coco, split_images
from rsvl.errors import DatasetError, InputNotFoundError, OutputError
from rsvl.io import atomic_dir, read_rgb, write_text

#: UCM scenes are 256 px at about 0.3 m
UCM_GSD = 0.3
FARMLAND_CLASS = "agricultural"
#: LoveDA's agriculture index
LOVEDA_FARMLAND = 7


@dataclass
class Sample:
    split: str
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8, 0/1
    meta: dict[str, Any]


def _resize(arr: np.ndarray, size: tuple[int, int], label: bool = False) -> np.ndarray:
    """(H, W[, 3]) -> (size[1], size[0]) with bicubic (images) or nearest (labels) resampling."""
    if arr.shape[1] == size[0] and arr.shape[0] == size[1]:
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST if label else Image.BICUBIC))


def _augment(arr: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of a square cell."""
    out = np.rot90(arr, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def _phrase_list(words: Sequence[str]) -> str:
    words = list(dict.fromkeys(words))
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


_SCENE_WORDS = {"agricultural": "farmland", "buildings": "buildings", "storagetanks": "storage tanks",
                "parkinglot": "a parking lot", "river": "a river", "beach": "a beach"}


def _scene_words(source: str, label: str) -> str:
    if source == "ucm":
        return _SCENE_WORDS.get(label, ucm_class_name(label))
    return aid_class_name(label)


def ucm_mosaics(ucm: Path, split: str, count: int, size: int, seed: int,
                aid: dict[str, list[Path]] | None = None, farmland_p: float = 0.4,
                empty_p: float = 0.2) -> list[Sample]:
    """``count`` mosaics of UCM (and AID) scenes of ``split`` with per-cell farmland labels."""
    meta = json.loads((ucm / "ucm.json").read_text())
    scenes: dict[str, list[dict[str, Any]]] = {}
    for s in meta["samples"]:
        if s["split"] == split:
            scenes.setdefault(s["label"], []).append(s)
    if not scenes.get(FARMLAND_CLASS):
        raise DatasetError(f"{ucm / 'ucm.json'} has no {FARMLAND_CLASS!r} scenes in its {split} split.")
    others = [("ucm", c) for c in sorted(scenes) if c != FARMLAND_CLASS]
    others += [("aid", c) for c in sorted(aid or {}) if (aid or {}).get(c)]
    rng = random.Random(f"farmland-mosaic:{seed}:{split}")
    out = []
    for i in range(count):
        g = rng.choice((1, 2, 2, 3, 3)) if size >= 256 else 1
        empty = rng.random() < empty_p
        cell = 256
        image = np.zeros((g * cell, g * cell, 3), np.uint8)
        label = np.zeros((g * cell, g * cell), np.uint8)
        shown: list[str] = []
        captions: list[str] = []
        for r in range(g):
            for c in range(g):
                farm = not empty and (rng.random() < farmland_p or (g == 1 and not empty))
                if farm:
                    s = rng.choice(scenes[FARMLAND_CLASS])
                    arr, src, cls = read_rgb(ucm / s["image"]), "ucm", FARMLAND_CLASS
                    captions.extend(s.get("captions", [])[:1])
                else:
                    src, cls = rng.choice(others)
                    if src == "ucm":
                        s = rng.choice(scenes[cls])
                        arr = read_rgb(ucm / s["image"])
                        captions.extend(s.get("captions", [])[:1])
                    else:
                        arr = read_rgb(rng.choice(aid[cls]))  # type: ignore[index]
                arr = _augment(_resize(arr, (cell, cell)), rng.randrange(8))
                image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = arr
                label[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 1 if farm else 0
                shown.append(_scene_words(src, cls))
        image = _resize(image, (size, size))
        label = _resize(label, (size, size), label=True)
        gsd = UCM_GSD * g * cell / size
        kind = rng.random()
        if kind < 0.5:
            desc = f"This is a {gsd:.1f} m aerial image of {_phrase_list(shown)}."
        elif kind < 0.75 and captions:
            desc = clean_caption(rng.choice(captions))
        elif kind < 0.9:
            desc = "This is a remote sensing image."
        else:
            desc = ""
        out.append(Sample(split, f"ucm_{split}_{i:05d}", image, label,
                          {"img_description_eg": desc, "source": "ucm-mosaic", "gsd": round(gsd, 3),
                           "grid": g}))
    return out


def nwpu_requests(coco_path: Path, image_dir: Path, size: int, val_fraction: float, seed: int,
                  max_side: int = 512) -> list[Sample]:
    """One "Please segment the X." sample per NWPU image and class present."""
    from pycocotools import mask as mask_utils  # lazy: only this source needs it

    coco = load_coco(coco_path)
    names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    images = {int(im["id"]): im for im in coco["images"]}
    split = split_images(images, val_fraction, seed)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            by_image.setdefault(int(a["image_id"]), []).append(a)
    out = []
    for image_id in sorted(images):
        im = images[image_id]
        anns = by_image.get(image_id, [])
        if not anns:
            continue
        path = image_dir / str(im["file_name"])
        if not path.is_file():
            raise InputNotFoundError(f"NWPU image not found: {path}.", hint="Pass --nwpu-images FOLDER.")
        rgb = read_rgb(path)
        h, w = rgb.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = _resize(rgb, new)
        per_class: dict[str, np.ndarray] = {}
        for a in sorted(anns, key=lambda a: int(a["id"])):
            seg = a.get("segmentation")
            if not seg:
                continue
            rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else [seg]
            m = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
            name = names[int(a["category_id"])]
            per_class[name] = np.maximum(per_class.get(name, np.zeros((h, w), np.uint8)), m.astype(np.uint8))
        for name in sorted(per_class):
            label = _resize(per_class[name], new, label=True)
            stem = Path(str(im["file_name"])).stem
            out.append(Sample(split[image_id], f"nwpu_{stem}_{name}", small, label,
                              {"img_description_eg": "This is a remote sensing image.",
                               "question": f"Please segment the {class_phrase(name, plural=True)}.",
                               "source": "nwpu"}))
    return out


def whu_requests(root: Path) -> list[Sample]:
    """WHU building tiles with "Please segment the buildings."."""
    out = []
    for split in ("train", "val"):
        folder = root / split / "image"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            lbl = root / split / "label" / path.name
            if not lbl.is_file():
                lbl = next(iter(sorted((root / split / "label").glob(path.stem + ".*"))), lbl)
            if not lbl.is_file():
                raise DatasetError(f"WHU label not found for {path}.")
            label = (np.asarray(Image.open(lbl)) > 0).astype(np.uint8)
            if label.ndim == 3:
                label = label.max(axis=2)
            out.append(Sample(split, f"whu_{split}_{path.stem}", read_rgb(path), label,
                              {"img_description_eg": "This is a 0.3 m aerial image.",
                               "question": "Please segment the buildings.", "source": "whu"}))
    return out


def loveda_tiles(root: Path, tile: int = 512) -> list[Sample]:
    """``test`` tiles of the LoveDA crops with farmland = agriculture."""
    out = []
    for path in sorted((root / "images").glob("*.png")):
        lbl = root / "labels" / path.name
        if not lbl.is_file():
            raise DatasetError(f"LoveDA label not found for {path}.")
        rgb = read_rgb(path)
        cls = np.asarray(Image.open(lbl))
        for y in range(0, rgb.shape[0] - tile + 1, tile):
            for x in range(0, rgb.shape[1] - tile + 1, tile):
                label = (cls[y:y + tile, x:x + tile] == LOVEDA_FARMLAND).astype(np.uint8)
                out.append(Sample("test", f"loveda_{path.stem}_{y}_{x}", rgb[y:y + tile, x:x + tile], label,
                                  {"img_description_eg": "This is a 0.3 m aerial image.", "source": "loveda",
                                   "gsd": 0.3}))
    return out


def build_farmland_data(out: str | Path, *, ucm: str | Path, nwpu: str | Path | None = None,
                        nwpu_images: str | Path | None = None, whu: str | Path | None = None,
                        loveda: str | Path | None = None, aid: str | Path | None = None,
                        train_mosaics: int = 800, val_mosaics: int = 80, size: int = 384,
                        val_fraction: float = 0.15, seed: int = 0, overwrite: bool = False,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the FIT-layout folder ``out`` (see the module doc); returns its statistics."""
    root = Path(out)
    if root.exists():
        if not overwrite:
            raise OutputError(f"{root} exists.", hint="Pass --overwrite or choose another --out.")
        if not (root / "stats.json").is_file() and any(root.iterdir()):
            raise OutputError(f"{root} exists and is not a farmland data folder; not replacing it.",
                              hint="Choose another --out.")
    ucm = Path(ucm)
    if not (ucm / "ucm.json").is_file():
        raise InputNotFoundError(f"{ucm / 'ucm.json'} not found.", hint="Pass --ucm ../shared/data/ucm.")
    say = log or (lambda _m: None)
    aid_cells: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}}
    if aid is not None:
        labels = {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(Path(aid).iterdir()) if d.is_dir()}
        for path, sp in aid_split(labels, val_fraction, seed).items():
            aid_cells[sp].setdefault(path.parent.name, []).append(path)
    samples: list[Sample] = []
    say("UCM mosaics")
    samples += ucm_mosaics(ucm, "train", train_mosaics, size, seed, aid_cells["train"])
    samples += ucm_mosaics(ucm, "val", val_mosaics, size, seed, aid_cells["val"])
    if nwpu is not None:
        say("NWPU VHR-10 requests")
        image_dir = Path(nwpu_images) if nwpu_images is not None else Path(nwpu).parent / "images"
        samples += nwpu_requests(Path(nwpu), image_dir, size, val_fraction, seed)
    if whu is not None:
        samples += whu_requests(Path(whu))
    if loveda is not None:
        samples += loveda_tiles(Path(loveda))
    names = Counter((s.split, s.name) for s in samples)
    dup = [k for k, n in names.items() if n > 1]
    if dup:
        raise DatasetError(f"duplicate sample names {dup[:3]}")
    say(f"writing {len(samples)} samples")
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root) as tmp:
        for s in samples:
            for sub in ("img", "lbl", "json"):
                (tmp / s.split / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.image).save(tmp / s.split / "img" / f"{s.name}.png", optimize=False)
            Image.fromarray(s.label).save(tmp / s.split / "lbl" / f"{s.name}.png")
            (tmp / s.split / "json" / f"{s.name}.json").write_text(json.dumps(s.meta, indent=1))
        stats = {
            "samples": dict(Counter(s.split for s in samples)),
            "by_source": {f"{s}/{sp}": n for (s, sp), n in sorted(Counter((s.meta["source"], s.split) for s in samples).items())},
            "farmland_fraction": {sp: round(float(np.mean([s.label.mean() for s in samples if s.split == sp
                                                           and "question" not in s.meta] or [0.0])), 4)
                                  for sp in ("train", "val", "test")},
            "settings": {"ucm": str(ucm.resolve()), "nwpu": None if nwpu is None else str(Path(nwpu).resolve()),
                         "whu": None if whu is None else str(Path(whu).resolve()),
                         "loveda": None if loveda is None else str(Path(loveda).resolve()),
                         "aid": None if aid is None else str(Path(aid).resolve()),
                         "train_mosaics": train_mosaics, "val_mosaics": val_mosaics, "size": size,
                         "val_fraction": val_fraction, "seed": seed},
        }
        write_text(tmp / "stats.json", json.dumps(stats, indent=2))
        if root.exists():
            shutil.rmtree(root)
    return stats


__all__ = ["build_farmland_data", "loveda_tiles", "nwpu_requests", "ucm_mosaics", "whu_requests"]
