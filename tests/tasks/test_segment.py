"""Open-vocabulary segmentation end to end with a model whose answers are known.

ColourModel embeds every 4x4 patch by its mean colour and the words "red", "green" and
"blue" as the matching unit vectors, so the correct segmentation of a synthetic scene is
known exactly: the test checks the task's plumbing (prompts, synonyms, tiling, blending,
georeferenced outputs, polygons, overlay), not a model's quality.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import write_raster
from PIL import Image

from rsvl.data.classes import parse_class_list
from rsvl.errors import OutputError, PromptError
from rsvl.tasks.segment import segment

WORDS = {"red": 0, "crimson": 0, "green": 1, "blue": 2}


class ColourModel:
    name = "colour-test"
    logit_scale = 100.0
    default_templates = ("{}",)
    preferred_tile = 64

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, WORDS[t]] = 1.0
        return out

    def encode_image(self, images):
        return torch.nn.functional.normalize(torch.as_tensor(images).float().mean(dim=(2, 3)) + 1e-3, dim=-1)

    def dense_features(self, images):
        x = torch.as_tensor(images).float()
        f = torch.nn.functional.avg_pool2d(x, 4) + 1e-3
        return torch.nn.functional.normalize(f, dim=1)


def scene() -> np.ndarray:
    img = np.zeros((3, 200, 300), np.uint8)
    img[0, :, :100] = 200  # red left third
    img[1, :, 100:200] = 200  # green middle
    img[2, :, 200:] = 200  # blue right
    img[:, :50, 250:] = 0  # a nodata corner
    return img


def test_segments_a_raster_into_named_classes(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene(), nodata=0)
    classes = parse_class_list("red|crimson, green, blue")
    res = segment(ColourModel(), src, classes, tmp_path / "out", tile=64, overlap=16, batch_size=3)
    assert res.classes == ["red", "green", "blue"]
    with rasterio.open(res.outputs["classes"]) as ds, rasterio.open(src) as s:
        labels = ds.read(1)
        assert ds.crs == s.crs and ds.transform == s.transform
        assert json.loads(ds.tags()["classes"]) == {"0": "red", "1": "green", "2": "blue"}
        assert json.loads(ds.tags()["rsvl_settings"])["prompt"] == "red|crimson, green, blue"
    # Away from colour boundaries (blurred by the 4 px patches) every pixel is right.
    assert (labels[:, :96] == 0).all() and (labels[:, 104:196] == 1).all()
    assert (labels[50:, 204:] == 2).all()
    assert (labels[:50, 250:] == 255).all()  # nodata stays nodata
    polys = gpd.read_file(res.outputs["polygons"])
    assert set(polys["class"]) == {"red", "green", "blue"}
    assert polys.crs.to_epsg() == 32618 and (polys.score > 0.9).all()
    big = polys.sort_values("pixels").iloc[-1]
    assert big["class"] in ("red", "green")
    img = Image.open(res.outputs["overlay"])
    assert img.width > 300 and img.height >= 200
    assert abs(res.class_fractions["blue"] - (100 * 200 - 50 * 50) / (200 * 300 - 2500)) < 0.03


def test_probabilities_and_reprojected_geojson(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene())
    res = segment(ColourModel(), src, parse_class_list("red, green, blue"), tmp_path / "o", tile=64, overlap=16,
                  probabilities=True, vector_format="geojson", to_crs="EPSG:4326")
    with rasterio.open(res.outputs["probabilities"]) as ds:
        p = ds.read()
        assert ds.count == 3 and ds.descriptions == ("red", "green", "blue")
    assert p[0, 100, 50] > 0.99 and p[2, 150, 250] > 0.99
    polys = gpd.read_file(res.outputs["polygons"])
    assert polys.crs.to_epsg() == 4326


def test_errors_before_any_work(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene())
    with pytest.raises(PromptError):
        parse_class_list("  ")
    (tmp_path / "o_classes.tif").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        segment(ColourModel(), src, parse_class_list("red, green"), tmp_path / "o", tile=64)
    assert (tmp_path / "o_classes.tif").read_bytes() == b"keep me"


def test_classify_images_folders_and_raster_tiles(tmp_path):
    from rsvl.tasks.classify import classify

    model = ColourModel()
    model.image_size = 32
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, ch in (("r.png", 0), ("g.png", 1), ("b.png", 2)):
        a = np.zeros((40, 50, 3), np.uint8)
        a[..., ch] = 180
        Image.fromarray(a).save(folder / name)
    classes = parse_class_list("red|crimson, green, blue")
    res = classify(model, folder, classes, top_k=2)
    got = {p.source.split("/")[-1]: p.label for p in res.predictions}
    assert got == {"r.png": "red", "g.png": "green", "b.png": "blue"}
    assert all(p.score > 0.99 and len(p.topk) == 2 for p in res.predictions)
    one = classify(model, folder / "g.png", classes)
    assert one.predictions[0].label == "green"
    src = write_raster(tmp_path / "scene.tif", scene(), nodata=0)
    res = classify(model, src, classes, tile=50, out=tmp_path / "cls")
    tiles = gpd.read_file(res.outputs["tiles"])
    assert tiles.crs.to_epsg() == 32618
    by_cell = {(r.row, r.col): r.label for r in tiles.itertuples()}
    assert by_cell[(0, 0)] == "red" and by_cell[(2, 3)] == "green" and by_cell[(3, 5)] == "blue"
    assert (0, 5) not in by_cell  # the nodata corner is not classified
    with rasterio.open(res.outputs["labels"]) as ds:
        lab = ds.read(1)
        assert lab.shape == (4, 6) and lab[0, 0] == 0 and lab[0, 5] == 255
        assert ds.transform.a == 0.5 * 50


# --- SegEarth-OV variant: CLS correction and low-confidence background ---------------------


class ClsColourModel(ColourModel):
    """ColourModel whose dense pass also returns a CLS embedding: the image's mean colour."""

    def dense_features(self, images, return_cls=False):
        f = super().dense_features(images)
        if not return_cls:
            return f
        cls = torch.nn.functional.normalize(torch.as_tensor(images).float().mean(dim=(2, 3)) + 1e-3, dim=-1)
        return f, cls


