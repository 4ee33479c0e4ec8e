"""Referring-expression generator (RRSIS-D layout) and the RRSIS-D / RefSegRS readers."""

from __future__ import annotations

import json
import math
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from rsvl.cli import main
from rsvl.data import refgen
from rsvl.data.refer import RRSISD, RefSegRS, decode_segmentation
from rsvl.errors import DatasetError, InputNotFoundError, OutputError

DATA = SHARED_DATA
NWPU = DATA / "nwpu_vhr10" / "instances_train.json"

CATS = ["airplane", "ship", "storage_tank", "harbor", "vehicle", "tennis_court"]


# ------------------------------------------------------------------ synthetic COCO

def _rect(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def synthetic_coco(n_images: int = 24, seed: int = 3, size: tuple[int, int] = (120, 96)) -> dict:
    """Random non-overlapping rectangles (a few hand-placed images first)."""
    width, height = size
    rng = random.Random(seed)
    images, anns = [], []

    def add(image_id: int, cat: int, x: float, y: float, w: float, h: float) -> None:
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                     "segmentation": [_rect(x, y, w, h)], "area": float(w * h),
                     "bbox": [x, y, w, h], "iscrowd": 0})

    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:03d}.jpg", "width": width, "height": height})
    # image 1: three tanks (upper left, middle, lower right and largest), a harbor, a ship
    add(1, 3, 5, 5, 10, 10)
    add(1, 3, 55, 43, 10, 10)
    add(1, 3, 95, 70, 20, 20)
    add(1, 4, 70, 5, 40, 20)
    add(1, 2, 60, 8, 8, 4)
    # image 2: two vehicles side by side, one bigger
    add(2, 5, 10, 40, 12, 12)
    add(2, 5, 90, 40, 6, 6)
    # the rest: random boxes on a coarse grid (no overlaps)
    for i in range(3, n_images + 1):
        cells = [(cx, cy) for cx in range(6) for cy in range(4)]
        rng.shuffle(cells)
        for cx, cy in cells[: rng.randint(1, 9)]:
            w, h = rng.randint(4, 18), rng.randint(4, 18)
            add(i, rng.randint(1, len(CATS)), cx * 20 + 1, cy * 24 + 1, w, h)
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CATS)]}


# ------------------------------------------------------------------ independent check

