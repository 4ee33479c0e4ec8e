"""rsvl run on a local Ray (loopback, 2 CPUs): several small rasters through segment and
index build, a worker killed mid-run, the driver killed and resumed, a corrupt raster among
good ones, and the message without Ray.

One Ray for the module (2 CPUs, no dashboard); every run kills its actors when it ends and
every wait has a timeout, so an idle actor never holds the CPUs the next test needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import REPO, write_raster
from rasterio.transform import from_origin

from rsvl.cli import main
from rsvl.errors import JobError
from rsvl.scale import run
from rsvl.scale.manifest import Manifest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'rsvl[ray]'")

CLASSES = "water, forest, buildings"
SEGMENT = {"classes": CLASSES, "gsd": 0, "tile": 64}
pytestmark = pytest.mark.timeout(240)


def start_ray(attempts: int = 3):
    """A local Ray of 2 CPUs. On a busy shared machine its agents can miss Ray's fixed 30 s
    start-up deadline; a few attempts make that a slow start instead of an error."""
    for i in range(attempts):
        try:
            return ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except Exception:
            ray.shutdown()
            if i == attempts - 1:
                raise


@pytest.fixture(scope="module")
def cluster():
    ctx = start_ray()
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A folder of three small adjacent scenes of one grid and a corrupt file."""
    d = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(7)
    for i in range(3):
        img = rng.integers(0, 255, (3, 96, 128), dtype=np.uint8)
        img[:, :, : 40 + 20 * i] //= 4  # some structure for the polygons
        write_raster(d / f"scene{i}.tif", img, transform=from_origin(500000 + 64 * i, 4100000, 0.5, 0.5))
    (d / "zz_broken.tif").write_bytes(b"II*\x00" + b"not a tiff" * 20)
    return d


@pytest.fixture(scope="module")
def model():
    import rsvl

    return rsvl.load("mini-clip")


@pytest.fixture(scope="module")
def reference(scenes, model, tmp_path_factory) -> dict[str, np.ndarray]:
    """Each scene segmented alone, in this process, as `rsvl segment` does."""
    from rsvl.data.classes import parse_class_list
    from rsvl.tasks.segment import segment

    out = tmp_path_factory.mktemp("alone")
    arrays = {}
    for f in sorted(scenes.glob("scene*.tif")):
        res = segment(model, f, parse_class_list(CLASSES), out / f.stem, gsd=0, tile=64)
        with rasterio.open(res.outputs["classes"]) as ds:
            arrays[f.stem] = ds.read(1)
    return arrays


@pytest.fixture(scope="module")
def full(cluster, scenes, tmp_path_factory) -> Path:
    """An uninterrupted run over the folder with two workers."""
    out = tmp_path_factory.mktemp("full") / "out"
    run("segment", [scenes], out, workers=2, start_timeout=120, **SEGMENT)
    return out


