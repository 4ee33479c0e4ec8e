"""Helpers shared by the dataset readers (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvl.errors import DatasetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def is_image(path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    return path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}.", hint=f"Expected layout: {layout}")
    return path


def require_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}.", hint=f"Expected layout: {layout}")
    return path


def load_json(path: Path, what: str, layout: str) -> Any:
    require_file(path, what, layout)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"{what} {path} is not valid JSON ({e}).", hint=f"Expected layout: {layout}"
        ) from e


def check_image(path: Path, layout: str) -> Path:
    """Raise a DatasetError naming the layout when an image listed by an index is missing."""
    if not path.is_file():
        raise DatasetError(
            f"Image listed by the dataset index is missing: {path}.",
            hint=f"Expected layout: {layout}",
        )
    return path
