from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from conftest import shared_data, write_raster
from rasterio.transform import from_origin

from rsvl.errors import OutputError, PredictorError, ResumeError
from rsvl.geo.raster import RasterSource
from rsvl.geo.runner import CHECKPOINT, RasterOutput, TiledRunner, partial_dir_for
from rsvl.geo.tiles import TileGrid, blend_weights


def coord_predictor(batch):
    """Returns each pixel's own (row, col) in the working grid."""
    n, _, t, _ = batch.images.shape
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    out = np.empty((n, 2, t, t), np.float32)
    for i, w in enumerate(batch.windows):
        out[i, 0] = yy + w.row_off
        out[i, 1] = xx + w.col_off
    return out


def const_predictor(batch):
    return np.full((len(batch), 3, *batch.images.shape[2:]), [[[0.25]], [[7.0]], [[-3.5]]], np.float32)


@pytest.mark.parametrize(
    "size,tile,overlap",
    [((301, 437), 128, 32), ((301, 437), 64, 48), ((100, 90), 128, 16), ((257, 129), 64, 0), ((500, 40), 32, 8)],
)
def test_coordinates_survive_stitching(tmp_path, size, tile, overlap):
    h, w = size
    src = write_raster(tmp_path / "in.tif", np.full((3, h, w), 9, np.uint8))
    out = tmp_path / "out.tif"
    with RasterSource(src) as s:
        res = TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], tile=tile, overlap=overlap, batch_size=3).run()
    assert res.tiles == len(TileGrid(w, h, tile, overlap))
    with rasterio.open(out) as ds:
        got = ds.read()
    yy, xx = np.mgrid[0:h, 0:w]
    assert np.abs(got[0] - yy).max() < 1e-3
    assert np.abs(got[1] - xx).max() < 1e-3


def test_constant_predictor_gives_constant_output_without_seams_or_edge_loss(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.full((3, 333, 517), 50, np.uint8))
    out = tmp_path / "const.tif"
    with RasterSource(src) as s:
        TiledRunner(s, const_predictor, [RasterOutput(out, 3)], tile=96, overlap=24, batch_size=5).run()
    with rasterio.open(out) as ds:
        got = ds.read()
    assert got.shape == (3, 333, 517)
    np.testing.assert_allclose(got[0], 0.25, atol=1e-6)
    np.testing.assert_allclose(got[1], 7.0, atol=1e-5)
    np.testing.assert_allclose(got[2], -3.5, atol=1e-5)


def test_georeferencing_nodata_and_settings_round_trip(tmp_path):
    transform = from_origin(612345.25, 5123456.75, 0.3, 0.3)
    data = np.full((3, 200, 260), 40, np.uint8)
    data[:, :, :70] = 0  # a nodata collar: the first tile column is all nodata
    src = write_raster(tmp_path / "in.tif", data, crs="EPSG:26914", transform=transform, nodata=0)
    out = tmp_path / "labels.tif"

    def finalize(values, valid):
        return (values[0] > 100.5).astype(np.uint8) + 1

    spec = RasterOutput(out, 1, "uint8", finalize=finalize, nodata=0, colormap={1: (0, 0, 255, 255), 2: (255, 0, 0, 255)},
                        tags={"classes": json.dumps({"1": "low", "2": "high"})})
    with RasterSource(src) as s:
        res = TiledRunner(s, coord_predictor, [spec], tile=64, overlap=16, settings={"model": "coord", "prompt": "x"}).run()
    assert res.tiles_skipped >= 4  # all-nodata tiles never reach the predictor
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 26914
        assert ds.transform == transform
        assert ds.nodata == 0
        got = ds.read(1)
        tags = ds.tags()
        assert ds.colormap(1)[2] == (255, 0, 0, 255)
    settings = json.loads(tags["rsvl_settings"])
    assert settings["model"] == "coord" and settings["tile"] == 64 and settings["overlap"] == 16
    assert json.loads(tags["classes"])["2"] == "high"
    assert (got[:, :70] == 0).all()
    yy = np.mgrid[0:200, 0:260][0]
    np.testing.assert_array_equal(got[:, 70:], np.where(yy[:, 70:] > 100, 2, 1))


def test_cog_output_is_a_valid_cog_with_overviews(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.full((3, 1100, 1300), 3, np.uint8))
    out = tmp_path / "p.cog.tif"
    with RasterSource(src) as s:
        TiledRunner(s, const_predictor, [RasterOutput(out, 3)], tile=256, overlap=32, batch_size=4).run()
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1)
        assert ds.crs.to_epsg() == 32618
    assert not partial_dir_for(out).exists()


