"""The task table of rsvl run: names, options checked on the driver, one entry per task."""

from __future__ import annotations

import pytest

from rsvl.errors import JobError, PromptError
from rsvl.scale.tasks import TASKS, block_pad, get_task, parse_bands


def test_task_names_and_aliases():
    assert set(TASKS) == {"segment", "classify", "instances", "refer", "index", "chat"}
    for name in ("index", "index build", "index-build", "Index"):
        assert get_task(name).name == "index"
    with pytest.raises(JobError, match="no task 'chatter'") as err:
        get_task("chatter")
    assert "segment" in err.value.hint


def test_options_are_checked_before_any_worker_starts():
    seg = get_task("segment")
    assert seg.check_options({"classes": "water, forest", "tile": 64, "bands": "3,2,1"})["bands"] == [3, 2, 1]
    with pytest.raises(JobError, match="segment has no option 'tiles'") as err:
        seg.check_options({"classes": "water", "tiles": 64})
    assert "min_pixels" in err.value.hint and "overwrite" not in err.value.hint
    with pytest.raises(JobError, match="needs the option 'classes'"):
        seg.check_options({})
    with pytest.raises(JobError, match="has no option 'out'"):
        seg.check_options({"classes": "water", "out": "x"})  # the runner names the outputs
    with pytest.raises(PromptError):
        seg.check_options({"classes": " , "})
    with pytest.raises(JobError, match="needs the option 'expression'"):
        get_task("refer").check_options({"tile": 512})
    assert get_task("index").check_options({"tile": 64, "min_valid": 0.2}) == {"tile": 64, "min_valid": 0.2}
    with pytest.raises(JobError, match="needs the option 'question'"):
        get_task("chat").check_options({"tile": 64})
    with pytest.raises(PromptError, match="question is empty"):
        get_task("chat").check_options({"question": "   "})
    assert get_task("chat").check_options({"question": " How  many? ", "iou": 0.3}) == {"question": "How many?", "iou": 0.3}


def test_which_outputs_each_task_merges():
    assert TASKS["segment"].rasters[:2] == ("classes", "confidence") and TASKS["segment"].block
    assert TASKS["instances"].vector_rule == "centre" and TASKS["instances"].block
    assert TASKS["classify"].table == "predictions" and not TASKS["classify"].block
    assert TASKS["index"].index and not TASKS["refer"].block


def test_bands_and_block_context():
    assert parse_bands("4, 3,2") == [4, 3, 2] and parse_bands([1, 2, 3]) == [1, 2, 3] and parse_bands(None) is None
    with pytest.raises(JobError, match="not a list of band numbers"):
        parse_bands("red")
    assert block_pad(TASKS["segment"], {"tile": 256}) == 256 and block_pad(TASKS["segment"], {}) == 512


def test_a_chat_item_writes_its_boxes_and_one_row(tmp_path):
    """One raster through the chat entry: the combined answer as the item's row, the boxes in
    map coordinates as its vector file (what the run joins with a source column)."""
    import geopandas as gpd
    import numpy as np
    from conftest import write_raster
    from scipy import ndimage

    from rsvl.models.chat import Box, ChatAnswer

    class BrightChat:  # the objects are the bright patches; counts in words with one box each
        name, image_size = "bright-chat", 64

        def chat(self, image, question, **_):
            h, w = image.shape[:2]
            labels, n = ndimage.label(image.mean(2) > 128)
            boxes = [Box(sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h)
                     for sl in ndimage.find_objects(labels)]
            return ChatAnswer(["No roofs.", "One roof.", "Two roofs."][n], boxes)

    a = np.full((3, 64, 128), 20, np.uint8)
    a[:, 10:20, 10:20] = 250
    a[:, 40:50, 90:100] = 250
    src = write_raster(tmp_path / "scene.tif", a)
    spec = get_task("chat")
    opts = spec.check_options({"question": "How many roofs are there?", "tile": 64, "overlap": 0})
    res = spec.run(BrightChat(), str(src), tmp_path / "item", opts)
    (row,) = res["rows"]
    assert (row["kind"], row["number"], row["boxes"]) == ("count", 2, 2)
    assert set(res["outputs"]) == {"vectors"}
    assert len(gpd.read_file(res["outputs"]["vectors"])) == 2