_NUMBERS = {w: k for k, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_POS = {  # phrase -> (horizontal interval, vertical interval) of the normalised box centre
    "on the left": ("L", None), "on the right": ("R", None),
    "at the top": (None, "L"), "at the bottom": (None, "R"),
    "in the upper left": ("L", "L"), "in the upper right": ("R", "L"),
    "in the lower left": ("L", "R"), "in the lower right": ("R", "R"),
    "in the middle": ("C", "C"),
}


def _inside(value: float, band: str, grow: float) -> bool:
    """Is a normalised coordinate in a third of the image, widened (or narrowed) by grow?"""
    if band == "L":
        return value < 1 / 3 + grow
    if band == "R":
        return value > 2 / 3 - grow
    return 1 / 3 - grow <= value <= 2 / 3 + grow


def refers_only_to(sentence: str, target: int, anns: list[dict], names: dict[int, str],
                   width: float, height: float) -> bool:
    """Re-evaluate a generated sentence from its words and the raw annotations.

    Written independently of the generator (only the numeric thresholds are shared): True
    when the target satisfies the sentence with the margins to spare and no other instance
    of its class comes within the margins.
    """
    spelled = {cid: n.replace("_", " ") for cid, n in names.items()}

    def plural(n: str) -> str:
        return n + ("es" if n.endswith(("s", "x", "ch", "sh")) else "s")

    def of_class(word: str, is_plural: bool = False) -> list[dict]:
        cids = [c for c, n in spelled.items() if (plural(n) if is_plural else n) == word]
        assert len(cids) == 1, f"no class named {word!r} in {sentence!r}"
        return [a for a in anns if a["category_id"] == cids[0]]

    def centre(a: dict) -> tuple[float, float]:
        x, y, w, h = a["bbox"]
        return (x + w / 2) / width, (y + h / 2) / height

    tgt = next(a for a in anns if a["id"] == target)

    m = re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) of the (\w+) (.+)", sentence)
    if m:
        group = of_class(m.group(3), is_plural=True)
        n = _NUMBERS.get(m.group(2), None) or int(m.group(2))
        assert n == len(group) >= 2, sentence
        axis = 0 if m.group(1) in ("leftmost", "rightmost") else 1
        sign = 1 if m.group(1) in ("leftmost", "topmost") else -1
        ct = centre(tgt)[axis] * sign
        return all(ct + refgen.EXTREME_MARGIN <= centre(o)[axis] * sign
                   for o in group if o is not tgt)
    m = re.fullmatch(r"the (largest|smallest|large|small) (.+)", sentence)
    if m:
        group = of_class(m.group(2))
        assert (len(group) >= 3) == (m.group(1) in ("largest", "smallest")) and len(group) >= 2
        big = m.group(1).startswith("large")
        r = refgen.SIZE_RATIO
        return all((tgt["area"] >= r * o["area"]) if big else (tgt["area"] * r <= o["area"])
                   for o in group if o is not tgt)
    m = re.fullmatch(r"the (.+?) (?:next to|near|beside) (the|a) (.+)", sentence)
    if m:
        group = of_class(m.group(1))
        others = of_class(m.group(3))
        assert (m.group(2) == "the") == (len(others) == 1)

        def gap(a: dict, b: dict) -> float:
            ax0, ay0, aw, ah = a["bbox"]
            bx0, by0, bw, bh = b["bbox"]
            dx = max(bx0 - (ax0 + aw), ax0 - (bx0 + bw), 0.0)
            dy = max(by0 - (ay0 + ah), ay0 - (by0 + bh), 0.0)
            return math.sqrt(dx * dx + dy * dy)

        def near(a: dict, factor: float) -> bool:
            return min(gap(a, o) for o in others) <= factor * max(a["bbox"][2], a["bbox"][3])

        return near(tgt, refgen.NEAR_FACTOR) and not any(
            near(o, 2 * refgen.NEAR_FACTOR) for o in group if o is not tgt)
    for phrase, (hb, vb) in _POS.items():
        if sentence.endswith(" " + phrase):
            group = of_class(sentence[len("the "):-len(phrase) - 1])
            mgn = refgen.POSITION_MARGIN

            def ok(a: dict, grow: float, hb: str | None = hb, vb: str | None = vb) -> bool:
                u, v = centre(a)
                return (hb is None or _inside(u, hb, grow)) and (vb is None or _inside(v, vb, grow))

            return ok(tgt, -mgn) and not any(ok(o, mgn) for o in group if o is not tgt)
    m = re.fullmatch(r"the (.+)", sentence)
    assert m, sentence
    return len(of_class(m.group(1))) == 1


def _check_all(coco: dict, result: refgen.GenerationResult) -> int:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    n = 0
    for ref in result.refs:
        im = images[ref["image_id"]]
        for s in ref["sentences"]:
            assert refers_only_to(s["raw"], ref["ann_id"], by_image[ref["image_id"]], names,
                                  im["width"], im["height"]), (s["raw"], ref)
            n += 1
    return n


# ------------------------------------------------------------------ generator

def test_hand_placed_image_expressions() -> None:
    coco = synthetic_coco()
    res = refgen.generate(coco, val_fraction=0.0, seed=0, group_sentences=True)
    texts = {(r["ann_id"], s["raw"]) for r in res.refs for s in r["sentences"] if r["image_id"] == 1}
    by_ann: dict[int, list[str]] = {}
    for a, t in texts:
        by_ann.setdefault(a, []).append(t)
    assert "the harbor" in by_ann[4] and "the ship" in by_ann[5]
    assert "the largest storage tank" in by_ann[3]
    assert any(t.startswith("the ship ") and t.endswith(" the harbor") for t in by_ann[5])
    assert {"the storage tank in the upper left", "the storage tank on the left",
            "the storage tank at the top"} & set(by_ann[1])
    assert any(t.endswith("of the three storage tanks") for t in by_ann[1] + by_ann[2] + by_ann[3])
    two = {s["raw"] for r in res.refs for s in r["sentences"] if r["image_id"] == 2}
    assert {"the large vehicle", "the small vehicle"} <= two


def test_independent_check_rejects_ambiguous_sentences() -> None:
    coco = synthetic_coco()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns = [a for a in coco["annotations"] if a["image_id"] == 1]
    assert refers_only_to("the harbor", 4, anns, names, 120, 96)
    assert not refers_only_to("the storage tank", 1, anns, names, 120, 96)
    assert not refers_only_to("the smallest storage tank", 1, anns, names, 120, 96)
    assert refers_only_to("the largest storage tank", 3, anns, names, 120, 96)
    assert not refers_only_to("the storage tank in the middle", 1, anns, names, 120, 96)
    assert refers_only_to("the storage tank in the middle", 2, anns, names, 120, 96)


