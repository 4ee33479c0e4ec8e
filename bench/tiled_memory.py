"""Peak memory and throughput of the streaming tiled runner as the scene grows.

    python bench/tiled_memory.py                      # 2k, 8k and 20k scenes (~5 min, ~3 GB disk)
    python bench/tiled_memory.py --sizes 2048 8192    # quicker

Each measurement runs in a fresh subprocess and reports its own peak resident memory
(ru_maxrss), so numbers do not leak between runs. Measured in the same run:

* ``runner``: rsvl's TiledRunner with a trivial predictor (mean of RGB, thresholded to a
  uint8 label raster: the shape of a segmentation output), tile 512, overlap 64, batch 4.
* ``whole-array``: the reference most tools use: read the scene into memory, predict, write.
  Run only where it fits comfortably.
* ``overhead``: the runner with a predictor that dominates (``sleep`` = a fixed 40 ms per
  tile with the CPU free, like a GPU model; ``compute`` = ~40 ms of single-threaded numpy
  work per tile, competing with the reader for the 2 cores), reported as runner wall time
  over the predictor's own time.

Synthetic scenes (smooth pattern + noise, uint8 RGB, tiled deflate GeoTIFF) are cached in
``--workdir`` (default: the system temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_scene(path: Path, size: int) -> Path:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.tif")
    prof = dict(
        driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32617",
        transform=from_origin(400000, 3300000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
        compress="deflate", BIGTIFF="IF_SAFER",
    )
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 24, (3, 512, 512), dtype=np.uint8)
    with rasterio.open(tmp, "w", **prof) as dst:
        for y in range(0, size, 512):
            for x in range(0, size, 512):
                h, w = min(512, size - y), min(512, size - x)
                yy, xx = np.mgrid[y : y + h, x : x + w]
                base = ((np.sin(yy / 97.0) + np.cos(xx / 131.0)) * 50 + 120).astype(np.uint8)
                block = base[None] + noise[:, :h, :w]
                dst.write(block, window=Window(x, y, w, h))
    os.replace(tmp, path)
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one(mode: str, scene: str, out: str, predictor: str) -> dict:
    """Runs inside the subprocess."""
    import rasterio  # noqa: F401  (import cost is part of the baseline)

    from rsvl.geo.raster import RasterSource
    from rsvl.geo.runner import RasterOutput, TiledRunner

    baseline = _rss_mb()

    def finalize(values, valid):
        return (values[0] > 128).astype(np.uint8)

    predict_time = 0.0
    if mode == "whole-array":
        import rasterio

        t0 = time.perf_counter()
        with rasterio.open(scene) as ds:
            data = ds.read()
            profile = ds.profile
        t1 = time.perf_counter()
        mean = data.astype(np.float32).mean(axis=0)
        labels = (mean > 128).astype(np.uint8)
        predict_time = time.perf_counter() - t1
        profile.update(count=1, dtype="uint8", compress="deflate", tiled=True)
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(labels, 1)
        wall = time.perf_counter() - t0
        tiles = 1
    else:
        if predictor == "trivial":
            def predict(batch):
                return batch.images.astype(np.float32).mean(axis=1)
        elif predictor.startswith("sleep"):
            def predict(batch):
                time.sleep(0.04 * len(batch))
                return batch.images[:, 0].astype(np.float32)
        elif predictor.startswith("compute"):
            rng = np.random.default_rng(0)
            a = rng.standard_normal((256, 256)).astype(np.float32)

            def predict(batch):
                acc = a
                for _ in range(len(batch) * 75):  # ~40 ms per tile on one idle core
                    acc = np.tanh(acc @ a * 0.01)
                return batch.images[:, 0].astype(np.float32) + float(acc[0, 0]) * 0
        else:
            raise SystemExit(f"unknown predictor {predictor}")
        with RasterSource(scene) as src:
            res = TiledRunner(
                src, predict, [RasterOutput(out, 1, "uint8", finalize=finalize, nodata=255)],
                tile=512, overlap=64, batch_size=4, overwrite=True,
            ).run()
        wall, predict_time, tiles = res.wall_seconds, res.predict_seconds, res.tiles
    size = int(Path(scene).stem.split("_")[-1])
    return {
        "mode": mode,
        "predictor": predictor,
        "size": size,
        "tiles": tiles,
        "wall_s": round(wall, 3),
        "predict_s": round(predict_time, 3),
        "mpix_per_s": round(size * size / 1e6 / wall, 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "baseline_rss_mb": round(baseline, 1),
    }


def run_sub(mode: str, scene: Path, workdir: Path, predictor: str) -> dict:
    out = workdir / f"out_{mode}_{predictor}_{scene.stem}.tif"
    cmd = [sys.executable, __file__, "--one", mode, str(scene), str(out), predictor]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    if out.exists():
        out.unlink()
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 20480])
    ap.add_argument("--whole-array-max", type=int, default=8192, help="largest scene for the whole-array reference")
    ap.add_argument("--overhead-size", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rsvl-bench")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "tiled_memory.json")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        print(f"scene {size} x {size} ...", file=sys.stderr, flush=True)
        scene = make_scene(args.workdir / f"scene_{size}.tif", size)
        rows.append(run_sub("runner", scene, args.workdir, "trivial"))
        if size <= args.whole_array_max:
            rows.append(run_sub("whole-array", scene, args.workdir, "trivial"))
    scene = make_scene(args.workdir / f"scene_{args.overhead_size}.tif", args.overhead_size)
    for pred in ("sleep", "compute"):
        rows.append(run_sub("runner", scene, args.workdir, pred))
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    runner = {r["size"]: r for r in rows if r["mode"] == "runner" and r["predictor"] == "trivial"}
    small = min(runner)
    print("| scene | mode | tiles | wall s | MPix/s | peak RSS MB | vs runner at smallest scene | vs whole-array |")
    print("|---|---|---|---|---|---|---|---|")
    whole = {r["size"]: r for r in rows if r["mode"] == "whole-array"}
    for r in rows:
        if r["predictor"] != "trivial":
            continue
        rel_small = r["peak_rss_mb"] / runner[small]["peak_rss_mb"]
        rel_whole = (
            f"{r['peak_rss_mb'] / whole[r['size']]['peak_rss_mb']:.2f}x" if r["size"] in whole and r["mode"] == "runner" else ""
        )
        print(f"| {r['size']}^2 | {r['mode']} | {r['tiles']} | {r['wall_s']:.1f} | {r['mpix_per_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {rel_small:.2f}x | {rel_whole} |")
    print()
    print("| predictor | scene | tiles | predictor s | wall s | wall / predictor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["predictor"] in ("sleep", "compute"):
            print(f"| {r['predictor']} | {r['size']}^2 | {r['tiles']} | {r['predict_s']:.1f} | {r['wall_s']:.1f} | "
                  f"{r['wall_s'] / r['predict_s']:.3f} |")


if __name__ == "__main__":
    main()
