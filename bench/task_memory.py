"""Peak memory of every raster task, with its built-in model, as the scene grows.

    python bench/task_memory.py                                  # 2k and 8k scenes, every task
    python bench/task_memory.py --sizes 2048 8192 16384 --tasks segment refer

Each measurement is a fresh subprocess that loads the task's default built-in model
(mini-clip, mini-refer, mini-instances: offline, CPU), runs the task with its default
options on a synthetic scene and reports its own peak resident memory (ru_maxrss), the
resident memory after loading the model (``baseline``) and the wall time. The table gives
the ratio of each size's peak to the smallest size's peak: flat means ~1.0.

Scenes are real imagery: ``examples/OSBS_029.tif`` (NEON aerial RGB, 400 px) tiled with
alternating mirror flips into a uint8 RGB GeoTIFF (tiled, deflate, UTM, 0.3048 m: mini-clip's
training GSD, so ``segment`` runs at its default GSD without changing the pixel count),
written block by block and cached in ``--workdir``.

Tasks and what they run (defaults of the command line unless stated):

* ``segment``: ``rsvl segment SCENE "forest|trees, grass, road, building, water"``.
* ``classify``: ``rsvl classify SCENE`` per tile (tile = the model's 256 px) with the same classes.
* ``index``: ``rsvl index build SCENE`` (tiles of 256 px).
* ``refer``: ``rsvl refer SCENE "the large building next to the road"`` (tile 1280, overlap 256).
* ``instances``: ``rsvl instances SCENE`` (tile 768, overlap 192).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCE = REPO / "examples" / "OSBS_029.tif"
TASKS = ("segment", "classify", "index", "refer", "instances")
CLASSES = "forest|trees, grass, road, building, water"
EXPRESSION = "the large building next to the road"
GSD = 0.3048


def make_scene(path: Path, size: int) -> Path:
    """A size x size uint8 RGB GeoTIFF tiled from OSBS_029 (mirror-flipped copies), block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    with rasterio.open(SOURCE) as ds:
        tile = ds.read()
    # a 2n x 2n seamless unit: the image and its mirrors
    unit = np.concatenate([np.concatenate([tile, tile[:, :, ::-1]], 2),
                           np.concatenate([tile[:, ::-1], tile[:, ::-1, ::-1]], 2)], 1)
    u = unit.shape[1]
    tmp = path.with_suffix(".tmp.tif")
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32617",
                transform=from_origin(404211.9, 3285142.9, GSD, GSD), tiled=True, blockxsize=512,
                blockysize=512, compress="deflate", BIGTIFF="IF_SAFER", photometric="RGB")
    with rasterio.open(tmp, "w", **prof) as dst:
        for y in range(0, size, 512):
            for x in range(0, size, 512):
                h, w = min(512, size - y), min(512, size - x)
                ys = (np.arange(y, y + h) % u)[:, None]
                xs = (np.arange(x, x + w) % u)[None, :]
                dst.write(unit[:, ys, xs], window=Window(x, y, w, h))
    os.replace(tmp, path)
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one(task: str, scene: str, out: str, options: str = "{}") -> dict:
    """Runs inside the subprocess; ``options`` (JSON) are extra keyword arguments of the task."""
    from rsvl.data.classes import parse_class_list
    from rsvl.models import registry

    model_name = {"refer": "mini-refer", "instances": "mini-instances"}.get(task, "mini-clip")
    model = registry.load(model_name)
    baseline = _rss_mb()
    kw = json.loads(options)
    t0 = time.perf_counter()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    if task == "segment":
        from rsvl.tasks.segment import segment

        res = segment(model, scene, parse_class_list(CLASSES), outdir / "seg", model_name=model_name, **kw)
        n = res.tiles
    elif task == "classify":
        from rsvl.tasks.classify import classify

        res = classify(model, scene, parse_class_list(CLASSES), out=outdir / "cls", **kw)
        n = len(res.predictions)
    elif task == "index":
        from rsvl.tasks.search import build

        res = build(model, [scene], outdir / "idx", **kw)
        n = res.count
    elif task == "refer":
        from rsvl.tasks.refer import refer

        res = refer(model, scene, EXPRESSION, outdir / "ref", model_name=model_name, **kw)
        n = res.tiles
    elif task == "instances":
        from rsvl.tasks.instances import instances

        res = instances(model, scene, outdir / "inst", instance_tif=True, model_name=model_name, **kw)
        n = res.tiles
    else:
        raise SystemExit(f"unknown task {task}")
    size = int(Path(scene).stem.split("_")[-1])
    return {"task": task, "model": model_name, "size": size, "options": kw, "items": n,
            "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "baseline_rss_mb": round(baseline, 1)}


def run_sub(task: str, scene: Path, workdir: Path, options: dict) -> dict:
    out = workdir / f"out_{task}_{scene.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--one", task, str(scene), str(out), json.dumps(options)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| task | model | options | scene | tiles/items | wall s | baseline MB | peak RSS MB | vs smallest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["size"])
        if not mine:
            continue
        ref = mine[0]["peak_rss_mb"]
        for r in mine:
            opts = " ".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "defaults"
            lines.append(f"| {task} | {r['model']} | {opts} | {r['size']}² | {r['items']} | {r['wall_s']:.0f} | "
                         f"{r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rsvl-bench")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "task_memory.json")
    ap.add_argument("--set", nargs=3, action="append", default=[], metavar=("TASK", "OPTION", "VALUE"),
                    help="a task option for every size, e.g. --set classify tile 1024 --set segment gsd 0.6096")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    options: dict[str, dict] = {t: {} for t in TASKS}
    for task, key, value in args.set:
        options[task][key] = json.loads(value)
    rows = []
    for size in args.sizes:
        scene = make_scene(args.workdir / f"osbs_{size}.tif", size)
        for task in args.tasks:
            print(f"{task} on {size} x {size} ...", file=sys.stderr, flush=True)
            rows.append(run_sub(task, scene, args.workdir, options[task]))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "platform": platform.platform()}, "rows": rows}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
