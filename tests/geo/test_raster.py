from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import shared_data, write_raster
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window

from rsvl.errors import BandSelectionError, InputNotFoundError, NoCRSError, RasterReadError
from rsvl.geo.raster import RasterSource, plan_bands


def test_info_reports_crs_transform_and_gsd(rgb_raster):
    with RasterSource(rgb_raster) as src:
        info = src.info()
    assert info.crs == "EPSG:32618" and info.epsg == 32618
    assert info.transform == list(from_origin(500000.0, 4100000.0, 0.5, 0.5))[:6]
    assert info.gsd == [0.5, 0.5] and info.gsd_m == 0.5
    assert (info.width, info.height, info.count) == (437, 301, 3)
    assert info.plan["rgb_bands"] == [1, 2, 3]
    assert info.warnings == []


def test_window_read_matches_source_and_pads_past_edges(rgb_raster):
    with rasterio.open(rgb_raster) as ds:
        full = ds.read()
    with RasterSource(rgb_raster) as src:
        rgb, valid = src.read(Window(400, 280, 64, 64))
    assert rgb.shape == (3, 64, 64) and valid.shape == (64, 64)
    np.testing.assert_array_equal(rgb[:, :21, :37], full[:, 280:, 400:])
    assert valid[:21, :37].all() and not valid[21:].any() and not valid[:, 37:].any()
    assert (rgb[:, 21:] == 0).all()


def test_four_band_without_colour_tags_uses_first_three_and_says_so(tmp_path):
    data = np.arange(4 * 20 * 30, dtype=np.uint8).reshape(4, 20, 30)
    ci = [ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined, ColorInterp.undefined]
    p = write_raster(tmp_path / "rgbn.tif", data, photometric="MINISBLACK", colorinterp=ci)
    with RasterSource(p) as src:
        assert src.band_plan.bands == (1, 2, 3)
        assert "4 bands: using 1,2,3 as RGB; pass --bands to change" in src.band_plan.note
    with RasterSource(p, bands=[4, 3, 2]) as src:
        rgb, _ = src.read(Window(0, 0, 30, 20))
    np.testing.assert_array_equal(rgb, data[[3, 2, 1]])


def test_band_errors_say_what_to_do(tmp_path):
    p = write_raster(tmp_path / "two.tif", np.zeros((2, 10, 10), np.uint8))
    with pytest.raises(BandSelectionError, match="--bands R,G,B"):
        RasterSource(p)
    with pytest.raises(BandSelectionError, match="band 5 does not exist: this raster has 2 band"):
        RasterSource(p, bands=[5, 1, 2])
    with pytest.raises(BandSelectionError, match="3 band numbers"):
        RasterSource(p, bands=[1, 2])
    with RasterSource(p, bands=[2]) as src:  # one band as grayscale
        assert src.band_plan.grayscale and src.band_plan.bands == (2, 2, 2)


def test_alpha_band_marks_validity_and_colour_tags_pick_rgb(tmp_path):
    data = np.full((4, 8, 8), 100, np.uint8)
    data[3, :, :4] = 0  # alpha: left half transparent
    ci = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.alpha]
    p = write_raster(tmp_path / "bgra.tif", data, colorinterp=ci)
    with RasterSource(p) as src:
        assert src.band_plan.bands == (3, 2, 1) and src.band_plan.alpha_band == 4
        _, valid = src.read(Window(0, 0, 8, 8))
    assert not valid[:, :4].any() and valid[:, 4:].all()


