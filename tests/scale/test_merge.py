"""The driver's merges: mosaics that put each item where it lies (blocks cropped to their
cores), vectors with a source column, table rows, and one index numbered in item order."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from conftest import write_raster
from rasterio.transform import from_origin

from rsvl.index.store import EmbeddingIndex
from rsvl.scale.merge import (
    Part,
    core_bounds,
    merge_index,
    merge_tables,
    merge_vectors,
    mosaic_vrt,
    to_cog,
)
from rsvl.scale.tasks import index_rows_schema


def test_mosaic_places_items_on_one_grid_with_nodata_between(tmp_path):
    a = write_raster(tmp_path / "a.tif", np.full((1, 4, 6), 1, np.uint8), nodata=255,
                     transform=from_origin(100, 200, 1, 1))
    b = write_raster(tmp_path / "b.tif", np.full((1, 4, 6), 2, np.uint8), nodata=255,
                     transform=from_origin(108, 198, 1, 1))
    (vrt,) = mosaic_vrt([Part(str(a), "a", "a"), Part(str(b), "b", "b")], tmp_path / "m.vrt")
    with rasterio.open(vrt) as ds:
        assert (ds.width, ds.height) == (14, 6) and ds.bounds.left == 100 and ds.bounds.top == 200
        m = ds.read(1)
    expected = np.full((6, 14), 255, np.uint8)
    expected[0:4, 0:6] = 1
    expected[2:6, 8:14] = 2
    np.testing.assert_array_equal(m, expected)
    assert 'relativeToVRT="1">a.tif<' in vrt.read_text()  # the run folder can move


def test_blocks_keep_only_their_core(tmp_path):
    src = write_raster(tmp_path / "src.tif", np.zeros((1, 10, 20), np.uint8), transform=from_origin(0, 10, 1, 1))
    # two blocks of 10 x 10 read with 3 pixels of context: outputs overlap by 6 columns
    left = write_raster(tmp_path / "l.tif", np.full((1, 10, 13), 1, np.uint8), transform=from_origin(0, 10, 1, 1))
    right = write_raster(tmp_path / "r.tif", np.full((1, 10, 13), 2, np.uint8), transform=from_origin(7, 10, 1, 1))
    parts = [Part(str(left), str(src), "l", core_bounds(str(src), (0, 0, 10, 10))),
             Part(str(right), str(src), "r", core_bounds(str(src), (10, 0, 10, 10)))]
    assert parts[1].core == (10.0, 0.0, 20.0, 10.0)
    (vrt,) = mosaic_vrt(parts, tmp_path / "m.vrt")
    with rasterio.open(vrt) as ds:
        m = ds.read(1)
    assert m.shape == (10, 20) and (m[:, :10] == 1).all() and (m[:, 10:] == 2).all()


def test_items_on_different_grids_get_one_mosaic_each(tmp_path):
    a = write_raster(tmp_path / "a.tif", np.ones((1, 4, 4), np.uint8))
    b = write_raster(tmp_path / "b.tif", np.ones((1, 4, 4), np.uint8), crs="EPSG:32633")
    vrts = mosaic_vrt([Part(str(a), "a", "a"), Part(str(b), "b", "b")], tmp_path / "m.vrt")
    assert [v.name for v in vrts] == ["m.vrt", "m-2.vrt"]


def test_cog_of_a_mosaic_has_its_pixels(tmp_path):
    a = write_raster(tmp_path / "a.tif", np.arange(64, dtype=np.uint8).reshape(1, 8, 8))
    (vrt,) = mosaic_vrt([Part(str(a), "a", "a")], tmp_path / "m.vrt")
    cog = to_cog(vrt, tmp_path / "m.tif")
    with rasterio.open(cog) as ds:
        np.testing.assert_array_equal(ds.read(1), np.arange(64).reshape(8, 8))


def _gpkg(path, geoms, crs="EPSG:32618"):
    gpd.GeoDataFrame({"class": [f"c{i}" for i in range(len(geoms))]}, geometry=geoms, crs=crs).to_file(path)
    return str(path)


def test_vectors_join_with_a_source_column_and_blocks_clip_or_keep_centres(tmp_path):
    sq = shapely.box
    a = _gpkg(tmp_path / "a.gpkg", [sq(0, 0, 4, 4), sq(8, 0, 12, 4)])
    b = _gpkg(tmp_path / "b.gpkg", [sq(8, 0, 12, 4), sq(14, 0, 16, 2)])
    core_a, core_b = (0.0, 0.0, 10.0, 10.0), (10.0, 0.0, 20.0, 10.0)
    out = merge_vectors([Part(a, "/s.tif", "a", core_a), Part(b, "/s.tif", "b", core_b)], tmp_path / "m.gpkg",
                        rule="clip")
    g = gpd.read_file(out)
    assert list(g.columns[:3]) == ["source", "item", "class"] and list(g["item"]) == ["a", "a", "b", "b"]
    assert [round(x.area, 6) for x in g.geometry] == [16.0, 8.0, 8.0, 4.0]  # the shared box split at x=10
    out = merge_vectors([Part(a, "/s.tif", "a", core_a), Part(b, "/s.tif", "b", core_b)], tmp_path / "c.gpkg",
                        rule="centre")
    g = gpd.read_file(out)
    assert list(g["item"]) == ["a", "b", "b"] and [x.area for x in g.geometry] == [16.0, 16.0, 4.0]


def test_vectors_in_another_crs_are_reprojected_to_the_first(tmp_path):
    a = _gpkg(tmp_path / "a.gpkg", [shapely.box(500000, 0, 500010, 10)])
    b = _gpkg(tmp_path / "b.gpkg", [shapely.box(-75.0, 0.0, -74.9999, 0.0001)], crs="EPSG:4326")
    g = gpd.read_file(merge_vectors([Part(a, "a", "a"), Part(b, "b", "b")], tmp_path / "m.gpkg"))
    assert g.crs.to_epsg() == 32618
    assert g.geometry.iloc[1].bounds[0] == pytest.approx(500000, abs=0.01)


def test_tables_join_rows_in_item_order(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"source": "a", "label": "x"}]))
    (tmp_path / "b.json").write_text(json.dumps([{"source": "b", "label": "y", "score": 0.5}]))
    out = merge_tables([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "t.csv")
    assert out.read_text().splitlines() == ["source,label,score", "a,x,", "b,y,0.5"]


def _index_part(tmp_path, name, n, start):
    schema = index_rows_schema()
    rows = [{"source": name, "kind": "tile", "row": i, "col": 0, "win_col": 0, "win_row": 0, "win_width": 4,
             "win_height": 4, "valid_fraction": 1.0, "source_size": 1, "source_mtime_ns": 1} for i in range(n)]
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {"model": "m", "dim": "3", "image_size": "4"})
    vec = np.eye(3, dtype=np.float32)[[(start + i) % 3 for i in range(n)]]
    np.save(tmp_path / f"{name}.npy", vec)
    pq.write_table(table, tmp_path / f"{name}.parquet")
    return str(tmp_path / f"{name}.npy"), str(tmp_path / f"{name}.parquet")


def test_index_numbers_vectors_in_item_order(tmp_path):
    parts = [_index_part(tmp_path, "a", 2, 0), _index_part(tmp_path, "empty", 0, 0), _index_part(tmp_path, "b", 3, 2)]
    idx = EmbeddingIndex.open(merge_index(parts, tmp_path / "index", {"tile": 4}))
    assert idx.count == 5 and idx.model == "m" and idx.dim == 3
    assert idx.metadata.column("source").to_pylist() == ["a", "a", "b", "b", "b"]
    assert idx.metadata.column("id").to_pylist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(idx.vectors().argmax(axis=1), [0, 1, 2, 0, 1])
    assert idx.settings["tile"] == 4 and idx.manifest["next_id"] == 5
