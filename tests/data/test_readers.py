"""Class lists and dataset readers: small fixtures written here, plus the real shared data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvl.data.classes import (
    BUILTIN_CLASS_FILES,
    ClassSpec,
    builtin_class_file,
    expand_synonyms,
    format_class_list,
    load_classes,
    parse_class_list,
    read_class_file,
)
from rsvl.data.datasets import (
    FARSLIP_CAPTION_PREFIX,
    SEG_PRESETS,
    CocoInstanceDataset,
    KarpathyCaptionDataset,
    RetrievalCsvDataset,
    SceneCsvDataset,
    SceneFolderDataset,
    SegmentationDataset,
    UCMJsonDataset,
    segmentation_preset,
)
from rsvl.errors import DatasetError, InputNotFoundError, PromptError
from rsvl.metrics import ConfusionMatrix, retrieval_ground_truth

SHARED = Path(__file__).parents[2] / "../shared/data"


def _img(path: Path, size=(8, 6), value=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, arr) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------
# class lists
# ---------------------------------------------------------------------------------------


def test_parse_inline_class_list():
    specs = parse_class_list("farmland|cropland, forest|trees, river ,  residential  area ")
    assert [s.name for s in specs] == ["farmland", "forest", "river", "residential area"]
    assert specs[0] == ClassSpec("farmland", ("farmland", "cropland"))
    assert specs[2].synonyms == ("river",)
    names, idx = expand_synonyms(specs)
    assert names == ["farmland", "cropland", "forest", "trees", "river", "residential area"]
    assert idx == [0, 0, 1, 1, 2, 3]
    assert parse_class_list(format_class_list(specs)) == specs
    assert [s.name for s in parse_class_list("a, b,")] == ["a", "b"]  # one trailing comma ok


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a,,b", "empty"),
        ("a|, b", "empty synonym"),
        ("forest|trees, trees", "appears in class 1 and class 2"),
        ("a, b\nc", "one line"),
    ],
)
def test_parse_inline_errors_say_what_to_type(text, match):
    with pytest.raises(PromptError, match=match) as e:
        parse_class_list(text)
    assert "|" in str(e.value) or "class file" in str(e.value)


def test_class_file_syntax(tmp_path):
    f = tmp_path / "cls.txt"
    f.write_text("# my classes\nbackground\n\ntree,forest\nwater | river\n", encoding="utf-8")
    specs = read_class_file(f)
    assert [s.synonyms for s in specs] == [("background",), ("tree", "forest"), ("water", "river")]
    assert load_classes(file=f) == specs
    assert load_classes(file=str(f)) == specs
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(PromptError, match="no classes"):
        read_class_file(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text("tree,,forest\n")
    with pytest.raises(PromptError, match="empty synonym"):
        read_class_file(tmp_path / "bad.txt")
    with pytest.raises(InputNotFoundError, match="Class file not found"):
        read_class_file(tmp_path / "nope.txt")


def test_load_classes_needs_exactly_one_source(tmp_path):
    with pytest.raises(PromptError, match="No classes"):
        load_classes()
    with pytest.raises(PromptError, match="not both"):
        load_classes(inline="a", file=tmp_path / "x.txt")
    assert [s.name for s in load_classes("a|b, c")] == ["a", "c"]


# content of SegEarth-OV / RS-OVSS configs/cls_*.txt (reference notes 1.5)
EXPECTED_CLASS_FILES = {
    "loveda": "background|building,roof,house|road|water|barren|forest|agricultural",
    "openearthmap": "background|bareland,barren|grass|pavement|road|tree,forest|water,river|cropland|building,roof,house",
    "potsdam": "road,parking lot|building|low vegetation|tree|car|clutter,background",
    "vaihingen": "impervious surface|building|low vegetation|tree|car|clutter",
    "udd5": "vegetation|building|road|vehicle|background",
    "vdd": "background|facade|road|vegetation|vehicle|roof|water",
    "uavid": "background|building|road|car|tree|vegetation|human",
    "isaid": "background|ship|store tank|baseball diamond|tennis court|basketball court|ground track field|bridge|large vehicle|small vehicle|helicopter|swimming pool|roundabout|soccer ball field|plane|harbor",
    "whu_building": "background|building,roof,house",  # rsvl's own (WHU building preset)
}


@pytest.mark.parametrize("name", BUILTIN_CLASS_FILES)
def test_builtin_class_files_are_the_upstream_ones(name):
    text = builtin_class_file(name).read_text(encoding="utf-8")
    assert text.splitlines() == EXPECTED_CLASS_FILES[name].split("|")
    specs = load_classes(builtin=name)
    assert [",".join(s.synonyms) for s in specs] == EXPECTED_CLASS_FILES[name].split("|")


def test_builtin_class_file_lookup():
    assert (
        builtin_class_file("iSAID").read_text() == builtin_class_file("cls_isaid.txt").read_text()
    )
    assert len(load_classes(file="loveda")) == 7  # a built-in name where no such file exists
    with pytest.raises(PromptError, match="loveda"):
        builtin_class_file("nope")


def test_classes_and_readers_do_not_import_torch():
    code = (
        "import sys, rsvl.data.classes, rsvl.data.datasets, rsvl.metrics; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    src = Path(__file__).parents[2] / "src"
    env = {"PYTHONPATH": str(src), "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------------------------------
# scene datasets
# ---------------------------------------------------------------------------------------


def _ucm_fixture(root: Path) -> Path:
    samples = []
    for c in ("beach", "river"):
        for i, split in enumerate(("train", "train", "val")):
            rel = f"images/{c}/{c}{i:02d}.jpg"
            _img(root / rel)
            samples.append(
                {
                    "image": rel,
                    "label": c,
                    "split": split,
                    "captions": [f"a {c}", f"the {c} {i}", f"a {c}"],
                }
            )
    (root / "ucm.json").write_text(
        json.dumps({"classes": ["beach", "river"], "source": "t", "samples": samples})
    )
    return root


def test_ucm_json_reader_and_splits(tmp_path):
    root = _ucm_fixture(tmp_path / "ucm")
    ds = UCMJsonDataset(root)
    assert len(ds) == 6 and ds.classes == ["beach", "river"] and ds.splits == ["train", "val"]
    assert len(UCMJsonDataset(root / "ucm.json", split="train")) == 4
    val = UCMJsonDataset(root, split="val")
    assert [s.class_name for s in val] == ["beach", "river"]
    assert val.labels().tolist() == [0, 1]
    assert val[0].image == root / "images/beach/beach02.jpg" and val[0].captions[0] == "a beach"
    assert len(UCMJsonDataset(root, split=["train", "val"])) == 6
    with pytest.raises(DatasetError, match="train"):
        UCMJsonDataset(root, split="test")
    # retrieval pairs: the duplicated "a beach" of one image collapses; shared strings dedup
    rs = val.retrieval_set(caption_prefix=FARSLIP_CAPTION_PREFIX)
    assert len(rs.images) == 2 and rs.texts[0] == "a satellite image. a beach"
    assert len(rs.pair_image) == 4 and len(rs.texts) == 4


def test_ucm_json_errors_name_the_layout(tmp_path):
    with pytest.raises(DatasetError, match="ucm.json"):
        UCMJsonDataset(tmp_path / "nothing")
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="Expected layout"):
        UCMJsonDataset(tmp_path / "x")
    (tmp_path / "x" / "ucm.json").write_text(json.dumps({"classes": ["a"]}))
    with pytest.raises(DatasetError, match="samples"):
        UCMJsonDataset(tmp_path / "x")
    (tmp_path / "x" / "ucm.json").write_text(
        json.dumps({"classes": ["a"], "samples": [{"image": "i.jpg", "label": "b"}]})
    )
    with pytest.raises(DatasetError, match="not in 'classes'"):
        UCMJsonDataset(tmp_path / "x")
    (tmp_path / "x" / "ucm.json").write_text(
        json.dumps({"classes": ["a"], "samples": [{"image": "i.jpg", "label": "a"}]})
    )
    ds = UCMJsonDataset(tmp_path / "x")  # indexing does not touch images ...
    with pytest.raises(DatasetError, match="missing"):  # ... reading them does
        list(ds)


def test_scene_folder_dataset(tmp_path):
    for c, n in (("b_river", 2), ("a_beach", 3)):
        for i in range(n):
            _img(tmp_path / c / f"{i}.png")
    (tmp_path / "a_beach" / "notes.txt").write_text("not an image")
    ds = SceneFolderDataset(tmp_path)
    assert ds.classes == ["a_beach", "b_river"]
    assert ds.labels().tolist() == [0, 0, 0, 1, 1]
    assert len(SceneFolderDataset(tmp_path, classes=["b_river"])) == 2
    with pytest.raises(DatasetError, match="one folder per class"):
        SceneFolderDataset(tmp_path, classes=["forest"])
    with pytest.raises(DatasetError, match="one folder per class"):
        SceneFolderDataset(tmp_path / "missing")


def test_scene_csv_dataset(tmp_path):
    for i in range(3):
        _img(tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "classnames.txt").write_text("baseball field\nbeach\nriver\n")
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "label"])
        w.writerows(
            [["imgs/0.jpg", "0"], ["imgs/1.jpg", "River"], ["imgs/2.jpg", "baseball_field"]]
        )
    ds = SceneCsvDataset(tmp_path / "test.csv", tmp_path / "classnames.txt")
    assert ds.labels().tolist() == [0, 2, 0]
    assert [s.image for s in ds] == [tmp_path / "imgs" / f"{i}.jpg" for i in range(3)]
    with pytest.raises(DatasetError, match="no column"):
        SceneCsvDataset(tmp_path / "test.csv", ["a"], label_key="class")
    (tmp_path / "bad.csv").write_text("filepath,label\nimgs/0.jpg,forest\n")
    with pytest.raises(DatasetError, match="forest"):
        SceneCsvDataset(tmp_path / "bad.csv", tmp_path / "classnames.txt")


# ---------------------------------------------------------------------------------------
# caption / retrieval datasets
# ---------------------------------------------------------------------------------------


def test_karpathy_json(tmp_path):
    images = []
    for i, split in enumerate(("train", "test", "test")):
        _img(tmp_path / "imgs" / f"{i}.tif")
        images.append(
            {
                "filename": f"{i}.tif",
                "imgid": i,
                "split": split,
                "sentences": [
                    {"raw": f"caption {i} a", "tokens": []},
                    {"raw": "many planes ", "tokens": []},
                ],
            }
        )
    (tmp_path / "dataset_rsitmd.json").write_text(
        json.dumps({"images": images, "dataset": "rsitmd"})
    )
    ds = KarpathyCaptionDataset(tmp_path / "dataset_rsitmd.json", split="test")
    assert len(ds) == 2 and ds.image_dir == tmp_path / "imgs"
    assert ds[0].captions == ("caption 1 a", "many planes") and ds[0].image_id == 1
    rs = ds.retrieval_set()  # "many planes" is one text with two images
    assert len(rs.texts) == 3 and rs.text_to_image() is None
    rs2 = ds.retrieval_set(dedup_texts=False)  # classic: one text per caption
    assert rs2.text_to_image().tolist() == [0, 0, 1, 1]
    # same grouping as the metric-side helper
    paths = [s.image for s in ds for _ in s.captions]
    caps = [c for s in ds for c in s.captions]
    _, texts, pi, pt = retrieval_ground_truth(paths, caps)
    assert (
        texts == rs.texts
        and pi.tolist() == rs.pair_image.tolist()
        and pt.tolist() == rs.pair_text.tolist()
    )
    with pytest.raises(DatasetError, match="image_dir"):
        KarpathyCaptionDataset(tmp_path / "dataset_rsitmd.json", image_dir=tmp_path / "nope")
    with pytest.raises(DatasetError, match="split"):
        KarpathyCaptionDataset(tmp_path / "dataset_rsitmd.json", split="val")


def test_retrieval_csv(tmp_path):
    for i in range(2):
        _img(tmp_path / "RSICD" / f"{i}.jpg")
    with open(tmp_path / "RSICD_img_txt_pairs_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(
            [
                ["RSICD/0.jpg", "a port"],
                ["RSICD/0.jpg", "boats, in a port"],
                ["RSICD/1.jpg", "a port"],
            ]
        )
    ds = RetrievalCsvDataset(tmp_path / "RSICD_img_txt_pairs_test.csv")
    assert len(ds) == 2 and ds.rows == 3
    rs = ds.retrieval_set(caption_prefix=FARSLIP_CAPTION_PREFIX)
    assert rs.texts == ["a satellite image. a port", "a satellite image. boats, in a port"]
    assert sorted(zip(rs.pair_image.tolist(), rs.pair_text.tolist(), strict=True)) == [
        (0, 0),
        (0, 1),
        (1, 0),
    ]
    with pytest.raises(DatasetError, match="title_multi_objects"):
        RetrievalCsvDataset(
            tmp_path / "RSICD_img_txt_pairs_test.csv", caption_key="title_multi_objects"
        )
    ds_bad_root = RetrievalCsvDataset(
        tmp_path / "RSICD_img_txt_pairs_test.csv", root=tmp_path / "x"
    )
    with pytest.raises(DatasetError, match="root="):
        ds_bad_root[0]


# ---------------------------------------------------------------------------------------
# segmentation datasets
# ---------------------------------------------------------------------------------------


def test_mmseg_layout_with_reduce_zero_label(tmp_path):
    raw = np.array([[0, 1, 2], [3, 255, 7]])
    for name in ("a", "b"):
        _img(tmp_path / "img_dir" / "val" / f"{name}.png", size=(3, 2))
        _mask(tmp_path / "ann_dir" / "val" / f"{name}.png", raw)
    ds = SegmentationDataset.mmseg(tmp_path, "val", classes=list("abcdefg"), reduce_zero_label=True)
    assert [s.name for s in ds] == ["a", "b"] and ds.num_classes == 7
    np.testing.assert_array_equal(ds.read_label(0), [[255, 0, 1], [2, 255, 6]])
    assert ds.read_image(ds[1]).shape == (2, 3, 3)
    plain = SegmentationDataset.mmseg(tmp_path, "val")
    np.testing.assert_array_equal(plain.read_label(0), raw)
    # suffixes as mmseg's img_suffix / seg_map_suffix
    _img(tmp_path / "s" / "img_dir" / "val" / "x.jpg", size=(3, 2))
    _mask(tmp_path / "s" / "ann_dir" / "val" / "x_gt.png", raw)
    ds2 = SegmentationDataset.mmseg(tmp_path / "s", img_suffix=".jpg", seg_map_suffix="_gt.png")
    assert ds2[0].label.name == "x_gt.png"
    with pytest.raises(DatasetError, match="ann_dir"):
        SegmentationDataset.mmseg(tmp_path, "train")


def test_segmentation_layout_errors(tmp_path):
    _img(tmp_path / "images" / "a.png", size=(3, 2))
    _img(tmp_path / "images" / "b.png", size=(3, 2))
    _mask(tmp_path / "labels" / "a.png", np.zeros((2, 3)))
    with pytest.raises(DatasetError, match="1 image.*no label.*b.png"):
        SegmentationDataset.simple(tmp_path)
    _img(tmp_path / "labels" / "b.png", size=(3, 2))  # a colour image where a mask should be
    ds = SegmentationDataset.simple(tmp_path)
    with pytest.raises(DatasetError, match="index mask"):
        ds.read_label(1)
    with pytest.raises(DatasetError, match="images/"):
        segmentation_preset("loveda", tmp_path / "nowhere")


def test_binary_labels(tmp_path):
    _img(tmp_path / "train" / "image" / "0.tif", size=(3, 2))
    (tmp_path / "train" / "label").mkdir()
    bits = Image.fromarray(np.array([[0, 255, 0], [255, 0, 0]], np.uint8)).convert("1")
    bits.save(tmp_path / "train" / "label" / "0.tif")  # 1-bit TIFF, as the WHU masks
    ds = segmentation_preset("whu_building", tmp_path, split="train")
    np.testing.assert_array_equal(ds.read_label(0), [[0, 1, 0], [1, 0, 0]])
    with pytest.raises(DatasetError, match="train"):
        segmentation_preset("whu_building", tmp_path)


# ---------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------


def test_coco_reader_keeps_1_based_ids(tmp_path):
    _img(tmp_path / "images" / "001.jpg", size=(20, 10))
    _img(tmp_path / "images" / "002.jpg", size=(20, 10))
    data = {
        "images": [
            {"id": 5, "file_name": "001.jpg", "width": 20, "height": 10},
            {"id": 7, "file_name": "002.jpg", "width": 20, "height": 10},
        ],
        "categories": [{"id": 1, "name": "airplane"}, {"id": 2, "name": "ship"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 2,
                "bbox": [2, 1, 4, 3],
                "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]],
                "area": 12,
            },
            {
                "id": 2,
                "image_id": 5,
                "category_id": 1,
                "bbox": [10, 2, 5, 5],
                "segmentation": [[10, 2, 15, 2, 15, 7, 10, 7]],
                "area": 25,
            },
        ],
    }
    (tmp_path / "instances_train.json").write_text(json.dumps(data))
    ds = CocoInstanceDataset(tmp_path / "instances_train.json")
    assert ds.cat_ids == [1, 2] and ds.classes == ["airplane", "ship"]
    s = ds.by_id(5)
    assert [a["category_id"] for a in s.annotations] == [2, 1]  # kept as in the file
    assert ds.labels(s).tolist() == [1, 0] and ds.cat_id_of(1) == 2
    np.testing.assert_allclose(ds.boxes_xyxy(s)[0], [2, 1, 6, 4])
    m = ds.masks(s)
    assert m.shape == (2, 10, 20) and m[0, 2, 3] and not m[0, 8, 12]
    assert ds[1].image_id == 7 and ds.masks(ds[1]).shape == (0, 10, 20)
    assert len(ds.subset([7])["annotations"]) == 0
    (tmp_path / "images" / "002.jpg").unlink()
    with pytest.raises(DatasetError, match="missing"):
        list(ds)
    with pytest.raises(DatasetError, match="Image folder not found"):
        CocoInstanceDataset(tmp_path / "instances_train.json", image_dir=tmp_path / "none")
    bad = dict(data, annotations=[dict(data["annotations"][0], category_id=3)])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="undeclared categories"):
        CocoInstanceDataset(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------
# the real shared data
# ---------------------------------------------------------------------------------------


def _need(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(
            f"real data not available: {p.resolve()} is missing (see ../shared/data/README.md)"
        )
    return p


@pytest.mark.realdata
def test_real_ucm():
    root = _need("ucm/ucm.json").parent
    ds = UCMJsonDataset(root)
    assert len(ds) == 1440 and len(ds.classes) == 16
    assert len(UCMJsonDataset(root, "train")) == 1283 and len(UCMJsonDataset(root, "val")) == 157
    assert all(len(s.captions) == 5 for s in ds.samples)
    ds.check_files()
    counts = np.bincount(ds.labels(), minlength=16)
    assert counts.sum() == 1440 and counts.min() > 0


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["loveda", "potsdam", "vaihingen"])
def test_real_semseg_labels(name):
    root = _need(f"semseg/{name}")
    ds = segmentation_preset(name, root)
    pr = SEG_PRESETS[name]
    assert len(load_classes(builtin=pr.class_file)) == len(pr.classes) == ds.num_classes
    cm = ConfusionMatrix(ds.num_classes)
    for s in ds:
        lab = ds.read_label(s)
        img = ds.read_image(s)
        assert img.shape[:2] == lab.shape
        values = set(np.unique(lab).tolist())
        assert values <= set(range(ds.num_classes)) | {255}
        cm.update(lab, lab)
    rep = cm.report(pr.classes)
    present = [v for v in rep["IoU"].values() if not np.isnan(v)]
    assert present and all(v == 1.0 for v in present)
    if name != "loveda":
        # ISPRS masks: raw 0 is the thin boundary outline, ignored after reduce_zero_label
        raw = np.asarray(Image.open(ds[0].label))
        assert (ds.read_label(0) == 255).sum() == (raw == 0).sum() > 0


@pytest.mark.realdata
def test_real_whu_building():
    root = _need("semseg/whu_building")
    ds = segmentation_preset("whu_building", root, split="train")
    assert len(ds) >= 1 and set(np.unique(ds.read_label(len(ds) - 1)).tolist()) <= {0, 1}


@pytest.mark.realdata
def test_real_nwpu_coco():
    ann = _need("nwpu_vhr10/instances_train.json")
    ds = CocoInstanceDataset(ann)
    assert len(ds) == 520 and ds.cat_ids == list(range(1, 11))
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "vehicle"
    assert sum(len(ds.coco.imgToAnns.get(i, [])) for i in ds.image_ids) == 3178
    s = ds[0]
    assert s.image.is_file()
    m = ds.masks(s)
    assert m.shape == (len(s.annotations), s.height, s.width) and m.any(axis=(1, 2)).all()
