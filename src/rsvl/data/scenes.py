"""Scene-classification datasets: the ``ucm.json`` index, one folder per class, and the
SkyScript benchmark CSV (``filepath,label`` + a class-name file).

Readers index paths and labels only; pixels are read by whoever iterates (``read_rgb``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsvl.data.captions import RetrievalSet
from rsvl.data.common import (
    CheckedSamples,
    check_image,
    load_json,
    read_csv_pairs,
    require_dir,
    require_file,
)
from rsvl.errors import DatasetError
from rsvl.io import IMAGE_SUFFIXES, is_image_file
from rsvl.io import read_rgb as _read_any_rgb

__all__ = [
    "SceneCsvDataset",
    "SceneDataset",
    "SceneFolderDataset",
    "SceneSample",
    "UCMJsonDataset",
    "read_class_names",
    "read_rgb",
]

UCM_LAYOUT = (
    "ROOT/ucm.json = {'classes': [...], 'source': ..., 'samples': [{'image': 'images/<class>/<file>.jpg', "
    "'label': <class>, 'split': 'train'|'val', 'captions': [...]}, ...]} with image paths relative to ROOT"
)
FOLDER_LAYOUT = "ROOT/<class name>/<image files>, one folder per class"
CSV_LAYOUT = (
    "a CSV with a header row holding an image-path column (default 'filepath') and a label column "
    "(default 'label': class index or class name), plus a class-name file with one class per line"
)


@dataclass(frozen=True)
class SceneSample:
    """One labelled scene: image path, class index, class name, split and captions."""

    image: Path
    label: int
    class_name: str
    split: str | None = None
    captions: tuple[str, ...] = ()


class SceneDataset(CheckedSamples[SceneSample]):
    """A list of :class:`SceneSample` plus the class names; images are not read."""

    layout: str = ""

    def __init__(self, samples: list[SceneSample], classes: list[str]):
        super().__init__(samples)
        self.classes = classes

    def labels(self) -> np.ndarray:
        """(N,) int64 class indices, in sample order."""
        return np.asarray([s.label for s in self.samples], dtype=np.int64)

    def paths(self) -> list[Path]:
        return [s.image for s in self.samples]

    def check_files(self) -> None:
        """Raise a DatasetError on the first listed image that does not exist."""
        for s in self.samples:
            check_image(s.image, self.layout)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a dataset image as an (H, W, 3) uint8 RGB array; a missing or unreadable file is
    a :class:`~rsvl.errors.DatasetError`."""
    return _read_any_rgb(path, error=DatasetError)


class UCMJsonDataset(SceneDataset):
    """The ``ucm.json`` index of ``../shared/data/ucm`` (UC Merced + UCM-Captions).

    ``source`` is a folder holding ``ucm.json`` or the JSON file itself; ``split`` selects
    one split name or several (``None`` = all).
    """

    layout = UCM_LAYOUT

    def __init__(self, source: str | Path, split: str | Sequence[str] | None = None):
        p = Path(source)
        if not p.exists():
            raise DatasetError(f"Dataset not found: {p}.", hint=f"Expected layout: {UCM_LAYOUT}")
        json_path = p / "ucm.json" if p.is_dir() else p
        data = load_json(json_path, "UCM index", UCM_LAYOUT)
        root = json_path.parent
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("classes"), list)
            or not isinstance(data.get("samples"), list)
        ):
            raise DatasetError(
                f"{json_path} lacks a 'classes' list or a 'samples' list.",
                hint=f"Expected layout: {UCM_LAYOUT}",
            )
        classes = [str(c) for c in data["classes"]]
        index = {c: i for i, c in enumerate(classes)}
        wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
        samples: list[SceneSample] = []
        seen_splits: set[str] = set()
        for k, rec in enumerate(data["samples"]):
            if not isinstance(rec, dict) or "image" not in rec or "label" not in rec:
                raise DatasetError(
                    f"Sample {k} of {json_path} lacks 'image' or 'label'.",
                    hint=f"Expected layout: {UCM_LAYOUT}",
                )
            label = str(rec["label"])
            if label not in index:
                raise DatasetError(
                    f"Sample {k} of {json_path} has label {label!r}, which is not in 'classes'.",
                    hint="Add the class to 'classes' or fix the label.",
                )
            s = rec.get("split")
            if s is not None:
                seen_splits.add(str(s))
            if wanted is not None and s not in wanted:
                continue
            caps = rec.get("captions") or []
            samples.append(
                SceneSample(
                    root / rec["image"],
                    index[label],
                    label,
                    None if s is None else str(s),
                    tuple(map(str, caps)),
                )
            )
        if wanted is not None and not (wanted & seen_splits):
            raise DatasetError(
                f"No sample of {json_path} is in split {sorted(wanted)}.",
                hint=f"Use one of the splits present: {sorted(seen_splits) or 'none (omit split)'}.",
            )
        self.root = root
        self.source = data.get("source")
        self.splits = sorted(seen_splits)
        super().__init__(samples, classes)

    def retrieval_set(self, *, caption_prefix: str = "", dedup_texts: bool = True) -> RetrievalSet:
        """The image-caption pairs of the selected split as a :class:`RetrievalSet`."""
        pairs = [(s.image, c) for s in self.samples for c in s.captions]
        if not pairs:
            raise DatasetError(
                "The selected samples have no captions.", hint=f"Expected layout: {UCM_LAYOUT}"
            )
        return RetrievalSet.from_pairs(
            pairs, caption_prefix=caption_prefix, dedup_texts=dedup_texts
        )


