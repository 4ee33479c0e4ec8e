"""rsvl index build / add and rsvl search, with a fake model whose embeddings are known.

The fake model embeds an image as its mean colour (a 3-D unit vector) and the texts
"red" / "green" / "blue" as the axes, so every ranking below can be checked by hand.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import write_raster
from rasterio.transform import from_origin

from rsvl.errors import (
    IndexCorruptError,
    IndexNotFoundError,
    ModelMismatchError,
    OutputError,
    PromptError,
)
from rsvl.index.store import EmbeddingIndex
from rsvl.tasks import search as S

TILE = 32
TRANSFORM = from_origin(500000.0, 4100000.0, 0.5, 0.5)
COLOURS = {"red": (200, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 200)}
PNG_COLOURS = {"red": (220, 40, 30), "green": (30, 210, 40), "blue": (40, 30, 190)}


class FakeRGB:
    """Mean colour -> unit 3-vector; "red"/"green"/"blue" -> the axes. Counts images embedded."""

    image_size = TILE
    logit_scale = 100.0

    def __init__(self, name: str = "fake-rgb") -> None:
        self.name = name
        self.images_encoded = 0

    def encode_image(self, images):
        import torch

        x = torch.as_tensor(np.asarray(images)).float()
        assert x.ndim == 4 and x.shape[1:] == (3, TILE, TILE)
        self.images_encoded += x.shape[0]
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)) + 1e-3, dim=1)

    def encode_text(self, texts):
        import torch

        axes = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0]}
        return torch.tensor([axes[t] for t in texts], dtype=torch.float32)

    def dense_features(self, images):  # pragma: no cover - not used by search
        raise NotImplementedError


def tile_colour(r: int, c: int) -> str:
    return ("red", "green", "blue")[(r + c) % 3]


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """128 x 128 px, 4 x 4 tiles of 32 px, each one pure colour; the last tile row is nodata."""
    data = np.zeros((3, 128, 128), np.uint8)
    for r in range(3):
        for c in range(4):
            data[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = np.array(COLOURS[tile_colour(r, c)])[:, None, None]
    return write_raster(tmp_path / "scene.tif", data, transform=TRANSFORM, nodata=0)


def write_png(path: Path, colour: tuple[int, int, int], shape=(20, 24)) -> Path:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.broadcast_to(np.array(colour, np.uint8)[:, None, None], (3, *shape)).copy()
    return write_raster(path, data, crs=None, transform=rasterio.Affine.identity(), driver="PNG")


@pytest.fixture
def pngs(tmp_path: Path) -> Path:
    folder = tmp_path / "pngs"
    write_png(folder / "a_red.png", PNG_COLOURS["red"])
    write_png(folder / "sub" / "b_green.png", PNG_COLOURS["green"])
    write_png(folder / "c_blue.png", PNG_COLOURS["blue"])
    return folder


def colour_of(hit) -> str:
    if hit.kind == "tile":
        return tile_colour(hit.row, hit.col)
    return {"a": "red", "b": "green", "c": "blue"}[Path(hit.source).name[0]]


def test_build_indexes_tiles_and_images_and_text_search_ranks_red_first(tmp_path, scene, pngs):
    model = FakeRGB()
    totals: list[int] = []
    calls: list[int] = []

    @contextmanager
    def progress(total):
        totals.append(total)
        yield calls.append

    res = S.build(model, [scene, pngs], tmp_path / "idx", tile=TILE, batch_size=5, progress=progress)
    assert res.count == 12 + 3 and res.tiles_skipped_nodata == 4
    assert totals == [16 + 3] and sum(calls) == 16 + 3 and model.images_encoded == 15
    idx = EmbeddingIndex.open(tmp_path / "idx")
    m = idx.manifest
    assert (m["model"], m["dim"], m["count"], m["index_type"], m["normalisation"]) == ("fake-rgb", 3, 15, "flat-ip", "l2")
    assert m["rsvl_version"] and m["settings"]["tile"] == TILE
    assert set(idx.metadata.column_names) >= {"id", "source", "row", "col", "win_col", "geometry", "geometry_4326", "crs", "model", "dim"}

    result = S.search(idx, "red", k=15, model=model)
    n_red = sum(tile_colour(r, c) == "red" for r in range(3) for c in range(4)) + 1
    assert [colour_of(h) for h in result.hits[:n_red]] == ["red"] * n_red
    assert all(colour_of(h) != "red" for h in result.hits[n_red:])
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and [h.rank for h in result.hits] == list(range(1, 16))
    top_tile = next(h for h in result.hits if h.kind == "tile")
    assert top_tile.crs == "EPSG:32618" and top_tile.window == [top_tile.col * TILE, top_tile.row * TILE, TILE, TILE]


def test_image_query_returns_the_identical_image_first(tmp_path, scene, pngs):
    model = FakeRGB()
    S.build(model, [scene, pngs], tmp_path / "idx", tile=TILE)
    query = pngs / "sub" / "b_green.png"
    res = S.search(tmp_path / "idx", image=query, k=3, model=model)
    assert res.hits[0].source == str(query.resolve())
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert colour_of(res.hits[1]) == "green" and res.hits[1].score < res.hits[0].score


def test_geojson_footprints_are_the_tile_bounds_in_4326(tmp_path, scene, pngs):
    import geopandas as gpd
    import shapely
    from pyproj import Transformer
    from rasterio.windows import Window, bounds

    model = FakeRGB()
    S.build(model, [scene, pngs], tmp_path / "idx", tile=TILE)
    res = S.search(tmp_path / "idx", "blue", k=15, model=model)
    out = res.write_geojson(tmp_path / "hits.geojson")
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 4326
    assert len(gdf) == 12  # the PNGs have no CRS, hence no footprint
    assert {"rank", "score", "source"} <= set(gdf.columns)
    tr = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    by_rank = {h.rank: h for h in res.hits}
    for _, feat in gdf.iterrows():
        h = by_rank[int(feat["rank"])]
        assert feat["score"] == pytest.approx(h.score) and feat["source"] == h.source
        left, bottom, right, top = bounds(Window(h.col * TILE, h.row * TILE, TILE, TILE), TRANSFORM)
        for x, y in [(left, bottom), (left, top), (right, top), (right, bottom)]:
            lon, lat = tr.transform(x, y)
            assert shapely.distance(feat.geometry.boundary, shapely.Point(lon, lat)) < 1e-9
        # densified edges: the polygon's bounds are the tile's transformed bounds
        assert feat.geometry.bounds == pytest.approx(tr.transform_bounds(left, bottom, right, top, densify_pts=21), abs=1e-9)


def test_add_embeds_only_new_or_changed_sources(tmp_path, scene, pngs):
    model = FakeRGB()
    S.build(model, [scene], tmp_path / "idx", tile=TILE)
    assert model.images_encoded == 12
    model.images_encoded = 0
    res = S.add(model, tmp_path / "idx", [scene, pngs])
    assert model.images_encoded == 3 and res.added == 3 and res.count == 15
    assert res.sources_skipped == [str(scene.resolve())]
    model.images_encoded = 0
    res = S.add(model, tmp_path / "idx", [scene, pngs])
    assert model.images_encoded == 0 and res.added == 0 and res.count == 15
    # a changed file is re-embedded and replaces its old vector
    blue = pngs / "c_blue.png"
    write_png(blue, (250, 250, 0))
    st = blue.stat()
    os.utime(blue, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = S.add(model, tmp_path / "idx", [pngs])
    assert model.images_encoded == 1 and res.sources_replaced == [str(blue.resolve())] and res.count == 15
    idx = EmbeddingIndex.open(tmp_path / "idx")
    assert len(set(idx.metadata.column("id").to_pylist())) == 15
    hit = S.search(idx, image=blue, k=1, model=model).hits[0]
    assert hit.source == str(blue.resolve()) and hit.score == pytest.approx(1.0, abs=1e-5)
    # one generation of files, no temporary leftovers
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["manifest.json", "metadata-000003.parquet", "vectors-000003.faiss"]  # the no-op add wrote nothing
    assert not [p for p in tmp_path.iterdir() if "rsvl-tmp" in p.name]


def test_ivf_index_agrees_with_exact_search(tmp_path):
    rng = np.random.default_rng(0)
    data = np.repeat(np.repeat(rng.integers(20, 255, (3, 16, 16), dtype=np.uint8), 16, axis=1), 16, axis=2)
    src = write_raster(tmp_path / "mosaic.tif", data, transform=TRANSFORM)
    model = FakeRGB()
    exact = S.build(model, [src], tmp_path / "flat", tile=16)
    approx = S.build(model, [src], tmp_path / "ivf", tile=16, ivf_threshold=100, nprobe=3)
    assert exact.index_type == "flat-ip" and exact.count == 256 and approx.index_type == "ivf-flat"
    m = EmbeddingIndex.open(tmp_path / "ivf").manifest
    assert m["index_type"] == "ivf-flat" and m["nlist"] >= 2 and m["nprobe"] == 3 and m["count"] == 256
    for q in ("red", "green", "blue"):
        a = S.search(tmp_path / "flat", q, k=5, model=model).hits
        b = S.search(tmp_path / "ivf", q, k=5, model=model).hits
        assert (b[0].id, b[0].score) == (a[0].id, pytest.approx(a[0].score))
        full = S.search(tmp_path / "ivf", q, k=5, model=model, nprobe=m["nlist"]).hits
        assert [h.id for h in full] == [h.id for h in a]
    # add keeps the IVF settings and the vectors
    write_png(tmp_path / "extra" / "x.png", (1, 2, 250))
    res = S.add(model, tmp_path / "ivf", [tmp_path / "extra"])
    assert res.index_type == "ivf-flat" and res.count == 257 and res.manifest["nprobe"] == 3


def test_errors_missing_corrupt_mismatch_and_empty_query(tmp_path, scene, pngs):
    model = FakeRGB()
    with pytest.raises(IndexNotFoundError, match="rsvl index build"):
        S.search(tmp_path / "nope", "red", model=model)
    S.build(model, [pngs], tmp_path / "idx", tile=TILE)
    for q in ("", "   ", None):
        with pytest.raises(PromptError):
            S.search(tmp_path / "idx", q, model=model)
    with pytest.raises(ModelMismatchError, match="fake-rgb.*other|other.*fake-rgb"):
        S.search(tmp_path / "idx", "red", model=FakeRGB("other"))
    with pytest.raises(ModelMismatchError, match="fake-rgb"):
        S.add(FakeRGB("other"), tmp_path / "idx", [scene])
    with pytest.raises(OutputError, match="already holds an index"):
        S.build(model, [pngs], tmp_path / "idx", tile=TILE)
    # a crash while replacing the manifest leaves the old index intact
    import rsvl.index.store as store

    def boom(*a, **k):
        raise KeyboardInterrupt

    orig = store._write_manifest
    store._write_manifest = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            S.add(model, tmp_path / "idx", [scene])
    finally:
        store._write_manifest = orig
    assert EmbeddingIndex.open(tmp_path / "idx").count == 3
    # corruptions
    idx = tmp_path / "idx"
    manifest = json.loads((idx / "manifest.json").read_text())
    vec = idx / manifest["files"]["vectors"]
    raw = vec.read_bytes()
    vec.write_bytes(raw[:8] + (1 << 40).to_bytes(8, "little") + raw[16:])  # a header that lies
    with pytest.raises(IndexCorruptError, match="1099511627776 vectors"):
        EmbeddingIndex.open(idx)
    vec.write_bytes(raw[:20])
    with pytest.raises(IndexCorruptError, match="FAISS"):
        EmbeddingIndex.open(idx)
    (idx / manifest["files"]["metadata"]).unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        EmbeddingIndex.open(idx)
    (idx / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="unreadable"):
        S.search(idx, "red", model=model)
    (idx / "manifest.json").unlink()
    with pytest.raises(IndexNotFoundError, match="not an rsvl index"):
        S.search(idx, "red", model=model)


def test_gsd_resampling_windows_and_footprints(tmp_path, scene):
    import shapely

    model = FakeRGB()
    res = S.build(model, [scene], tmp_path / "idx", tile=TILE, gsd=1.0)  # 128 px at 0.5 m -> 64 px
    assert res.count == 4  # 2 x 2 tiles of 32 px; the lower row is half nodata: still kept
    idx = EmbeddingIndex.open(tmp_path / "idx")
    assert idx.settings["gsd"] == 1.0
    for r in idx.metadata.to_pylist():
        assert (r["win_col"], r["win_row"]) == (r["col"] * 32, r["row"] * 32)
        assert r["valid_fraction"] == pytest.approx(1.0 if r["row"] == 0 else 0.5)
        g = shapely.from_wkb(r["geometry"])
        x0, y0 = 500000.0 + r["col"] * 32.0, 4100000.0 - r["row"] * 32.0
        assert g.bounds == pytest.approx((x0, y0 - 32.0, x0 + 32.0, y0))


def test_cli_json_is_one_document(tmp_path, scene, pngs, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import rsvl.api
    from rsvl.cli import index as cmd

    model = FakeRGB()
    monkeypatch.setattr(rsvl.api, "load", lambda name, **kw: model if name == "fake-rgb" else FakeRGB(name))
    monkeypatch.setattr(cmd.preflight, "model_for", lambda *a, **kw: None)  # fake-rgb has no card
    app = typer.Typer()
    cmd.register(app)
    runner = CliRunner()
    idx = tmp_path / "idx"
    r = runner.invoke(app, ["index", "build", str(scene), str(pngs), "-o", str(idx), "--model", "fake-rgb", "--tile", "32", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["count"] == 15 and doc["model"] == "fake-rgb"
    r = runner.invoke(app, ["search", str(idx), "red", "-k", "4", "--json", "--geojson", str(tmp_path / "hits.geojson")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [h["rank"] for h in doc["hits"]] == [1, 2, 3, 4] and doc["outputs"]["geojson"].endswith("hits.geojson")
    assert all(h["source"] for h in doc["hits"]) and doc["hits"][0]["score"] >= doc["hits"][-1]["score"] > 0.99
    r = runner.invoke(app, ["index", "add", str(idx), str(pngs), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["added"] == 0
    r = runner.invoke(app, ["search", str(idx), "red", "--model", "other"])
    assert isinstance(r.exception, ModelMismatchError) and "other" in str(r.exception) and "fake-rgb" in str(r.exception)
    r = runner.invoke(app, ["search", str(idx), "  "])
    assert isinstance(r.exception, PromptError)
    r = runner.invoke(app, ["search", str(idx), "red"])
    assert r.exit_code == 0 and "rank" in r.stdout
