"""The chat items (tasks, phrasings, answers) generated from annotations."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image

from rsvl.data import chat_items as chat


def test_box_to_vhm_by_hand() -> None:
    # x 100/400 -> 250, y 50/200 -> 250, x2 300/400 -> 750, y2 150/200 -> 750
    assert chat.box_to_vhm([100, 50, 200, 100], 400, 200) == [250, 250, 750, 750]
    # rounding and clipping to 0-1000
    assert chat.box_to_vhm([-3, 0.4, 1003, 999.4], 1000, 1000) == [0, 0, 1000, 1000]
    assert chat.box_to_vhm([1, 1, 1, 1], 3, 3) == [333, 333, 667, 667]


def test_rsivqa_kind_from_question_form() -> None:
    assert chat.rsivqa_kind("Does this picture contain an airplane?") == "rsivqa_presence"
    assert chat.rsivqa_kind("How many cars in the picture?") == "rsivqa_counting"
    assert chat.rsivqa_kind("What is the location of the trees in this picture?") == \
        "rsivqa_location"
    assert chat.rsivqa_kind("what is the theme of this picture?") == "rsivqa_theme"
    # noise: a counting question without an object, an unknown form
    assert chat.rsivqa_kind("How many  in the picture?") is None
    assert chat.rsivqa_kind("Why is the sky blue?") is None


def test_readable_class_names_and_captions() -> None:
    assert chat.ucm_class_name("mobilehomepark") == "mobile home park"
    assert chat.ucm_class_name("storagetanks") == "storage tanks"
    assert chat.ucm_class_name("agricultural") == "agricultural"
    assert chat.aid_class_name("RailwayStation") == "railway station"
    assert chat.aid_class_name("BareLand") == "bare land"
    assert chat.aid_class_name("Beach") == "beach"
    assert chat.clean_caption("there is a piece of farmland .") == "There is a piece of farmland."
    assert chat.clean_caption("many planes ,  parked") == "Many planes, parked."


def test_synthetic_nwpu_answers(tmp_path: Path) -> None:
    """Two images of known content: every answer follows from the boxes."""
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (200, 100)).save(tmp_path / "images" / name)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                       {"id": 2, "file_name": "b.png", "width": 200, "height": 100}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [150, 60, 20, 20]},
                {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 10, 10]},
                {"id": 4, "image_id": 2, "category_id": 1, "bbox": [50, 10, 10, 10]},
                {"id": 5, "image_id": 2, "category_id": 1, "bbox": [90, 10, 10, 10]},
                {"id": 6, "image_id": 2, "category_id": 1, "bbox": [130, 10, 10, 10]}],
            "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "harbor"},
                           {"id": 3, "name": "storage_tank"}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    items = chat.generate_items(nwpu=tmp_path / "inst.json", val_fraction=0.0)
    got = defaultdict(list)
    for it in items:
        got[(it.image.name, it.task)].append((it.question, it.answer))
    # image a: ship and harbor present, storage tank absent (one "No.")
    answers = sorted(a for _, a in got[("a.png", "nwpu_presence")])
    assert answers == ["No.", "Yes.", "Yes."]
    assert any("storage tank" in q for q, a in got[("a.png", "nwpu_presence")] if a == "No.")
    counts = {a for q, a in got[("a.png", "nwpu_counting")]}
    assert counts == {"1", "0"}
    # the ship [10, 10, 30, 30] of 200x100 -> [50, 100, 150, 300]
    vg = dict(got[("a.png", "nwpu_vg")])
    assert any(a == "[[50, 100, 150, 300]]" for a in vg.values())
    # ship centre (20, 20), harbor (160, 70): left/right and above/below both clear
    rel = got[("a.png", "nwpu_relpos")]
    assert len(rel) == 2
    for q, a in rel:
        ship_first = q.index("ship") < q.index("harbor")
        if "left" in q:
            assert a == ("Left." if ship_first else "Right.")
        else:
            assert a == ("Above." if ship_first else "Below.")
    # image b: four ships -> counted, not grounded (more than MAX_BOXES), one "No."
    assert [a for _, a in got[("b.png", "nwpu_counting")]].count("4") == 1
    assert not got[("b.png", "nwpu_vg")]
    assert sorted(a for _, a in got[("b.png", "nwpu_presence")]) == ["No.", "Yes."]
