"""Question kinds, numbers and yes/no read from chat answers, and box grouping across windows."""

from __future__ import annotations

import pytest
import shapely

from rsvl.tasks.chat_answers import (
    dedupe_boxes,
    parse_number,
    parse_yesno,
    question_kind,
    strip_box_markup,
)


@pytest.mark.parametrize(("question", "kind"), [
    ("How many airplanes are there?", "count"),
    ("how  MANY storage tanks can you see", "count"),
    ("Count the ships in the harbour.", "count"),
    ("What is the number of buildings?", "count"),
    ("Are there more than three ships? How many?", "count"),
    ("Is there a ship in this image?", "yesno"),
    ("Are there any airplanes?", "yesno"),
    ("Does this image contain a tennis court?", "yesno"),
    ("Can you see a bridge?", "yesno"),
    ("Is this area urban or rural?", "other"),
    ("Where is the largest ship?", "grounding"),
    ("Locate the storage tanks.", "grounding"),
    ("Find the bridge over the river", "grounding"),
    ("Give the bounding box of the stadium.", "grounding"),
    ("[refer] the white car on the left", "grounding"),
    ("Describe this image.", "describe"),
    ("What is in this image?", "describe"),
    ("What do you see?", "describe"),
    ("Write a caption for the scene", "describe"),
    ("What colour is the roof?", "other"),
    ("Classify the scene: farmland, forest or river.", "other"),
])
def test_question_kind(question, kind):
    assert question_kind(question) == kind


@pytest.mark.parametrize(("answer", "number"), [
    ("3", 3),
    ("There are 3 airplanes.", 3),
    ("about 28", 28),
    ("roughly 1,200 cars", 1200),
    ("2.5", 2.5),
    ("three", 3),
    ("There are Three ships.", 3),
    ("twenty-one tanks", 21),
    ("a dozen houses", 12),
    ("two hundred and five", 205),
    ("a single bridge", 1),
    ("No.", 0),
    ("none", 0),
    ("There are no ships in this image.", 0),
    ("No, there are four.", 4),
    ("I cannot tell from this image.", None),
    ("ship [120, 340, 560, 780]", None),  # coordinates are not a count
    ("2 ships {<12><34><56><78>|30} and {<1><2><3><4>|0}", 2),
    ("one of the ships", 1),
])
def test_parse_number(answer, number):
    got = parse_number(answer)
    assert got == number and type(got) is type(number)


@pytest.mark.parametrize(("answer", "yes"), [
    ("Yes", True), ("yes, there is a ship.", True), ("No.", False), ("no", False),
    ("There is no ship.", False), ("I think yes.", True), ("Nothing like that.", False),
    ("A ship [1, 2, 3, 4]", None), ("", None),
])
def test_parse_yesno(answer, yes):
    assert parse_yesno(answer) is yes


def test_strip_box_markup_keeps_words():
    assert strip_box_markup("a ship [0.1, 0.2, 0.3, 0.4] here").split() == ["a", "ship", "here"]
    assert strip_box_markup("the [left] ship").split() == ["the", "[left]", "ship"]


def test_dedupe_boxes_groups_only_across_windows_by_iou():
    a = shapely.box(0, 0, 10, 10)
    a_shifted = shapely.box(1, 0, 11, 10)  # IoU 90/110 = 0.818 with a
    far = shapely.box(50, 50, 60, 60)
    half = shapely.box(5, 0, 15, 10)  # IoU 50/150 = 0.333 with a
    # the same object seen by windows 0 and 1; far is alone; half overlaps too little
    assert dedupe_boxes([a, a_shifted, far, half], [0, 1, 1, 2]) == [0, 0, 1, 2]
    # two boxes of one window are two objects, however much they overlap
    assert dedupe_boxes([a, a_shifted], [0, 0]) == [0, 1]
    # transitive: a ~ a_shifted (windows 0, 1), a_shifted ~ a2 (windows 1, 2)
    a2 = shapely.box(2, 0, 12, 10)
    assert dedupe_boxes([a, a_shifted, a2], [0, 1, 2], iou=0.8) == [0, 0, 0]
    assert dedupe_boxes([a, half], [0, 1], iou=0.3) == [0, 0]
    assert dedupe_boxes([], []) == []
