"""A tiny synthetic UCM-Captions folder for the mini-clip training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_ucm(root: Path, classes: tuple[str, ...] = ("beach", "forest", "parkinglot"),
             n_train: int = 4, n_val: int = 2) -> Path:
    """A ucm.json with a few 256x256 images per class (a distinct colour and texture each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for ci, c in enumerate(classes):
        (root / "images" / c).mkdir(parents=True, exist_ok=True)
        for k in range(n_train + n_val):
            base = np.zeros((256, 256, 3), np.uint8)
            base[..., ci] = 180
            img = np.clip(base + rng.integers(0, 60, (256, 256, 3)), 0, 255).astype(np.uint8)
            rel = f"images/{c}/{c}{k:02d}.jpg"
            Image.fromarray(img).save(root / rel, quality=90)
            caps = [f"There is a {c} here .", f"It is a {c} with {k} things .", f"A {c} .",
                    f"Some {c} in the scene .", f"There is a {c} here ."]
            samples.append({"image": rel, "label": c, "split": "train" if k < n_train else "val", "captions": caps})
    (root / "ucm.json").write_text(json.dumps({"classes": list(classes), "samples": samples}))
    return root
