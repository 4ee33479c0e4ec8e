"""Resampling is announced and bounded: every raster task says on stderr what resampling to
the working GSD does (native -> target GSD, factor, grid, tiles) before the first tile; a
*default* GSD (the model's training GSD) that would upsample more than 4x is refused before
anything is written, with the two ways out (--gsd 0 for the native grid, an explicit --gsd
to confirm); the plan is recorded in the output's settings tags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from conftest import write_raster
from rasterio.transform import from_origin

from rsvl.data.classes import parse_class_list
from rsvl.errors import GridError
from rsvl.geo.gsd import ResamplePlan
from rsvl.geo.raster import RasterSource
from rsvl.tasks.segment import segment

torch.set_num_threads(1)

WORDS = {"red": 0, "green": 1, "blue": 2}
CLASSES = parse_class_list("red, green, blue")


class ColourModel:
    name = "colour-test"
    logit_scale = 100.0
    default_templates = ("{}",)
    preferred_tile = 64
    preferred_gsd = 0.3
    image_size = 32

    def __init__(self) -> None:
        self.calls = 0

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, WORDS[t]] = 1.0
        return out

    def dense_features(self, images):
        self.calls += 1
        f = torch.nn.functional.avg_pool2d(torch.as_tensor(images).float(), 4) + 1e-3
        return torch.nn.functional.normalize(f, dim=1)


def coarse(tmp_path, gsd=5.0, h=12, w=18):
    img = np.zeros((3, h, w), np.uint8)
    img[0, :, : w // 3] = 200
    img[1, :, w // 3: 2 * w // 3] = 200
    img[2, :, 2 * w // 3:] = 200
    return write_raster(tmp_path / "coarse.tif", img, transform=from_origin(500000.0, 4100000.0, gsd, gsd))


def settings_of(path):
    with rasterio.open(path) as ds:
        return json.loads(ds.tags()["rsvl_settings"])


def test_default_gsd_upsampling_over_4x_is_refused_before_anything_is_written(tmp_path):
    src = coarse(tmp_path)
    model = ColourModel()
    with pytest.raises(GridError) as err:
        segment(model, src, CLASSES, tmp_path / "o", tile=64, overlap=16)
    e = err.value
    assert "5 m raster would be resampled 16.7x to the model's 0.3 m" in e.message
    assert "--gsd 0 to run at the native 5 m" in e.hint and "--gsd 0.3 to confirm" in e.hint
    assert model.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coarse.tif"]


def test_native_gsd_runs_and_the_tags_record_no_resampling(tmp_path, capsys):
    src = coarse(tmp_path)
    res = segment(ColourModel(), src, CLASSES, tmp_path / "o", tile=64, overlap=16, gsd=0)
    s = settings_of(res.outputs["classes"])
    assert s["native_gsd"] == 5.0 and s["target_gsd"] is None and s["resample_factor"] == 1.0
    assert res.class_fractions["red"] == pytest.approx(1 / 3, abs=0.05)


def test_explicit_gsd_confirms_the_upsampling_says_so_on_stderr_and_records_it(tmp_path, capsys):
    src = coarse(tmp_path)
    res = segment(ColourModel(), src, CLASSES, tmp_path / "o", tile=64, overlap=16, gsd=0.3)
    err = capsys.readouterr().err
    assert "resampling 5 m -> 0.3 m (16.7x upsampling): 18x12 -> 300x200 px, 24 tiles" in err
    s = settings_of(res.outputs["classes"])
    assert s["native_gsd"] == 5.0 and s["target_gsd"] == 0.3
    assert s["resample_factor"] == pytest.approx(16.6667, abs=1e-3)
    with rasterio.open(res.outputs["classes"]) as ds:
        assert (ds.width, ds.height) == (300, 200)


def test_default_gsd_within_4x_runs_and_is_announced(tmp_path, capsys):
    src = coarse(tmp_path, gsd=1.2, h=24, w=36)  # 1.2 m -> 0.3 m: exactly 4x
    res = segment(ColourModel(), src, CLASSES, tmp_path / "o", tile=64, overlap=16)
    assert "resampling 1.2 m -> 0.3 m (4x upsampling): 36x24 -> 144x96 px" in capsys.readouterr().err
    assert settings_of(res.outputs["classes"])["resample_factor"] == pytest.approx(4.0)


def test_plan_describes_downsampling_and_native_grids(tmp_path):
    src = coarse(tmp_path, gsd=0.5, h=40, w=60)
    with RasterSource(src, target_gsd=2.0) as rs:
        plan = rs.resample_plan()
    assert plan.factor == pytest.approx(0.25)
    assert plan.describe(1) == "resampling 0.5 m -> 2 m (4x downsampling): 60x40 -> 15x10 px, 1 tile"
    plan.check_default(1)  # downsampling is never refused
    native = ResamplePlan(0.5, None, (60, 40), (60, 40))
    assert native.factor == 1.0 and native.describe(2) == "no resampling: 60x40 px at the native 0.5 m, 2 tiles"


def test_cli_refusal_is_one_line_on_stderr_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from rsvl.cli import main
    from rsvl.models import registry

    src = coarse(tmp_path)
    model = ColourModel()
    monkeypatch.setattr(registry, "load", lambda *a, **k: model)
    out = tmp_path / "run" / "o"
    code = main(["segment", str(src), "red, green, blue", "-o", str(out)])
    assert code == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "16.7x" in lines[0] and "--gsd 0 to run at the native 5 m, or --gsd 0.3 to confirm" in lines[0]
    assert model.calls == 0 and not list(out.parent.glob("o_*"))
    assert main(["segment", str(src), "red, green, blue", "-o", str(out), "--gsd", "0", "--json"]) == 0
    assert settings_of(out.parent / "o_classes.tif")["resample_factor"] == 1.0
