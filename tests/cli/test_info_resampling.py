"""`rsvl info` says what resampling would do: nothing by default, and for --gsd the native
-> target GSD, the factor and the working grid (as segment announces it)."""

from __future__ import annotations

import json

import numpy as np
from conftest import write_raster
from rasterio.transform import from_origin

from rsvl.cli import main


def test_info_reports_the_resampling_plan(tmp_path, capsys):
    src = write_raster(tmp_path / "c.tif", np.zeros((3, 12, 18), np.uint8),
                       transform=from_origin(500000.0, 4100000.0, 5.0, 5.0))
    assert main(["info", str(src)]) == 0
    assert "no resampling: 18x12 px at the native 5 m" in capsys.readouterr().out
    assert main(["info", str(src), "--gsd", "0.3"]) == 0
    assert "resampling 5 m -> 0.3 m (16.7x upsampling): 18x12 -> 300x200 px" in capsys.readouterr().out
    assert main(["info", str(src), "--gsd", "0.3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["working_size"] == [300, 200] and abs(plan["resample_factor"] - 16.6667) < 1e-3
