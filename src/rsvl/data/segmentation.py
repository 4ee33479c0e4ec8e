"""Semantic-segmentation datasets: mmseg ``img_dir/ann_dir/<split>`` layouts, the simple
``images/`` + ``labels/`` layout of ``../shared/data/semseg``, and any (image folder, label
folder) pair (UDD5/VDD ``<split>/src`` + ``<split>/gt``, WHU ``<split>/image`` + ``<split>/label``).

Labels are single-band index masks. :meth:`SegmentationDataset.read_label` returns them in
class-index space: 0..C-1 and ``ignore_index`` (255), after mmseg's ``reduce_zero_label``
when the dataset uses it (label 0 = no-data / boundary -> 255, others -1), or after
binarisation (anything > 0 -> 1) for building masks.

Label values of the shared data (checked on the files, see ``SEG_PRESETS``):

- LoveDA: 0 no-data, 1 background, 2 building, 3 road, 4 water, 5 barren, 6 forest,
  7 agriculture -> reduce_zero_label -> 7 classes, 0 ignored.
- Potsdam / Vaihingen: mmseg's converted ISPRS masks: 0 = eroded boundary (ignored),
  1 impervious surface, 2 building, 3 low vegetation, 4 tree, 5 car, 6 clutter ->
  reduce_zero_label -> 6 classes. (The 0 pixels are the thin black outlines around every
  object; ``../shared/data/README.md`` calls the values "0-5: impervious surface ...", which
  the masks contradict.)
- WHU building: 1-bit masks, building = 1 (or 255 in the original release) -> binary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsvl.data.common import require_dir
from rsvl.data.scenes import read_rgb
from rsvl.errors import DatasetError
from rsvl.io import IMAGE_SUFFIXES, is_image_file

__all__ = [
    "SEG_PRESETS",
    "SegPreset",
    "SegSample",
    "SegmentationDataset",
    "segmentation_preset",
]

SIMPLE_LAYOUT = "ROOT/images/<name>.<ext> with ROOT/labels/<name>.png index masks"
MMSEG_LAYOUT = (
    "ROOT/img_dir/<split>/<name><img_suffix> with ROOT/ann_dir/<split>/<name><seg_map_suffix>"
)


@dataclass(frozen=True)
class SegSample:
    """One image and its label mask (paths only)."""
    image: Path
    label: Path
    name: str


@dataclass(frozen=True)
class SegPreset:
    """How to read one benchmark's labels."""
    classes: tuple[str, ...]
    reduce_zero_label: bool = False
    binary: bool = False
    #: built-in OVSS class file (prompts with synonyms) for the dataset, if any
    class_file: str | None = None
    label_values: str = ""


ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")

SEG_PRESETS: dict[str, SegPreset] = {
    "loveda": SegPreset(
        ("background", "building", "road", "water", "barren", "forest", "agricultural"),
        reduce_zero_label=True,
        class_file="loveda",
        label_values="0 no-data (ignored), 1 background .. 7 agricultural",
    ),
    "potsdam": SegPreset(
        ISPRS_CLASSES,
        reduce_zero_label=True,
        class_file="potsdam",
        label_values="0 boundary (ignored), 1 impervious surface .. 6 clutter (mmseg converted)",
    ),
    "vaihingen": SegPreset(
        ISPRS_CLASSES,
        reduce_zero_label=True,
        class_file="vaihingen",
        label_values="0 boundary (ignored), 1 impervious surface .. 6 clutter (mmseg converted)",
    ),
    "whu_building": SegPreset(
        ("background", "building"),
        binary=True,
        class_file="whu_building",
        label_values="0 background, >0 building",
    ),
}


def _find_label(label_dir: Path, stem: str, label_suffix: str | None) -> Path | None:
    if label_suffix is not None:
        p = label_dir / f"{stem}{label_suffix}"
        return p if p.is_file() else None
    for ext in (".png", ".tif", ".tiff", ".bmp", ".jpg"):
        for e in (ext, ext.upper()):
            p = label_dir / f"{stem}{e}"
            if p.is_file():
                return p
    return None


