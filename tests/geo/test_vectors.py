from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from conftest import write_raster
from pyproj import Transformer
from rasterio.transform import from_origin

from rsvl.errors import NoCRSError, OutputError
from rsvl.geo.vectors import (
    boxes_to_polygons,
    mask_to_polygon,
    polygonize_array,
    polygonize_raster,
    write_vectors,
)

T = from_origin(400000.0, 3300000.0, 2.0, 2.0)


def test_polygons_land_where_the_pixels_are():
    labels = np.zeros((50, 60), np.uint8)
    labels[10:20, 30:45] = 1  # rows 10-19, cols 30-44
    gdf = polygonize_array(labels, T, "EPSG:32617", classes={1: "building"})
    assert len(gdf) == 1
    row = gdf.iloc[0]
    assert row["class"] == "building" and row["pixels"] == 150 and row["area"] == 600.0
    assert row.geometry.bounds == (400000.0 + 60, 3300000.0 - 40, 400000.0 + 90, 3300000.0 - 20)
    # Reprojected: corners match pyproj's transformation of the same corners.
    wgs = gdf.to_crs("EPSG:4326")
    tr = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True)
    lon, lat = tr.transform(400060.0, 3299960.0)
    xs, ys = wgs.geometry.iloc[0].exterior.coords.xy
    assert min(abs(x - lon) + abs(y - lat) for x, y in zip(xs, ys, strict=True)) < 1e-9


def test_strips_merge_to_the_same_polygons_as_a_whole_read():
    rng = np.random.default_rng(3)
    labels = (rng.random((97, 83)) > 0.55).astype(np.uint8) + (rng.random((97, 83)) > 0.8).astype(np.uint8)
    conf = rng.random((97, 83)).astype(np.float32)
    whole = polygonize_array(labels, T, "EPSG:32617", confidence=conf, strip_rows=10_000)
    strips = polygonize_array(labels, T, "EPSG:32617", confidence=conf, strip_rows=7)
    assert len(whole) == len(strips)
    for cls in (0, 1, 2):
        a = whole[whole.class_id == cls]
        b = strips[strips.class_id == cls]
        assert sorted(a.pixels) == sorted(b.pixels)
        assert a.geometry.union_all().symmetric_difference(b.geometry.union_all()).area < 1e-6
        np.testing.assert_allclose(sorted(a.score), sorted(b.score), rtol=1e-9)
    assert int(whole.pixels.sum()) == labels.size


def test_min_pixels_ignore_and_validity():
    labels = np.zeros((20, 20), np.uint8)
    labels[0:2, 0:2] = 1  # 4 px
    labels[10:20, 10:20] = 1  # 100 px
    valid = np.ones_like(labels, bool)
    valid[15:, :] = False
    gdf = polygonize_array(labels, T, None, ignore=[0], min_pixels=5, valid=valid)
    assert list(gdf.pixels) == [50]


def test_polygonize_raster_streams_a_file_and_respects_nodata(tmp_path):
    labels = np.ones((300, 200), np.uint8)
    labels[100:200] = 2
    labels[:, :20] = 255
    p = write_raster(tmp_path / "labels.tif", labels, crs="EPSG:32617", transform=T, nodata=255)
    gdf = polygonize_raster(p, classes={1: "a", 2: "b"}, strip_rows=64, attributes={"prompt": "a, b"})
    assert sorted(gdf["class"]) == ["a", "a", "b"]
    assert gdf.pixels.sum() == 300 * 180
    assert (gdf.prompt == "a, b").all()
    assert gdf.crs.to_epsg() == 32617


def test_boxes_and_masks_to_polygons():
    (box,) = boxes_to_polygons([[10, 20, 30, 25]], T)
    assert box.bounds == (400020.0, 3299950.0, 400060.0, 3299960.0)
    m = np.zeros((10, 10), bool)
    m[2:4, 5:9] = True
    poly = mask_to_polygon(m, T)
    assert poly.area == 8 * 4.0
    assert poly.bounds == (400010.0, 3299992.0, 400018.0, 3299996.0)
    assert mask_to_polygon(np.zeros((3, 3), bool)).is_empty


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".parquet"])
def test_vector_formats_round_trip(tmp_path, suffix):
    labels = np.zeros((30, 30), np.uint8)
    labels[5:10, 5:10] = 1
    gdf = polygonize_array(labels, T, "EPSG:32617", classes={1: "tank"})
    out = write_vectors(gdf, tmp_path / f"out{suffix}")
    back = gpd.read_parquet(out) if suffix == ".parquet" else gpd.read_file(out)
    assert list(back["class"]) == ["tank"] and back.crs.to_epsg() == 32617
    assert back.geometry.iloc[0].equals(gdf.geometry.iloc[0])
    with pytest.raises(OutputError, match="--overwrite"):
        write_vectors(gdf, out)
    out2 = write_vectors(gdf, tmp_path / f"wgs{suffix}", to_crs="EPSG:4326")
    back2 = gpd.read_parquet(out2) if suffix == ".parquet" else gpd.read_file(out2)
    assert back2.crs.to_epsg() == 4326
    assert not list(tmp_path.glob(".*rsvl-tmp*"))


def test_vector_errors(tmp_path):
    gdf = polygonize_array(np.ones((4, 4), np.uint8), T, None)
    with pytest.raises(OutputError, match=".gpkg"):
        write_vectors(gdf, tmp_path / "x.shp")
    with pytest.raises(NoCRSError):
        write_vectors(gdf, tmp_path / "x.gpkg", to_crs="EPSG:4326")
