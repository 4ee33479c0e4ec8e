"""Data of the referring trainer: REFER-format samples as images (:class:`ImageReferDataset`)
or as cached frozen-tower outputs (:class:`FeatureCache`, :class:`CachedReferDataset`), and
expressions under flips (:func:`flip_expression`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rsvl.data.refer import RRSISD
from rsvl.errors import DatasetError
from rsvl.io import atomic_path
from rsvl.models.checkpoint import read_file

_H_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_V_SWAP = {"top": "bottom", "bottom": "top", "topmost": "bottommost", "bottommost": "topmost",
           "upper": "lower", "lower": "upper", "above": "below", "below": "above"}
_WORD = re.compile(r"[A-Za-z]+")


def flip_expression(text: str, flip: str) -> str:
    """The expression that stays true after flipping the image: ``flip`` "h" (left-right)
    swaps left/right words, "v" (top-bottom) swaps top/bottom, upper/lower, above/below."""
    table = {"h": _H_SWAP, "v": _V_SWAP, "": {}}[flip]

    def sub(m: re.Match[str]) -> str:
        word = m.group(0)
        new = table.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(sub, text)



VIEWS = ("", "h", "v")


def flip_view(x: torch.Tensor, view: str) -> torch.Tensor:
    return x.flip(-1) if view == "h" else x.flip(-2) if view == "v" else x


def read_image_tensor(path: Path, size: int) -> torch.Tensor:
    """RGB image -> uint8 (3, size, size), bilinear (upstream: ``Resize((480, 480))``)."""
    if not Path(path).is_file():
        raise DatasetError(f"image {path} not found", hint="Check the dataset's image folder.")
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool -> (size, size) bool, NEAREST (as upstream resizes the ground truth)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((size, size), Image.NEAREST)) > 0


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float normalised with 0-1 scale ``mean``/``std``."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def black_boxes(image: torch.Tensor, rng: np.random.Generator, n_range: tuple[int, int] = (20, 60),
                box: int = 32) -> torch.Tensor:
    """RRSIS-D augmentation: paste ``n`` black ``box`` x ``box`` squares on a uint8 image."""
    out = image.clone()
    _, h, w = out.shape
    for _ in range(int(rng.integers(n_range[0], n_range[1] + 1))):
        y = int(rng.integers(0, max(1, h - box)))
        x = int(rng.integers(0, max(1, w - box)))
        out[:, y : y + box, x : x + box] = 0
    return out


class ImageReferDataset(torch.utils.data.Dataset):
    """Samples of a REFER-format split as (uint8 image, sentence, mask), resized to ``size``."""

    def __init__(self, root: str | Path, split: str, size: int, augment: bool = False,
                 seed: int = 0, limit: int | None = None) -> None:
        self.ds = RRSISD(root, split)
        self.size = size
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.indices = list(range(len(self.ds)))[: limit or None]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.ds[self.indices[i]]
        image = read_image_tensor(s.image_path, self.size)
        if self.augment and self.rng.random() < 0.2:
            image = black_boxes(image, self.rng)
        mask = torch.from_numpy(resize_mask(s.mask, self.size))
        return {"image": image, "sentence": s.sentence, "mask": mask}


def collate_images(tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> Callable[..., dict[str, Any]]:
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([it["image"] for it in items]),
                "text": tokenize([it["sentence"] for it in items]),
                "mask": torch.stack([it["mask"] for it in items])}
    return collate


def default_cache_dir() -> Path:
    root = os.environ.get("RSVL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "rsvl")
    return Path(root) / "mini-refer-features"


def image_list(root: Path, splits: Sequence[str]) -> tuple[list[Path], dict[str, list[tuple[int, str, np.ndarray]]]]:
    """Unique image paths and, per split, (image index, sentence, mask) of every sample."""
    paths: list[Path] = []
    index: dict[Path, int] = {}
    samples: dict[str, list[tuple[int, str, np.ndarray]]] = {}
    for split in splits:
        ds = RRSISD(root, split)
        rows = []
        for s in ds:
            if s.image_path not in index:
                index[s.image_path] = len(paths)
                paths.append(s.image_path)
            rows.append((index[s.image_path], s.sentence, s.mask))
        samples[split] = rows
    return paths, samples


class FeatureCache:
    """Frozen-tower outputs of every image (per view) and expression of a dataset, on disk.

    Files under ``cache_dir/<key>/``: ``images_<view>.pt`` (f8, f16, f32, small as
    float16, one row per image), ``text.pt`` (words float16, mask, sentence list); the key
    hashes the dataset's image paths, the image size and the model's tower description.
    """

    def __init__(self, model: Any, root: str | Path, splits: Sequence[str], size: int,
                 cache_dir: str | Path | None = None, views: Sequence[str] = VIEWS,
                 batch_size: int = 8, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.size = size
        self.views = tuple(views)  # text views; image features are cached as is only
        self.paths, self.samples = image_list(self.root, splits)
        ident = json.dumps({"images": [str(p.resolve()) for p in self.paths], "size": size,
                            "towers": getattr(model, "tower_id", type(model).__name__)})
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir or default_cache_dir()) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images = self._image_view(model, "", batch_size, log)
        sentences = sorted({flip_expression(s, v) for rows in self.samples.values()
                            for _, s, _ in rows for v in self.views})
        self.text_index, self.words, self.text_mask = self._text(model, sentences, log)

    def _image_view(self, model: Any, view: str, batch_size: int,
                    log: Callable[[str], None]) -> list[torch.Tensor]:
        path = self.dir / f"images_{view or 'id'}.pt"
        if path.is_file():
            return list(read_file(path, "Feature cache"))
        t0 = time.time()
        outs: list[list[torch.Tensor]] = [[], [], [], []]
        dev = model.device
        for i in range(0, len(self.paths), batch_size):
            batch = torch.stack([flip_view(read_image_tensor(p, self.size), view)
                                 for p in self.paths[i : i + batch_size]]).to(dev)
            feats, small = model.image_features(normalise(batch, model.mean, model.std))
            for k, t in enumerate((*feats, small)):
                outs[k].append(t.half().cpu())
            if (i // batch_size) % 10 == 0:
                log(f"cache view {view or 'id'}: {i + len(batch)}/{len(self.paths)} images "
                    f"({time.time() - t0:.0f} s)")
        tensors = [torch.cat(o) for o in outs]
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)
        return tensors

    def _text(self, model: Any, sentences: list[str],
              log: Callable[[str], None]) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        path = self.dir / "text.pt"
        if path.is_file():
            d = read_file(path, "Feature cache")
            if list(d["sentences"]) == sentences:
                return {s: i for i, s in enumerate(sentences)}, d["words"], d["mask"]
        words, masks = [], []
        for i in range(0, len(sentences), 64):
            w, m = model.text_features(model.tokenize(sentences[i : i + 64]))
            words.append(w.half().cpu())
            masks.append(m.cpu())
        d = {"sentences": sentences, "words": torch.cat(words), "mask": torch.cat(masks)}
        with atomic_path(path) as tmp:
            torch.save(d, tmp)
        log(f"cached {len(sentences)} expressions")
        return {s: i for i, s in enumerate(sentences)}, d["words"], d["mask"]


class CachedReferDataset(torch.utils.data.Dataset):
    """(cached features, cached words, packed mask) per sample.

    Each access picks one of ``views`` at random ("" as is, "h" left-right flip, "v"
    top-bottom flip, applied to the features, the mask and the words); with one view it is
    deterministic (validation).
    """

    def __init__(self, cache: FeatureCache, split: str, views: Sequence[str] = ("",),
                 limit: int | None = None) -> None:
        self.cache = cache
        self.views = tuple(views)
        rows = cache.samples[split][: limit or None]
        self.items: list[tuple[int, dict[str, int], np.ndarray]] = [
            (img, {v: cache.text_index[flip_expression(sentence, v)] for v in self.views},
             np.packbits(resize_mask(mask, cache.size)))
            for img, sentence, mask in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, texts, packed = self.items[i]
        view = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else self.views[0]
        t = texts[view]
        size = self.cache.size
        mask = torch.from_numpy(np.unpackbits(packed)[: size * size].reshape(size, size).astype(bool))
        feats = [flip_view(f[img], view) for f in self.cache.images]
        return {"feats": feats[:3], "small": feats[3],
                "words": self.cache.words[t], "text_mask": self.cache.text_mask[t],
                "mask": flip_view(mask, view)}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"feats": [torch.stack([it["feats"][k] for it in items]) for k in range(3)],
            "small": torch.stack([it["small"] for it in items]),
            "words": torch.stack([it["words"] for it in items]),
            "text_mask": torch.stack([it["text_mask"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items])}


__all__ = [
    "VIEWS",
    "CachedReferDataset",
    "FeatureCache",
    "ImageReferDataset",
    "black_boxes",
    "collate_cached",
    "collate_images",
    "default_cache_dir",
    "flip_expression",
    "flip_view",
    "image_list",
    "normalise",
    "read_image_tensor",
    "resize_mask",
]
