"""MGRS-style region JSON (FarSLIP stage 2: MGRS-200k ``text_info.json``).

The file is a JSON list; each item is one image with its regions::

    [{"global_filepath": "0001.png",                 # relative to the image root
      "global_caption": "...",                        # else "detailed_caption", else "brief_caption"
      "segment": [
          {"bbox": {"x1": 10, "y1": 20, "x2": 200, "y2": 180, "W": 512, "H": 512},
           "category": "storage tank", "category_id": 7},
          {"bbox": {...}, "cap": "a free-text description of the region"}]},
     ...]

``bbox`` holds six numbers read **in dict order** as ``x1, y1, x2, y2, W, H`` (pixels of the
original image; ``W, H`` = image size), as FarSLIP's reader does; a list of 4 or 6 numbers is
accepted too. A region has either ``category`` + ``category_id`` (region contrastive loss: same
id = positive pair) or a free-text ``cap`` (category id -1: such regions are kept in the box
budget but dropped from the multi-positive loss, as in FarSLIP). The region text is ``cap`` or
``"a satellite image of {category}"``.

No torch here; :func:`select_regions` implements FarSLIP's box selection (shuffle, keep
``min_size² <= area <= max_size²``, at most ``max_boxes``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsvl.data.common import CheckedSamples, load_json
from rsvl.errors import DatasetError

__all__ = [
    "MGRS_LAYOUT",
    "MgrsDataset",
    "MgrsItem",
    "MgrsRegion",
    "is_mgrs_json",
    "region_text",
    "select_regions",
]

MGRS_LAYOUT = (
    "a JSON list of {'global_filepath': <image path relative to the image root>, "
    "'global_caption' (or 'detailed_caption' / 'brief_caption'): <text>, "
    "'segment': [{'bbox': {x1, y1, x2, y2, W, H} in pixels, 'category': <name>, "
    "'category_id': <int>} or {'bbox': ..., 'cap': <text>}, ...]}"
)

#: caption keys of an item, in the order they are tried
CAPTION_KEYS: tuple[str, ...] = ("global_caption", "detailed_caption", "brief_caption")
#: template of a categorised region's text (FarSLIP)
REGION_TEMPLATE = "a satellite image of {}"


@dataclass(frozen=True)
class MgrsRegion:
    """One region of an MGRS item: pixel box, category (id -1 for free-text regions)."""

    box: tuple[float, float, float, float]
    category_id: int = -1
    category: str | None = None
    caption: str | None = None

    @property
    def text(self) -> str:
        """``cap``, or ``"a satellite image of {category}"``."""
        return region_text(self)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


@dataclass(frozen=True)
class MgrsItem:
    """One image, its global caption and its regions."""

    image: Path
    caption: str
    regions: tuple[MgrsRegion, ...]
    size: tuple[int, int] | None = None  # (W, H) stated by the boxes, if any


def region_text(region: MgrsRegion) -> str:
    if region.caption:
        return region.caption
    return REGION_TEMPLATE.format(region.category)


def is_mgrs_json(data: Any) -> bool:
    """True when ``data`` (a parsed JSON document) looks like an MGRS region list."""
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and "global_filepath" in data[0]
    )


def _where(path: Path, k: int, j: int | None = None) -> str:
    return f"Item {k}" + (f", segment {j}" if j is not None else "") + f" of {path}"


def _parse_bbox(raw: Any, where: str) -> tuple[tuple[float, float, float, float], tuple[int, int] | None]:
    values = list(raw.values()) if isinstance(raw, dict) else raw
    if not isinstance(values, (list, tuple)) or len(values) not in (4, 6):
        raise DatasetError(
            f"{where}: 'bbox' must hold 6 numbers (x1, y1, x2, y2, W, H, in that order) or 4 "
            f"(x1, y1, x2, y2); got {raw!r}.",
            hint=f"Expected layout: {MGRS_LAYOUT}",
        )
    try:
        nums = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DatasetError(
            f"{where}: 'bbox' values must be numbers; got {raw!r}.",
            hint=f"Expected layout: {MGRS_LAYOUT}",
        ) from None
    x1, y1, x2, y2 = nums[:4]
    if not (x2 > x1 and y2 > y1):
        raise DatasetError(
            f"{where}: 'bbox' {raw!r} is empty or inverted (needs x2 > x1 and y2 > y1).",
            hint="Boxes are x1, y1, x2, y2 in pixels (not x, y, w, h).",
        )
    size = (int(nums[4]), int(nums[5])) if len(nums) == 6 else None
    return (x1, y1, x2, y2), size


def _parse_region(seg: Any, path: Path, k: int, j: int) -> tuple[MgrsRegion, tuple[int, int] | None]:
    where = _where(path, k, j)
    if not isinstance(seg, dict) or "bbox" not in seg:
        raise DatasetError(f"{where} has no 'bbox'.", hint=f"Expected layout: {MGRS_LAYOUT}")
    box, size = _parse_bbox(seg["bbox"], where)
    cap = seg.get("cap")
    if cap is not None:
        if not isinstance(cap, str) or not cap.strip():
            raise DatasetError(f"{where}: 'cap' is empty.", hint="Give the region a caption or a category.")
        return MgrsRegion(box, -1, seg.get("category"), cap.strip()), size
    if "category" not in seg or "category_id" not in seg:
        raise DatasetError(
            f"{where} has neither 'cap' nor both 'category' and 'category_id'.",
            hint=f"Expected layout: {MGRS_LAYOUT}",
        )
    cat_id = seg["category_id"]
    if isinstance(cat_id, bool) or not isinstance(cat_id, int) or cat_id < 0:
        raise DatasetError(
            f"{where}: 'category_id' must be an integer >= 0; got {cat_id!r}.",
            hint="Regions of the same category must share one non-negative integer id.",
        )
    category = str(seg["category"]).strip()
    if not category:
        raise DatasetError(f"{where}: 'category' is empty.", hint=f"Expected layout: {MGRS_LAYOUT}")
    return MgrsRegion(box, cat_id, category, None), size


class MgrsDataset(CheckedSamples[MgrsItem]):
    """An MGRS-style region JSON (see the module docstring).

    ``image_root`` is where ``global_filepath`` is resolved; default: the JSON's folder, or a
    ``global_imgs/`` folder next to it when the first image is found there (MGRS-200k layout).
    Every item and region is validated when the file is opened; images are checked to exist
    when an item is taken.
    """

    layout = MGRS_LAYOUT

    def __init__(self, json_path: str | Path, image_root: str | Path | None = None) -> None:
        json_path = Path(json_path)
        data = load_json(json_path, "MGRS region JSON", MGRS_LAYOUT)
        if not isinstance(data, list):
            raise DatasetError(
                f"{json_path} is not a JSON list of items.", hint=f"Expected layout: {MGRS_LAYOUT}"
            )
        if not data:
            raise DatasetError(f"{json_path} holds no item.", hint=f"Expected layout: {MGRS_LAYOUT}")
        items: list[MgrsItem] = []
        for k, rec in enumerate(data):
            if not isinstance(rec, dict) or not isinstance(rec.get("global_filepath"), str):
                raise DatasetError(
                    f"{_where(json_path, k)} has no 'global_filepath' string.",
                    hint=f"Expected layout: {MGRS_LAYOUT}",
                )
            caption = next(
                (str(rec[c]).strip() for c in CAPTION_KEYS if isinstance(rec.get(c), str) and rec[c].strip()),
                None,
            )
            if caption is None:
                raise DatasetError(
                    f"{_where(json_path, k)} has no caption (looked for {list(CAPTION_KEYS)}).",
                    hint="Every image needs a global caption for the image-text loss.",
                )
            segs = rec.get("segment", [])
            if not isinstance(segs, list):
                raise DatasetError(
                    f"{_where(json_path, k)}: 'segment' must be a list of regions.",
                    hint=f"Expected layout: {MGRS_LAYOUT}",
                )
            regions, size = [], None
            for j, seg in enumerate(segs):
                region, s = _parse_region(seg, json_path, k, j)
                regions.append(region)
                size = size or s
            items.append(MgrsItem(Path(rec["global_filepath"]), caption, tuple(regions), size))
        root = self._image_root(json_path, image_root, items[0].image)
        self.json_path = json_path
        self.image_root = root
        self.categories: dict[int, str] = {}
        for item in items:
            for r in item.regions:
                if r.category_id >= 0:
                    self.categories.setdefault(r.category_id, r.category or "")
        super().__init__([MgrsItem(root / it.image, it.caption, it.regions, it.size) for it in items])

    @staticmethod
    def _image_root(json_path: Path, image_root: str | Path | None, first: Path) -> Path:
        if image_root is not None:
            root = Path(image_root)
            if not root.is_dir():
                raise DatasetError(f"Image root not found: {root}.", hint=f"Expected layout: {MGRS_LAYOUT}")
            return root
        if first.is_absolute():
            return Path("/")
        for cand in (json_path.parent, json_path.parent / "global_imgs"):
            if (cand / first).is_file():
                return cand
        return json_path.parent

    @property
    def n_regions(self) -> int:
        return sum(len(it.regions) for it in self.samples)


def select_regions(
    regions: Sequence[MgrsRegion],
    *,
    max_boxes: int = 4,
    min_size: float = 64,
    max_size: float | None = 1024,
    rng: random.Random | None = None,
) -> list[MgrsRegion]:
    """FarSLIP's choice of regions for one image: shuffle, keep boxes with
    ``min_size² <= area <= max_size²`` (``max_size`` None/0 = no upper bound), at most
    ``max_boxes``."""
    rng = rng or random.Random()
    order = list(range(len(regions)))
    rng.shuffle(order)
    out: list[MgrsRegion] = []
    for i in order:
        r = regions[i]
        if r.area < min_size**2 or (max_size and r.area > max_size**2):
            continue
        out.append(r)
        if len(out) >= max_boxes:
            break
    return out
