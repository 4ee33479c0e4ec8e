"""Checks every command runs on its inputs and outputs before it loads a model.

Loading a model takes seconds (18-25 s for the published CLIPs on a CPU); a missing file, a
folder where one raster is expected, or an output that exists without ``--overwrite`` must
fail before that, with the same one-line error the task would give later. The output names
come from the tasks themselves (``output_paths``), so the two never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rsvl.errors import InputNotFoundError, OutputError, PromptError, UnknownModelError
from rsvl.geo.raster import check_last_block, open_dataset
from rsvl.io import IMAGE_SUFFIXES

VECTOR_FORMATS = ("gpkg", "geojson", "parquet")


def raster_file(path: Path) -> bool:
    """Check that ``path`` is one raster or image GDAL opens (not a folder, not missing);
    returns whether it is georeferenced. A file cut short fails here, before a model loads."""
    with open_dataset(path) as ds:
        check_last_block(ds)
        return ds.crs is not None


def file_or_folder(path: Path) -> bool | None:
    """Check that ``path`` exists; a file must open as a raster or image (returns whether it
    is georeferenced), a folder must hold images (returns None)."""
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder.", hint="Check the path.")
    if path.is_dir():
        images(path)
        return None
    return raster_file(path)


def images(folder: Path) -> list[Path]:
    """The images of ``folder`` (the tasks' own list), refusing a folder without any."""
    from rsvl.tasks.sources import find_images, no_images_message  # lazy: see rsvl.cli

    files = find_images(folder)
    if not files:
        raise InputNotFoundError(no_images_message(folder), hint="Point at a folder of images, or at one image.")
    return files


#: the built-in model to suggest for each task
DEFAULT_MODELS = {"classify": "mini-clip", "search": "mini-clip", "segment": "mini-clip",
                  "instances": "mini-instances", "refer": "mini-refer", "chat": "mini-chat"}


def model_for(task: str, name: str, weights: Path | None = None, *, also: tuple[str, ...] = ()) -> Any:
    """The card of model ``name`` (or an open_clip architecture with ``weights``), refusing an
    unknown model or one that serves neither ``task`` nor any of ``also``: loading takes
    seconds, and a model of another task would fail only after it."""
    from rsvl.models import registry  # lazy: torch start-up, see rsvl.cli

    card = registry.resolve_card(name, weights)
    if task not in card.tasks and not set(also) & set(card.tasks):
        default = DEFAULT_MODELS.get(task, "")
        raise UnknownModelError(
            f"{card.name} is not a {task} model (it serves {', '.join(card.tasks) or 'no task'}).",
            hint=(f"Use --model {default}, or see " if default else "See ") + f"`rsvl models` for the {task} task.")
    return card


def vector_format(name: str) -> str:
    fmt = name.lower().lstrip(".")
    if fmt not in VECTOR_FORMATS:
        raise OutputError(f"unknown vector format {name!r}.", hint="Use gpkg, geojson or parquet.")
    return fmt


def new_outputs(paths: Iterable[str | os.PathLike[str] | None], overwrite: bool) -> None:
    """Refuse outputs that exist (unless ``overwrite``)."""
    if overwrite:
        return
    for p in paths:
        if p is not None and Path(p).exists():
            raise OutputError(f"{p} exists.", hint="Pass --overwrite to replace it, or choose another output name.")


def not_a_path(classes: str | None) -> None:
    """Refuse a class list that is a file name (``rsvl segment a.tif b.tif``: one raster per
    run; a class file goes to --labels-file)."""
    if classes is None:
        return
    text = classes.strip().strip("'\"")
    if not text or "," in text or "|" in text:
        return
    p = Path(text).expanduser()
    if "/" not in text and os.sep not in text and not p.suffix:
        return  # a plain word ("water") is a class even if a file of that name is here
    if p.suffix.lower() in IMAGE_SUFFIXES or p.is_dir():
        raise PromptError(
            f"the class list {classes!r} is a raster or image path: segment takes one raster per run.",
            hint='Give the classes after the raster, e.g. "forest|trees, water", and run once per raster.',
        )
    if p.is_file():
        raise PromptError(
            f"the class list {classes!r} is a file.",
            hint=f"Pass a class file with --labels-file {text}, or the classes themselves, e.g. \"forest, water\".",
        )


__all__ = ["DEFAULT_MODELS", "file_or_folder", "images", "model_for", "new_outputs", "not_a_path", "raster_file",
           "vector_format"]