def test_no_crs_input_gives_ungeoreferenced_output(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.ones((3, 50, 70), np.uint8), crs=None, transform=rasterio.Affine.identity())
    out = tmp_path / "o.tif"
    with RasterSource(src) as s:
        TiledRunner(s, const_predictor, [RasterOutput(out, 3)], tile=32, overlap=8).run()
    with rasterio.open(out) as ds:
        assert ds.crs is None
        np.testing.assert_allclose(ds.read(2), 7.0, atol=1e-5)


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.full((3, 300, 300), 1, np.uint8))
    ref, out = tmp_path / "ref.tif", tmp_path / "out.tif"
    kw = dict(tile=64, overlap=16, batch_size=2, settings={"model": "coord"})
    with RasterSource(src) as s:
        TiledRunner(s, coord_predictor, [RasterOutput(ref, 2)], **kw).run()
    calls = {"n": 0}

    def dying(batch):
        calls["n"] += 1
        if calls["n"] == 9:
            raise Interrupt("killed")
        return coord_predictor(batch)

    with RasterSource(src) as s, pytest.raises(Interrupt):
        TiledRunner(s, dying, [RasterOutput(out, 2)], **kw).run()
    assert not out.exists()  # nothing under the final name
    with np.load(partial_dir_for(out) / CHECKPOINT) as z:
        state = json.loads(str(z["state"]))
    assert state["next_row"] >= 2

    seen = []

    def counting(batch):
        seen.extend(batch.positions)
        return coord_predictor(batch)

    with RasterSource(src) as s:
        res = TiledRunner(s, counting, [RasterOutput(out, 2)], resume=True, **kw).run()
    grid = TileGrid(300, 300, 64, 16)
    assert min(r for r, _ in seen) == state["next_row"]
    assert len(seen) == len(grid) - state["next_row"] * grid.n_cols == len(grid) - res.tiles_resumed
    with rasterio.open(ref) as a, rasterio.open(out) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert not partial_dir_for(out).exists()


def test_resume_refuses_other_settings(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.full((3, 200, 200), 1, np.uint8))
    out = tmp_path / "out.tif"
    n = {"calls": 0}

    def dying(batch):
        n["calls"] += 1
        if n["calls"] == 5:
            raise Interrupt()
        return coord_predictor(batch)

    with RasterSource(src) as s, pytest.raises(Interrupt):
        TiledRunner(s, dying, [RasterOutput(out, 2)], tile=64, overlap=16, batch_size=1, settings={"prompt": "a"}).run()
    with RasterSource(src) as s, pytest.raises(ResumeError, match="other settings"):
        TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], tile=64, overlap=16, settings={"prompt": "b"}, resume=True).run()


def test_existing_output_is_never_replaced_without_overwrite(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.ones((3, 40, 40), np.uint8))
    out = tmp_path / "o.tif"
    out.write_bytes(b"precious")
    with RasterSource(src) as s, pytest.raises(OutputError, match="--overwrite"):
        TiledRunner(s, const_predictor, [RasterOutput(out, 3)], tile=32, overlap=8).run()
    assert out.read_bytes() == b"precious"
    with RasterSource(src) as s:
        TiledRunner(s, const_predictor, [RasterOutput(out, 3)], tile=32, overlap=8, overwrite=True).run()
    with rasterio.open(out) as ds:
        assert ds.count == 3


def test_bad_predictor_output_is_reported(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.ones((3, 40, 40), np.uint8))
    with RasterSource(src) as s, pytest.raises(PredictorError, match=r"expected \(2, C, 32, 32\)"):
        TiledRunner(s, lambda b: np.zeros((len(b), 1, 16, 16)), [RasterOutput(tmp_path / "o.tif", 1)], tile=32, overlap=8, batch_size=2).run()
    with RasterSource(src) as s, pytest.raises(PredictorError, match="NaN"):
        TiledRunner(s, lambda b: np.full((len(b), 32, 32), np.nan), [RasterOutput(tmp_path / "o.tif", 1)], tile=32, overlap=8).run()
    assert not (tmp_path / "o.tif").exists()


def test_output_suffix_and_folder_errors(tmp_path):
    with pytest.raises(OutputError, match=".tif"):
        RasterOutput(tmp_path / "o.png", 1)
    src = write_raster(tmp_path / "in.tif", np.ones((3, 40, 40), np.uint8))
    with RasterSource(src) as s, pytest.raises(OutputError, match="does not exist"):
        TiledRunner(s, const_predictor, [RasterOutput(tmp_path / "nope" / "o.tif", 3)], tile=32, overlap=8).run()


def test_blend_weights_are_positive_symmetric_and_flat_inside():
    w = blend_weights(64, 16)
    assert w.min() > 0 and w.max() == 1.0
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert (w[16:48, 16:48] == 1).all()
    assert (blend_weights(32, 0) == 1).all()


