"""rsvl instances end to end with a model whose answers are known.

SquareModel "detects" every pure-white region of a tile as one instance of the class its
green channel names (255: airplane, 254: ship), with the mask clipped at the tile border,
exactly what a real model does with an object cut by a tile. The tests check the task's
plumbing: the cross-tile merge, map coordinates, outputs and errors.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import shared_data, write_raster
from PIL import Image
from rasterio.transform import from_origin

from rsvl.errors import InputNotFoundError, OutputError, PromptError, UnknownModelError
from rsvl.tasks.instances import Piece, instances, merge_pieces

torch.set_num_threads(1)

ORIGIN_X, ORIGIN_Y, RES = 500000.0, 4100000.0, 0.5


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


def to_map(col: float, row: float) -> tuple[float, float]:
    return ORIGIN_X + RES * col, ORIGIN_Y - RES * row


def test_object_spanning_four_tiles_comes_out_once_whole_in_map_coordinates(tmp_path):
    # 800 px, tile 512, overlap 224 -> a 2 x 2 grid (tiles at 0 and 288); the square 100..700
    # is cut by the border of every tile it is in.
    tif = write_raster(tmp_path / "scene.tif", scene(800, [(100, 100, 700, 700, 255)]),
                       transform=from_origin(ORIGIN_X, ORIGIN_Y, RES, RES))
    res = instances(SquareModel(), tif, tmp_path / "out", tile=512, overlap=224,
                    instance_tif=True)
    assert res.tiles == 4
    gdf = gpd.read_file(res.outputs["instances"])
    assert len(gdf) == 1
    assert gdf.crs.to_epsg() == 32618
    row = gdf.iloc[0]
    assert row["class"] == "airplane" and row["score"] == pytest.approx(0.9)
    x0, y1 = to_map(100, 100)
    x1, y0 = to_map(700, 700)
    assert row.geometry.bounds == pytest.approx((x0, y0, x1, y1))
    assert row.geometry.area == pytest.approx((600 * RES) ** 2)
    with rasterio.open(res.outputs["instance_tif"]) as ds:
        ids = ds.read(1)
        assert ds.crs.to_epsg() == 32618 and ds.transform == from_origin(ORIGIN_X, ORIGIN_Y, RES, RES)
    assert set(np.unique(ids)) == {0, 1}
    assert (ids[100:700, 100:700] == 1).all() and ids.sum() == 600 * 600
    assert (tmp_path / "out_overlay.png").is_file()


def test_separate_objects_and_classes_stay_separate(tmp_path):
    squares = [(100, 100, 700, 700, 255),   # airplane across all four tiles
               (720, 40, 780, 90, 254),     # a ship near the right edge, inside two tiles
               (20, 720, 60, 770, 255)]     # a small airplane in the overlap of two tiles
    tif = write_raster(tmp_path / "scene.tif", scene(800, squares),
                       transform=from_origin(ORIGIN_X, ORIGIN_Y, RES, RES))
    res = instances(SquareModel(), tif, tmp_path / "out", tile=512, overlap=224,
                    vector_format="geojson")
    assert res.instances == 3 and res.counts == {"airplane": 2, "ship": 1}
    gdf = gpd.read_file(res.outputs["instances"])
    areas = sorted(round(a / RES**2) for a in gdf.geometry.area)
    assert areas == [40 * 50, 60 * 50, 600 * 600]
    # --classes filters
    res = instances(SquareModel(), tif, tmp_path / "ships", tile=512, overlap=224,
                    classes="ship", vector_format="geojson")
    assert res.counts == {"ship": 1}


def test_merge_joins_cut_pieces_but_not_whole_neighbours():
    from shapely.geometry import box

    cut = [Piece(box(0, 0, 10, 10), 0, 0.8, True), Piece(box(5, 0, 20, 10), 0, 0.9, True)]
    (m,) = merge_pieces(cut)
    assert m.geometry.area == pytest.approx(200) and m.score == 0.9
    # two whole objects that touch slightly are different objects
    whole = [Piece(box(0, 0, 10, 10), 0, 0.8, False), Piece(box(9, 0, 19, 10), 0, 0.9, False)]
    assert len(merge_pieces(whole)) == 2
    # the same object seen whole by two tiles is one
    dup = [Piece(box(0, 0, 10, 10), 0, 0.8, False), Piece(box(0, 0, 10, 10.5), 0, 0.7, False)]
    assert len(merge_pieces(dup)) == 1
    # different classes never merge
    assert len(merge_pieces([Piece(box(0, 0, 10, 10), 0, 0.8, True),
                             Piece(box(5, 0, 15, 10), 1, 0.8, True)])) == 2


def test_plain_image_gives_overlay_and_pixel_geojson(tmp_path):
    png = tmp_path / "img.png"
    Image.fromarray(np.moveaxis(scene(200, [(10, 20, 60, 50, 255), (100, 100, 150, 180, 254)]), 0, -1)).save(png)
    res = instances(SquareModel(), png, tmp_path / "img", score=0.5)
    assert res.tiles == 1 and res.instances == 2
    doc = json.loads((tmp_path / "img_instances.geojson").read_text())
    feats = {f["properties"]["class"]: f for f in doc["features"]}
    assert feats["airplane"]["properties"]["bbox"] == [10, 20, 60, 50]
    assert feats["ship"]["properties"]["area"] == 50 * 80
    with Image.open(tmp_path / "img_overlay.png") as im:
        assert im.size == (200, 200)
    with pytest.raises(OutputError, match="exists"):
        instances(SquareModel(), png, tmp_path / "img")
    # a folder: one result per image
    res = instances(SquareModel(), tmp_path, tmp_path / "folder", overwrite=True)
    assert isinstance(res, list) and len(res) == 2  # img.png and img_overlay.png


def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        instances(SquareModel(), tmp_path / "missing.tif", tmp_path / "x")
    png = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    with pytest.raises(PromptError) as e:
        instances(SquareModel(), png, tmp_path / "x", classes="airplane,helicopter")
    assert "helicopter" in str(e.value) and "airplane, ship, storage_tank" in e.value.hint


def test_cli_errors_are_one_line(tmp_path, capsys):
    from rsvl.cli import main

    assert main(["instances", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    png = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert main(["instances", str(png), "--model", "no-such-model"]) != 0
    assert "Unknown model" in capsys.readouterr().err
    with pytest.raises(UnknownModelError):
        import rsvl

        rsvl.load("mini-instancez")


def test_shipped_weights_find_objects_on_a_real_nwpu_val_image(tmp_path):
    from rsvl.data.coco import CocoInstanceDataset, split_ids
    from rsvl.models.mini.instances import DEFAULT_WEIGHTS, load_mini_instances

    ann = shared_data("nwpu_vhr10", "instances_train.json")
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("mini-instances weights not trained yet")
    ds = CocoInstanceDataset(ann)
    _, val = split_ids(ds.image_ids, 0.15, 0)
    # the val image with the most storage tanks / planes: large, easy objects
    best = max(val, key=lambda i: len(ds.by_id(i).annotations))
    sample = ds.by_id(best)
    model = load_mini_instances()
    res = instances(model, sample.image, tmp_path / "nwpu", score=0.3)
    assert res.instances >= 1
    assert set(res.counts) <= set(model.classes)


def test_int8_export_round_trips_within_the_quantisation_step(tmp_path):
    import torch

    from rsvl.models.mini.instances import dequantize_state_dict, quantize_int8

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    back = dequantize_state_dict({"w": q, "w::scale": scale, "b": torch.ones(3)})
    assert set(back) == {"w", "b"}
    step = scale.view(-1, 1, 1, 1) / 2 + 1e-7
    assert ((back["w"] - w).abs() <= step).all()
