"""Reading chat answers: what kind of question was asked, and the number, yes/no or boxes in
the answer. ``rsvl chat`` on a raster asks the question once per window and combines the
answers by the question's kind (:mod:`rsvl.tasks.chat`), so the kind decides the combination.

Question kinds (:func:`question_kind`, first match wins, case-insensitive):

* ``count``: "how many ...", "count the ...", "the number of ...";
* ``grounding``: "where is ...", "locate / localize / find / detect / box / mark ...", a
  "bounding box", GeoChat's ``[refer]`` / ``[grounding]`` / ``[detection]`` tags;
* ``yesno``: a question that opens with an auxiliary verb ("is there", "are there", "does
  ... contain", "can you see", "has", ...) and offers no choice ("... or ...");
* ``describe``: "describe ...", "caption", "what is in this image", "what do you see";
* ``other``: everything else (a classification, a colour, a free question).

Answers (:func:`parse_number`, :func:`parse_yesno`) are read after the box markup the chat
families put in their text (VHM's ``[12, 34, 56, 78]``, GeoChat's ``{<12><34><56><78>|30}``)
is removed, so a coordinate is never read as a count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely
from shapely.strtree import STRtree

__all__ = [
    "QUESTION_KINDS",
    "dedupe_boxes",
    "parse_number",
    "parse_yesno",
    "question_kind",
    "strip_box_markup",
]

#: what :func:`question_kind` returns
QUESTION_KINDS = ("count", "yesno", "grounding", "describe", "other")

_COUNT = re.compile(r"\bhow\s+many\b|^\s*count\b|\bcount\s+(the|all|every)\b|\bnumber\s+of\b|\bhow\s+much\b")
_GROUNDING = re.compile(
    r"^\s*\[(refer|grounding|detection)\]|\bwhere\s+(is|are|was|were|'s)\b|\bwhere\b.*\?\s*$"
    r"|\b(locate|localize|localise|detect)\b|^\s*(find|mark|box|outline)\b|\bbounding\s+box"
    r"|\b(give|output|draw|provide)\b.*\bbox(es)?\b|\bcoordinates?\s+of\b"
)
_YESNO = re.compile(
    r"^\s*(is|are|was|were|does|do|did|can|could|has|have|had|will|would|should|shall|may|might|must)\b"
)
_CHOICE = re.compile(r"\bor\b")
_DESCRIBE = re.compile(
    r"\bdescribe\b|\bdescription\b|\bcaption\b|\bsummar(y|ise|ize)\b"
    r"|\bwhat\s+(is|can\s+be)\s+(in|shown\s+in|seen\s+in|visible\s+in)\s+(this|the)\s+(image|picture|scene|photo|tile)"
    r"|\bwhat\s+(do|can)\s+you\s+see\b|\bwhat\s+does\s+(this|the)\s+(image|picture|scene)\s+show\b"
)


def question_kind(question: str) -> str:
    """``count``, ``yesno``, ``grounding``, ``describe`` or ``other`` (see the module doc)."""
    q = " ".join(str(question).lower().split())
    if _COUNT.search(q):
        return "count"
    if _GROUNDING.search(q):
        return "grounding"
    if _YESNO.search(q) and not _CHOICE.search(q):
        return "yesno"
    if _DESCRIBE.search(q):
        return "describe"
    return "other"


#: box markup of the chat families: [..] lists, {<..>...} groups, <..> tokens
_MARKUP = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\d[^\[\]]*\]|<[^<>]*>")


def strip_box_markup(text: str) -> str:
    """``text`` without bracketed coordinates (``[0.1, 0.2, ...]``, ``{<1><2><3><4>}``)."""
    return _MARKUP.sub(" ", str(text))


_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "single": 1,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}
_SCALES = {"dozen": 12, "hundred": 100, "thousand": 1000, "million": 1_000_000}
_NONE_WORDS = re.compile(r"\b(no|none|nothing|zero|not\s+any|there\s+(is|are)\s+no)\b")
_DIGITS = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")


def parse_number(text: str) -> int | float | None:
    """The count an answer gives: the first number in digits ("about 28" -> 28, "1,200" ->
    1200), else in words ("three" -> 3, "twenty-one" -> 21, "a dozen" -> 12, "two hundred
    and five" -> 205), else 0 for "no" / "none" / "nothing" / "zero"; None when the answer
    has no number (box coordinates are ignored)."""
    clean = strip_box_markup(text).lower()
    m = _DIGITS.search(clean)
    if m:
        value = float(m.group(1).replace(",", "") + (m.group(2) or ""))
        return int(value) if value.is_integer() else value
    words = re.findall(r"[a-z]+", clean)
    value = _words_number(words)
    if value is not None:
        return value
    if _NONE_WORDS.search(clean):
        return 0
    return None


def _words_number(words: Sequence[str]) -> int | None:
    """The first number spelled in ``words`` (consecutive number words, "and" between)."""
    total, current, seen = 0, 0, False
    for i, w in enumerate(words):
        if w in _UNITS:
            current += _UNITS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w in _SCALES:
            if w == "dozen" and not seen and i > 0 and words[i - 1] in ("a", "one"):
                current = 1
            current = max(current, 1) * _SCALES[w]
            if _SCALES[w] >= 1000:
                total, current = total + current, 0
        elif w == "and" and seen and words[i - 1] in _SCALES:  # "two hundred and five"
            continue
        elif seen:
            break
        else:
            continue
        seen = True
    return total + current if seen else None


_YES = {"yes", "yeah", "yep", "true", "correct", "affirmative"}
_NO = {"no", "nope", "false", "incorrect", "negative"}


def parse_yesno(text: str) -> bool | None:
    """True for a yes, False for a no, None when the answer says neither. The first word
    decides ("Yes, there is a ship" -> True); else the first "yes" / "no" / "there is no"
    in the answer."""
    words = re.findall(r"[a-z]+", strip_box_markup(text).lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    for w in words:
        if w in _YES:
            return True
        if w in _NO or w in ("none", "nothing"):
            return False
    return None


def dedupe_boxes(geoms: Sequence[Any], windows: Sequence[int], *, iou: float = 0.5) -> list[int]:
    """Group boxes that are the same object seen by two overlapping windows.

    ``geoms``: box polygons in one coordinate system (map coordinates); ``windows``: the
    window each box came from. Two boxes of *different* windows whose IoU is at least
    ``iou`` are the same object (boxes of one window are always distinct objects), and
    groups are closed transitively. Returns a group id (0, 1, ...) per box, in order of
    each group's first box, so ``max(ids) + 1`` is the number of distinct objects.
    """
    n = len(geoms)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    areas = np.array([g.area for g in geoms])
    left, right = STRtree(list(geoms)).query(list(geoms), predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i >= j or windows[i] == windows[j]:
            continue
        inter = shapely.intersection(geoms[i], geoms[j]).area
        union = areas[i] + areas[j] - inter
        if union > 0 and inter / union >= iou:
            parent[find(i)] = find(j)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]
