"""Data of the mini-clip trainer: UCM-Captions (``ucm.json``), image views, synthetic
mosaics, and the on-disk caches of the frozen towers' outputs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rsvl.errors import DatasetError
from rsvl.io import atomic_path, read_rgb
from rsvl.models.checkpoint import read_file
from rsvl.models.mini.clip import pool_features
from rsvl.models.mini.towers import LITE_MEAN, LITE_STD

#: readable names of the UCM classes (used for prompts)
UCM_READABLE: dict[str, str] = {
    "agricultural": "farmland",
    "airplane": "airplanes",
    "baseballdiamond": "a baseball diamond",
    "beach": "a beach",
    "buildings": "buildings",
    "chaparral": "chaparral",
    "denseresidential": "a dense residential area",
    "forest": "a forest",
    "freeway": "a freeway",
    "golfcourse": "a golf course",
    "harbor": "a harbor",
    "intersection": "a road intersection",
    "mediumresidential": "a medium residential area",
    "mobilehomepark": "a mobile home park",
    "overpass": "an overpass",
    "parkinglot": "a parking lot",
    "river": "a river",
    "runway": "a runway",
    "sparseresidential": "a sparse residential area",
    "storagetanks": "storage tanks",
    "tenniscourt": "a tennis court",
}

VIEWS = ("id", "hflip", "vflip")

#: things the train captions mention, as (prompt, caption words that signal it). They give
#: the dense head a weak, region-level signal for a vocabulary wider than the 16 classes
#: (e.g. "trees" inside residential scenes): multiple-instance learning on mosaic regions.
CAPTION_CONCEPTS: dict[str, tuple[str, ...]] = {
    "trees": ("trees", "tree", "forest"), "plants": ("plants",), "cars": ("cars", "car"),
    "roads": ("road", "roads", "roadside"), "houses": ("houses", "house", "homes", "villa"),
    "grass": ("lawn", "lawns", "grass", "meadow"), "buildings": ("buildings", "building"),
    "sand": ("sand", "sands"), "water": ("water", "waters", "sea", "river", "lake"),
    "roofs": ("roofs", "roof"), "boats": ("boats", "boat"), "a runway": ("runway",),
    "farmland": ("farmland", "cropland"), "a tennis court": ("tennis",),
    "a baseball diamond": ("baseball",), "a swimming pool": ("pool", "swimming"),
    "storage tanks": ("tanks", "tank"), "airplanes": ("airplane", "airplanes"),
    "a parking lot": ("parking",), "a beach": ("beach",), "waves": ("waves", "foam", "foams"),
}
CACHE_VERSION = "1"
#: version of the pooled image-feature cache (2: mean and max pooling)
IMAGE_CACHE_VERSION = "2"


def readable(name: str) -> str:
    """``baseballdiamond`` -> ``a baseball diamond``; unknown names: underscores to spaces."""
    return UCM_READABLE.get(name, name.replace("_", " "))


def default_cache_dir() -> Path:
    return Path(os.environ.get("RSVL_CACHE", Path.home() / ".cache" / "rsvl")) / "mini-clip"


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


@dataclass
class UcmData:
    root: Path
    classes: list[str]
    samples: list[dict[str, Any]]
    digest: str

    def split(self, name: str) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s["split"] == name]


def load_ucm(data_root: str | Path) -> UcmData:
    root = Path(data_root)
    ann = root / "ucm.json"
    if not ann.is_file():
        raise DatasetError(f"UCM annotation file not found: {ann}.",
                           hint="Pass --data pointing at the folder holding ucm.json and images/.")
    raw = ann.read_bytes()
    try:
        d = json.loads(raw)
        classes, samples = list(d["classes"]), list(d["samples"])
        for s in samples:
            s["image"], s["label"], s["split"], s["captions"]  # noqa: B018 - layout check
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{ann} does not have the UCM layout (classes, samples[image, label, "
                           f"split, captions]): {exc}") from exc
    return UcmData(root, classes, samples, hashlib.sha256(raw).hexdigest()[:16])


# --------------------------------------------------------------------------------------
# AID: the landscapes UCM lacks
# --------------------------------------------------------------------------------------

#: AID classes (folder names) -> readable name and caption phrasings (templated captions)
AID_PHRASES: dict[str, tuple[str, ...]] = {
    "BareLand": ("bare land", "bare soil", "an empty field of bare ground"),
    "Beach": ("a beach", "a sandy beach by the sea", "a coastline with waves"),
    "Center": ("a city center", "a dense city center"),
    "Commercial": ("a commercial area", "shops and commercial buildings", "a business district"),
    "Desert": ("a desert", "sand dunes", "dry sandy land"),
    "Forest": ("a forest", "dense trees", "a woodland with many trees"),
    "Meadow": ("a meadow", "grassland", "a green grass field"),
    "Mountain": ("mountains", "a mountain ridge", "rocky hills"),
    "Parking": ("a parking lot", "many cars parked in a parking lot"),
    "Pond": ("a pond", "a small lake"),
    "RailwayStation": ("a railway station", "a train station with railway tracks"),
    "River": ("a river", "a river flowing through the land"),
    "SparseResidential": ("a sparse residential area", "scattered houses with gardens"),
    "Stadium": ("a stadium", "a sports stadium"),
    "Viaduct": ("a viaduct", "an elevated road on pillars"),
}
#: AID classes that are UCM classes (trained as the UCM class, same prompts)
AID_TO_UCM: dict[str, str] = {"Beach": "beach", "River": "river", "Parking": "parkinglot",
                              "SparseResidential": "sparseresidential"}
#: AID classes never trained on (neither scene nor pixel level): the zero-shot val of unseen
#: classes. Chosen among the classes UCM does not have, keeping the landscapes (forest,
#: meadow, desert, mountain, bare land) in training, since those are what rasters are full of.
AID_HELDOUT: tuple[str, ...] = ("Center", "Pond", "Stadium", "Viaduct")
#: caption templates of the AID images (filled with one of the class's phrasings)
AID_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}.", "this is {}.", "an aerial view of {}.", "{} seen from above.", "the image shows {}.",
)


def aid_key(folder: str) -> str:
    """Class key of an AID folder in the joint class list: the UCM class it is, else its own."""
    return AID_TO_UCM.get(folder, "aid:" + folder)


def aid_readable(key: str) -> str:
    """Prompt name of a class key (``aid:Forest`` -> ``a forest``; UCM keys via :func:`readable`)."""
    return AID_PHRASES[key[4:]][0] if key.startswith("aid:") else readable(key)


def load_aid(root: str | Path, per_class: int = 240, val_fraction: float = 0.2, seed: int = 0,
             heldout: Sequence[str] = AID_HELDOUT, heldout_per_class: int = 60) -> UcmData:
    """AID as :class:`UcmData`: up to ``per_class`` images of each trained class (a seeded
    choice, ``val_fraction`` of them val), ``heldout_per_class`` images of each held-out class
    (split ``heldout``); ``label`` is the class key (:func:`aid_key`); five templated
    captions per image from the class's phrasings."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"AID folder not found: {base}.", hint="Pass --aid ../shared/data/aid (one sub-folder per class).")
    folders = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name in AID_PHRASES)
    if not folders:
        raise DatasetError(f"{base} has no AID class folders ({', '.join(sorted(AID_PHRASES))}).")
    samples: list[dict[str, Any]] = []
    for folder in folders:
        files = sorted(p.name for p in (base / folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
        rng = np.random.default_rng([seed, sum(map(ord, folder))])
        files = [files[i] for i in rng.permutation(len(files))]
        held = folder in heldout
        files = files[: heldout_per_class if held else per_class]
        n_val = int(round(len(files) * val_fraction))
        for k, f in enumerate(files):
            split = "heldout" if held else ("val" if k < n_val else "train")
            caps = [AID_CAPTION_TEMPLATES[j].format(AID_PHRASES[folder][int(rng.integers(len(AID_PHRASES[folder])))])
                    for j in range(len(AID_CAPTION_TEMPLATES))]
            caps = [c[0].upper() + c[1:] for c in caps]
            samples.append({"image": f"{folder}/{f}", "label": aid_key(folder), "split": split,
                            "captions": caps, "folder": folder})
    digest = hashlib.sha256(json.dumps([(s["image"], s["split"]) for s in samples]).encode()).hexdigest()[:16]
    classes = sorted({s["label"] for s in samples})
    return UcmData(base, classes, samples, digest)


def read_ucm_image(path: Path, size: int | None = 256) -> np.ndarray:
    """(H, W, 3) uint8 (:func:`rsvl.io.read_rgb`); resized bilinearly to ``size`` x ``size``
    when it differs (a few UCM images are not exactly 256 px)."""
    img = read_rgb(path, error=DatasetError)
    if size is not None and img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img


def apply_view(img: np.ndarray, view: str) -> np.ndarray:
    """(H, W, 3) -> view of it."""
    if view == "id":
        return img
    if view == "hflip":
        return img[:, ::-1]
    if view == "vflip":
        return img[::-1]
    if view == "rot90":
        return np.rot90(img, 1, (0, 1))
    raise ValueError(view)


def to_input(batch: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 images -> the towers' normalised (B, 3, H, W) float input."""
    x = torch.from_numpy(np.stack([np.ascontiguousarray(b) for b in batch])).permute(0, 3, 1, 2)
    return (x.float() - LITE_MEAN) / LITE_STD


def progress(msg: str, quiet: bool) -> None:
    """``msg`` on stderr unless ``quiet``."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# feature caches
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def cache_image_features(data: UcmData, cache: Path, tower: Any, batch_size: int = 4,
                         quiet: bool = False, views: Sequence[str] = VIEWS) -> torch.Tensor:
    """(n_views, n_images, 2864) pooled features ("mean+max": global averages then global
    maxima of the stride 8/16/32 maps; "mean" heads use the first 1432), computed once and
    kept on disk. Every image is resized to 256 px (mini-clip's input size)."""
    out = []
    for view in views:
        f = cache / f"image-{data.digest}-{view}-meanmax-v{IMAGE_CACHE_VERSION}.pt"
        if f.is_file():
            out.append(read_file(f, "Feature cache"))
            continue
        t0, feats = time.time(), []
        for i in range(0, len(data.samples), batch_size):
            imgs = [apply_view(read_ucm_image(data.root / s["image"]), view)
                    for s in data.samples[i : i + batch_size]]
            feats.append(pool_features(*tower(to_input(imgs)), pooling="mean+max"))
            if (i // batch_size) % 50 == 0:
                progress(f"  image features [{view}] {i}/{len(data.samples)}", quiet)
        feats_t = torch.cat(feats).float()
        with atomic_path(f) as tmp:
            torch.save(feats_t, tmp)
        progress(f"  view {view}: {len(data.samples) / (time.time() - t0):.1f} img/s", quiet)
        out.append(feats_t)
    return torch.stack(out)


@torch.inference_mode()
def cache_text_features(texts: Sequence[str], cache: Path, tower: Any, tag: str) -> torch.Tensor:
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    f = cache / f"text-{tag}-{key}-v{CACHE_VERSION}.pt"
    if f.is_file():
        return read_file(f, "Feature cache")
    feats = tower(list(texts)).float()
    with atomic_path(f) as tmp:
        torch.save(feats, tmp)
    return feats


def make_mosaic(rng: np.random.Generator, pick: Callable[[np.random.Generator, set[int]], tuple[np.ndarray, int, int]],
                size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` mosaic of pieces of images of different classes, at native scale.

    ``pick(rng, excluded_classes)`` returns (image, class, sample index). Returns the RGB
    mosaic, its per-pixel class and per-pixel sample index.
    """
    img = np.zeros((size, size, 3), np.uint8)
    cls = np.zeros((size, size), np.int16)
    src = np.zeros((size, size), np.int32)
    used: set[int] = set()

    def paste(y0: int, y1: int, x0: int, x1: int) -> None:
        im, c, s = pick(rng, used)
        used.add(c)
        im = np.rot90(im, int(rng.integers(4)))
        if rng.random() < 0.5:
            im = im[:, ::-1]
        h, w = y1 - y0, x1 - x0
        oy = int(rng.integers(0, im.shape[0] - h + 1))
        ox = int(rng.integers(0, im.shape[1] - w + 1))
        img[y0:y1, x0:x1] = im[oy : oy + h, ox : ox + w]
        cls[y0:y1, x0:x1] = c
        src[y0:y1, x0:x1] = s

    r = rng.random()
    if r < 0.15:  # a whole image
        paste(0, size, 0, size)
    elif r < 0.4:  # two halves
        cut = int(size * rng.uniform(0.3, 0.7))
        if rng.random() < 0.5:
            paste(0, cut, 0, size)
            paste(cut, size, 0, size)
        else:
            paste(0, size, 0, cut)
            paste(0, size, cut, size)
    elif r < 0.75:  # 2 x 2 with a random cross
        cy, cx = (int(size * rng.uniform(0.3, 0.7)) for _ in range(2))
        for y0, y1 in ((0, cy), (cy, size)):
            for x0, x1 in ((0, cx), (cx, size)):
                paste(y0, y1, x0, x1)
    else:  # one image with another pasted in as a rectangle
        paste(0, size, 0, size)
        h, w = (int(size * rng.uniform(0.3, 0.6)) for _ in range(2))
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        paste(y0, y0 + h, x0, x0 + w)
    return img, cls, src


@torch.inference_mode()
def cache_mosaic_features(data: UcmData, split: str, n: int, seed: int, cache: Path, tower: Any,
                          batch_size: int = 4, quiet: bool = False) -> dict[str, torch.Tensor]:
    """Tower maps of ``n`` mosaics of ``split`` images, with per-cell (stride 8) labels."""
    f = cache / f"mosaic-{data.digest}-{split}-{n}-{seed}-v{CACHE_VERSION}.pt"
    if f.is_file():
        return read_file(f, "Feature cache")
    idx = data.split(split)
    cidx = {c: i for i, c in enumerate(data.classes)}
    by_class: dict[int, list[int]] = {}
    for i in idx:
        by_class.setdefault(cidx[data.samples[i]["label"]], []).append(i)
    classes = sorted(by_class)
    images: dict[int, np.ndarray] = {}

    def pick(rng: np.random.Generator, excluded: set[int]) -> tuple[np.ndarray, int, int]:
        # prefer a class not yet in the mosaic (with fewer classes than pieces, any class)
        c = int(rng.choice([k for k in classes if k not in excluded] or classes))
        s = int(rng.choice(by_class[c]))
        if s not in images:
            images[s] = read_ucm_image(data.root / data.samples[s]["image"])
        return images[s], c, s

    rng = np.random.default_rng(seed)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("f8", "f16", "f32", "label", "source")}
    t0 = time.time()
    for b in range(0, n, batch_size):
        mos = [make_mosaic(rng, pick) for _ in range(min(batch_size, n - b))]
        f8, f16, f32 = tower(to_input([m[0] for m in mos]))
        out["f8"].append(f8.half())
        out["f16"].append(f16.half())
        out["f32"].append(f32.half())
        out["label"].append(torch.from_numpy(np.stack([m[1][4::8, 4::8] for m in mos])).long())
        out["source"].append(torch.from_numpy(np.stack([m[2][4::8, 4::8] for m in mos])).long())
        if (b // batch_size) % 50 == 0:
            progress(f"  mosaics [{split}] {b}/{n}", quiet)
    res = {k: torch.cat(v) for k, v in out.items()}
    with atomic_path(f) as tmp:
        torch.save(res, tmp)
    progress(f"  mosaics [{split}]: {n / (time.time() - t0):.1f} mosaics/s", quiet)
    return res