class SceneFolderDataset(SceneDataset):
    """One sub-folder per class (AID, NWPU-RESISC45, UCM as distributed, PatternNet...).

    Classes are the sorted sub-folder names unless ``classes`` gives them (and their order).
    Images are found recursively inside each class folder, sorted by path.
    """

    layout = FOLDER_LAYOUT

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_SUFFIXES,
    ):
        root = require_dir(Path(root), "Dataset folder", FOLDER_LAYOUT)
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if classes is None:
            classes = sorted(
                d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
            )
            if not classes:
                raise DatasetError(
                    f"{root} has no class sub-folders.", hint=f"Expected layout: {FOLDER_LAYOUT}"
                )
        samples: list[SceneSample] = []
        for i, c in enumerate(classes):
            d = root / c
            if not d.is_dir():
                raise DatasetError(
                    f"Class folder not found: {d}.", hint=f"Expected layout: {FOLDER_LAYOUT}"
                )
            for f in sorted(d.rglob("*")):
                if is_image_file(f, exts):
                    samples.append(SceneSample(f, i, c))
        if not samples:
            raise DatasetError(
                f"No image ({', '.join(exts)}) found under {root}.",
                hint=f"Expected layout: {FOLDER_LAYOUT}",
            )
        self.root = root
        super().__init__(samples, list(classes))


def read_class_names(path: str | Path) -> list[str]:
    """A class-name file: one class per line (SkyScript ``classnames.txt``); blank lines skipped."""
    p = require_file(Path(path), "Class-name file", CSV_LAYOUT)
    names = [
        line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()
    ]
    if not names:
        raise DatasetError(f"Class-name file {p} is empty.", hint="Write one class name per line.")
    return names


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


class SceneCsvDataset(SceneDataset):
    """SkyScript benchmark CSV (as FarSLIP's ``test_scene_classification``): ``filepath,label``.

    ``label`` may be a class index into ``classnames`` or a class name (matched exactly, then
    ignoring case and ``_`` vs space). Relative paths are resolved against ``root``
    (default: the CSV's folder).
    """

    layout = CSV_LAYOUT

    def __init__(
        self,
        csv_path: str | Path,
        classnames: str | Path | Sequence[str],
        *,
        root: str | Path | None = None,
        img_key: str = "filepath",
        label_key: str = "label",
        sep: str = ",",
    ):
        csv_path = require_file(Path(csv_path), "CSV file", CSV_LAYOUT)
        classes = (
            read_class_names(classnames) if isinstance(classnames, str | Path) else list(classnames)
        )
        base = Path(root) if root is not None else csv_path.parent
        exact = {c: i for i, c in enumerate(classes)}
        loose = {_norm(c): i for i, c in enumerate(classes)}
        rows = read_csv_pairs(csv_path, (img_key, label_key), sep, CSV_LAYOUT, "img_key/label_key/sep")
        samples = []
        for n, (fp, lab) in enumerate(rows, start=2):
            lab = (lab or "").strip()
            if lab.lstrip("-").isdigit():
                i = int(lab)
                if not 0 <= i < len(classes):
                    raise DatasetError(
                        f"{csv_path} line {n}: label {i} is outside the {len(classes)} classes.",
                        hint="Labels are 0-based indices into the class-name file.",
                    )
            elif lab in exact:
                i = exact[lab]
            elif _norm(lab) in loose:
                i = loose[_norm(lab)]
            else:
                raise DatasetError(
                    f"{csv_path} line {n}: label {lab!r} is not a class of the class-name file.",
                    hint="Use a class index or a name listed in the class-name file.",
                )
            p = Path(fp)
            samples.append(SceneSample(p if p.is_absolute() else base / p, i, classes[i]))
        if not samples:
            raise DatasetError(f"{csv_path} has no rows.", hint=f"Expected {CSV_LAYOUT}.")
        self.root = base
        self.layout = f"{CSV_LAYOUT}; image paths relative to {base} (pass root= to change)"
        super().__init__(samples, classes)