class SegmentationDataset(Sequence[SegSample]):
    """Pairs of (image, index mask) found in two folders; labels read on demand.

    Images are the files of ``image_dir`` ending in ``img_suffix`` (default: any image
    extension); each one's label is ``label_dir/<name><label_suffix>`` (default: the same
    name with .png/.tif/...). An image without a label raises a :class:`DatasetError`.
    """
    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        *,
        classes: Sequence[str] | None = None,
        reduce_zero_label: bool = False,
        binary: bool = False,
        ignore_index: int = 255,
        img_suffix: str | None = None,
        label_suffix: str | None = None,
        class_file: str | None = None,
        layout: str = "IMAGE_DIR/<name>.<ext> with LABEL_DIR/<name>.png",
    ):
        image_dir = require_dir(Path(image_dir), "Image folder", layout)
        label_dir = require_dir(Path(label_dir), "Label folder", layout)
        if reduce_zero_label and binary:
            raise ValueError("reduce_zero_label and binary are exclusive")
        samples: list[SegSample] = []
        missing: list[str] = []
        for f in sorted(image_dir.iterdir()):
            if img_suffix is not None:
                if not f.is_file() or not f.name.endswith(img_suffix):
                    continue
                stem = f.name[: -len(img_suffix)]
            else:
                if not is_image_file(f, IMAGE_SUFFIXES):
                    continue
                stem = f.stem
            lab = _find_label(label_dir, stem, label_suffix)
            if lab is None:
                missing.append(f.name)
                continue
            samples.append(SegSample(f, lab, stem))
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) of {image_dir} have no label in {label_dir} (first: {missing[0]}).",
                hint=f"Expected layout: {layout}",
            )
        if not samples:
            raise DatasetError(f"No image found in {image_dir}.", hint=f"Expected layout: {layout}")
        self.image_dir = image_dir
        self.label_dir = label_dir
        self.samples = samples
        self.classes = list(classes) if classes is not None else None
        self.reduce_zero_label = reduce_zero_label
        self.binary = binary
        self.ignore_index = ignore_index
        self.class_file = class_file
        self.layout = layout

    # -- construction from the usual layouts -------------------------------------------

    @classmethod
    def mmseg(
        cls,
        root: str | Path,
        split: str = "val",
        *,
        img_dir: str = "img_dir",
        ann_dir: str = "ann_dir",
        img_suffix: str | None = None,
        seg_map_suffix: str | None = None,
        **kw,
    ) -> SegmentationDataset:
        """mmseg layout: ``ROOT/img_dir/<split>`` + ``ROOT/ann_dir/<split>``."""
        root = Path(root)
        return cls(
            root / img_dir / split,
            root / ann_dir / split,
            img_suffix=img_suffix,
            label_suffix=seg_map_suffix,
            layout=MMSEG_LAYOUT.replace("img_dir", img_dir).replace("ann_dir", ann_dir),
            **kw,
        )

    @classmethod
    def simple(
        cls, root: str | Path, *, images: str = "images", labels: str = "labels", **kw
    ) -> SegmentationDataset:
        """``ROOT/images`` + ``ROOT/labels`` (``../shared/data/semseg/<name>``)."""
        root = Path(root)
        return cls(root / images, root / labels, layout=SIMPLE_LAYOUT, **kw)

    # -- sequence ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    def __iter__(self) -> Iterator[SegSample]:
        return iter(self.samples)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    # -- reading -----------------------------------------------------------------------

    def read_label(self, sample: SegSample | int) -> np.ndarray:
        """(H, W) uint8 label in class-index space (0..C-1, ``ignore_index``)."""
        s = self.samples[sample] if isinstance(sample, int) else sample
        try:
            with Image.open(s.label) as im:
                if im.mode in ("RGB", "RGBA"):
                    raise DatasetError(
                        f"Label {s.label} is a colour image, not an index mask.",
                        hint="Convert colour-coded labels to single-band class indices (e.g. mmseg's dataset converters).",
                    )
                a = np.asarray(im)
        except FileNotFoundError as e:
            raise DatasetError(
                f"Label not found: {s.label}.", hint=f"Expected layout: {self.layout}"
            ) from e
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(
                f"Cannot read label {s.label} ({e}).", hint="Re-create or remove the file."
            ) from e
        if a.ndim != 2:
            raise DatasetError(
                f"Label {s.label} has shape {a.shape}; expected a single-band mask.",
                hint="Labels must be (H, W) index masks.",
            )
        if self.binary:
            return (a > 0).astype(np.uint8)
        a = a.astype(np.int64)
        if self.reduce_zero_label:
            zero = a == 0
            ign = a == self.ignore_index
            a = a - 1
            a[zero | ign] = self.ignore_index
        if a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise DatasetError(
                f"Label {s.label} has values outside 0..255.",
                hint="Labels must be uint8 index masks.",
            )
        return a.astype(np.uint8)

    def read_image(self, sample: SegSample | int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of a plain image file (PNG/JPEG/3-band TIFF) via PIL."""
        s = self.samples[sample] if isinstance(sample, int) else sample
        return read_rgb(s.image)


def segmentation_preset(
    name: str, root: str | Path, split: str | None = None
) -> SegmentationDataset:
    """Open a known dataset with its class names and label encoding (``SEG_PRESETS``).

    The folder layout is detected: ``images/`` + ``labels/`` (the shared data), mmseg
    ``img_dir/<split>`` + ``ann_dir/<split>``, or ``<split>/image`` + ``<split>/label`` (WHU).
    """
    key = name.lower()
    if key not in SEG_PRESETS:
        raise DatasetError(
            f"No segmentation preset named {name!r}.",
            hint=f"Use one of {sorted(SEG_PRESETS)}, or SegmentationDataset(...) directly.",
        )
    pr = SEG_PRESETS[key]
    root = Path(root)
    kw = dict(
        classes=pr.classes,
        reduce_zero_label=pr.reduce_zero_label,
        binary=pr.binary,
        class_file=pr.class_file,
    )
    if not root.is_dir():
        raise DatasetError(
            f"Dataset folder not found: {root}.",
            hint=f"Expected {SIMPLE_LAYOUT}, or {MMSEG_LAYOUT}.",
        )
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return SegmentationDataset.simple(root, **kw)
    if (root / "img_dir").is_dir():
        return SegmentationDataset.mmseg(root, split or "val", **kw)
    if split is not None and (root / split / "image").is_dir():
        return SegmentationDataset(
            root / split / "image",
            root / split / "label",
            layout="ROOT/<split>/image + ROOT/<split>/label",
            **kw,
        )
    splits = sorted(d.name for d in root.iterdir() if (d / "image").is_dir())
    hint = (
        f"Pass split= one of {splits}."
        if splits
        else f"Expected {SIMPLE_LAYOUT}, or {MMSEG_LAYOUT}."
    )
    raise DatasetError(f"{root} has no recognised segmentation layout for {name!r}.", hint=hint)
