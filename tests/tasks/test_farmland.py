"""Language-guided segmentation of rasters (rsvl segment --model mini-fsvlm "..."): outputs,
blending, areas, the recorded answer, requests, errors; with a fake SegChatModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from conftest import write_raster

from rsvl.errors import OutputError, PromptError
from rsvl.models.segchat import SegAnswer, SegChatModel
from rsvl.tasks.farmland import request_target, segment_request


class BrightFields:
    """A fake language-guided model: the requested class is whatever is bright; it answers
    with [SEG] only when asked to segment something."""

    name = "bright-fields"

    def __init__(self, image_size: int = 64) -> None:
        self.image_size = image_size
        self.calls = []

    def seg_chat(self, image, prompt, *, max_new_tokens=32, force_seg=False):
        self.calls.append((image.shape, prompt, force_seg))
        logits = (image.mean(axis=2).astype(np.float32) - 127.5) / 8.0
        if force_seg or "segment" in prompt.lower():
            return SegAnswer(text="Sure, [SEG].", masks=[logits])
        return SegAnswer(text="It is a field.")


def _scene(h=150, w=230):
    a = np.full((3, h, w), 30, np.uint8)
    a[:, 20:90, 40:160] = 220  # a 70 x 120 px bright field
    return a


def test_the_fake_model_is_a_segchat_model():
    assert isinstance(BrightFields(), SegChatModel)


def test_raster_outputs_classes_probability_polygons_areas_and_answer(tmp_path):
    src = write_raster(tmp_path / "scene.tif", _scene())  # 0.5 m pixels, EPSG:32618
    model = BrightFields()
    res = segment_request(model, src, "This is a 0.5 m image. Please segment the farmland.", tmp_path / "scene_out",
                          tile=64, overlap=16)
    assert res.target == "farmland" and res.answer == "Sure, [SEG]."
    with rasterio.open(res.outputs["classes"]) as ds:
        classes = ds.read(1)
        tags = ds.tags()
        assert ds.crs.to_epsg() == 32618 and ds.transform.a == 0.5
        cmap = ds.colormap(1)
    assert json.loads(tags["classes"]) == {"0": "background", "1": "farmland"}
    assert tags["answer"] == "Sure, [SEG]." and "segment the farmland" in tags["request"]
    assert cmap[1][:3] != cmap[0][:3]
    expected = (_scene()[0] > 127).astype(np.uint8)
    assert (classes == expected).mean() > 0.995  # blended tiles reproduce the field
    with rasterio.open(res.outputs["probability"]) as ds:
        prob = ds.read(1)
    assert prob[50, 100] > 250 and prob[120, 10] < 5
    import geopandas as gpd

    gdf = gpd.read_file(res.outputs["polygons"])
    assert len(gdf) == 1 and gdf["class"].iloc[0] == "farmland"
    assert gdf["area_m2"].iloc[0] == pytest.approx(70 * 120 * 0.25, rel=0.02)
    assert gdf["area_ha"].iloc[0] == pytest.approx(70 * 120 * 0.25 / 1e4, rel=0.02)
    assert res.hectares == pytest.approx(0.21, rel=0.02)
    assert res.fraction == pytest.approx(70 * 120 / (150 * 230), rel=0.02)
    assert res.tiles > 4
    # the answer is generated once; every window is segmented with [SEG] forced
    assert sum(1 for _, _, forced in model.calls if not forced) == 1
    assert sum(1 for _, _, forced in model.calls if forced) == res.tiles


def test_plain_png_has_no_areas(tmp_path):
    from PIL import Image

    path = tmp_path / "chip.png"
    Image.fromarray(np.transpose(_scene(64, 64), (1, 2, 0))).save(path)
    res = segment_request(BrightFields(), path, "Please segment the storage tanks.", tmp_path / "chip")
    assert res.target == "storage tanks" and res.hectares is None
    assert res.tiles == 1


def test_a_model_that_does_not_answer_with_seg_is_reported_and_forced(tmp_path, capsys):
    src = write_raster(tmp_path / "scene.tif", _scene(64, 64))
    res = segment_request(BrightFields(), src, "What is in this image?", tmp_path / "o")
    assert res.answer == "It is a field." and res.polygons == 1
    assert "without [SEG]" in capsys.readouterr().err


@pytest.mark.parametrize("request_text, target", [
    ("This is a remote sensing image. Please segment farmland", "farmland"),
    ("{desc} What is the farmland in this image? Please output segmentation mask.", "farmland"),
    ("Please segment the storage tanks.", "storage tanks"),
    ("A 1 m scene. Can you segment all ships in this image?", "ships"),
    ("Segment the ground track field.", "ground track field"),
    ("Show me the water", "target"),
])
def test_request_target(request_text, target):
    assert request_target(request_text) == target


def test_errors_before_any_work(tmp_path):
    src = write_raster(tmp_path / "scene.tif", _scene(64, 64))
    model = BrightFields()
    with pytest.raises(PromptError, match="empty"):
        segment_request(model, src, "   ", tmp_path / "o")
    with pytest.raises(PromptError, match="threshold"):
        segment_request(model, src, "Please segment the farmland.", tmp_path / "o", threshold=1.0)
    (tmp_path / "o_classes.tif").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists"):
        segment_request(model, src, "Please segment the farmland.", tmp_path / "o")
    assert (tmp_path / "o_classes.tif").read_bytes() == b"keep me"
    assert model.calls == []
