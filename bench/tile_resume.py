"""Kill -9 and Ctrl-C at random moments of ``rsvl classify --tile`` and ``rsvl instances`` on a
multi-thousand-tile raster, ``--resume`` until done, and compare with an uninterrupted run.

    python bench/tile_resume.py                          # 2048 px: 4096 classify tiles, 1369 instance tiles
    python bench/tile_resume.py --size 4096 --kills 8 --tasks classify

Every run is a fresh ``rsvl`` process (``python -c`` around :func:`rsvl.cli.main`) whose model is
a fast deterministic stand-in (``rsvl.load`` replaced in that process: a colour/contrast
embedder for classify, a bright-blob detector for instances), so the bench measures the
journal, not a network; the command line, tiling, journal and writers are the real ones.
Each interrupted attempt is stopped after a random delay with SIGKILL or SIGINT
(alternately), then rerun with ``--resume`` until it exits 0. The outputs must equal the
uninterrupted run's: label GeoTIFF pixels and tags, GeoPackage rows and geometries in order,
the instance-id GeoTIFF. Results go to ``bench/results/tile_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

_DRIVER = textwrap.dedent(
    """
    import sys, numpy as np, torch
    import rsvl

    class Texture:
        name = "texture-bench"
        logit_scale = 10.0
        default_templates = ("{}",)
        image_size = 16

        def encode_text(self, texts):
            out = torch.zeros(len(texts), 3)
            for i, t in enumerate(texts):
                out[i, {"red": 0, "green": 1, "blue": 2}[t]] = 1.0
            return out

        def encode_image(self, images):
            x = torch.as_tensor(images).float() / 255
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)) + 0.3 * x.std(dim=(2, 3)) + 1e-3, dim=-1)

    class Blobs(torch.nn.Module):
        name = "blobs-bench"
        classes = ["airplane", "ship"]

        def forward(self, images):
            from scipy import ndimage
            outs = []
            for im in images:
                red = (im[0] * 255).round().numpy()
                lab, n = ndimage.label(red >= 250)
                masks = [lab == k for k in range(1, n + 1)]
                boxes = []
                for m in masks:
                    ys, xs = np.nonzero(m)
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                h, w = im.shape[-2:]
                outs.append({
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor([1 + (len(b) and int(b[0]) % 2) for b in boxes], dtype=torch.int64),
                    "scores": torch.tensor([0.5 + 0.5 * (m.sum() % 97) / 97 for m in masks], dtype=torch.float32),
                    "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool)).float()[:, None],
                })
            return outs

    rsvl.load = lambda *a, **k: Texture() if sys.argv[1] == "classify" else Blobs()
    from rsvl.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def write_scene(path: Path, size: int) -> None:
    import rasterio  # lazy: the bench's only raster write
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (3, size, size), dtype=np.uint8)
    for _ in range(size // 8):  # bright blobs, some cut by tile borders
        x, y = rng.integers(0, size - 40, 2)
        w, h = rng.integers(6, 40, 2)
        img[0, y : y + h, x : x + w] = 255
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32618", transform=from_origin(500000, 4100000, 0.5, 0.5),
                       tiled=True, blockxsize=256, blockysize=256) as ds:
        ds.write(img)


def command(task: str, scene: Path, prefix: Path) -> list[str]:
    if task == "classify":
        return ["classify", str(scene), "-l", "red, green, blue", "--tile", "32", "--gsd", "0",
                "--batch-size", "16", "-o", str(prefix)]
    return ["instances", str(scene), "--tile", "64", "--overlap", "8", "--batch-size", "4",
            "--instance-tif", "-o", str(prefix)]


def outputs(task: str, prefix: Path) -> list[Path]:
    if task == "classify":
        return [Path(f"{prefix}_tiles.gpkg"), Path(f"{prefix}_tiles.tif")]
    return [Path(f"{prefix}_instances.gpkg"), Path(f"{prefix}_instances.tif")]


def same(task: str, a: Path, b: Path) -> bool:
    import geopandas as gpd  # lazy: comparison only
    import rasterio  # lazy: comparison only

    va, ta = outputs(task, a)
    vb, tb = outputs(task, b)
    with rasterio.open(ta) as x, rasterio.open(tb) as y:
        if not (np.array_equal(x.read(), y.read()) and x.tags() == y.tags()):
            return False
    ga, gb = gpd.read_file(va), gpd.read_file(vb)
    return bool(ga.drop(columns="geometry").equals(gb.drop(columns="geometry"))
                and [g.wkb for g in ga.geometry] == [g.wkb for g in gb.geometry])


def run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _DRIVER, *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def bench(task: str, scene: Path, work: Path, kills: int, seed: int) -> dict:
    rnd = random.Random(seed)
    t0 = time.perf_counter()
    ref = run(command(task, scene, work / f"{task}_ref"))
    _, err = ref.communicate()
    assert ref.returncode == 0, err
    ref_s = time.perf_counter() - t0
    prefix = work / f"{task}_run"
    attempts, stopped, codes = 0, 0, []
    t1 = time.perf_counter()
    while True:
        args = command(task, scene, prefix) + (["--resume"] if attempts else [])
        attempts += 1
        p = run(args)
        if stopped < kills:
            delay = rnd.uniform(0.15, 0.6) * ref_s
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL if stopped % 2 == 0 else signal.SIGINT)
        _, err = p.communicate()
        codes.append(p.returncode)
        stopped += p.returncode not in (0, 2)  # a signal sent as the run finished does not count
        if p.returncode == 0:
            break
        if p.returncode == 2 and "that run finished" in err:  # stopped after its last write
            break
        if p.returncode not in (-signal.SIGKILL, -signal.SIGINT, 130):  # -2: SIGINT before main() runs
            raise SystemExit(f"{task}: unexpected exit {p.returncode}: {err[-2000:]}")
    return {"task": task, "reference_s": round(ref_s, 2), "interrupted_total_s": round(time.perf_counter() - t1, 2),
            "attempts": attempts, "stops": stopped, "exit_codes": codes, "identical": same(task, work / f"{task}_ref", prefix)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--tasks", nargs="+", default=["classify", "instances"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tile_resume.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rsvl-resume-") as tmp:
        work = Path(tmp)
        scene = work / "scene.tif"
        write_scene(scene, a.size)
        rows = [bench(t, scene, work, a.kills, a.seed) for t in a.tasks]
    for r in rows:
        print(json.dumps(r))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"size": a.size, "results": rows}, indent=1) + "\n")
    if not all(r["identical"] for r in rows):
        raise SystemExit("outputs differ from the uninterrupted run")


if __name__ == "__main__":
    main()
