"""Image-text retrieval: R@1/5/10 in both directions and their mean."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsvl.data.captions import KarpathyCaptionDataset, RetrievalCsvDataset, RetrievalSet
from rsvl.data.common import load_json
from rsvl.data.scenes import UCMJsonDataset
from rsvl.errors import DatasetError
from rsvl.eval.results import (
    EvalResult,
    Progress,
    base_settings,
    finish,
    load_square,
    model_settings,
    sample_settings,
    subset_indices,
)
from rsvl.metrics import retrieval_recall

CAPTION_LAYOUTS = (
    "a ucm.json index (samples with 'captions'); a Karpathy dataset_<name>.json ({'images': "
    "[{'filename', 'split', 'sentences'}]}) next to images/ or imgs/; or a FarSLIP "
    "<name>_img_txt_pairs_<split>.csv (columns filepath and title)"
)


def open_caption_dataset(
    path: str | Path, split: str | None = None, caption_key: str = "title"
) -> tuple[Any, str, str | None]:
    """Open a retrieval dataset; returns ``(dataset, layout, split used)``.

    Default split: ``val`` for ucm.json, ``test`` for a Karpathy JSON; CSVs have none.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"Dataset not found: {p}.", hint=f"Expected {CAPTION_LAYOUTS}.")
    if p.is_dir() and (p / "ucm.json").is_file():
        p = p / "ucm.json"
    if p.is_file() and p.suffix.lower() == ".json":

        data = load_json(p, "Caption index", CAPTION_LAYOUTS)
        if isinstance(data, dict) and "samples" in data:
            s = split or "val"
            return UCMJsonDataset(p, split=s), "ucm.json", s
        if isinstance(data, dict) and "images" in data:
            s = split or "test"
            return KarpathyCaptionDataset(p, split=s), "karpathy", s
        raise DatasetError(f"{p} is neither a ucm.json nor a Karpathy caption JSON.", hint=f"Expected {CAPTION_LAYOUTS}.")
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        sep = "\t" if p.suffix.lower() == ".tsv" else ","
        return RetrievalCsvDataset(p, caption_key=caption_key, sep=sep), "csv", None
    raise DatasetError(f"{p} is not a retrieval dataset.", hint=f"Expected {CAPTION_LAYOUTS}.")


def run_retrieval(
    model: Any,
    dataset_path: str | Path,
    *,
    split: str | None = None,
    caption_prefix: str = "",
    caption_key: str = "title",
    dedup_texts: bool = True,
    batch_size: int = 32,
    limit: int | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = None,
) -> EvalResult:
    """Image-text retrieval, FarSLIP / SkyScript protocol; ``limit`` keeps that many images."""

    t0 = time.perf_counter()
    ds, layout, used_split = open_caption_dataset(dataset_path, split, caption_key)
    samples = list(ds.samples)
    idx = subset_indices(len(samples), limit)
    samples = [samples[i] for i in idx]
    pairs = [(s.image, c) for s in samples for c in s.captions]
    if not pairs:
        raise DatasetError("The selected samples have no captions.", hint=f"Expected {CAPTION_LAYOUTS}.")
    rs = RetrievalSet.from_pairs(pairs, caption_prefix=caption_prefix, dedup_texts=dedup_texts)
    size = int(model.image_size)
    img_emb: list[torch.Tensor] = []
    for start in range(0, len(rs.images), batch_size):
        chunk = rs.images[start : start + batch_size]
        imgs = np.stack([load_square(p, size) for p in chunk])
        with torch.no_grad():
            img_emb.append(torch.nn.functional.normalize(model.encode_image(imgs).float().cpu(), dim=-1))
        if progress:
            progress(len(chunk))
    txt_emb: list[torch.Tensor] = []
    for start in range(0, len(rs.texts), 256):
        with torch.no_grad():
            e = model.encode_text(list(rs.texts[start : start + 256])).float().cpu()
        txt_emb.append(torch.nn.functional.normalize(e, dim=-1))
    sim = (torch.cat(img_emb) @ torch.cat(txt_emb).T).numpy()
    metrics = retrieval_recall(sim, pairs=rs.pairs, ks=(1, 5, 10))
    metrics["n_images"] = len(rs.images)
    metrics["n_texts"] = len(rs.texts)
    metrics["n_pairs"] = int(len(rs.pair_image))
    settings = base_settings("retrieval", dataset_path)
    settings.update(model_settings(model, model_name, weights))
    settings.update(
        {
            "layout": layout,
            "split": used_split,
            "caption_prefix": caption_prefix,
            "caption_key": caption_key if layout == "csv" else None,
            "dedup_texts": dedup_texts,
            "image_size": size,
            "preprocess": "short side resized to image_size (bilinear, antialias), centre crop",
            "ks": [1, 5, 10],
        }
    )
    settings.update(sample_settings(len(samples), len(ds.samples), limit, batch_size))
    return finish("retrieval", metrics, settings, t0)
