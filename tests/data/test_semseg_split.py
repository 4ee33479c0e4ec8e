"""rsvl data semseg-split: every dataset keeps a val crop, pixels land where the rule says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvl.data.segmentation import segmentation_preset
from rsvl.data.semseg_split import build_semseg_split
from rsvl.errors import DatasetError, OutputError


def _write(folder: Path, stem: str, img: np.ndarray, lab: np.ndarray, image_dir: str = "images",
           label_dir: str = "labels") -> None:
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    (folder / label_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / image_dir / f"{stem}.png")
    Image.fromarray(lab).save(folder / label_dir / f"{stem}.png")


def _semseg(root: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    for stem in ("0", "1"):
        _write(root / "loveda", stem, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
               rng.integers(0, 8, (32, 32), dtype=np.uint8))
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    lab = np.zeros((64, 64), np.uint8)
    lab[:32, :32], lab[:32, 32:], lab[32:, :32], lab[32:, 32:] = 1, 2, 3, 4
    _write(root / "potsdam", "p", img, lab)
    for split in ("train", "val"):
        whu = np.zeros((16, 16), np.uint8)
        whu[4:8, 4:8] = 255
        _write(root / "whu_building" / split, f"w_{split}", img[:16, :16], whu, "image", "label")
    return img, lab


def test_split_keeps_a_val_crop_of_every_dataset(tmp_path: Path) -> None:
    img, lab = _semseg(tmp_path / "semseg")
    out = tmp_path / "px"
    stats = build_semseg_split(tmp_path / "semseg", out)
    assert stats["crops"]["loveda"] == {"train": ["0"], "val": ["1"]}
    assert stats["crops"]["potsdam"] == {"train": ["p_tl", "p_tr", "p_bl"], "val": ["p_br"]}
    assert stats["crops"]["whu_building"] == {"train": ["w_train"], "val": ["w_val"]}
    assert json.loads((out / "split.json").read_text())["crops"] == stats["crops"]
    # the val quadrant is the bottom-right one, pixel for pixel, and readable by the preset
    ds = segmentation_preset("potsdam", out / "val" / "potsdam")
    (s,) = ds.samples
    np.testing.assert_array_equal(ds.read_image(s), img[32:, 32:])
    np.testing.assert_array_equal(np.asarray(Image.open(s.label)), lab[32:, 32:])
    # WHU masks are written 0/1 and read as background / building
    w = segmentation_preset("whu_building", out / "val" / "whu_building")
    labels = w.read_label(w.samples[0])
    assert set(np.unique(np.asarray(Image.open(w.samples[0].label)))) == {0, 1}
    assert labels[5, 5] == 1 and labels[0, 0] == 0


def test_split_refuses_to_overwrite_and_bad_folders(tmp_path: Path) -> None:
    _semseg(tmp_path / "semseg")
    out = tmp_path / "px"
    build_semseg_split(tmp_path / "semseg", out)
    with pytest.raises(OutputError, match="exists") as e:
        build_semseg_split(tmp_path / "semseg", out)
    assert "--overwrite" in e.value.hint
    build_semseg_split(tmp_path / "semseg", out, overwrite=True)
    with pytest.raises(DatasetError, match="not found"):
        build_semseg_split(tmp_path / "nope", tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has none of"):
        build_semseg_split(tmp_path / "empty", tmp_path / "o3")
    assert not (tmp_path / "o3").exists()
