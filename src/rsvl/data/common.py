"""Helpers shared by the dataset readers (no torch)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from rsvl.errors import DatasetError


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


def read_csv_pairs(
    csv_path: Path, keys: tuple[str, str], sep: str, layout: str, options: str
) -> list[tuple[str, str]]:
    """The ``(row[keys[0]], row[keys[1]])`` pairs of a CSV file, in file order; a missing
    column is a DatasetError naming the columns found and the ``options`` that choose them."""
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = reader.fieldnames or []
        missing = [k for k in keys if k not in cols]
        if missing:
            raise DatasetError(
                f"{csv_path} has no column {missing} (columns found: {cols}).",
                hint=f"Expected {layout}; or pass {options}.",
            )
        return [(r[keys[0]], r[keys[1]]) for r in reader]


def check_image(path: Path, layout: str) -> Path:
    """Raise a DatasetError naming the layout when an image listed by an index is missing."""
    if not path.is_file():
        raise DatasetError(
            f"Image listed by the dataset index is missing: {path}.",
            hint=f"Expected layout: {layout}",
        )
    return path


S = TypeVar("S")


class CheckedSamples(Sequence[S], Generic[S]):
    """A list of samples whose ``image`` is checked to exist when a sample is taken, so a
    missing file fails with the dataset's ``layout`` in the message (images are not read)."""

    layout: str = ""

    def __init__(self, samples: list[S]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self.samples[i]
        check_image(s.image, self.layout)  # type: ignore[attr-defined]
        return s

    def __iter__(self) -> Iterator[S]:
        for s in self.samples:
            check_image(s.image, self.layout)  # type: ignore[attr-defined]
            yield s
