"""Interrupted ``classify`` per tile and ``instances`` on rasters resume to the very outputs of
an uninterrupted run (the tile journal of :mod:`rsvl.geo.journal`)."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import write_raster
from rasterio.transform import from_origin

from rsvl.data.classes import parse_class_list
from rsvl.errors import OutputError, ResumeError
from rsvl.geo.journal import CHUNK_PREFIX, JOURNAL
from rsvl.geo.runner import partial_dir_for
from rsvl.tasks.classify import classify
from rsvl.tasks.instances import instances

torch.set_num_threads(1)

WORDS = {"red": 0, "green": 1, "blue": 2}


class TextureModel:
    """Embeds a tile by its mean colour and its contrast: varied, exact scores per tile."""

    name = "texture-test"
    logit_scale = 10.0
    default_templates = ("{}",)
    image_size = 20

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.calls = 0
        self.interrupt_after = interrupt_after

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, WORDS[t]] = 1.0
        return out

    def encode_image(self, images):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        x = torch.as_tensor(images).float() / 255
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)) + 0.3 * x.std(dim=(2, 3)) + 1e-3, dim=-1)


# the instance model of tests/tasks/test_instances.py: white squares, class by green
class SquareModel(torch.nn.Module):
    name = "square-test"
    classes = ["airplane", "ship", "storage_tank"]

    def forward(self, images):
        from scipy import ndimage

        outs = []
        for im in images:
            red = (im[0] * 255).round().numpy()
            green = (im[1] * 255).round().numpy()
            lab, n = ndimage.label(red == 255)
            masks, boxes, labels = [], [], []
            for k in range(1, n + 1):
                m = lab == k
                ys, xs = np.nonzero(m)
                masks.append(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                labels.append(1 if green[ys[0], xs[0]] == 255 else 2)
            h, w = im.shape[-2:]
            outs.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "scores": torch.full((n,), 0.9),
                "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool))
                .float()[:, None],
            })
        return outs


def scene(size: int, squares: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """(3, size, size) uint8: black with white squares (x0, y0, x1, y1, green value)."""
    img = np.zeros((3, size, size), np.uint8)
    for x0, y0, x1, y1, g in squares:
        img[0, y0:y1, x0:x1] = 255
        img[1, y0:y1, x0:x1] = g
        img[2, y0:y1, x0:x1] = 255
    return img


class InterruptedSquares(SquareModel):
    def __init__(self, interrupt_after: int) -> None:
        super().__init__()
        self.calls = 0
        self.interrupt_after = interrupt_after

    def forward(self, images):
        self.calls += 1
        if self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        return super().forward(images)


CLASSES = parse_class_list("red, green, blue")


def texture_raster(tmp_path):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (3, 200, 300), dtype=np.uint8)
    img[:, :60, 240:] = 0  # a nodata corner: tiles there are not classified
    return write_raster(tmp_path / "scene.tif", img, nodata=0)


def same_vectors(a, b) -> None:
    da, db = gpd.read_file(a), gpd.read_file(b)
    assert list(da.columns) == list(db.columns) and len(da) == len(db)
    assert da.drop(columns="geometry").equals(db.drop(columns="geometry"))
    assert [g.wkb for g in da.geometry] == [g.wkb for g in db.geometry]


def same_raster(a, b) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert np.array_equal(x.read(), y.read())
        assert x.tags() == y.tags() and x.transform == y.transform and x.crs == y.crs


def classify_run(model, src, out, **kw):
    return classify(model, src, CLASSES, tile=20, batch_size=4, top_k=3, out=out, **kw)


def test_classify_interrupted_then_resumed_gives_the_uninterrupted_outputs(tmp_path):
    src = texture_raster(tmp_path)
    ref = classify_run(TextureModel(), src, tmp_path / "ref")
    assert len({p.label for p in ref.predictions}) > 1  # the scene is not one class

    with pytest.raises(KeyboardInterrupt):
        classify_run(TextureModel(interrupt_after=10), src, tmp_path / "run")
    gpkg = tmp_path / "run_tiles.gpkg"
    partial = partial_dir_for(gpkg)
    assert not gpkg.exists() and (partial / JOURNAL).exists()
    chunks = sorted(partial.glob(f"{CHUNK_PREFIX}*.json"))
    assert len(chunks) == 5  # 10 batches of 4 tiles, 8 tiles a chunk

    with pytest.raises(OutputError, match="interrupted run") as err:
        classify_run(TextureModel(), src, tmp_path / "run")
    assert "--resume" in err.value.hint and "--overwrite" in err.value.hint

    model = TextureModel()
    res = classify_run(model, src, tmp_path / "run", resume=True)
    assert model.calls == 38 - 10  # 150 tiles: the 40 journaled ones are not predicted again
    assert not partial.exists()
    assert [p.to_dict() for p in res.predictions] == [
        {**p.to_dict(), "source": p.source} for p in ref.predictions]
    same_vectors(ref.outputs["tiles"], res.outputs["tiles"])
    same_raster(ref.outputs["labels"], res.outputs["labels"])
    assert open(ref.outputs["labels"], "rb").read() == open(res.outputs["labels"], "rb").read()


def test_classify_resume_survives_a_chunk_cut_short_by_a_kill(tmp_path):
    src = texture_raster(tmp_path)
    ref = classify_run(TextureModel(), src, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        classify_run(TextureModel(interrupt_after=9), src, tmp_path / "run")
    partial = partial_dir_for(tmp_path / "run_tiles.gpkg")
    last = sorted(partial.glob(f"{CHUNK_PREFIX}*.json"))[-1]
    text = last.read_text()
    last.write_text(text[: len(text) // 2])  # as if written without the atomic rename
    (partial / f"{CHUNK_PREFIX}000099.json").write_text("{}")  # and a stray one beyond
    model = TextureModel()
    res = classify_run(model, src, tmp_path / "run", resume=True)
    assert model.calls == 38 - 6  # chunks 0-2 (24 tiles, 6 batches) were kept
    same_vectors(ref.outputs["tiles"], res.outputs["tiles"])
    same_raster(ref.outputs["labels"], res.outputs["labels"])


def test_classify_resume_refuses_other_settings_and_says_which(tmp_path):
    src = texture_raster(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        classify_run(TextureModel(interrupt_after=3), src, tmp_path / "run")
    with pytest.raises(ResumeError, match="other settings") as err:
        classify(TextureModel(), src, parse_class_list("red, blue, green"), tile=20, batch_size=4,
                 top_k=3, out=tmp_path / "run", resume=True)
    assert "prompt" in err.value.message and "red, green, blue" in err.value.message
    with pytest.raises(ResumeError, match="batch_size"):
        classify(TextureModel(), src, CLASSES, tile=20, batch_size=2, top_k=3, out=tmp_path / "run", resume=True)
    # --overwrite without --resume starts over
    res = classify_run(TextureModel(), src, tmp_path / "run", overwrite=True)
    assert len(res.predictions) > 100 and not partial_dir_for(tmp_path / "run_tiles.gpkg").exists()
    # complete outputs with --resume: nothing to continue, and no silent relabelling
    with pytest.raises(ResumeError, match="no interrupted run"):
        classify_run(TextureModel(), src, tmp_path / "run", resume=True)


def squares_raster(tmp_path):
    squares = [(100, 100, 420, 300, 255), (500, 60, 560, 700, 0), (30, 600, 300, 780, 255),
               (600, 560, 760, 620, 0), (180, 400, 260, 470, 255)]
    return write_raster(tmp_path / "squares.tif", scene(800, squares),
                        transform=from_origin(500000.0, 4100000.0, 0.5, 0.5))


def test_instances_interrupted_then_resumed_gives_the_uninterrupted_outputs(tmp_path):
    src = squares_raster(tmp_path)
    kw = dict(tile=256, overlap=64, batch_size=2, instance_tif=True)
    ref = instances(SquareModel(), src, tmp_path / "ref", **kw)
    assert ref.tiles == 16 and ref.instances >= 5

    with pytest.raises(KeyboardInterrupt):
        instances(InterruptedSquares(5), src, tmp_path / "run", **kw)
    gpkg = tmp_path / "run_instances.gpkg"
    partial = partial_dir_for(gpkg)
    assert not gpkg.exists() and len(list(partial.glob(f"{CHUNK_PREFIX}*.json"))) == 1  # 8 of 10 tiles

    with pytest.raises(ResumeError, match="score"):
        instances(SquareModel(), src, tmp_path / "run", score=0.6, resume=True, **kw)
    with pytest.raises(OutputError, match="--resume"):
        instances(SquareModel(), src, tmp_path / "run", **kw)

    model = InterruptedSquares(100)
    res = instances(model, src, tmp_path / "run", resume=True, **kw)
    assert model.calls == 4 and res.tiles == 16  # 8 tiles of 16 were journaled
    assert not partial.exists()
    assert res.detections == ref.detections and res.counts == ref.counts
    same_vectors(ref.outputs["instances"], res.outputs["instances"])
    same_raster(ref.outputs["instance_tif"], res.outputs["instance_tif"])
    for kind in ("instance_tif", "overlay"):
        assert open(ref.outputs[kind], "rb").read() == open(res.outputs[kind], "rb").read()


def test_instances_resume_refuses_a_folder_and_finished_outputs(tmp_path):
    src = squares_raster(tmp_path)
    instances(SquareModel(), src, tmp_path / "run", tile=256, overlap=64)
    with pytest.raises(ResumeError, match="no interrupted run"):
        instances(SquareModel(), src, tmp_path / "run", tile=256, overlap=64, resume=True)
    with pytest.raises(ResumeError, match="folder"):
        instances(SquareModel(), tmp_path, tmp_path / "f", resume=True)
    saved = json.dumps(sorted(p.name for p in tmp_path.iterdir()))
    assert "rsvl-partial" not in saved
