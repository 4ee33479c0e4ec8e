"""Never lose or mislabel a user's data: outputs that are inputs, stale results taken for
finished ones, options that would fail only at the end, degrees taken for metres.

ColourModel (as in test_segment) embeds 4x4 patches by their mean colour and the words
"red", "green", "blue" as unit vectors, so every test knows the right answer; it counts its
calls, so "refused before the first tile" is checked, not assumed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from conftest import write_raster
from PIL import Image
from rasterio.transform import from_origin

from rsvl.data.classes import parse_class_list
from rsvl.errors import GridError, OutputError, ResumeError
from rsvl.tasks.segment import segment

torch.set_num_threads(1)

WORDS = {"red": 0, "green": 1, "blue": 2}


class ColourModel:
    name = "colour-test"
    logit_scale = 100.0
    default_templates = ("{}",)
    preferred_tile = 64
    image_size = 32

    def __init__(self) -> None:
        self.calls = 0

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, WORDS[t]] = 1.0
        return out

    def encode_image(self, images):
        self.calls += 1
        return torch.nn.functional.normalize(torch.as_tensor(images).float().mean(dim=(2, 3)) + 1e-3, dim=-1)

    def dense_features(self, images):
        self.calls += 1
        f = torch.nn.functional.avg_pool2d(torch.as_tensor(images).float(), 4) + 1e-3
        return torch.nn.functional.normalize(f, dim=1)


def scene() -> np.ndarray:
    img = np.zeros((3, 96, 144), np.uint8)
    img[0, :, :48] = 200
    img[1, :, 48:96] = 200
    img[2, :, 96:] = 200
    return img


CLASSES = parse_class_list("red, green, blue")


# -- an output that resolves to an input is refused, with or without --overwrite ------------


def test_segment_refuses_to_write_over_its_input(tmp_path):
    """`rsvl segment same/x_classes.tif "..." -o same/x --overwrite` used to replace the input."""
    same = tmp_path / "same"
    (same / "sub").mkdir(parents=True)
    src = write_raster(same / "x_classes.tif", scene())
    before = src.read_bytes()
    model = ColourModel()
    for prefix in (same / "x", same / "sub" / ".." / "x", same / "x.tif"):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="reads"):
                segment(model, src, CLASSES, prefix, overwrite=overwrite)
    # through a symlink to the folder as well
    (tmp_path / "link").symlink_to(same)
    with pytest.raises(OutputError, match="reads"):
        segment(model, src, CLASSES, tmp_path / "link" / "x", overwrite=True)
    assert src.read_bytes() == before and model.calls == 0


def test_segment_refuses_to_write_over_a_file_a_vrt_reads(tmp_path):
    inner = write_raster(tmp_path / "x_confidence.tif", scene())
    vrt = tmp_path / "mosaic.vrt"
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">x_confidence.tif</SourceFilename><SourceBand>{b}</SourceBand>'
        "</SimpleSource></VRTRasterBand>"
        for b in (1, 2, 3)
    )
    vrt.write_text(f'<VRTDataset rasterXSize="144" rasterYSize="96">{bands}</VRTDataset>')
    before = inner.read_bytes()
    with pytest.raises(OutputError, match="reads"):
        segment(ColourModel(), vrt, CLASSES, tmp_path / "x", overwrite=True)
    assert inner.read_bytes() == before


def test_other_raster_tasks_refuse_outputs_that_are_inputs(tmp_path):
    from rsvl.tasks.classify import classify
    from rsvl.tasks.instances import instances
    from rsvl.tasks.refer import refer
    from rsvl.tasks.search import build

    src = write_raster(tmp_path / "c_tiles.tif", scene())
    with pytest.raises(OutputError, match="reads"):
        classify(ColourModel(), src, CLASSES, tile=32, out=tmp_path / "c", overwrite=True)

    png = tmp_path / "p_overlay.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    before = png.read_bytes()

    class Boxes(torch.nn.Module):
        classes = ["thing"]

        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0)} for _ in images]

    with pytest.raises(OutputError, match="reads"):
        instances(Boxes(), png, tmp_path / "p", overwrite=True)
    # a folder whose outputs would replace another image of the same folder
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a_overlay.png")
    with pytest.raises(OutputError, match="reads"):
        instances(Boxes(), folder, folder, overwrite=True)
    assert png.read_bytes() == before

    mask_src = write_raster(tmp_path / "r_mask.tif", scene())
    with pytest.raises(OutputError, match="reads"):
        refer(None, mask_src, "the red field", tmp_path / "r", overwrite=True, predictor=lambda x: x)

    # rebuilding an index (the folder is replaced) from a source kept inside it
    idx = tmp_path / "idx"
    build(ColourModel(), [png], idx)
    inside = write_raster(idx / "scene.tif", scene())
    with pytest.raises(OutputError, match="reads"):
        build(ColourModel(), [inside], idx, overwrite=True)
    assert inside.exists()


# -- --resume on finished outputs checks the settings -----------------------------------------


def test_resume_on_finished_outputs_with_other_classes_is_refused(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene())
    res = segment(ColourModel(), src, CLASSES, tmp_path / "o", gsd=0)
    before = {k: open(v, "rb").read() for k, v in res.outputs.items()}
    with pytest.raises(ResumeError, match="settings"):
        segment(ColourModel(), src, parse_class_list("blue, green, red"), tmp_path / "o", gsd=0, resume=True)
    assert {k: open(v, "rb").read() for k, v in res.outputs.items()} == before
    # the same run resumed: nothing to redo, the same answer
    again = segment(ColourModel(), src, CLASSES, tmp_path / "o", gsd=0, resume=True)
    assert again.class_fractions == res.class_fractions


# -- every option is checked before the first tile ------------------------------------------


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(to_crs="EPSG:999999"), OutputError, "to-crs"),
        (dict(to_crs="not a crs"), OutputError, "to-crs"),
        (dict(vector_format="shp"), OutputError, "vector format"),
        (dict(tile=0), GridError, "tile"),
        (dict(tile=-64), GridError, "tile"),
        (dict(gsd=-1), GridError, "GSD"),
        (dict(overlap=-1), GridError, "overlap"),
        (dict(tile=64, overlap=64), GridError, "overlap"),
        (dict(batch_size=0), GridError, "batch"),
    ],
)
def test_segment_checks_every_option_before_any_tile(tmp_path, kw, error, match):
    src = write_raster(tmp_path / "scene.tif", scene())
    model = ColourModel()
    with pytest.raises(error, match=match):
        segment(model, src, CLASSES, tmp_path / "o", **kw)
    assert model.calls == 0
    assert not list(tmp_path.glob("o_*"))


@pytest.mark.parametrize("kw", [dict(tile=0), dict(gsd=-1), dict(batch_size=0), dict(overlap=-1)])
def test_other_tasks_reject_out_of_range_grid_options(tmp_path, kw):
    from rsvl.tasks.classify import classify
    from rsvl.tasks.instances import instances
    from rsvl.tasks.refer import refer
    from rsvl.tasks.search import build

    src = write_raster(tmp_path / "scene.tif", scene())
    model = ColourModel()
    with pytest.raises(GridError):
        instances(_NoModel(), src, tmp_path / "i", **kw)
    with pytest.raises(GridError):
        refer(None, src, "red", tmp_path / "r", predictor=_fail, **kw)
    with pytest.raises(GridError):
        build(model, [src], tmp_path / "idx", **kw)
    if "overlap" not in kw:
        with pytest.raises(GridError):
            classify(model, src, CLASSES, out=tmp_path / "c", **kw)
    assert model.calls == 0


class _NoModel(torch.nn.Module):
    classes = ["thing"]

    def forward(self, images):  # pragma: no cover - must not be reached
        raise AssertionError("the model ran before the options were checked")


def _fail(images):  # pragma: no cover - must not be reached
    raise AssertionError("the model ran before the options were checked")


def test_cli_tile_zero_and_negative_gsd_are_errors(tmp_path, capsys):
    from rsvl.cli import main

    src = write_raster(tmp_path / "scene.tif", scene())
    for args in (["--tile", "0"], ["--gsd", "-1"]):
        code = main(["segment", str(src), "red, green", "-o", str(tmp_path / "o"), *args])
        assert code != 0
        assert "error" in capsys.readouterr().err.lower()
    assert not list(tmp_path.glob("o_*"))


# -- geographic CRS: the model's GSD is in metres, not degrees ---------------------------------


def test_segment_on_an_epsg4326_raster_resamples_in_metres(tmp_path):
    # ~1.1 m pixels at the equator: 0.00001 degree
    deg = 0.00001
    src = write_raster(tmp_path / "geo.tif", scene(), crs="EPSG:4326", transform=from_origin(10.0, 0.00048, deg, deg))
    model = ColourModel()
    model.preferred_gsd = 2.2  # about half the resolution: roughly 48 x 72 px
    res = segment(model, src, CLASSES, tmp_path / "o", tile=32, overlap=8)
    with rasterio.open(res.outputs["classes"]) as ds:
        assert 44 <= ds.height <= 52 and 68 <= ds.width <= 76
        assert ds.crs.to_epsg() == 4326
        assert abs(ds.transform.a - deg * 144 / ds.width) < 1e-12
        settings = json.loads(ds.tags()["rsvl_settings"])
    assert settings["gsd"] == 2.2
    fr = res.class_fractions
    assert fr["red"] == pytest.approx(1 / 3, abs=0.05) and fr["blue"] == pytest.approx(1 / 3, abs=0.05)