def test_every_expression_selects_exactly_its_instance() -> None:
    coco = synthetic_coco(n_images=60, seed=11)
    res = refgen.generate(coco, seed=5)
    assert _check_all(coco, res) == res.stats["expressions"] > 50
    assert all(res.stats["per_template"][t] > 0 for t in refgen.TEMPLATE_TYPES)


def test_select_reports_ambiguity() -> None:
    insts = [refgen.Instance(1, 1, "ship", (10, 10, 10, 10), 100.0),
             refgen.Instance(2, 1, "ship", (14, 80, 10, 10), 100.0)]
    # both on the left: "on the left" is ambiguous; "at the top" picks ship 1
    assert refgen.select(refgen.Spec("position", "ship", "left,any"), insts, 100, 100,
                         target=1) == {1, 2}
    assert refgen.select(refgen.Spec("position", "ship", "any,top"), insts, 100, 100,
                         target=1) == {1}
    # same size: no size expression
    assert refgen.select(refgen.Spec("size", "ship", "largest"), insts, 100, 100, target=1) == set()


def test_deterministic_and_split_by_image() -> None:
    coco = synthetic_coco(n_images=40)
    a = refgen.generate(coco, val_fraction=0.25, seed=0)
    b = refgen.generate(coco, val_fraction=0.25, seed=0)
    assert pickle.dumps(a.refs) == pickle.dumps(b.refs) and a.stats == b.stats
    c = refgen.generate(coco, val_fraction=0.25, seed=1)
    assert [r["split"] for r in a.refs] != [r["split"] for r in c.refs]
    split_of = {}
    for r in a.refs:
        assert r["split"] in ("train", "val")
        assert split_of.setdefault(r["image_id"], r["split"]) == r["split"]
    val_images = {i for i, s in refgen.split_images(range(1, 41), 0.25, 0).items() if s == "val"}
    assert len(val_images) == 10
    assert {r["ref_id"] for r in a.refs} == set(range(len(a.refs)))
    sent_ids = [s["sent_id"] for r in a.refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)
    with pytest.raises(DatasetError):
        refgen.split_images([1, 2], 1.0, 0)


def _write_images(coco: dict, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        Image.new("RGB", (im["width"], im["height"]), (40, 80, 120)).save(folder / im["file_name"])


def test_rrsisd_round_trip_through_reader(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    coco = synthetic_coco(n_images=12)
    _write_images(coco, tmp_path / "src")
    res = refgen.generate(coco, val_fraction=0.25, seed=0)
    ddir = refgen.write_rrsisd(res, coco, tmp_path / "out", image_dir=tmp_path / "src")
    assert (ddir / "refs(unc).p").is_file() and (ddir / "instances.json").is_file()
    with open(ddir / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    keys = {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id",
            "file_name"}
    assert all(keys <= set(r) for r in refs)
    assert all({"tokens", "raw", "sent", "sent_id"} <= set(s) for r in refs for s in r["sentences"])
    assert all(len(r["sentences"]) == 1 for r in refs)  # RRSIS-D: one sentence per ref

    anns = {a["id"]: a for a in coco["annotations"]}
    images = {im["id"]: im for im in coco["images"]}
    seen = 0
    for split in ("train", "val"):
        ds = RRSISD(tmp_path / "out", split=split)
        assert len(ds) == sum(r["split"] == split for r in refs)
        for sample in ds:
            im = images[sample.image_id]
            ann = anns[sample.ann_id]
            rle = mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])
            expect = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
            assert sample.mask.shape == (im["height"], im["width"]) and sample.mask.dtype == bool
            assert (sample.mask == expect).all()
            assert sample.image_path.is_file() and sample.split == split
            assert sample.category_id == ann["category_id"]
            seen += 1
    assert seen == len(refs)
    with pytest.raises(OutputError):
        refgen.write_rrsisd(res, coco, tmp_path / "out")


def test_decode_segmentation_forms() -> None:
    from pycocotools import mask as mask_utils

    poly = [_rect(2, 2, 6, 4), _rect(4, 2, 6, 4)]  # two overlapping parts
    union = decode_segmentation(poly, 12, 16, "union")
    upstream = decode_segmentation(poly, 12, 16)
    assert union.sum() > upstream.sum() > 0  # upstream keeps pixels covered exactly once
    rles = mask_utils.frPyObjects(poly, 12, 16)
    listed = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]  # RRSIS-D style
    assert (decode_segmentation(listed, 12, 16, "union") == union).all()
    one = mask_utils.merge(rles)
    assert (decode_segmentation(one, 12, 16) == union).all()
    raw = np.zeros((12, 16), dtype=np.uint8, order="F")
    raw[3:5, 4:9] = 1
    unc = {"size": [12, 16], "counts": _uncompressed_counts(raw)}
    assert (decode_segmentation(unc, 12, 16) == raw.astype(bool)).all()
    with pytest.raises(DatasetError):
        decode_segmentation(listed, 10, 10)


