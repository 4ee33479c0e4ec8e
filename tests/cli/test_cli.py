from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, shared_data, write_raster

from rsvl.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsvl.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_info_json_is_exactly_one_document_on_stdout(capsys):
    code = main(["info", "--json", str(REPO / "examples" / "OSBS_029.tif")])
    out, err = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)
    assert doc["epsg"] == 32617 and doc["width"] == 400 and doc["gsd"] == [0.1, 0.1]
    assert doc["plan"]["rgb_bands"] == [1, 2, 3]


def test_info_text_says_what_rsvl_will_do(tmp_path, capsys):
    p = write_raster(tmp_path / "u16.tif", np.arange(4 * 64 * 64, dtype=np.uint16).reshape(4, 64, 64), photometric="MINISBLACK")
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "4 bands: using 1,2,3 as RGB; pass --bands to change" in out
    assert "percentile stretch" in out


def test_no_crs_warning_goes_to_stderr_and_json_stays_clean(tmp_path, capsys):
    import rasterio

    p = write_raster(tmp_path / "nocrs.tif", np.zeros((3, 8, 8), np.uint8), crs=None, transform=rasterio.Affine.identity())
    assert main(["info", "--json", str(p)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["crs"] is None
    assert "no CRS" in err


def test_user_errors_are_one_line_without_traceback():
    r = run_cli("info", "does-not-exist.tif")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: does-not-exist.tif: no such file.")
    assert "Traceback" not in r.stderr
    r = run_cli("info", "--bands", "9,1,2", str(REPO / "examples" / "OSBS_029.tif"))
    assert r.returncode == 2 and "band 9 does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--debug", "info", "does-not-exist.tif")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_readme_commands_and_ci_agree():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must open with the run command and the test command"
    test_cmd = blocks[1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, ".ci/run must run exactly the README's test command"
    assert "examples/" in blocks[0]


@pytest.mark.realdata
def test_info_on_every_real_raster(capsys):
    for name in ("RGB.byte.tif", "m_4709963_se_14_1_20200831.tif", "OSBS_029.tif"):
        p = shared_data("geotiff", name)
        assert main(["info", "--json", str(p)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["crs"].startswith("EPSG:")


def test_models_lists_cards_and_unknown_models_suggest(capsys):
    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in doc["models"]}
    assert {"farslip2-vit-b16", "remoteclip-vit-b32", "sam-vit-b"} <= names
    r = run_cli("classify", str(REPO / "examples" / "OSBS_029.tif"), "-l", "forest, water", "-m", "farslip3")
    assert r.returncode == 2 and "Did you mean" in r.stderr and "farslip2" in r.stderr


def test_missing_weights_say_where_to_put_them(tmp_path):
    import os

    env = {**os.environ, "RSVL_OFFLINE": "1", "RSVL_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "rsvl.cli", "classify", str(REPO / "examples" / "OSBS_029.tif"),
                        "-l", "forest, water", "-m", "farslip2-vit-b16"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "FarSLIP2_ViT-B-16.pt" in r.stderr and str(tmp_path) in r.stderr and "--weights" in r.stderr


@pytest.mark.realdata
def test_main_job_segments_the_bundled_sample(tmp_path, capsys):
    """The README's first command, on the real sample with the shipped model, georeferenced
    like the input. The scene is open pine forest on sand: no water, no buildings, and what
    the model cannot name goes to the learned "background" class instead of being forced into
    a name (the dense head without it called a quarter of this scene water). It does not yet
    call the scene forest at 0.3 m (README, mini-clip)."""
    import rasterio

    out = tmp_path / "sub" / "OSBS_029"
    code = main(["segment", str(REPO / "examples" / "OSBS_029.tif"),
                 "farmland|cropland, forest|trees, water, buildings|houses, roads", "-o", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    fr = doc["class_fractions"]
    assert doc["classes"][-1] == "background" and doc["settings"]["learned_other"] == "background"
    assert fr["water"] < 0.02 and fr["buildings"] < 0.02
    assert fr["background"] + fr["forest"] > 0.6
    with rasterio.open(doc["outputs"]["classes"]) as ds, rasterio.open(REPO / "examples" / "OSBS_029.tif") as src:
        assert ds.crs == src.crs
        assert abs(ds.bounds.left - src.bounds.left) < 1e-6 and abs(ds.bounds.top - src.bounds.top) < 1e-6
        assert abs(ds.transform.a - 0.3048) < 0.01  # resampled to the model's training GSD
    for key in ("polygons", "overlay", "confidence"):
        assert (tmp_path / "sub" / doc["outputs"][key].split("/")[-1]).exists()


def test_readme_claims_only_commands_that_exist():
    import typer.main

    from rsvl.cli import app

    readme = (REPO / "README.md").read_text()
    commands = set(typer.main.get_command(app).commands)
    named = set(re.findall(r"`rsvl ([a-z][a-z-]*)", readme)) | set(re.findall(r"&& rsvl ([a-z][a-z-]*)", readme))
    assert named and named <= commands, f"README names commands rsvl lacks: {named - commands}"
    intro = readme.split("## ")[0].lower()
    for missing in ("chat", "service", "ray"):
        assert not re.search(rf"\b{missing}\b", intro), f"the README's opening claims {missing!r}"
