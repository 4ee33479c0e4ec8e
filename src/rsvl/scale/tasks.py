"""The task table of ``rsvl run``: for each task, how one item is run on a worker and which
of its outputs the driver merges.

Each entry is a :class:`TaskSpec`. ``run(model, source, prefix, options)`` calls the task
exactly as its own command does (same function, same options, ``overwrite=True`` so that a
retried item replaces what a failed attempt left) and returns the item's output files plus
any table rows; the driver then mosaics the ``rasters`` kinds into one VRT each, joins the
``vectors`` kinds into one file with a ``source`` column, concatenates ``table`` rows into a
CSV, and builds one FAISS index when ``index`` is set. Adding a task (``chat``, farmland) is
one more entry in :data:`TASKS`.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsvl.data.classes import load_classes
from rsvl.errors import JobError
from rsvl.index.store import metadata_schema
from rsvl.io import atomic_path, write_text
from rsvl.tasks.chat import chat, check_question
from rsvl.tasks.classify import classify
from rsvl.tasks.instances import instances
from rsvl.tasks.refer import check_expression, refer
from rsvl.tasks.search import embed_sources, model_name, plan_sources
from rsvl.tasks.segment import segment
from rsvl.tasks.sources import is_georeferenced

#: keyword arguments of the task functions that the runner itself sets
RESERVED = frozenset({"model", "source", "sources", "out", "overwrite", "resume", "progress", "model_name",
                      "predictor", "classes_specs"})

RunItem = Callable[[Any, str, Path, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class TaskSpec:
    """How ``rsvl run`` runs one task (see module doc).

    Attributes:
        name: the task name on the command line.
        default_model: the model used when none is given.
        run: ``run(model, source, prefix, options) -> {"outputs": {kind: path}, "rows": [...]}``.
        function: the task function whose keyword arguments are the task's options.
        own_options: options ``run`` consumes itself (not passed to ``function`` as is).
        required: options that must be given (``classes`` for segment).
        rasters: output kinds mosaicked into ``KIND.vrt``.
        vectors: output kinds joined into one vector file ``KIND.<format>``.
        table: name of the CSV the items' rows are joined into (``None``: no rows).
        index: the items' embeddings are merged into one index folder.
        block: whether a raster larger than the block size is split into blocks.
        vector_rule: how a block's features are kept: ``clip`` to its core (regions), or
            ``centre`` (objects whose centre lies in the core: no object counted twice).
    """

    name: str
    default_model: str
    run: RunItem
    function: Callable[..., Any]
    own_options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    rasters: tuple[str, ...] = ()
    vectors: tuple[str, ...] = ()
    table: str | None = None
    index: bool = False
    block: bool = False
    vector_rule: str = "clip"

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with unknown or reserved names refused and required ones present
        (checked on the driver, before any worker starts)."""
        params = inspect.signature(self.function).parameters
        known = (set(params) | set(self.own_options)) - RESERVED
        opts = dict(options)
        for key in opts:
            if key not in known:
                raise JobError(f"{self.name} has no option {key!r}.",
                               hint=f"Options of {self.name}: {', '.join(sorted(known))}.")
        for key in self.required:
            if opts.get(key) in (None, ""):
                raise JobError(f"{self.name} needs the option {key!r}.", hint=_REQUIRED_HINTS.get(key))
        if "bands" in opts:
            opts["bands"] = parse_bands(opts["bands"])
        if self.name in ("segment", "classify"):
            load_classes(inline=opts.get("classes"), file=opts.get("labels_file"))  # fails now, not on a worker
        if self.name == "refer":
            check_expression(opts.get("expression"))
        if self.name == "chat":
            opts["question"] = check_question(opts.get("question"))
        return opts

    def task_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in options.items() if k not in self.own_options}


_REQUIRED_HINTS = {
    "classes": 'Pass the classes, e.g. --classes "forest|trees, water, buildings" (or --labels-file).',
    "expression": 'Pass the expression, e.g. --expression "the large storage tank next to the road".',
    "question": 'Pass the question, e.g. --question "How many storage tanks are there?".',
}


