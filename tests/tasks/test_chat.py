"""rsvl chat: one answer for an image, windows of a raster combined by the kind of question."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import shared_data, write_raster
from PIL import Image
from rasterio.transform import from_origin
from scipy import ndimage

from rsvl.errors import BandSelectionError, InputNotFoundError, OutputError, PromptError
from rsvl.models.chat import Box, ChatAnswer, ChatModel
from rsvl.tasks.chat import ChatSession, chat

ORIGIN = from_origin(500000.0, 4100000.0, 0.5, 0.5)
NUMBERS = ["no", "one", "two", "three", "four"]


class BrightChat:
    """A deterministic chat model: the objects are the bright patches of the image.

    Counts are answered in words, with one box per patch (unless ``boxes`` is False);
    "is there" with yes/no; "where" with the boxes; anything else with the image size.
    Every call is recorded (question, history, image shape)."""

    name = "bright-chat"
    image_size = 64

    def __init__(self, boxes: bool = True) -> None:
        self.boxes = boxes
        self.calls: list[tuple[str, list[tuple[str, str]], tuple[int, ...]]] = []

    def chat(self, image, question, *, history=(), task=None, max_new_tokens=256, temperature=0.0,
             on_text=None):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.calls.append((question, [tuple(t) for t in history], image.shape))
        h, w = image.shape[:2]
        labels, n = ndimage.label(image.mean(2) > 128)
        found = [Box(sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h, label="roof")
                 for sl in ndimage.find_objects(labels)]
        q = question.lower()
        if "how many" in q:
            return ChatAnswer(f"There are {NUMBERS[n]} bright roofs.", found if self.boxes else [])
        if q.startswith("is there"):
            return ChatAnswer("Yes, there is." if n else "No.")
        if q.startswith("where"):
            return ChatAnswer(" ".join(f"roof [{b.x1:.2f}, {b.y1:.2f}, {b.x2:.2f}, {b.y2:.2f}]" for b in found), found)
        if "before" in q:
            return ChatAnswer(history[-1][0] if history else "nothing")
        return ChatAnswer(f"an image of {w}x{h} pixels with {n} bright patches", new_tokens=7)


def _scene(h: int, w: int, patches: list[tuple[int, int, int, int]]) -> np.ndarray:
    a = np.full((3, h, w), 20, np.uint8)
    for r0, r1, c0, c1 in patches:
        a[:, r0:r1, c0:c1] = 250
    return a


#: a 90 x 90 raster cut into 2 x 2 windows of 64 px with 28 px overlap (stride 36): the
#: windows start at 0 and 36 and the second ones are 54 px inside the raster. A is seen by
#: window 0 only, C (in the overlap of all four) by every window, B by window 3 only.
A, C, B = (5, 15, 5, 15), (40, 50, 42, 52), (75, 85, 70, 86)


@pytest.fixture
def scene(tmp_path):
    return write_raster(tmp_path / "scene.tif", _scene(90, 90, [A, C, B]), transform=ORIGIN)


def test_fake_model_is_a_chat_model():
    assert isinstance(BrightChat(), ChatModel)


def test_image_file_is_one_call_with_boxes_in_pixels(tmp_path):
    png = tmp_path / "chip.png"
    Image.fromarray(_scene(40, 60, [(10, 20, 30, 45)]).transpose(1, 2, 0)).save(png)
    model = BrightChat()
    res = chat(model, png, "  How many   bright roofs are there? ")
    assert len(model.calls) == 1 and model.calls[0][2] == (40, 60, 3)
    assert res.question == "How many bright roofs are there?" and res.kind == "count"
    assert res.answer == "There are one bright roofs." and res.number == 1 and res.yes is None
    assert res.boxes == [pytest.approx({"x1": 30.0, "y1": 10.0, "x2": 45.0, "y2": 20.0, "angle": 0.0, "label": "roof"})]
    assert res.windows == [] and res.combined == "one answer for the whole image"
    assert res.settings["windowed"] is False and res.settings["model"] == "bright-chat"
    json.dumps(res.to_dict())  # the --json document


def test_arrays_in_every_layout_give_the_same_answer():
    hwc = _scene(40, 60, [(10, 20, 30, 45)]).transpose(1, 2, 0)
    model = BrightChat()
    for image in (hwc, hwc.transpose(2, 0, 1), Image.fromarray(hwc)):
        res = chat(model, image, "Where is the roof?")
        assert res.kind == "grounding" and res.boxes[0]["x1"] == pytest.approx(30.0)
        assert res.boxes[0]["y2"] == pytest.approx(20.0)
    assert [c[2] for c in model.calls] == [(40, 60, 3)] * 3
    with pytest.raises(BandSelectionError, match="float32"):
        chat(model, hwc.astype(np.float32), "Where is the roof?")


def test_raster_counts_remove_duplicates_across_overlaps_by_box_iou(scene):
    model = BrightChat()
    res = chat(model, scene, "How many bright roofs are there?", tile=64, overlap=28)
    # windows 0 and 3 see two patches, 1 and 2 one: 6 boxes, C four times
    assert [w["number"] for w in res.windows] == [2, 1, 1, 2]
    assert res.number == 3 and res.answer == "3"
    assert res.combined == "summed over 4 windows, 3 duplicates across overlaps removed by box IoU >= 0.5"
    assert sorted(c[2] for c in model.calls) == [(54, 54, 3), (54, 64, 3), (64, 54, 3), (64, 64, 3)]
    assert len(res.boxes) == 6 and len({b["group"] for b in res.boxes}) == 3
    c_boxes = [b for b in res.boxes if b["group"] == res.boxes[1]["group"]]
    assert len(c_boxes) == 4  # C: cols 42-52, rows 40-50 in every window
    for b in c_boxes:
        assert (b["x1"], b["y1"], b["x2"], b["y2"]) == pytest.approx((500021.0, 4099975.0, 500026.0, 4099980.0))


def test_raster_counts_without_boxes_use_each_windows_core(scene):
    res = chat(BrightChat(boxes=False), scene, "How many bright roofs are there?", tile=64, overlap=28)
    # the overlap [36, 64) is split at 36 + 14 = 50: window cores are 50 x 50, 40 x 50,
    # 50 x 40 and 40 x 40 pixels of windows with 64 x 64, 54 x 64, 64 x 54, 54 x 54 valid pixels
    raw = 2 * 2500 / 4096 + 1 * 2000 / 3456 + 1 * 2000 / 3456 + 2 * 1600 / 2916
    assert [w["core"] for w in res.windows] == pytest.approx([2500 / 4096, 2000 / 3456, 2000 / 3456, 1600 / 2916], abs=1e-4)
    assert res.number == round(raw) == 3
    assert "using only each window's core" in res.combined and f"{raw:.3g} -> 3" in res.combined


def test_raster_counts_without_overlap_are_summed(scene):
    res = chat(BrightChat(boxes=False), scene, "How many bright roofs are there?", tile=45, overlap=0)
    # 45 px windows: A in window 0, C in windows 0, 1, 2, 3 (cut by both borders), B in 3
    assert res.number == sum(w["number"] for w in res.windows) and res.number == 6
    assert res.combined == "summed over 4 windows (no overlap)"


def test_yes_no_is_any_yes_and_names_the_windows(tmp_path):
    only_b = write_raster(tmp_path / "b.tif", _scene(90, 90, [B]), transform=ORIGIN)
    res = chat(BrightChat(), only_b, "Is there a bright roof?", tile=64, overlap=28)
    assert res.kind == "yesno" and res.yes is True and res.answer == "yes"
    assert [w["yes"] for w in res.windows] == [False, False, False, True]
    assert res.combined == "any-yes over 4 windows: 1 said yes (windows 3)"
    dark = write_raster(tmp_path / "dark.tif", _scene(90, 90, []), transform=ORIGIN)
    res = chat(BrightChat(), dark, "Is there a bright roof?", tile=64, overlap=28)
    assert res.yes is False and res.answer == "no" and res.combined == "any-yes over 4 windows: none said yes"


def test_grounding_boxes_land_on_the_map_and_read_back(scene, tmp_path):
    import geopandas as gpd

    out = tmp_path / "roofs.gpkg"
    res = chat(BrightChat(), scene, "Where are the bright roofs?", tile=64, overlap=28, out=out)
    assert res.kind == "grounding" and res.outputs == {"vectors": str(out)}
    assert res.answer == "6 boxes in 4 of 4 windows"
    assert "map coordinates (EPSG:32618); 3 distinct" in res.combined
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 32618 and len(gdf) == 6
    assert set(gdf.columns) >= {"window", "label", "answer", "group", "question", "geometry"}
    # B by hand: window 3 starts at pixel (36, 36); the model saw its 54 x 54 part and
    # boxed cols 34-50, rows 39-49 of it, i.e. raster cols 70-86, rows 75-85:
    # x = 500000 + 0.5 col, y = 4100000 - 0.5 row
    b = gdf[(gdf["window"] == 3) & (gdf.geometry.bounds["minx"] > 500030)]
    assert len(b) == 1 and b.iloc[0]["label"] == "roof" and b.iloc[0]["answer"].startswith("roof [")
    assert b.geometry.iloc[0].bounds == pytest.approx((500035.0, 4099957.5, 500043.0, 4099962.5))
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_describe_writes_one_row_per_window(scene, tmp_path):
    out = tmp_path / "windows.csv"
    res = chat(BrightChat(), scene, "Describe this image.", tile=64, overlap=28, out=out)
    assert res.kind == "describe" and res.combined == "one answer per window (4 windows), not merged"
    assert res.answer.splitlines()[0] == "[window 0] an image of 64x64 pixels with 2 bright patches"
    rows = list(csv.DictReader(out.open()))
    assert [r["window"] for r in rows] == ["0", "1", "2", "3"]
    assert [float(rows[3][k]) for k in ("minx", "miny", "maxx", "maxy")] == [500018.0, 4099955.0, 500045.0, 4099982.0]
    assert rows[3]["answer"] == "an image of 54x54 pixels with 2 bright patches"
    assert res.settings["tokens"]["new"] == 28
    with pytest.raises(OutputError, match="exists"):
        chat(BrightChat(), scene, "Describe this image.", tile=64, overlap=28, out=out)
    chat(BrightChat(), scene, "Describe this image.", tile=64, overlap=28, out=out, overwrite=True)


def test_default_window_is_the_model_input_at_its_gsd(scene, capsys):
    model = BrightChat()
    model.preferred_gsd = 1.0  # 0.5 m raster -> 45 x 45 px working grid: one 64 px window
    res = chat(model, scene, "Describe this image.")
    assert res.settings["tile"] == 64 and res.settings["overlap"] == 8 and res.settings["target_gsd"] == 1.0
    assert len(res.windows) == 1 and model.calls[0][2] == (45, 45, 3)
    assert "resampling 0.5 m -> 1 m" in capsys.readouterr().err
    res = chat(model, scene, "Describe this image.", gsd=0)  # native: 90 px, two windows a side
    assert len(res.windows) == 4 and res.settings["target_gsd"] is None


def test_session_keeps_history_per_image_and_per_window(tmp_path, scene):
    png = tmp_path / "chip.png"
    Image.fromarray(_scene(40, 60, [(10, 20, 30, 45)]).transpose(1, 2, 0)).save(png)
    model = BrightChat()
    session = ChatSession(model, png)
    first = session.ask("How many bright roofs are there?")
    second = session.ask("What did I ask before?")
    assert model.calls[1][1] == [("How many bright roofs are there?", first.answer)]
    assert second.answer == "How many bright roofs are there?"
    model = BrightChat()
    session = ChatSession(model, scene, tile=64, overlap=28)
    first = session.ask("How many bright roofs are there?")
    session.ask("What did I ask before?")
    later = model.calls[4:]
    assert len(later) == 4
    # each window sees its own earlier answer, not the combined one
    by_window = {w["window"]: w["answer"] for w in first.windows}
    assert sorted(c[1][0][1] for c in later) == sorted(by_window.values())
    assert all(c[1][0][0] == "How many bright roofs are there?" for c in later)


def test_errors_before_any_window(tmp_path, scene):
    with pytest.raises(PromptError, match="question is empty"):
        chat(BrightChat(), scene, "   ")
    with pytest.raises(InputNotFoundError, match="no such file"):
        chat(BrightChat(), tmp_path / "missing.tif", "Describe this image.")
    odd = write_raster(tmp_path / "odd.gpkg", _scene(20, 20, []), transform=ORIGIN)  # a GeoTIFF named .gpkg
    with pytest.raises(OutputError, match="would replace"):
        chat(BrightChat(), odd, "Describe this image.", out=odd, overwrite=True)
    with pytest.raises(OutputError, match="unknown output format"):
        chat(BrightChat(), scene, "Describe this image.", out=tmp_path / "x.txt")
    with pytest.raises(PromptError, match="temperature"):
        chat(BrightChat(), scene, "Describe this image.", temperature=-1)
    with pytest.raises(PromptError, match="max-new-tokens"):
        chat(BrightChat(), scene, "Describe this image.", max_new_tokens=0)


def test_windows_without_a_valid_pixel_are_not_asked(tmp_path):
    half = _scene(90, 90, [A])
    half[:, :, 45:] = 0  # nodata: the right column of 45 px windows
    src = write_raster(tmp_path / "half.tif", half, transform=ORIGIN, nodata=0)
    model = BrightChat()
    res = chat(model, src, "Describe this image.", tile=45, overlap=0)
    assert [w["window"] for w in res.windows] == [0, 2] and len(model.calls) == 2
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 90, 90), np.uint8), transform=ORIGIN, nodata=0)
    res = chat(model, empty, "Describe this image.", tile=45, overlap=0, out=tmp_path / "empty.gpkg")
    assert res.windows == [] and "no window of the raster has a valid pixel" in res.combined
    assert len(model.calls) == 2


def test_rotated_rasters_keep_the_window_geometry(tmp_path):
    import geopandas as gpd
    from affine import Affine

    rotated = ORIGIN * Affine.rotation(30)
    src = write_raster(tmp_path / "rot.tif", _scene(64, 64, [(10, 20, 30, 40)]), transform=rotated)
    out = tmp_path / "rot.geojson"
    chat(BrightChat(), src, "Where is the roof?", out=out)
    geom = gpd.read_file(out).geometry.iloc[0]
    corners = [rotated * (30, 10), rotated * (40, 10), rotated * (40, 20), rotated * (30, 20)]
    got = [c for xy in sorted(geom.exterior.coords[:-1]) for c in xy]
    assert got == pytest.approx([c for xy in sorted(corners) for c in xy])


class TreeOracle:
    """Answers "how many trees" for each window of a known grid with the annotated trees
    that lie wholly inside it (boxes as fractions of the window it is shown): what a
    perfect model would say, window by window, in the order the windows stream."""

    name = "tree-oracle"
    image_size = 160

    def __init__(self, trees, grid, height: int, width: int) -> None:
        self.trees, self.grid, self.height, self.width = trees, grid, height, width
        self.windows = iter(grid)

    def chat(self, image, question, *, history=(), task=None, max_new_tokens=256, temperature=0.0, on_text=None):
        _, _, win = next(self.windows)
        c0, r0 = int(win.col_off), int(win.row_off)
        h, w = min(160, self.height - r0), min(160, self.width - c0)
        assert image.shape == (h, w, 3)
        inside = [(x1, y1, x2, y2) for x1, y1, x2, y2 in self.trees
                  if x1 >= c0 and y1 >= r0 and x2 <= c0 + w and y2 <= r0 + h]
        boxes = [Box((x1 - c0) / w, (y1 - r0) / h, (x2 - c0) / w, (y2 - r0) / h, label="tree")
                 for x1, y1, x2, y2 in inside]
        return ChatAnswer(f"There are {len(boxes)} trees.", boxes)


@pytest.mark.realdata
def test_real_raster_counts_every_annotated_tree_once(tmp_path):
    import geopandas as gpd
    import rasterio

    from rsvl.geo.tiles import TileGrid

    tif = shared_data("geotiff", "OSBS_029.tif")
    trees = [tuple(int(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
             for r in csv.DictReader(shared_data("geotiff", "OSBS_029.csv").open())]
    with rasterio.open(tif) as ds:
        height, width, transform = ds.height, ds.width, ds.transform
    # 160 px windows overlapping by 64: every tree (at most 59 x 64 px) lies wholly in one
    grid = TileGrid(width, height, 160, 64)
    out = tmp_path / "trees.gpkg"
    res = chat(TreeOracle(trees, grid, height, width), tif, "How many trees are there?", tile=160, overlap=64,
               out=out)
    assert len(res.windows) == len(grid) == 16
    assert sum(w["number"] for w in res.windows) > len(trees)  # trees in overlaps, seen twice or more
    assert res.number == len(trees) == 61
    assert f"{sum(w['number'] for w in res.windows) - 61} duplicates" in res.combined
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 32617 and gdf["group"].nunique() == 61
    got = sorted(tuple(round(v, 6) for v in g.bounds) for g in gdf.drop_duplicates("group").geometry)
    want = sorted(tuple(round(v, 6) for v in (*(transform * (x1, y2)), *(transform * (x2, y1))))
                  for x1, y1, x2, y2 in trees)
    assert got == want