@pytest.mark.realdata
def test_real_landsat_scene_keeps_its_nodata_collar(tmp_path):
    landsat = shared_data("geotiff", "RGB.byte.tif")
    out = tmp_path / "mean.tif"

    def mean_rgb(batch):
        return batch.images.astype(np.float32).mean(axis=1)

    with RasterSource(landsat) as s:
        TiledRunner(s, mean_rgb, [RasterOutput(out, 1, nodata=-1.0)], tile=256, overlap=32).run()
    with rasterio.open(landsat) as a, rasterio.open(out) as b:
        valid = a.dataset_mask() > 0
        expected = a.read().astype(np.float32).mean(axis=0)
        got = b.read(1)
        assert b.crs == a.crs and b.transform == a.transform
    assert (got[~valid] == -1).all()
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-3)


# --- the shared read-ahead loop of vector tasks ----------------------------------------------


def test_map_tiles_yields_every_tile_in_order_and_skips_invalid_ones(tmp_path):
    from rsvl.geo.stream import map_tiles

    data = np.full((3, 100, 130), 50, np.uint8)
    data[:, :40, :] = 0  # nodata rows: the first tile row is empty, tiles of the second partly valid
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    seen: list[int] = []
    done: list[int] = []

    def predict(batch):
        seen.append(len(batch))
        return [w.col_off for w in batch.windows]

    with RasterSource(src) as s:
        grid = TileGrid(s.width, s.height, 32, 8)
        outs = list(map_tiles(s, predict, tile=32, overlap=8, batch_size=3, progress=done.append))
        half = list(map_tiles(s, lambda b: np.zeros(len(b)), tile=32, overlap=8, min_valid=0.5))
        every = list(map_tiles(s, lambda b: np.zeros(len(b)), tile=32, overlap=8, min_valid=None))
    assert [o.position for o in outs] == [(r, c) for r, c, _ in grid]
    assert sum(done) == len(grid) == len(outs)
    empty = [o for o in outs if not o.valid.any()]
    assert empty and all(not o.predicted for o in empty)
    assert all(o.result == o.window.col_off for o in outs if o.predicted)
    assert sum(seen) == len(grid) - len(empty)
    assert all(o.valid_fraction >= 0.5 for o in half if o.predicted)
    assert any(o.predicted for o in outs if 0 < o.valid_fraction < 0.5)
    assert not any(o.predicted for o in half if o.valid_fraction < 0.5)
    assert all(o.predicted for o in every)
    assert outs[5].transform == s.transform * rasterio.Affine.translation(outs[5].window.col_off, outs[5].window.row_off)


def test_map_tiles_stops_its_reader_when_the_consumer_stops_or_fails(tmp_path):
    import threading

    from rsvl.geo.stream import map_tiles

    src = write_raster(tmp_path / "in.tif", np.full((3, 200, 200), 9, np.uint8))
    with RasterSource(src) as s:
        gen = map_tiles(s, lambda b: np.zeros(len(b)), tile=32, overlap=0, batch_size=1, prefetch=1)
        next(gen)
        gen.close()
        with pytest.raises(PredictorError, match="2 result"):
            list(map_tiles(s, lambda b: np.zeros(2), tile=32, overlap=0, batch_size=3))
    assert not [t for t in threading.enumerate() if t.name == "rsvl-tile-reader"]


def test_progress_scope_is_silent_without_a_progress():
    from contextlib import contextmanager

    from rsvl.console import progress_scope

    with progress_scope(None, 10) as advance:
        advance(3)
    got: list[tuple[str, int]] = []

    @contextmanager
    def progress(total):
        got.append(("total", total))
        yield lambda n: got.append(("advance", n))

    with progress_scope(progress, 4) as advance:
        advance(4)
    assert got == [("total", 4), ("advance", 4)]


# -- never lose or mislabel a user's data (issue 16) -----------------------------------------


def test_output_that_is_the_input_is_refused_even_with_overwrite(tmp_path):
    data = np.full((3, 80, 80), 5, np.uint8)
    src = write_raster(tmp_path / "in.tif", data)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.tif"
    link.symlink_to(src)
    for out in (src, tmp_path / "sub" / ".." / "in.tif", link):
        with RasterSource(src) as s, pytest.raises(OutputError, match="reads"):
            TiledRunner(s, const_predictor, [RasterOutput(out, 3)], tile=32, overlap=8, overwrite=True).run()
    with rasterio.open(src) as ds:
        np.testing.assert_array_equal(ds.read(), data)


