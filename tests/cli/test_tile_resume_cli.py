"""``rsvl classify --tile`` and ``rsvl instances`` killed or interrupted mid-run: a kill -9
leaves a journal that ``--resume`` continues to the uninterrupted outputs; Ctrl-C exits 130
and says how to continue."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
import torch
from conftest import REPO, write_raster

import rsvl
from rsvl.cli import main
from rsvl.geo.journal import CHUNK_PREFIX, JOURNAL
from rsvl.geo.runner import partial_dir_for

_MODEL = textwrap.dedent(
    """
    import os, signal, torch

    class Texture:
        name = "texture-test"
        logit_scale = 10.0
        default_templates = ("{}",)
        image_size = 20

        def __init__(self, kill_at=None):
            self.calls, self.kill_at = 0, kill_at

        def encode_text(self, texts):
            words = {"red": 0, "green": 1, "blue": 2}
            out = torch.zeros(len(texts), 3)
            for i, t in enumerate(texts):
                out[i, words[t]] = 1.0
            return out

        def encode_image(self, images):
            self.calls += 1
            if self.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            x = torch.as_tensor(images).float() / 255
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)) + 0.3 * x.std(dim=(2, 3)) + 1e-3, dim=-1)
    """
)

_KILLED = _MODEL + textwrap.dedent(
    """
    import sys
    import rsvl
    rsvl.load = lambda *a, **k: Texture(kill_at=7)
    from rsvl.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _texture_model():
    scope: dict = {}
    exec(_MODEL, scope)  # the very model the killed process used
    return scope["Texture"]()


@pytest.fixture
def raster(tmp_path):
    rng = np.random.default_rng(11)
    return write_raster(tmp_path / "scene.tif", rng.integers(1, 256, (3, 120, 160), dtype=np.uint8))


@pytest.mark.slow
def test_kill_9_during_classify_tiles_then_resume_gives_the_uninterrupted_outputs(tmp_path, raster, monkeypatch):
    assert signal.SIGKILL
    args = ["classify", str(raster), "-l", "red, green, blue", "--tile", "20", "--gsd", "0", "--batch-size", "4"]
    r = subprocess.run([sys.executable, "-c", _KILLED, *args, "-o", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stderr
    partial = partial_dir_for(tmp_path / "run_tiles.gpkg")
    assert (partial / JOURNAL).exists() and len(list(partial.glob(f"{CHUNK_PREFIX}*.json"))) == 3
    assert not (tmp_path / "run_tiles.gpkg").exists()

    monkeypatch.setattr(rsvl, "load", lambda *a, **k: _texture_model())
    assert main([*args, "-o", str(tmp_path / "run")]) == 2  # the journal is not thrown away silently
    assert main([*args, "-o", str(tmp_path / "run"), "--resume"]) == 0
    assert not partial.exists()
    assert main([*args, "-o", str(tmp_path / "ref")]) == 0
    with rasterio.open(tmp_path / "run_tiles.tif") as a, rasterio.open(tmp_path / "ref_tiles.tif") as b:
        assert np.array_equal(a.read(), b.read()) and a.tags() == b.tags()
    import geopandas as gpd  # lazy: only this test reads vectors

    ga, gb = gpd.read_file(tmp_path / "run_tiles.gpkg"), gpd.read_file(tmp_path / "ref_tiles.gpkg")
    assert ga.drop(columns="geometry").equals(gb.drop(columns="geometry")) and ga.geometry.equals(gb.geometry)


class _Interrupting(torch.nn.Module):
    name = "interrupting"
    classes = ["airplane"]

    def forward(self, images):
        raise KeyboardInterrupt


def test_ctrl_c_during_instances_exits_130_and_says_resume(tmp_path, raster, monkeypatch, capsys):
    monkeypatch.setattr(rsvl, "load", lambda *a, **k: _Interrupting())
    args = ["instances", str(raster), "--tile", "64", "-o", str(tmp_path / "i")]
    assert main(args) == 130
    assert "interrupted; rerun with --resume to continue" in capsys.readouterr().err
    assert (partial_dir_for(tmp_path / "i_instances.gpkg") / JOURNAL).exists()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