def parse_bands(value: Any) -> list[int] | None:
    """``"4,3,2"`` or ``[4, 3, 2]`` -> [4, 3, 2]; None stays None."""
    if value is None or value == "":
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        return [int(p) for p in parts if p != ""]
    except (TypeError, ValueError):
        raise JobError(f"bands {value!r} is not a list of band numbers.", hint="Example: --bands 4,3,2") from None


def _classes(options: Mapping[str, Any]) -> Any:
    return load_classes(inline=options.get("classes"), file=options.get("labels_file"))


def _existing(outputs: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in outputs.items() if v and Path(v).exists()}


def run_segment(model: Any, source: str, prefix: Path, options: dict[str, Any]) -> dict[str, Any]:
    spec = TASKS["segment"]
    res = segment(model, source, _classes(options), prefix, overwrite=True, model_name=getattr(model, "name", None),
                  **spec.task_kwargs(options))
    return {"outputs": _existing(res.outputs), "rows": []}


def run_classify(model: Any, source: str, prefix: Path, options: dict[str, Any]) -> dict[str, Any]:
    spec = TASKS["classify"]
    res = classify(model, source, _classes(options), out=prefix, overwrite=True, **spec.task_kwargs(options))
    outputs = _existing(res.outputs)
    rows = []
    if not outputs:  # a whole image: its predictions are the output
        rows = [{"source": p.source, "label": p.label, "score": p.score, "topk": json.dumps(p.topk)}
                for p in res.predictions]
    return {"outputs": outputs, "rows": rows}


def run_instances(model: Any, source: str, prefix: Path, options: dict[str, Any]) -> dict[str, Any]:
    spec = TASKS["instances"]
    res = instances(model, source, prefix, overwrite=True, model_name=getattr(model, "name", None),
                    **spec.task_kwargs(options))
    return {"outputs": _existing(res.outputs), "rows": []}  # type: ignore[union-attr]


def run_refer(model: Any, source: str, prefix: Path, options: dict[str, Any]) -> dict[str, Any]:
    spec = TASKS["refer"]
    kw = spec.task_kwargs(options)
    expression = kw.pop("expression")
    res = refer(model, source, expression, prefix, overwrite=True, model_name=getattr(model, "name", None), **kw)
    outputs = _existing(res.outputs)
    if not str(outputs.get("mask", "")).lower().endswith((".tif", ".tiff")):
        outputs.pop("mask", None)  # a PNG mask of a plain image has no place in a mosaic
    row = {"source": source, "expression": res.expression, "found": res.found, "score": res.score,
           "pixels": res.pixels, "bounds": json.dumps(res.bounds)}
    return {"outputs": outputs, "rows": [row]}


def run_chat(model: Any, source: str, prefix: Path, options: dict[str, Any]) -> dict[str, Any]:
    """One question about one raster or image: its boxes (grounding) or windows as a vector
    file when it is a raster, and one row with the combined answer."""
    spec = TASKS["chat"]
    kw = spec.task_kwargs(options)
    fmt = str(options.get("vector_format") or "gpkg")
    out = Path(f"{prefix}.{fmt}") if is_georeferenced(source) else None
    res = chat(model, source, options["question"], out=out, overwrite=True, model_name=getattr(model, "name", None), **kw)
    outputs = {k: v for k, v in _existing(res.outputs).items() if k == "vectors"}
    row = {"source": source, "question": res.question, "kind": res.kind, "answer": res.answer,
           "number": res.number, "yes": res.yes, "combined": res.combined, "boxes": len(res.boxes)}
    return {"outputs": outputs, "rows": [row]}


#: the metadata columns an item of ``index build`` writes (the run numbers the rows at merge)
def index_rows_schema() -> pa.Schema:
    return pa.schema([f for f in metadata_schema() if f.name not in ("id", "model", "dim")])


