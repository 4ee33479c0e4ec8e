"""Items of a scaled run: sources expanded in a fixed order, blocks that tile a raster, and
block VRTs that read exactly their window of the source."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import write_raster
from rasterio.windows import Window

from rsvl.errors import InputNotFoundError
from rsvl.scale.items import Item, block_windows, expand_sources, plan_items, write_block_vrt


def _tif(path, w=32, h=24, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    return write_raster(path, rng.integers(0, 255, (3, h, w), dtype=np.uint8), **kw)


def test_sources_expand_folders_globs_and_files_once_in_order(tmp_path):
    b = _tif(tmp_path / "a" / "b.tif")
    a = _tif(tmp_path / "a" / "sub" / "a.tif")
    c = _tif(tmp_path / "c.tif")
    (tmp_path / "a" / "notes.txt").write_text("x")
    got = expand_sources([str(tmp_path / "c.tif"), tmp_path / "a", str(tmp_path / "**" / "*.tif")])
    assert got == [c.resolve(), b.resolve(), a.resolve()]


def test_missing_sources_and_empty_patterns_are_refused(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        expand_sources([tmp_path / "nope.tif"])
    with pytest.raises(InputNotFoundError, match="matches no raster"):
        expand_sources([str(tmp_path / "*.tif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no images found"):
        expand_sources([tmp_path / "empty"])


def test_blocks_tile_the_raster_and_reads_add_clipped_context():
    blocks = block_windows(250, 120, 100, 10)
    assert [(r, c) for r, c, _, _ in blocks] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    cover = np.zeros((120, 250), int)
    for _, _, (x, y, w, h), _ in blocks:
        cover[y:y + h, x:x + w] += 1
    assert (cover == 1).all()
    assert blocks[0][3] == (0, 0, 110, 110)  # clipped at the raster's top-left
    assert blocks[4][2] == (100, 100, 100, 20) and blocks[4][3] == (90, 90, 120, 30)
    assert blocks[5][3] == (190, 90, 60, 30)


def test_plan_items_names_are_unique_and_large_rasters_become_blocks(tmp_path):
    _tif(tmp_path / "x" / "scene.tif")
    _tif(tmp_path / "y" / "scene.tif")
    _tif(tmp_path / "big.tif", w=70, h=40)
    (tmp_path / "bad.tif").write_bytes(b"not a raster")
    items = plan_items([tmp_path / "x", tmp_path / "y", tmp_path / "big.tif", tmp_path / "bad.tif"], block=32, pad=4)
    names = [it.name for it in items]
    assert names[:2] == ["scene", "scene-2"]
    assert names[2:8] == [f"big_block{r:03d}-{c:03d}" for r in range(2) for c in range(3)]
    assert names[8] == "bad" and items[8].core is None  # unreadable: one item that reports its error
    assert items[3].core == (32, 0, 32, 32) and items[3].read == (28, 0, 40, 36)
    assert plan_items([tmp_path / "big.tif"], block=None)[0].core is None
    assert Item.from_dict(items[3].to_dict()) == items[3]


def test_block_vrt_reads_its_window_with_the_georeferencing_kept(tmp_path):
    src = _tif(tmp_path / "big.tif", w=70, h=40, nodata=0)
    item = plan_items([src], block=32, pad=4)[4]  # row 1, col 1
    vrt = write_block_vrt(item, tmp_path / "b.vrt")
    x, y, w, h = item.read
    with rasterio.open(src) as s, rasterio.open(vrt) as v:
        expected = s.read(window=Window(x, y, w, h))
        assert (v.width, v.height) == (w, h)
        np.testing.assert_array_equal(v.read(), expected)
        assert v.crs == s.crs and v.nodata == 0
        assert v.transform == s.window_transform(Window(x, y, w, h))
