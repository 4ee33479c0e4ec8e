"""Image-caption datasets for retrieval: Karpathy-style ``dataset_*.json`` (RSICD, RSITMD,
UCM-Captions, Sydney-Captions) and FarSLIP / SkyScript retrieval CSVs
(``*_img_txt_pairs_test.csv``: one row per (image, caption) pair).

A :class:`RetrievalSet` is what the retrieval protocol needs: the unique images, the unique
texts, and the (image, text) ground-truth pairs, deduplicated as FarSLIP's
``test_retrieval`` does (images by path, texts by string).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsvl.data.common import CheckedSamples, load_json, read_csv_pairs, require_dir, require_file
from rsvl.errors import DatasetError

__all__ = [
    "FARSLIP_CAPTION_PREFIX",
    "CaptionSample",
    "KarpathyCaptionDataset",
    "RetrievalCsvDataset",
    "RetrievalSet",
]

#: FarSLIP prefixes RSICD / RSITMD / UCM captions with this before tokenising.
FARSLIP_CAPTION_PREFIX = "a satellite image. "

KARPATHY_LAYOUT = (
    "dataset_<name>.json = {'images': [{'filename': ..., 'split': 'train'|'val'|'test', "
    "'sentences': [{'raw': ...}, ...]}, ...]} next to an image folder (images/ or imgs/, or pass image_dir)"
)
CSV_LAYOUT = (
    "<name>_img_txt_pairs_<split>.csv with a header row holding an image-path column (default 'filepath') "
    "and a caption column ('title'; SkyScript: 'title_multi_objects'), one row per (image, caption) pair"
)


@dataclass(frozen=True)
class CaptionSample:
    """One image and its captions."""

    image: Path
    captions: tuple[str, ...]
    split: str | None = None
    image_id: int | str | None = None


@dataclass
class RetrievalSet:
    """Unique images, unique texts and the ground-truth (image, text) pairs."""

    images: list[Path]
    texts: list[str]
    pair_image: np.ndarray
    pair_text: np.ndarray

    @property
    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image_index, text_index)`` of every ground-truth pair (for ``retrieval_recall``)."""
        return self.pair_image, self.pair_text

    def text_to_image(self) -> np.ndarray | None:
        """(n_texts,) image index of each text when every text has exactly one image, else None."""
        counts = np.bincount(self.pair_text, minlength=len(self.texts))
        if len(self.pair_text) != len(self.texts) or np.any(counts != 1):
            return None
        out = np.empty(len(self.texts), dtype=np.int64)
        out[self.pair_text] = self.pair_image
        return out

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[tuple[str | Path, str]],
        *,
        caption_prefix: str = "",
        dedup_texts: bool = True,
    ) -> RetrievalSet:
        """Build from (image path, caption) rows.

        ``dedup_texts=True`` (FarSLIP / SkyScript): a caption string shared by several images
        is one text whose ground truth is all of them. ``False``: every row is its own text
        (the classic "5 captions per image" protocol).
        """
        img_idx: dict[Path, int] = {}
        txt_idx: dict[str, int] = {}
        texts: list[str] = []
        seen: set[tuple[int, int]] = set()
        pi: list[int] = []
        pt: list[int] = []
        for path, cap in pairs:
            i = img_idx.setdefault(Path(path), len(img_idx))
            text = caption_prefix + str(cap)
            if dedup_texts:
                if text not in txt_idx:
                    txt_idx[text] = len(texts)
                    texts.append(text)
                t = txt_idx[text]
            else:
                t = len(texts)
                texts.append(text)
            if (i, t) not in seen:
                seen.add((i, t))
                pi.append(i)
                pt.append(t)
        if not pi:
            raise DatasetError(
                "No (image, caption) pair to build a retrieval set from.",
                hint="Check the split and the caption column.",
            )
        return cls(list(img_idx), texts, np.asarray(pi, np.int64), np.asarray(pt, np.int64))


class _CaptionDataset(CheckedSamples[CaptionSample]):
    layout = ""

    def retrieval_set(self, *, caption_prefix: str = "", dedup_texts: bool = True) -> RetrievalSet:
        pairs = [(s.image, c) for s in self.samples for c in s.captions]
        return RetrievalSet.from_pairs(
            pairs, caption_prefix=caption_prefix, dedup_texts=dedup_texts
        )