def run_index(model: Any, source: str, prefix: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Embed one source as ``rsvl index build`` does; write its vectors (``.npy``) and
    metadata rows (``.parquet``), which the driver joins into one index."""
    tile = int(options.get("tile") or getattr(model, "image_size", 224))
    overlap, gsd = int(options.get("overlap") or 0), options.get("gsd") or None
    planned = plan_sources([source], tile=tile, overlap=overlap, gsd=gsd)
    vectors, rows = embed_sources(model, planned, tile=tile, overlap=overlap, gsd=gsd, bands=options.get("bands"),
                                  min_valid=float(options.get("min_valid", 0.5)),
                                  batch_size=int(options.get("batch_size", 16)))
    paths = {"vectors": Path(f"{prefix}_vectors.npy"), "rows": Path(f"{prefix}_rows.parquet")}
    schema = index_rows_schema()
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    table = table.replace_schema_metadata({"model": model_name(model), "dim": str(int(vectors.shape[1]) if len(rows) else 0),
                                          "image_size": str(int(getattr(model, "image_size", tile)))})
    with atomic_path(paths["vectors"]) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(vectors, np.float32))
    with atomic_path(paths["rows"]) as tmp:
        pq.write_table(table, tmp)
    return {"outputs": {k: str(v) for k, v in paths.items()}, "rows": []}


def _index_options(model: Any = None, sources: Any = None, out: Any = None, *, tile: int | None = None,
                   overlap: int = 0, gsd: float | None = None, bands: Any = None, min_valid: float = 0.5,
                   batch_size: int = 16, ivf_threshold: int | None = None, nlist: int | None = None,
                   nprobe: int | None = None, index_type: str = "auto", hnsw_m: int | None = None,
                   ef_construction: int | None = None, ef_search: int | None = None) -> None:
    """The options of ``index build`` under ``rsvl run`` (those of :func:`rsvl.tasks.search.build`)."""


#: every task ``rsvl run`` knows, by name
TASKS: dict[str, TaskSpec] = {
    "segment": TaskSpec("segment", "mini-clip", run_segment, segment, own_options=("classes", "labels_file"),
                        required=("classes",), rasters=("classes", "confidence", "probabilities"),
                        vectors=("polygons",), block=True, vector_rule="clip"),
    "classify": TaskSpec("classify", "mini-clip", run_classify, classify, own_options=("classes", "labels_file"),
                         required=("classes",), rasters=("labels",), vectors=("tiles",), table="predictions"),
    "instances": TaskSpec("instances", "mini-instances", run_instances, instances, rasters=(),
                          vectors=("instances",), block=True, vector_rule="centre"),
    "refer": TaskSpec("refer", "mini-refer", run_refer, refer, own_options=("expression",),
                      required=("expression",), rasters=("mask",), vectors=("vector",), table="refer"),
    "index": TaskSpec("index", "mini-clip", run_index, _index_options, index=True),
    "chat": TaskSpec("chat", "mini-chat", run_chat, chat, own_options=("question", "vector_format"),
                     required=("question",), vectors=("vectors",), table="chat"),
}
#: other spellings of task names
ALIASES = {"index-build": "index", "index_build": "index", "build": "index"}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name`` (``index build`` and ``index-build`` are ``index``)."""
    key = str(name).strip().lower().replace(" build", "")
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise JobError(f"rsvl run has no task {name!r}.", hint=f"Tasks: {', '.join(TASKS)}.")
    return TASKS[key]


def block_pad(spec: TaskSpec, options: Mapping[str, Any]) -> int:
    """Pixels of context a block is read with on every side: one tile of the task."""
    tile = options.get("tile")
    return int(tile) if tile else 512


def write_rows(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """An item's table rows as JSON (the driver joins them into the run's CSV)."""
    return write_text(path, json.dumps(rows, indent=1, default=str) + "\n")


__all__ = ["TASKS", "TaskSpec", "block_pad", "get_task", "index_rows_schema", "parse_bands", "write_rows"]
