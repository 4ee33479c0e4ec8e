"""What each task takes over HTTP (a pydantic model per task, unknown fields refused) and the
one function that calls it: :func:`run` hands a loaded :class:`rsvl.api.Model`, an input
(a server-side file or a decoded image) and the parameters to the task, with outputs in one
folder. The service's synchronous endpoints and its jobs both go through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from rsvl.console import TaskProgress, progress_scope
from rsvl.errors import PromptError
from rsvl.io import atomic_path
from rsvl.tasks.sources import is_georeferenced

Task = Literal["classify", "segment", "farmland", "refer", "instances", "chat", "index"]
#: tasks whose runs continue from a journal after an interruption (``resume=True``)
RESUMABLE = frozenset({"classify", "segment", "farmland", "instances"})


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RasterParams(Params):
    gsd: float | None = Field(None, ge=0, le=10_000, description="Resample to this GSD (metres); 0: native; "
                              "default: the model's training GSD.")
    tile: int | None = Field(None, ge=32, le=8192, description="Tile (window) size in pixels.")


class ClassifyParams(RasterParams):
    classes: str = Field(..., min_length=1, max_length=10_000, description='"farmland|cropland, forest, river"')
    top_k: int = Field(5, ge=1, le=100)


class SegmentParams(RasterParams):
    classes: str = Field(..., min_length=1, max_length=10_000, description='"forest|trees, water, buildings"')
    threshold: float = Field(0.0, ge=0.0, lt=1.0)
    cls_lambda: float = Field(0.0, ge=-5.0, le=5.0)
    min_pixels: int = Field(16, ge=0, le=1_000_000)


class FarmlandParams(RasterParams):
    request: str = Field(..., min_length=1, max_length=4000, description='"Please segment the farmland."')
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_pixels: int = Field(16, ge=0, le=1_000_000)


class ReferParams(RasterParams):
    expression: str = Field(..., min_length=1, max_length=2000, description='"the large tank next to the road"')
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    keep: Literal["best", "all"] = "best"


class InstancesParams(RasterParams):
    classes: str | None = Field(None, max_length=10_000, description="Comma-separated class names to keep.")
    score: float = Field(0.5, ge=0.0, le=1.0)


class ChatParams(RasterParams):
    question: str = Field(..., min_length=1, max_length=8000)
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=100,
                                           description="Earlier (question, answer) turns.")


class IndexParams(RasterParams):
    pass


PARAMS: dict[str, type[Params]] = {
    "classify": ClassifyParams, "segment": SegmentParams, "farmland": FarmlandParams, "refer": ReferParams,
    "instances": InstancesParams, "chat": ChatParams, "index": IndexParams,
}
#: the card task a run needs from its model
CARD_TASK = {"index": "search"}


def parse_params(task: str, params: dict[str, Any]) -> Params:
    """``params`` checked against the task's model (a :class:`pydantic.ValidationError`
    otherwise: the service answers 422 naming the field)."""
    if task not in PARAMS:
        raise PromptError(f"unknown task {task!r}.", hint=f"Tasks: {', '.join(PARAMS)}.")
    return PARAMS[task].model_validate(params)


def write_png(rgb: np.ndarray, path: Path) -> Path:
    """An in-memory image as a PNG the file-based tasks can read."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def jsonable(doc: Any) -> Any:
    return json.loads(json.dumps(doc, default=lambda o: o.item() if isinstance(o, np.generic)
                                 else o.tolist() if isinstance(o, np.ndarray) else str(o)))


def run(task: str, model: Any, source: Path | np.ndarray, params: Params, out_dir: Path, *,
        progress: TaskProgress | None = None, resume: bool = False, stem: str = "input") -> dict[str, Any]:
    """Run ``task`` with ``model`` on ``source``; outputs go to ``out_dir`` (named from
    ``stem``). Returns the task's result as a JSON-ready dict; its ``outputs`` are paths."""
    p = params.model_dump()
    raster = {"gsd": p.get("gsd"), "tile": p.get("tile")}
    prefix = out_dir / stem
    if isinstance(source, np.ndarray) and task == "classify":
        with progress_scope(progress, 1) as advance:
            result = model.classify(source, p["classes"], top_k=p["top_k"])
            advance(1)
        return jsonable(result.to_dict())
    if isinstance(source, np.ndarray) and task == "chat":
        result = model.chat(source, p["question"], history=p["history"], max_new_tokens=p["max_tokens"],
                            temperature=p["temperature"], progress=progress)
        return jsonable(result.to_dict())
    if isinstance(source, np.ndarray):
        source = write_png(source, out_dir / f".{stem}.png")
    opts = {k: v for k, v in raster.items() if v is not None}
    if task == "classify":
        is_raster = _georeferenced(source) or "tile" in opts
        out = {"out": prefix} if is_raster else {}
        result = model.classify(source, p["classes"], top_k=p["top_k"], resume=resume and is_raster,
                                progress=progress, **opts, **out)
    elif task == "segment":
        result = model.segment(source, p["classes"], prefix, threshold=p["threshold"], cls_lambda=p["cls_lambda"],
                               min_pixels=p["min_pixels"], resume=resume, overwrite=not resume, progress=progress,
                               **opts)
    elif task == "farmland":
        result = model.segment(source, p["request"], prefix, threshold=p["threshold"], min_pixels=p["min_pixels"],
                               resume=resume, overwrite=not resume, progress=progress, **opts)
    elif task == "refer":
        result = model.refer(source, p["expression"], prefix, threshold=p["threshold"], keep=p["keep"],
                             overwrite=True, progress=progress, **opts)
    elif task == "instances":
        classes = [c.strip() for c in p["classes"].split(",") if c.strip()] if p["classes"] else None
        result = model.instances(source, prefix, classes=classes, score=p["score"], resume=resume,
                                 overwrite=not resume, instance_tif=_georeferenced(source), progress=progress,
                                 **opts)
    elif task == "chat":
        out = {"out": Path(f"{prefix}_chat.gpkg")} if _georeferenced(source) else {}
        result = model.chat(source, p["question"], history=p["history"], max_new_tokens=p["max_tokens"],
                            temperature=p["temperature"], overwrite=True, progress=progress, **opts, **out)
    elif task == "index":
        result = model.build_index([source], out_dir / "index", overwrite=True, progress=progress, **opts)
    else:
        raise PromptError(f"unknown task {task!r}.")
    return jsonable(result.to_dict())


def _georeferenced(path: Path) -> bool:
    return bool(is_georeferenced(path))


def relative_outputs(outputs: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """A result's output paths as names inside ``out_dir`` (what the files endpoint serves)."""
    names = {}
    for kind, path in outputs.items():
        try:
            names[kind] = Path(path).resolve().relative_to(out_dir.resolve()).as_posix()
        except (ValueError, TypeError):
            continue
    return names


def files_of(out_dir: Path) -> list[str]:
    """Every finished file under ``out_dir`` (hidden and temporary files left out)."""
    if not out_dir.is_dir():
        return []
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out_dir).parts))