def test_sixteen_bit_is_percentile_stretched_from_a_decimated_read(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(1000, 5000, (3, 2100, 1500)).astype(np.uint16)
    data[:, 0, 0] = 65000  # an outlier the stretch must ignore
    p = write_raster(tmp_path / "u16.tif", data)
    with RasterSource(p) as src:
        st = src.stretch
        rgb, valid = src.read(Window(0, 0, 256, 256))
    assert st.method == "percentile"
    full_lo, full_hi = np.percentile(data[0], [2, 98])
    assert abs(st.low[0] - full_lo) < 40 and abs(st.high[0] - full_hi) < 40
    assert rgb.dtype == np.uint8 and valid.all()
    x = data[0, :256, :256].astype(np.float64)
    expected = np.clip(np.rint((x - st.low[0]) / (st.high[0] - st.low[0]) * 255), 0, 255)
    assert np.abs(rgb[0].astype(int) - expected).max() <= 1
    assert rgb[0, 0, 0] == 255


def test_nodata_and_nan_become_invalid(tmp_path):
    data = np.full((3, 10, 10), 7, np.uint16)
    data[:, :3] = 0
    p = write_raster(tmp_path / "nd.tif", data, nodata=0)
    with RasterSource(p) as src:
        _, valid = src.read(Window(0, 0, 10, 10))
    assert not valid[:3].any() and valid[3:].all()
    f = np.ones((3, 10, 10), np.float32)
    f[:, 5:, 5:] = np.nan
    p2 = write_raster(tmp_path / "nan.tif", f)
    with RasterSource(p2) as src:
        rgb, valid = src.read(Window(0, 0, 10, 10))
    assert not valid[5:, 5:].any() and valid[:5].all()


def test_no_crs_works_with_a_warning(tmp_path):
    p = write_raster(tmp_path / "nocrs.tif", np.zeros((3, 10, 10), np.uint8), crs=None, transform=rasterio.Affine.identity())
    with RasterSource(p) as src:
        info = src.info()
    assert info.crs is None
    assert "no CRS" in info.warnings[0] and "not be georeferenced" in info.warnings[0]
    with pytest.raises(NoCRSError, match="target GSD"):
        RasterSource(p, target_gsd=1.0)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        RasterSource(tmp_path / "missing.tif")
    good = write_raster(tmp_path / "good.tif", np.ones((3, 64, 64), np.uint8))
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(RasterReadError, match="GDAL cannot read"):
        RasterSource(bad).read(Window(0, 0, 64, 64))
    with pytest.raises(RasterReadError, match="folder"):
        RasterSource(tmp_path)


def test_target_gsd_resamples_the_working_grid(rgb_raster):
    with RasterSource(rgb_raster, target_gsd=1.0) as src:
        assert (src.width, src.height) == (218, 150) or (src.width, src.height) == (219, 151)
        assert src.transform.a == pytest.approx(437 / src.width * 0.5)
        rgb, valid = src.read(Window(0, 0, 32, 32))
    assert valid.all() and rgb.shape == (3, 32, 32)


def test_plan_bands_grayscale_single_band():
    plan = plan_bands(1, [ColorInterp.gray])
    assert plan.bands == (1, 1, 1) and plan.grayscale


@pytest.mark.realdata
def test_real_rasters_describe_themselves():
    naip = shared_data("geotiff", "m_4709963_se_14_1_20200831.tif")
    with RasterSource(naip) as src:
        info = src.info()
    assert info.epsg == 26914 and info.count == 4
    assert "pass --bands to change" in info.plan["bands_note"]
    landsat = shared_data("geotiff", "RGB.byte.tif")
    with RasterSource(landsat) as src:
        info = src.info()
        _, valid = src.read(Window(0, 0, src.width, src.height))
    assert info.epsg == 32618 and info.nodata == 0
    with rasterio.open(landsat) as ds:
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
    assert 0.2 < valid.mean() < 0.9  # the black collar is nodata


def test_target_gsd_is_metres_on_a_geographic_raster(tmp_path):
    """EPSG:4326 pixels are degrees: a 0.3 m target used to give a 1 x 1 px working grid."""
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from rsvl.geo.gsd import gsd_metres, resampled_size
    from rsvl.geo.raster import open_dataset

    deg = 0.00001  # about 1.11 m at the equator
    src = write_raster(tmp_path / "geo.tif", np.full((3, 100, 200), 90, np.uint8), crs="EPSG:4326",
                       transform=from_origin(10.0, 0.0005, deg, deg))
    with RasterSource(src, target_gsd=0.5565) as s:
        assert abs(s.width - 400) <= 2 and abs(s.height - 200) <= 2
        rgb, valid = s.read(Window(0, 0, 64, 64))
        assert valid.all() and (rgb == 90).all()
    with open_dataset(src) as ds:
        assert resampled_size(ds, gsd_metres(ds)) == (200, 100)
