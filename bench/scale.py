"""Scale-out on this machine: items per second of ``rsvl run segment`` with 1 and 2 Ray
workers (same run, same items), and the driver's merge time against the number of items.

    python bench/scale.py                 # ~3-5 min on 2 cores

* throughput: ``--items`` small georeferenced scenes (``--size`` pixels a side) segmented
  by mini-clip; the rate is counted from the first item started to the last finished, so
  the workers' start (loading the model once each) is reported apart.
* merge: synthetic finished items (a class raster, a confidence raster and polygons each;
  an embedding table for the index) merged as the driver does at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import ray
import shapely
from rasterio.transform import from_origin

from rsvl.scale import run
from rsvl.scale.items import Item
from rsvl.scale.manifest import DONE, ItemRecord, Manifest
from rsvl.scale.runner import merge_outputs
from rsvl.scale.tasks import TASKS, index_rows_schema

HERE = Path(__file__).resolve().parent


def write_tif(path: Path, data: np.ndarray, x0: float, y0: float = 4100000.0, nodata: float | None = None) -> None:
    prof = dict(driver="GTiff", width=data.shape[-1], height=data.shape[-2], count=data.shape[0],
                dtype=data.dtype.name, crs="EPSG:32618", transform=from_origin(x0, y0, 0.5, 0.5), nodata=nodata)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)


def scenes(folder: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 255, (3, size, size), dtype=np.uint8)
        img[:, :, : size // 3] //= 4
        write_tif(folder / f"scene{i:04d}.tif", img, 500000 + i * size * 0.5)
    return folder


def throughput(src: Path, out: Path, workers: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"start": [], "done": []}

    def on_event(event: str, item: str, info: dict) -> None:
        if event in times:
            times[event].append(time.perf_counter())

    t0 = time.perf_counter()
    res = run("segment", [src], out, workers=workers, classes="water, forest, buildings", gsd=0, tile=128,
              on_event=on_event, start_timeout=600)
    steady = times["done"][-1] - times["start"][0]
    return {"workers": workers, "items": res.done, "total_s": round(time.perf_counter() - t0, 2),
            "startup_s": round(times["start"][0] - t0, 2), "steady_s": round(steady, 2),
            "items_per_s": round(res.done / steady, 3), "s_per_item": round(steady / res.done, 3),
            "merge_s": res.merge_seconds}


def fake_items(out: Path, n: int) -> Manifest:
    """``n`` finished segment + index items with small outputs, as workers leave them."""
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    schema = index_rows_schema()
    records = []
    for i in range(n):
        x0 = 500000 + i * 32.0
        cls, conf = items_dir / f"s{i}_classes.tif", items_dir / f"s{i}_confidence.tif"
        write_tif(cls, rng.integers(0, 3, (1, 64, 64), dtype=np.uint8), x0, nodata=255)
        write_tif(conf, rng.integers(0, 254, (1, 64, 64), dtype=np.uint8), x0, nodata=255)
        polys = items_dir / f"s{i}_classes.gpkg"
        boxes = [shapely.box(x0 + k, 4099990 - k, x0 + k + 4, 4099994 - k) for k in range(10)]
        gpd.GeoDataFrame({"class": ["water"] * 10, "score": np.linspace(0, 1, 10)}, geometry=boxes,
                         crs="EPSG:32618").to_file(polys)
        vec, rows = items_dir / f"s{i}_vectors.npy", items_dir / f"s{i}_rows.parquet"
        np.save(vec, rng.normal(size=(4, 64)).astype(np.float32))
        table = pa.Table.from_pylist([{"source": f"/s{i}.tif", "kind": "tile", "row": r, "col": 0}
                                      for r in range(4)], schema=schema)
        pq.write_table(table.replace_schema_metadata({"model": "mini-clip", "image_size": "224"}), rows)
        records.append(ItemRecord(Item(f"s{i}", f"/s{i}.tif"), DONE,
                                  {"classes": str(cls), "confidence": str(conf), "polygons": str(polys),
                                   "vectors": str(vec), "rows": str(rows)}))
    return Manifest(out, {}, records)


def merge_times(root: Path, counts: list[int]) -> list[dict[str, float]]:
    rows = []
    for n in counts:
        m = fake_items(root / f"m{n}", n)
        t0 = time.perf_counter()
        merge_outputs(m, TASKS["segment"], {})
        seg = time.perf_counter() - t0
        t0 = time.perf_counter()
        merge_outputs(m, TASKS["index"], {})
        idx = time.perf_counter() - t0
        rows.append({"items": n, "segment_merge_s": round(seg, 3), "index_merge_s": round(idx, 3),
                     "segment_ms_per_item": round(1000 * seg / n, 2)})
        print(f"merge {n:4d} items: segment {seg:6.2f} s, index {idx:6.2f} s", flush=True)
    return rows


def start_ray(attempts: int = 3) -> None:
    """A local Ray of 2 CPUs; its agents can miss Ray's fixed start deadline on a busy machine."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--merge", type=str, default="10,50,100,300")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "scale.json")
    args = ap.parse_args()
    os.environ.setdefault("RSVL_OFFLINE", "1")
    speed: list[dict[str, float]] = []
    ray_error = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        merge = merge_times(root, [int(x) for x in args.merge.split(",")])
        src = scenes(root / "scenes", args.items, args.size)
        try:
            start_ray()
        except Exception as exc:  # measured merge times are still written
            ray_error = f"Ray did not start: {exc}"
            print(ray_error, flush=True)
        else:
            try:
                for w in (1, 2):
                    r = throughput(src, root / f"out{w}", w)
                    speed.append(r)
                    print(f"{w} worker(s): {r['items_per_s']:.2f} items/s ({r['s_per_item']:.2f} s/item), "
                          f"start {r['startup_s']:.1f} s, merge {r['merge_s']:.2f} s", flush=True)
            finally:
                ray.shutdown()
    doc = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_average": os.getloadavg(), "ray": ray.__version__, "items": args.items, "size": args.size,
           "throughput": speed, "ray_error": ray_error, "merge": merge}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
