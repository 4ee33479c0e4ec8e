"""FarmSeg-VL / FIT layout (FSVLM's data) and FSVLM's request and answer templates.

::

    ROOT/{train,val,test}/img/NAME.png     RGB tiles (FarmSeg-VL: 512 x 512)
    ROOT/{train,val,test}/lbl/NAME.png     the label: any non-zero pixel is farmland
    ROOT/{train,val,test}/json/NAME.json   ``img_description_eg``: the scene's description

The label path is the image path with ``img`` replaced by ``lbl`` (as FSVLM's loader does).
rsvl extensions, for "segment the X" folders in the same layout: a json's ``question``
replaces the farmland request for that image; ``source`` names where a sample came from
(``rsvl eval farmland`` reports per source); ``img_description_eg`` may be empty or absent.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rsvl.errors import DatasetError, InputNotFoundError

SPLITS = ("train", "val", "test")
#: FSVLM's training requests (``{desc}``: the image's description, possibly empty)
QUESTION_TEMPLATES = (
    "{desc} Can you segment the farmland in this image?",
    "{desc} Please segment the farmland in this image.",
    "{desc} What is the farmland in this image? Please respond with segmentation mask.",
    "{desc} What is the farmland in this image? Please output segmentation mask.",
)
#: FSVLM's answers (``[SEG]``'s state prompts the mask decoder)
ANSWER_TEMPLATES = ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].",
                    "Sure, the segmentation result is [SEG].", "[SEG].")
#: FSVLM's test-time request (test.py), without a description
TEST_QUESTION = "This is a remote sensing image. Please segment farmland"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def farmland_question(description: str, rng: random.Random | None = None) -> str:
    """A farmland request with ``description`` in front: one of FSVLM's templates, chosen by
    ``rng``, or the first one without ``rng``."""
    template = rng.choice(QUESTION_TEMPLATES) if rng is not None else QUESTION_TEMPLATES[0]
    return template.format(desc=(description or "").strip()).strip()


@dataclass
class FarmSample:
    """One image of a FIT-layout split."""

    name: str
    image: Path
    label: Path
    description: str = ""
    #: the request that replaces the farmland question, or None
    question: str | None = None
    source: str = "farmland"

    def read_label(self) -> np.ndarray:
        """(H, W) uint8: 1 where the label is non-zero."""
        try:
            arr = np.asarray(Image.open(self.label))
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read label {self.label}: {e}") from e
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        return (arr > 0).astype(np.uint8)

    def request(self, rng: random.Random | None = None) -> str:
        """The question to ask about this image."""
        return self.question if self.question else farmland_question(self.description, rng)


def read_split(root: str | Path, split: str) -> list[FarmSample]:
    """The samples of ``root/split`` (sorted by name). Every image needs a label; a missing
    json means no description."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}", hint=f"Use one of {', '.join(SPLITS)}.")
    base = Path(root) / split
    img_dir = base / "img"
    if not img_dir.is_dir():
        raise InputNotFoundError(f"{img_dir} not found: not a FarmSeg-VL/FIT folder with a {split!r} split.",
                                 hint="Expected ROOT/{train,val,test}/{img,lbl,json}; build one with `rsvl data farmland`.")
    out = []
    for path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label = base / "lbl" / (path.stem + ".png")
        if not label.is_file():
            candidates = sorted((base / "lbl").glob(path.stem + ".*"))
            if not candidates:
                raise DatasetError(f"no label for {path} (looked for {label}).",
                                   hint="Each img/NAME needs lbl/NAME.png (non-zero = the requested class).")
            label = candidates[0]
        meta: dict = {}
        js = base / "json" / (path.stem + ".json")
        if js.is_file():
            try:
                meta = json.loads(js.read_text())
            except ValueError as e:
                raise DatasetError(f"{js} is not JSON ({e}).") from e
            if not isinstance(meta, dict):
                raise DatasetError(f"{js}: expected an object with img_description_eg.")
        question = meta.get("question")
        out.append(FarmSample(path.stem, path, label, str(meta.get("img_description_eg") or ""),
                              str(question).strip() if question and str(question).strip() else None,
                              str(meta.get("source") or "farmland")))
    if not out:
        raise DatasetError(f"{img_dir} holds no images.")
    return out


__all__ = ["ANSWER_TEMPLATES", "QUESTION_TEMPLATES", "SPLITS", "TEST_QUESTION", "FarmSample", "farmland_question",
           "read_split"]