def grey_scene() -> np.ndarray:
    img = scene()
    img[:, 150:, :] = 90  # a grey band at the bottom: every colour word scores the same there
    return img


def test_threshold_sends_low_confidence_pixels_to_an_added_background_class(tmp_path):
    src = write_raster(tmp_path / "scene.tif", grey_scene(), nodata=0)
    res = segment(ColourModel(), src, parse_class_list("red, green, blue"), tmp_path / "out",
                  tile=64, overlap=16, threshold=0.5, probabilities=True)
    assert res.classes == ["red", "green", "blue", "background"]
    with rasterio.open(res.outputs["classes"]) as ds:
        labels = ds.read(1)
        assert json.loads(ds.tags()["classes"])["3"] == "background"
    assert (labels[160:, 10:290] == 3).all()  # grey: 1/3 each < 0.5
    assert (labels[10:140, 10:90] == 0).all() and (labels[60:140, 110:190] == 1).all()
    with rasterio.open(res.outputs["probabilities"]) as ds:
        assert ds.count == 4 and float(ds.read(4).max()) == 0.0  # the added class has no query
    assert res.settings["threshold"] == 0.5 and res.settings["background"] == "background"


def test_threshold_uses_the_lists_own_background_class(tmp_path):
    src = write_raster(tmp_path / "scene.tif", grey_scene(), nodata=0)
    res = segment(ColourModel(), src, parse_class_list("red, green|blue"), tmp_path / "out",
                  tile=64, overlap=16, threshold=0.6, background="Blue")
    assert res.classes == ["red", "green"]  # nothing appended: "blue" is a synonym of green
    with rasterio.open(res.outputs["classes"]) as ds:
        labels = ds.read(1)
    assert (labels[160:, 10:290] == 1).all()


def test_cls_correction_matches_segearth_formula():
    from rsvl.tasks.segment import DensePredictor

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    classes = parse_class_list("red, green, blue")
    plain = DensePredictor(ClsColourModel(), classes)
    corrected = DensePredictor(ClsColourModel(), classes, cls_lambda=-0.3)
    feats, cls = ClsColourModel().dense_features(imgs, return_cls=True)
    q = torch.eye(3)
    want = torch.einsum("bdhw,pd->bphw", feats, q) - 0.3 * (cls @ q.T)[:, :, None, None]
    torch.testing.assert_close(corrected.dense_logits(imgs), want)
    assert not torch.allclose(plain.dense_logits(imgs), want)
    probs = corrected(imgs)
    assert probs.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cls_correction_flips_a_globally_biased_pixel():
    from rsvl.tasks.segment import DensePredictor

    # a mostly-red image with one purple-ish patch that leans red: subtracting the red
    # image bias makes the patch blue
    img = np.zeros((1, 3, 16, 16), np.uint8)
    img[0, 0] = 200
    img[0, :, :4, :4] = np.array([200, 0, 180])[:, None, None]
    classes = parse_class_list("red, green, blue")
    before = DensePredictor(ClsColourModel(), classes)(img).argmax(axis=1)[0]
    after = DensePredictor(ClsColourModel(), classes, cls_lambda=-0.3)(img).argmax(axis=1)[0]
    assert before[0, 0] == 0 and after[0, 0] == 2
    assert (after[8:, 8:] == 0).all()


