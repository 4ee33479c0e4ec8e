"""rsvl refer: georeferenced outputs, tiled candidate search, plain images, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_raster

torch.set_num_threads(1)


class BrightModel(torch.nn.Module):
    """A fake referring model: the referred object is whatever is bright (mean > 0.5)."""

    name = "bright"
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, image_size: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.calls = 0

    def tokenize(self, expressions):
        assert expressions and all(e.strip() for e in expressions)
        return {"input_ids": torch.zeros(len(expressions), 4, dtype=torch.long)}

    def forward(self, images, text):
        self.calls += images.shape[0]
        fg = (images.mean(1) - 0.5) * 20
        return torch.stack([torch.zeros_like(fg), fg], 1)


def _rgb(h: int, w: int, blobs: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    a = np.full((3, h, w), 20, np.uint8)
    for r0, r1, c0, c1, v in blobs:
        a[:, r0:r1, c0:c1] = v
    return a


def test_georeferenced_raster_gives_mask_geotiff_and_polygon_in_place(tmp_path):
    import geopandas as gpd
    import rasterio
    from rasterio.transform import from_origin

    from rsvl.tasks.refer import refer

    transform = from_origin(500000.0, 4100000.0, 0.5, 0.5)
    src = write_raster(tmp_path / "scene.tif", _rgb(64, 64, [(10, 20, 30, 45, 230)]), transform=transform)
    res = refer(BrightModel(64), src, "  the bright roof ", tmp_path / "out", model_name="bright")
    assert res.found and res.expression == "the bright roof" and res.pixels == 150 and res.tiles == 1
    assert res.score > 0.99
    with rasterio.open(tmp_path / "out_mask.tif") as ds:
        assert ds.crs.to_epsg() == 32618 and ds.transform == transform
        m = ds.read(1)
        assert ds.tags()["expression"] == "the bright roof"
    assert m[10:20, 30:45].all() and m.sum() == 150
    gdf = gpd.read_file(tmp_path / "out.gpkg")
    assert len(gdf) == 1 and gdf.crs.to_epsg() == 32618
    assert gdf.iloc[0]["expression"] == "the bright roof" and gdf.iloc[0]["score"] > 0.99
    assert gdf.geometry.iloc[0].bounds == pytest.approx((500015.0, 4099990.0, 500022.5, 4099995.0))
    assert res.bounds == pytest.approx([500015.0, 4099990.0, 500022.5, 4099995.0])
    assert (tmp_path / "out_overlay.png").is_file()
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["expression"] == "the bright roof" and doc["settings"]["crs"] == "EPSG:32618"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_large_raster_returns_best_scoring_uncut_component(tmp_path):
    import rasterio

    from rsvl.geo.tiles import TileGrid
    from rsvl.tasks.refer import refer

    # A: dimmer (score ~0.98), in one tile; B: brighter, cut by some tiles, whole in others
    rgb = _rgb(260, 300, [(20, 36, 20, 40, 180), (200, 216, 220, 246, 250)])
    src = write_raster(tmp_path / "big.tif", rgb)
    model = BrightModel(128)
    res = refer(model, src, "the brightest thing", tmp_path / "big", tile=128, overlap=32, batch_size=2,
                vector_format="geojson")
    assert res.tiles == len(TileGrid(300, 260, 128, 32)) and model.calls == res.tiles
    assert res.settings["tiled"] is True
    assert res.found and res.pixels == 16 * 26
    with rasterio.open(tmp_path / "big_mask.tif") as ds:
        m = ds.read(1)
    assert m[200:216, 220:246].all() and m.sum() == 16 * 26 and m[20:36, 20:40].sum() == 0
    assert (tmp_path / "big.geojson").is_file()
    # keep every candidate: the dimmer one is there too
    allres = refer(model, src, "the brightest thing", tmp_path / "all", tile=128, overlap=32, keep="all")
    with rasterio.open(tmp_path / "all_mask.tif") as ds:
        m = ds.read(1)
    assert m[20:36, 20:40].all() and m[200:216, 220:246].all() and allres.candidates >= 2


def test_plain_image_outputs_png_geojson_and_json(tmp_path):
    from PIL import Image

    from rsvl.tasks.refer import refer

    Image.fromarray(np.moveaxis(_rgb(80, 100, [(40, 60, 10, 30, 240)]), 0, -1)).save(tmp_path / "img.png")
    res = refer(BrightModel(64), tmp_path / "img.png", "the white square", tmp_path / "img_out")
    mask = np.asarray(Image.open(tmp_path / "img_out_mask.png"))
    assert mask.shape == (80, 100) and set(np.unique(mask)) <= {0, 255}
    assert (mask[42:58, 12:28] == 255).all() and mask[:, 40:].max() == 0
    gj = json.loads((tmp_path / "img_out.geojson").read_text())
    assert len(gj["features"]) == 1 and gj["features"][0]["properties"]["expression"] == "the white square"
    minx, miny, maxx, maxy = res.bounds
    assert 9 <= minx <= 11 and 39 <= miny <= 41 and 29 <= maxx <= 31 and 59 <= maxy <= 61
    assert json.loads((tmp_path / "img_out.json").read_text())["score"] == pytest.approx(res.score)
    assert (tmp_path / "img_out_overlay.png").is_file()
    # a second run refuses to overwrite, unless asked
    from rsvl.errors import OutputError

    with pytest.raises(OutputError):
        refer(BrightModel(64), tmp_path / "img.png", "the white square", tmp_path / "img_out")
    refer(BrightModel(64), tmp_path / "img.png", "the white square", tmp_path / "img_out", overwrite=True)


def test_nothing_found_still_writes_empty_outputs(tmp_path):
    from rsvl.tasks.refer import refer

    src = write_raster(tmp_path / "dark.tif", _rgb(32, 32, []))
    res = refer(BrightModel(32), src, "a ship", tmp_path / "dark")
    assert not res.found and res.score == 0.0 and res.bounds is None
    assert (tmp_path / "dark_mask.tif").is_file() and (tmp_path / "dark.gpkg").is_file()


def test_bad_input_raises_user_errors(tmp_path):
    from rsvl.errors import InputNotFoundError, PromptError
    from rsvl.tasks.refer import find_candidates, refer

    src = write_raster(tmp_path / "s.tif", _rgb(32, 32, []))
    with pytest.raises(PromptError):
        refer(BrightModel(32), src, "   ", tmp_path / "o")
    with pytest.raises(InputNotFoundError):
        refer(BrightModel(32), tmp_path / "missing.tif", "a ship", tmp_path / "o")
    prob = np.zeros((10, 10), np.float32)
    prob[0:3, 0:3] = 0.9
    prob[5:9, 5:9] = 0.7
    cands = find_candidates(prob, threshold=0.5, min_pixels=4, inner_edges=(True, False, False, False))
    assert sorted((c.pixels, c.cut) for c in cands) == [(9, True), (16, False)]


def test_cli_errors_are_reported_without_traceback(tmp_path, capsys):
    from rsvl.cli import main

    src = write_raster(tmp_path / "s.tif", _rgb(32, 32, []))
    assert main(["refer", str(src), "the ship", "--model", "no-such-model", "-o", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err
    assert main(["refer", str(src), "", "-o", str(tmp_path / "o")]) != 0
    assert "empty" in capsys.readouterr().err
    assert main(["refer", str(tmp_path / "nope.tif"), "the ship", "-o", str(tmp_path / "o")]) != 0
    assert "nope.tif" in capsys.readouterr().err
    assert main(["refer", str(src), "the ship", "--model", "mini-clip", "-o", str(tmp_path / "o")]) != 0
    assert "not a referring" in capsys.readouterr().err


def test_mask_painted_per_window_equals_the_whole_mask():
    from rsvl.tasks.refer import Candidate, PaintedMask

    rng = np.random.default_rng(0)
    kept = []
    for r0, c0, h, w in ((5, 250, 40, 30), (300, 10, 20, 500), (0, 0, 3, 3)):
        kept.append(Candidate(0.9, 1, r0, c0, rng.random((h, w)) > 0.3))
    whole = np.zeros((400, 600), np.uint8)
    for c in kept:
        r0, c0, r1, c1 = c.bounds
        whole[r0:r1, c0:c1] |= c.mask
    lazy = PaintedMask(kept, 400, 600)
    assert lazy.shape == (1, 400, 600) and lazy.dtype == np.uint8
    tiled = np.zeros_like(whole)
    for y in range(0, 400, 128):
        for x in range(0, 600, 128):
            tiled[y : y + 128, x : x + 128] = lazy[:, y : y + 128, x : x + 128][0]
    assert (tiled == whole).all()
