"""Option parsing shared by commands."""

from __future__ import annotations

import typer

from rsvl.errors import BandSelectionError

#: ``--fast``: the model's faster CPU path (CLIP: int8 linear layers; see BENCHMARKS.md)
FAST_HELP = ("CLIP, SAM and RSPrompter models on the CPU: int8 linear layers, 1.8-1.95x faster, embeddings "
             "within ~3e-3 cosine (BENCHMARKS.md). Built-in models always run their exact fast path.")


def fast_option() -> bool:
    """The ``--fast`` option, the same on every command that loads a CLIP or SAM-based model."""
    return typer.Option(False, "--fast", help=FAST_HELP)


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
