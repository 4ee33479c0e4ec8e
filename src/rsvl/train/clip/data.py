"""Training data for ``rsvl train clip``: the index readers and the views FarSLIP trains on.

The global view is the image's centred square resized to the model's input size (FarSLIP
resizes the shortest side without cropping; square batches need the crop). Stage 1 samples
``max_boxes`` crops inside that square with ``RandomResizedCrop`` parameters (scale 0.3-0.7,
ratio 3/4-4/3), each resized to the input size; stage 2 takes up to ``max_boxes`` object
regions chosen as FarSLIP does (:func:`rsvl.data.mgrs.select_regions`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torch.utils.data import Dataset

from rsvl.data.captions import KarpathyCaptionDataset, RetrievalCsvDataset
from rsvl.data.common import check_image, load_json
from rsvl.data.mgrs import MgrsDataset, MgrsRegion, is_mgrs_json, select_regions
from rsvl.data.scenes import UCMJsonDataset
from rsvl.errors import DatasetError
from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD
from rsvl.train.clip.config import ClipTrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainItem:
    """One training image: path, captions (one is drawn per visit), regions (stage 2)."""

    image: Path
    captions: tuple[str, ...]
    regions: tuple[MgrsRegion, ...] = ()


def open_train_items(
    path: str | Path,
    *,
    split: str | None = None,
    caption_key: str = "title",
    image_root: str | Path | None = None,
) -> tuple[list[TrainItem], str]:
    """Read a training index: MGRS region JSON, ``ucm.json``, Karpathy JSON or caption CSV.

    Returns ``(items, layout)``. ``split`` defaults to ``train`` for ``ucm.json`` and Karpathy
    files (CSV and MGRS have none).
    """
    layouts = (
        "an MGRS region JSON (list of {global_filepath, global_caption, segment}), a ucm.json, "
        "a Karpathy dataset_*.json, or a CSV with 'filepath' and a caption column"
    )
    p = Path(path)
    if p.is_dir() and (p / "ucm.json").is_file():
        p = p / "ucm.json"
    if not p.exists():
        raise DatasetError(f"Training data not found: {p}.", hint=f"Expected {layouts}.")
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".json":
        data = load_json(p, "Training index", layouts)
        if isinstance(data, list):
            if not is_mgrs_json(data):
                raise DatasetError(
                    f"{p} is a JSON list whose first item has no 'global_filepath'.",
                    hint=f"Expected {layouts}.",
                )
            ds = MgrsDataset(p, image_root)
            return [TrainItem(it.image, (it.caption,), it.regions) for it in ds.samples], "mgrs"
        if isinstance(data, dict) and "samples" in data:
            s = split or "train"
            ucm = UCMJsonDataset(p, split=s)
            items = [TrainItem(x.image, tuple(x.captions)) for x in ucm.samples]
            return _with_captions(items, p), "ucm.json"
        if isinstance(data, dict) and "images" in data:
            s = split or "train"
            kp = KarpathyCaptionDataset(p, split=s, image_dir=image_root)
            items = [TrainItem(x.image, tuple(x.captions)) for x in kp.samples]
            return _with_captions(items, p), "karpathy"
        raise DatasetError(f"{p} is not a training index rsvl knows.", hint=f"Expected {layouts}.")
    if p.is_file() and suffix in (".csv", ".tsv"):
        csv = RetrievalCsvDataset(p, root=image_root, caption_key=caption_key,
                                  sep="\t" if suffix == ".tsv" else ",")
        items = [TrainItem(x.image, tuple(x.captions)) for x in csv.samples]
        return _with_captions(items, p), "csv"
    raise DatasetError(f"{p} is not a training index.", hint=f"Expected {layouts}.")


def _with_captions(items: list[TrainItem], path: Path) -> list[TrainItem]:
    kept = [
        TrainItem(it.image, tuple(c for c in it.captions if c.strip()), it.regions) for it in items
    ]
    kept = [it for it in kept if it.captions]
    if not kept:
        raise DatasetError(
            f"No image of {path} (in the selected split) has a caption.",
            hint="Image-text training needs captions; pick the split that has them.",
        )
    if len(kept) < len(items):
        log.warning("%s: %d image(s) without captions skipped", path, len(items) - len(kept))
    return kept


def random_resized_crop_box(
    rng: random.Random, width: float, height: float, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) with torchvision ``RandomResizedCrop.get_params`` semantics."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, int(width) - w)
            y = rng.randint(0, int(height) - h)
            return float(x), float(y), float(x + w), float(y + h)
    # fallback: central crop at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return float(x), float(y), float(x + w), float(y + h)


class ClipTrainData(Dataset):
    """Training samples as dicts of tensors (see :meth:`__getitem__`)."""

    def __init__(
        self,
        items: Sequence[TrainItem],
        *,
        stage: int,
        image_size: int,
        context_length: int,
        config: ClipTrainConfig,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        if stage == 2 and not any(it.regions for it in items):
            raise DatasetError(
                "Stage 2 (region contrastive loss) needs regions: none of the training images "
                "has any.",
                hint="Pass an MGRS-style region JSON (list of {global_filepath, global_caption, "
                "segment: [{bbox, category, category_id}]}) as --data, or train stage 1.",
            )
        self.items = list(items)
        self.stage = stage
        self.size = int(image_size)
        self.ctx = int(context_length)
        self.cfg = config
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self._tok: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tok is None:
            self._tok = SimpleTokenizer(context_length=self.ctx)
        return self._tok(texts)

    def _tensor(self, im: Any, box: tuple[float, float, float, float], *, keep_ratio: bool) -> torch.Tensor:
        """Crop ``box`` (pixels) and resize to size²: straight (``keep_ratio=False``), or
        shortest side + centre crop."""
        x1, y1, x2, y2 = box
        if keep_ratio:
            w, h = x2 - x1, y2 - y1
            side = min(w, h)
            x1, y1 = x1 + (w - side) / 2, y1 + (h - side) / 2
            x2, y2 = x1 + side, y1 + side
        out = im.resize((self.size, self.size), Image.BICUBIC, box=(x1, y1, x2, y2))
        arr = np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self.mean) / self.std)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``image`` (3, S, S), ``text`` (ctx,); stage 1: ``crops`` (K, 3, S, S), ``boxes``
        (K, 4) normalised xyxy of the global view, ``box_valid`` (K,); stage 2:
        ``region_images`` (K, 3, S, S), ``region_texts`` (K, ctx), ``region_labels`` (K,)
        (category id, -1 = dropped/padding)."""
        item = self.items[index]
        rng = random.Random(random.getrandbits(64))
        check_image(item.image, "the training index's image paths")
        try:
            with Image.open(item.image) as f:
                im = f.convert("RGB")
        except OSError as exc:
            raise DatasetError(
                f"Cannot read training image {item.image} ({exc}).",
                hint="Remove it from the index or replace the file.",
            ) from exc
        W, H = im.size
        side = min(W, H)
        left, top = (W - side) / 2, (H - side) / 2
        square = (left, top, left + side, top + side)
        out: dict[str, torch.Tensor] = {
            "image": self._tensor(im, square, keep_ratio=False),
            "text": self.tokenize([rng.choice(item.captions)])[0],
        }
        K, S = self.cfg.max_boxes, self.size
        if self.stage == 1:
            crops = torch.zeros(K, 3, S, S)
            boxes = torch.zeros(K, 4)
            for k in range(K):
                bx = random_resized_crop_box(rng, side, side, self.cfg.crop_scale, self.cfg.crop_ratio)
                crops[k] = self._tensor(
                    im, (bx[0] + left, bx[1] + top, bx[2] + left, bx[3] + top), keep_ratio=False
                )
                boxes[k] = torch.tensor(bx) / side
            out.update(crops=crops, boxes=boxes, box_valid=torch.ones(K, dtype=torch.bool))
        else:
            regions = select_regions(
                item.regions, max_boxes=K, min_size=self.cfg.min_size,
                max_size=self.cfg.max_size, rng=rng,
            )
            imgs = torch.zeros(K, 3, S, S)
            texts = torch.zeros(K, self.ctx, dtype=torch.long)
            labels = torch.full((K,), -1, dtype=torch.long)
            for k, r in enumerate(regions):
                x1, y1, x2, y2 = r.box
                x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(W)), min(y2, float(H))
                if x2 - x1 < 1 or y2 - y1 < 1:
                    continue
                imgs[k] = self._tensor(im, (x1, y1, x2, y2), keep_ratio=True)
                texts[k] = self.tokenize([r.text])[0]
                labels[k] = r.category_id
            out.update(region_images=imgs, region_texts=texts, region_labels=labels)
        return out


__all__ = ["ClipTrainData", "TrainItem", "open_train_items", "random_resized_crop_box"]