def test_resume_on_complete_outputs_still_checks_the_settings(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.full((3, 100, 100), 1, np.uint8))
    out = tmp_path / "out.tif"
    kw = dict(tile=64, overlap=16)
    with RasterSource(src) as s:
        TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], settings={"prompt": "a"}, **kw).run()
    before = out.read_bytes()
    with RasterSource(src) as s, pytest.raises(ResumeError, match="settings"):
        TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], settings={"prompt": "b"}, resume=True, **kw).run()
    # the same settings: nothing to do, the outputs are this run's
    with RasterSource(src) as s:
        res = TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], settings={"prompt": "a"}, resume=True, **kw).run()
    assert res.tiles_resumed == res.tiles
    assert out.read_bytes() == before
    # an output rsvl did not write (or wrote without a key) is not taken for a finished run
    other = tmp_path / "other.tif"
    write_raster(other, np.zeros((2, 100, 100), np.float32))
    with RasterSource(src) as s, pytest.raises(ResumeError, match="settings"):
        TiledRunner(s, coord_predictor, [RasterOutput(other, 2)], settings={"prompt": "a"}, resume=True, **kw).run()


@pytest.mark.parametrize("after_rename", [True, False])
def test_kill_while_the_checkpoint_is_written_never_resumes_wrong(tmp_path, monkeypatch, after_rename):
    """A kill at any moment of writing the checkpoint (before its file is renamed into
    place, or right after it landed) resumes to exactly the uninterrupted result."""
    import rsvl.geo.runner as runner_mod

    src = write_raster(tmp_path / "in.tif", np.full((3, 300, 300), 1, np.uint8))
    ref, out = tmp_path / "ref.tif", tmp_path / "out.tif"
    kw = dict(tile=64, overlap=16, batch_size=2, settings={"model": "coord"})
    with RasterSource(src) as s:
        TiledRunner(s, coord_predictor, [RasterOutput(ref, 2)], **kw).run()

    real = runner_mod.atomic_path
    calls = {"n": 0}

    from contextlib import contextmanager

    @contextmanager
    def killed_on_second(path, **k):
        calls["n"] += 1
        if calls["n"] == 2 and not after_rename:
            with real(path, **k) as tmp:
                yield tmp
                raise KeyboardInterrupt  # the file is written but not renamed
        with real(path, **k) as tmp:
            yield tmp
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the first file of the checkpoint has landed

    monkeypatch.setattr(runner_mod, "atomic_path", killed_on_second)
    with RasterSource(src) as s, pytest.raises(KeyboardInterrupt):
        TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], **kw).run()
    monkeypatch.setattr(runner_mod, "atomic_path", real)
    assert not out.exists()
    with RasterSource(src) as s:
        res = TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], resume=True, **kw).run()
    assert res.tiles_resumed > 0
    with rasterio.open(ref) as a, rasterio.open(out) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_a_second_run_on_the_same_output_is_refused_and_told_who_holds_it(tmp_path):
    src = write_raster(tmp_path / "in.tif", np.full((3, 200, 200), 1, np.uint8))
    out = tmp_path / "out.tif"
    errors = []

    def predictor(batch):
        if not errors:
            with RasterSource(src) as s2:
                try:
                    TiledRunner(s2, coord_predictor, [RasterOutput(out, 2)], tile=64, overlap=16, overwrite=True).run()
                except OutputError as exc:
                    errors.append(exc)
            assert partial_dir_for(out).exists()  # the first run's work is still there
        return coord_predictor(batch)

    with RasterSource(src) as s:
        TiledRunner(s, predictor, [RasterOutput(out, 2)], tile=64, overlap=16).run()
    assert errors and "another rsvl run" in str(errors[0])
    import os

    assert f"pid {os.getpid()}" in str(errors[0])
    assert out.exists()
    # the lock went with the run: the next one is free to start
    with RasterSource(src) as s:
        TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], tile=64, overlap=16, overwrite=True).run()


def test_stale_lock_file_of_a_dead_run_is_taken_over(tmp_path):
    from rsvl.io import lock_path_for

    src = write_raster(tmp_path / "in.tif", np.full((3, 64, 64), 1, np.uint8))
    out = tmp_path / "out.tif"
    lock_path_for(out).write_text("pid 999999 on elsewhere since long ago")
    with RasterSource(src) as s:
        TiledRunner(s, coord_predictor, [RasterOutput(out, 2)], tile=32, overlap=8).run()
    assert out.exists() and not lock_path_for(out).exists()


@pytest.mark.parametrize("kw", [dict(tile=0), dict(tile=-32), dict(overlap=-1), dict(overlap=32), dict(batch_size=0)])
def test_grid_options_out_of_range_are_grid_errors(tmp_path, kw):
    from rsvl.errors import GridError
    from rsvl.geo.stream import map_tiles

    src = write_raster(tmp_path / "in.tif", np.full((3, 64, 64), 1, np.uint8))
    args = dict(tile=32, overlap=8, batch_size=2) | kw
    with RasterSource(src) as s, pytest.raises(GridError):
        TiledRunner(s, coord_predictor, [RasterOutput(tmp_path / "o.tif", 2)], **args)
    with RasterSource(src) as s, pytest.raises(GridError):
        list(map_tiles(s, coord_predictor, **args))