def _classes(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_without_ray_the_run_says_how_to_install_it(monkeypatch, scenes, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(JobError, match=r'pip install "rsvl\[ray\]"'):
        run("segment", [scenes], tmp_path / "out", **SEGMENT)


def test_segment_with_a_corrupt_raster_among_good_ones(full, scenes, reference):
    man = Manifest.load(full)
    assert [r.item.name for r in man.items] == ["scene0", "scene1", "scene2", "zz_broken"]
    assert [r.state for r in man.items] == ["done", "done", "done", "failed"]
    broken = man.items[3]
    assert broken.attempts == 2  # retried once
    assert "RasterReadError" in broken.error and "zz_broken.tif" in broken.error
    # each item's classes equal the scene segmented alone
    for r in man.items[:3]:
        np.testing.assert_array_equal(_classes(Path(r.outputs["classes"])), reference[r.item.name])
    # the mosaic holds the three scenes side by side
    with rasterio.open(full / "classes.vrt") as ds:
        mosaic = ds.read(1)
        assert ds.bounds.left == 500000 and ds.bounds.right == 500000 + 64 * 2 + 64
        # the shipped mini-clip adds its learned "other" as a background class
        assert json.loads(ds.tags()["classes"]) == {"0": "water", "1": "forest", "2": "buildings", "3": "background"}
    np.testing.assert_array_equal(mosaic[:, :128], reference["scene0"])
    np.testing.assert_array_equal(mosaic[:, 256:384], reference["scene2"])
    polys = gpd.read_file(full / "polygons.gpkg")
    assert list(polys.columns[:2]) == ["source", "item"]
    assert sorted(set(polys["source"])) == [str(scenes / f"scene{i}.tif") for i in range(3)]
    assert man.merged["classes"] == [str(full / "classes.vrt")]


def test_index_build_merges_one_index_in_source_order(cluster, scenes, model, tmp_path):
    from rsvl.index.store import EmbeddingIndex
    from rsvl.tasks.search import build

    res = run("index", [scenes], tmp_path / "run", workers=2, start_timeout=120, tile=64)
    assert res.done == 3 and [f["item"] for f in res.failed] == ["zz_broken"]
    merged = EmbeddingIndex.open(tmp_path / "run" / "index")
    good = sorted(scenes.glob("scene*.tif"))
    alone = EmbeddingIndex.open(build(model, good, tmp_path / "alone", tile=64).index)
    assert merged.count == alone.count > 3
    assert merged.metadata.column("source").to_pylist() == alone.metadata.column("source").to_pylist()
    assert merged.metadata.column("id").to_pylist() == list(range(merged.count))
    assert merged.metadata.column("geometry").to_pylist() == alone.metadata.column("geometry").to_pylist()
    np.testing.assert_allclose(merged.vectors(), alone.vectors(), atol=1e-5)
    assert merged.settings["tile"] == 64 and merged.model == "mini-clip"


def test_a_killed_worker_is_replaced_and_on_error_stop_stops(cluster, scenes, reference, tmp_path):
    killed = []

    def kill_second(event, item, info):
        if event == "start" and item == "scene1" and not killed:
            killed.append(info["pid"])
            os.kill(info["pid"], signal.SIGKILL)

    with pytest.raises(JobError, match="zz_broken.*failed") as err:
        run("segment", [scenes], tmp_path / "out", workers=1, on_event=kill_second, start_timeout=120,
            on_error="stop", **SEGMENT)
    assert killed and "--resume" in err.value.hint
    man = Manifest.load(tmp_path / "out")
    assert [r.state for r in man.items] == ["done", "done", "done", "failed"]
    rec = man.items[1]
    assert rec.attempts == 2 and rec.worker != killed[0]
    np.testing.assert_array_equal(_classes(Path(rec.outputs["classes"])), reference["scene1"])
    assert not (tmp_path / "out" / "classes.vrt").exists()  # a stopped run merges nothing


DRIVER = """
import os, signal, sys
import ray
from rsvl.scale import run

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")

def die_after_first(event, item, info):
    if event == "done":
        os.kill(os.getpid(), signal.SIGKILL)

run("segment", [sys.argv[2]], sys.argv[3], workers=1, on_event=die_after_first, start_timeout=120, save_every=0,
    classes="water, forest, buildings", gsd=0, tile=64)
"""


def test_a_killed_driver_resumes_to_identical_merged_outputs(cluster, scenes, full, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "RSVL_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), cluster, str(scenes), str(tmp_path / "out")], env=env,
                          timeout=180, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    man = Manifest.load(tmp_path / "out")
    assert man.counts()["done"] == 1 and not (tmp_path / "out" / "classes.vrt").exists()
    # the CLI resumes it; the corrupt file fails again, so the exit code says so
    code = main(["--quiet", "run", "segment", str(scenes), "-o", str(tmp_path / "out"), "--classes", CLASSES,
                 "--gsd", "0", "--tile", "64", "--resume", "--json"])
    assert code == 2
    resumed = Manifest.load(tmp_path / "out")
    assert [r.state for r in resumed.items] == ["done", "done", "done", "failed"]
    assert [r.attempts for r in resumed.items[:3]] == [1, 1, 1]
    for name in ("classes.vrt", "confidence.vrt"):
        assert (tmp_path / "out" / name).read_bytes() == (full / name).read_bytes()
    for i in range(3):
        a, b = (d / "items" / f"scene{i}_classes.tif" for d in (tmp_path / "out", full))
        np.testing.assert_array_equal(_classes(a), _classes(b))
    pa, pb = (gpd.read_file(d / "polygons.gpkg") for d in (tmp_path / "out", full))
    assert pa.drop(columns="geometry").equals(pb.drop(columns="geometry"))
    assert pa.geometry.geom_equals(pb.geometry).all()
