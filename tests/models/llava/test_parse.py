"""``rsvl.models.llava.parse``: VHM's 0-1000 lists and GeoChat's oriented 0-100 boxes."""

from __future__ import annotations

import pytest

from rsvl.models.chat import Box
from rsvl.models.llava.parse import parse_boxes, parse_geochat_boxes, parse_vhm_boxes


def test_vhm_boxes_are_thousandths_of_the_image():
    assert parse_vhm_boxes("[[100, 250, 300, 1000]]") == [Box(0.1, 0.25, 0.3, 1.0)]


def test_several_vhm_boxes_in_order_and_swapped_corners_sorted():
    boxes = parse_vhm_boxes("There are two: [10,20,30,40] and [ 500 , 600 , 400 , 700 ].")
    assert boxes == [Box(0.01, 0.02, 0.03, 0.04), Box(0.4, 0.6, 0.5, 0.7)]


def test_vhm_out_of_range_values_are_clipped_and_malformed_lists_skipped():
    assert parse_vhm_boxes("[-5, 0, 1200, 900]") == [Box(0.0, 0.0, 1.0, 0.9)]
    assert parse_vhm_boxes("[1, 2, 3] and [a, b, c, d] and no box") == []


def test_geochat_oriented_boxes_with_angles_and_labels():
    text = (
        "<p>plane</p> {<10><20><30><40>|45}{<50><50><60><70>|-30} and <p>ship</p> {<0><5><100><95>}"
    )
    assert parse_geochat_boxes(text) == [
        Box(0.1, 0.2, 0.3, 0.4, angle=45.0, label="plane"),
        Box(0.5, 0.5, 0.6, 0.7, angle=-30.0, label="plane"),
        Box(0.0, 0.05, 1.0, 0.95, angle=0.0, label="ship"),
    ]


def test_geochat_box_without_label_and_with_bracketed_angle():
    assert parse_geochat_boxes("{<25><25><75><75>|<90>}") == [
        Box(0.25, 0.25, 0.75, 0.75, angle=90.0)
    ]
    assert parse_geochat_boxes("{<1><2><3>}") == []


@pytest.mark.parametrize(
    ("variant", "text", "n"),
    [("vhm", "[1,2,3,4]", 1), ("geochat", "[1,2,3,4]", 0), ("geochat", "{<1><2><3><4>|0}", 1)],
)
def test_each_variant_reads_only_its_own_format(variant, text, n):
    assert len(parse_boxes(text, variant)) == n
