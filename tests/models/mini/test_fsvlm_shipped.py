"""The shipped mini-fsvlm on real UCM val scenes (never trained on): farmland where the
scene is fields, none on parking lots and rivers; chat questions answered without [SEG];
and `rsvl segment --model mini-fsvlm` end to end on a georeferenced mosaic."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import shared_data, write_raster
from PIL import Image

import rsvl
from rsvl.cli import main


@pytest.fixture(scope="module")
def model():
    return rsvl.load("mini-fsvlm")


def _val_scenes(cls: str, n: int = 3) -> list[np.ndarray]:
    root = shared_data("ucm")
    samples = json.loads((root / "ucm.json").read_text())["samples"]
    paths = [s["image"] for s in samples if s["split"] == "val" and s["image"].split("/")[1] == cls][:n]
    return [np.asarray(Image.open(root / p).convert("RGB")) for p in paths]


def _farmland_share(model, image) -> float:
    answer = model.seg_chat(image, "This is a 0.3 m image. Please segment the farmland.")
    assert "[SEG]" in answer.text and len(answer.masks) == 1
    assert answer.masks[0].shape == image.shape[:2]
    return float((answer.masks[0] > 0).mean())


def test_fields_are_farmland_and_parking_lots_and_rivers_are_not(model):
    assert min(_farmland_share(model, im) for im in _val_scenes("agricultural")) > 0.8
    for cls in ("parkinglot", "river"):
        assert max(_farmland_share(model, im) for im in _val_scenes(cls)) < 0.2, cls


def test_a_chat_question_gets_words_not_a_mask(model):
    (image,) = _val_scenes("agricultural", 1)
    answer = model.seg_chat(image, "Does this picture contain a river?")
    assert answer.masks == [] and "[SEG]" not in answer.text and answer.text.strip()


def test_cli_segments_a_georeferenced_mosaic(tmp_path, capsys):
    (fields,) = _val_scenes("agricultural", 1)
    (lot,) = _val_scenes("parkinglot", 1)
    mosaic = np.concatenate([fields, lot], axis=1).transpose(2, 0, 1)  # 256 x 512: fields | parking lot
    src = write_raster(tmp_path / "mosaic.tif", np.ascontiguousarray(mosaic), transform=rasterio.Affine(0.3, 0, 500000, 0, -0.3, 4000000))
    out = tmp_path / "out" / "mosaic"
    code = main(["segment", str(src), "--model", "mini-fsvlm", "This is a 0.3 m image. Please segment the farmland.",
                 "-o", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    with rasterio.open(doc["outputs"]["classes"]) as ds:
        classes = ds.read(1)
        tags = ds.tags()
    assert "[SEG]" in tags["answer"] and json.loads(tags["rsvl_settings"])["model"] == "mini-fsvlm"
    assert classes[:, :256].mean() > 0.8 and classes[:, 256:].mean() < 0.2
    polys = gpd.read_file(doc["outputs"]["polygons"])
    assert len(polys) >= 1
    assert polys["area_ha"].sum() == pytest.approx(polys.geometry.area.sum() / 1e4, rel=1e-6)
    assert 0.4 < polys["area_ha"].sum() / (256 * 256 * 0.09 / 1e4) < 1.3  # about the fields' 0.59 ha
