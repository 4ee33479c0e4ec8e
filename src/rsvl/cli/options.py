"""Option parsing shared by commands."""

from __future__ import annotations

from rsvl.errors import BandSelectionError


def parse_bands(text: str | None) -> list[int] | None:
    """``"4,3,2"`` -> [4, 3, 2]; None stays None."""
    if text is None or not text.strip():
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise BandSelectionError(
            f"--bands {text!r} is not a list of band numbers.", hint="Example: --bands 4,3,2"
        ) from None
