"""Boxes in the answers of the LLaVA family, as :class:`~rsvl.models.chat.Box` fractions.

* VHM writes axis-aligned boxes as integer lists ``[x1, y1, x2, y2]`` normalised to 0-1000
  (RSEvalKit scales them by width / 1000 and height / 1000), one or several per answer, often
  nested (``[[x1, y1, x2, y2], [...]]``).
* GeoChat writes ``{<x1><y1><x2><y2>|θ}`` in 0-100 with the rotation θ in degrees (``|θ``
  may be missing: angle 0), several boxes per object as ``{...}{...}``, the object's name
  before them as ``<p>name</p>``.

Coordinates are clipped to [0, 1] and put in order (x1 <= x2, y1 <= y2); malformed
fragments are skipped, never guessed.
"""

from __future__ import annotations

import re

from rsvl.models.chat import Box

_NUM = r"-?\d+(?:\.\d+)?"
_VHM_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_GEOCHAT_BOX = re.compile(
    rf"\{{\s*<({_NUM})>\s*<({_NUM})>\s*<({_NUM})>\s*<({_NUM})>\s*(?:\|\s*<?\s*({_NUM})\s*>?\s*)?\}}"
)
_GEOCHAT_LABEL = re.compile(r"<p>(.*?)</p>", re.S)


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def _box(coords: list[float], scale: float, angle: float = 0.0, label: str = "") -> Box:
    x1, y1, x2, y2 = (_clip(c / scale) for c in coords)
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), angle=angle, label=label)


def parse_vhm_boxes(text: str) -> list[Box]:
    """Every ``[x1, y1, x2, y2]`` (0-1000) in a VHM answer, in order of appearance."""
    return [_box([float(g) for g in m.groups()], 1000.0) for m in _VHM_BOX.finditer(text)]


def parse_geochat_boxes(text: str) -> list[Box]:
    """Every ``{<x1><y1><x2><y2>|θ}`` (0-100) in a GeoChat answer, with the angle and the
    ``<p>name</p>`` written before it (the closest one to its left) as the label."""
    labels = [(m.end(), m.group(1).strip()) for m in _GEOCHAT_LABEL.finditer(text)]
    boxes = []
    for m in _GEOCHAT_BOX.finditer(text):
        coords = [float(g) for g in m.groups()[:4]]
        angle = float(m.group(5)) if m.group(5) is not None else 0.0
        label = next((name for end, name in reversed(labels) if end <= m.start()), "")
        boxes.append(_box(coords, 100.0, angle, label))
    return boxes


def parse_boxes(text: str, variant: str) -> list[Box]:
    """The boxes of an answer of ``variant`` ("vhm" or "geochat")."""
    return parse_geochat_boxes(text) if variant == "geochat" else parse_vhm_boxes(text)


__all__ = ["parse_boxes", "parse_geochat_boxes", "parse_vhm_boxes"]