def test_cls_correction_needs_a_model_with_a_cls_token(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene(), nodata=0)
    with pytest.raises(PromptError, match="no CLS embedding") as e:
        segment(ColourModel(), src, parse_class_list("red, green"), tmp_path / "out", cls_lambda=-0.3)
    assert "--cls-lambda 0" in e.value.hint


def test_threshold_must_be_a_probability(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene(), nodata=0)
    with pytest.raises(PromptError, match="not a probability"):
        segment(ColourModel(), src, parse_class_list("red, green"), tmp_path / "out", threshold=1.5)


class OtherColourModel(ColourModel):
    """ColourModel with a learned "other" cosine of 0.9: a pure colour has cosine 1 with its
    word, grey (equal R, G, B) 0.58 with each, so grey is "other"."""

    def other_threshold(self):
        return 0.9

    def encode_text(self, texts):
        # words outside WORDS ("background", "clutter") point nowhere: only the "other" channel counts
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            if t in WORDS:
                out[i, WORDS[t]] = 1.0
        return out


def test_learned_other_takes_the_pixels_of_none_of_the_classes(tmp_path):
    src = write_raster(tmp_path / "scene.tif", grey_scene(), nodata=0)
    res = segment(OtherColourModel(), src, parse_class_list("red, green, blue"), tmp_path / "out", tile=64, overlap=16)
    assert res.classes == ["red", "green", "blue", "background"]
    assert res.settings["learned_other"] == "background"
    with rasterio.open(res.outputs["classes"]) as ds:
        labels = ds.read(1)
        assert json.loads(ds.tags()["classes"])["3"] == "background"
    assert (labels[160:, 10:290] == 3).all()  # grey: below the "other" cosine for every colour
    assert (labels[10:140, 10:90] == 0).all() and (labels[60:140, 110:190] == 1).all()
    # --no-other: the same grey pixels are forced into a colour
    off = segment(OtherColourModel(), src, parse_class_list("red, green, blue"), tmp_path / "off", tile=64,
                  overlap=16, other=False)
    assert off.classes == ["red", "green", "blue"] and off.settings["learned_other"] is None
    with rasterio.open(off.outputs["classes"]) as ds:
        assert (ds.read(1)[160:, 10:290] < 3).all()


def test_learned_other_joins_the_lists_background_class(tmp_path):
    from rsvl.tasks.segment import DensePredictor

    src = write_raster(tmp_path / "scene.tif", grey_scene(), nodata=0)
    classes = parse_class_list("red, green|background, blue")
    res = segment(OtherColourModel(), src, classes, tmp_path / "out", tile=64, overlap=16, threshold=0.4)
    assert res.classes == ["red", "green", "blue"]  # nothing appended: it merged into green
    assert res.settings["learned_other"] == "green" and res.settings["background"] == "green"
    with rasterio.open(res.outputs["classes"]) as ds:
        assert (ds.read(1)[160:, 10:290] == 1).all()
    # the eval protocol's form: no class to join -> the query is not used, the list is unchanged
    p = DensePredictor(OtherColourModel(), parse_class_list("red, green, blue"), other=None, append_other=False)
    assert p.other_class is None and len(p.index) == 3 and len(p.classes) == 3
    p = DensePredictor(OtherColourModel(), parse_class_list("red, clutter|green, blue"), other=None, append_other=False)
    assert p.other_class == 1 and len(p.index) == 5 and p.index[-1] == 1  # 4 prompts + other
    logits = p.dense_logits(np.zeros((1, 3, 8, 8), np.uint8))
    assert logits.shape == (1, 5, 2, 2) and bool((logits[:, 4] == 0.9).all())


def test_learned_other_required_from_a_model_without_one(tmp_path):
    src = write_raster(tmp_path / "scene.tif", scene(), nodata=0)
    with pytest.raises(PromptError, match="no learned 'other' class") as e:
        segment(ColourModel(), src, parse_class_list("red, green, blue"), tmp_path / "out", other=True)
    assert "--no-other" in e.value.hint
    assert not (tmp_path / "out_classes.tif").exists()
    # default (None): a model without one runs as before
    res = segment(ColourModel(), src, parse_class_list("red, green, blue"), tmp_path / "out", tile=64, overlap=16)
    assert res.classes == ["red", "green", "blue"] and res.settings["learned_other"] is None