class KarpathyCaptionDataset(_CaptionDataset):
    """Karpathy-style caption JSON (``dataset_rsicd.json``, ``dataset_rsitmd.json``, UCM's
    ``dataset.json``). ``split`` keeps one split name or several (None = all).

    Images are looked up under ``image_dir`` (default: ``images/`` or ``imgs/`` next to the
    JSON), joined with an entry's ``filepath`` when it has one.
    """

    layout = KARPATHY_LAYOUT

    def __init__(
        self,
        json_path: str | Path,
        image_dir: str | Path | None = None,
        split: str | Sequence[str] | None = None,
    ):
        json_path = Path(json_path)
        data = load_json(json_path, "Caption JSON", KARPATHY_LAYOUT)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(
                f"{json_path} has no 'images' list.", hint=f"Expected layout: {KARPATHY_LAYOUT}"
            )
        if image_dir is None:
            for cand in ("images", "imgs"):
                if (json_path.parent / cand).is_dir():
                    image_dir = json_path.parent / cand
                    break
            else:
                raise DatasetError(
                    f"No image folder (images/ or imgs/) next to {json_path}.",
                    hint="Pass image_dir= the folder holding the images.",
                )
        image_dir = require_dir(Path(image_dir), "Image folder", KARPATHY_LAYOUT)
        wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
        seen_splits: set[str] = set()
        samples: list[CaptionSample] = []
        for k, rec in enumerate(data["images"]):
            if (
                not isinstance(rec, dict)
                or "filename" not in rec
                or not isinstance(rec.get("sentences"), list)
            ):
                raise DatasetError(
                    f"Entry {k} of {json_path} lacks 'filename' or a 'sentences' list.",
                    hint=f"Expected layout: {KARPATHY_LAYOUT}",
                )
            s = rec.get("split")
            if s is not None:
                seen_splits.add(str(s))
            if wanted is not None and s not in wanted:
                continue
            caps = []
            for sent in rec["sentences"]:
                raw = sent.get("raw") if isinstance(sent, dict) else sent
                if raw is None and isinstance(sent, dict) and "tokens" in sent:
                    raw = " ".join(sent["tokens"])
                if raw is not None:
                    caps.append(str(raw).strip())
            sub = rec.get("filepath") or ""
            samples.append(
                CaptionSample(
                    image_dir / sub / rec["filename"],
                    tuple(caps),
                    s,
                    rec.get("imgid", rec.get("id")),
                )
            )
        if wanted is not None and not samples:
            raise DatasetError(
                f"No image of {json_path} is in split {sorted(wanted)}.",
                hint=f"Use one of the splits present: {sorted(seen_splits) or 'none (omit split)'}.",
            )
        self.json_path = json_path
        self.image_dir = image_dir
        self.splits = sorted(seen_splits)
        super().__init__(samples)


class RetrievalCsvDataset(_CaptionDataset):
    """FarSLIP / SkyScript retrieval CSV: one row per (image, caption) pair.

    RSICD / RSITMD / UCM use the caption column ``title``; SkyScript's test set
    ``title_multi_objects``. Relative image paths resolve against ``root`` (default: the
    CSV's folder). FarSLIP prefixes these captions with :data:`FARSLIP_CAPTION_PREFIX`; pass
    it as ``caption_prefix`` to :meth:`retrieval_set` to reproduce its numbers.
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        root: str | Path | None = None,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = ",",
    ):
        csv_path = require_file(Path(csv_path), "Retrieval CSV", CSV_LAYOUT)
        base = Path(root) if root is not None else csv_path.parent
        rows = read_csv_pairs(csv_path, (img_key, caption_key), sep, CSV_LAYOUT, "img_key/caption_key/sep")
        if not rows:
            raise DatasetError(f"{csv_path} has no rows.", hint=f"Expected {CSV_LAYOUT}.")
        grouped: dict[str, list[str]] = {}
        for fp, cap in rows:
            grouped.setdefault(fp, []).append(str(cap))
        samples = []
        for fp, caps in grouped.items():
            p = Path(fp)
            samples.append(CaptionSample(p if p.is_absolute() else base / p, tuple(caps)))
        self.csv_path = csv_path
        self.root = base
        self.rows = len(rows)
        self.layout = f"{CSV_LAYOUT}; image paths relative to {base} (pass root= to change)"
        super().__init__(samples)