def _uncompressed_counts(m: np.ndarray) -> list[int]:
    flat = m.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_reader_errors_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p"):
        RRSISD(tmp_path)
    with pytest.raises(DatasetError, match="output_phrase"):
        RefSegRS(tmp_path)
    with pytest.raises(InputNotFoundError):
        refgen.load_coco(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError):
        refgen.load_coco(tmp_path / "bad.json")
    coco = synthetic_coco(n_images=4)
    res = refgen.generate(coco, val_fraction=0.0)
    refgen.write_rrsisd(res, coco, tmp_path / "r", image_dir=None)
    with pytest.raises(DatasetError, match="JPEGImages"):
        RRSISD(tmp_path / "r")
    with pytest.raises(DatasetError, match="split"):
        RRSISD(tmp_path / "r", split="test", image_dir=tmp_path)


def test_refsegrs_reader(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    m = np.zeros((8, 10), dtype=np.uint8)
    m[2:5, 3:7] = 255
    m[0, 0] = 50  # not above the threshold
    Image.fromarray(m).save(tmp_path / "masks" / "17.tif")
    Image.new("RGB", (10, 8)).save(tmp_path / "images" / "17.tif")
    Image.fromarray(np.stack([m] * 3, -1)).save(tmp_path / "masks" / "18.tif")
    Image.new("RGB", (10, 8)).save(tmp_path / "images" / "18.tif")
    (tmp_path / "output_phrase_test.txt").write_text(
        "17 vehicle along the road\n18 the building near the tree \n")
    ds = RefSegRS(tmp_path, "test")
    assert len(ds) == 2
    s = ds[0]
    assert s.sentence == "vehicle along the road" and s.image_id == "17" and s.ref_id == 0
    assert s.mask.dtype == bool and s.mask.sum() == 12 and not s.mask[0, 0]
    assert (ds[1].mask == s.mask).all() and ds[1].sentence == "the building near the tree"
    (tmp_path / "output_phrase_val.txt").write_text("99 a missing image\n")
    with pytest.raises(DatasetError, match="99.tif"):
        list(RefSegRS(tmp_path, "val"))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rsvl data refgen`` (rsvl.cli.data), the one command-line entry of the generator."""
    coco = synthetic_coco(n_images=10)
    (tmp_path / "images").mkdir()
    _write_images(coco, tmp_path / "images")
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    rc = main(["data", "refgen", "--coco", str(tmp_path / "inst.json"), "--out", str(tmp_path / "out"),
               "--val-fraction", "0.2", "--seed", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "per template" in out and "storage_tank" in out
    assert len(RRSISD(tmp_path / "out", split=None)) > 0
    assert main(["data", "refgen", "--coco", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    rc = main(["data", "refgen", "--coco", str(tmp_path / "inst.json"), "--out", str(tmp_path / "out2"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["stats"]["refs"] > 0 and doc["out"].endswith("rrsisd")


# ------------------------------------------------------------------ real data

@pytest.mark.realdata
@pytest.mark.skipif(not NWPU.is_file(), reason=f"NWPU VHR-10 instances not found at {NWPU}")
def test_nwpu_generation(tmp_path: Path) -> None:
    coco = refgen.load_coco(NWPU)
    res = refgen.generate(coco, val_fraction=0.15, seed=0)
    st = res.stats
    assert st["images"] == 520 and st["instances"] == 3178
    assert st["expressions"] > 1000
    assert all(st["per_template"][t] > 0 for t in refgen.TEMPLATE_TYPES)
    assert st["per_split"]["val"]["images"] == 78
    assert _check_all(coco, res) == st["expressions"]
    # read a few refs back with their real images
    ddir = refgen.write_rrsisd(res, coco, tmp_path, image_dir=NWPU.parent / "images")
    ds = RRSISD(ddir.parent, split="val", mask_rule="union")
    anns = {a["id"]: a for a in coco["annotations"]}
    for i in range(0, len(ds), max(1, len(ds) // 5)):
        s = ds[i]
        assert s.image_path.is_file() and s.mask.sum() > 0.5 * anns[s.ann_id]["area"]
