"""``rsvl run TASK SOURCES... -o OUTDIR``: one task over many rasters on Ray (or ``rsvl run
jobs.yaml``), with resume and merged outputs; see :mod:`rsvl.scale`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from rsvl.console import emit_json, state
from rsvl.errors import JobError


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def parse_option(text: str) -> tuple[str, Any]:
    """``"min_pixels=32"`` -> ("min_pixels", 32): values are read as JSON when they parse
    (numbers, true/false, lists), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise JobError(f"-O {text!r} is not NAME=VALUE.", hint="Example: -O min_pixels=32")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def run(
    task: str = typer.Argument(..., help="segment, classify, instances, refer, chat, index (build), or a job file (.yaml/.json)."),
    sources: list[str] = typer.Argument(None, help="Rasters, folders (recursive) or glob patterns (quoted)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the run: run.json, items/, merged outputs."),
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: the task's; see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint to use instead of the model card's file."),
    device: str = typer.Option(None, "--device", help="Device of each worker (default: cuda with --gpus-per-worker, else cpu)."),
    classes: str = typer.Option(None, "--classes", help='segment, classify: "forest|trees, water, buildings".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="segment, classify: class file, one class per line."),
    expression: str = typer.Option(None, "--expression", help="refer: the referring expression."),
    question: str = typer.Option(None, "--question", help='chat: the question, e.g. "How many storage tanks are there?".'),
    tile: int = typer.Option(None, "--tile", help="Tile size in pixels (default: the task's)."),
    overlap: int = typer.Option(None, "--overlap", help="Tile overlap in pixels (default: the task's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Tiles per model call (default: the task's)."),
    gsd: float = typer.Option(None, "--gsd", help="Resample to this GSD in metres; 0: native (default: the task's)."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    vector_format: str = typer.Option(None, "--vector-format", help="gpkg (default), geojson or parquet."),
    option: list[str] = typer.Option(None, "--option", "-O", help="Any other task option, NAME=VALUE (repeatable): -O min_pixels=32."),
    workers: int = typer.Option(None, "--workers", "-w", help="Workers (actors), each holding the model (default 1)."),
    gpus_per_worker: float = typer.Option(None, "--gpus-per-worker", help="GPUs per worker (1: one GPU each; default 0)."),
    address: str = typer.Option(None, "--address", help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local Ray."),
    on_error: str = typer.Option(None, "--on-error", help="skip (default: record the item's error and go on) or stop."),
    block: int = typer.Option(None, "--block", help="Split rasters larger than this many pixels a side into blocks (default 8192)."),
    cog: bool = typer.Option(None, "--cog/--no-cog", help="Also write each raster mosaic as a COG."),
    item_timeout: float = typer.Option(None, "--item-timeout", help="Seconds after which an item's worker is killed and the item retried."),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in OUTDIR: finished items are kept."),
    overwrite: bool = typer.Option(None, "--overwrite", help="Start again in an OUTDIR that holds a run."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Run TASK over every raster of SOURCES on Ray: one worker per --workers loads the model once,
    items are retried once on failure, and the outputs are merged (VRT mosaic, one vector file
    with a source column, one index). `rsvl run jobs.yaml` reads everything from a job file."""
    from rsvl.scale.jobs import is_job_file, load_job  # lazy: torch start-up, see rsvl.cli
    from rsvl.scale.runner import run as run_scaled  # lazy: torch start-up, see rsvl.cli

    srcs = list(sources or [])
    if is_job_file(task):
        kwargs = load_job(task)
        if srcs:
            raise JobError("a job file names its own sources.", hint=f"Put them under `sources:` in {task}.")
    else:
        if task.lower() == "index" and srcs[:1] == ["build"] and not Path("build").exists():
            srcs = srcs[1:]  # `rsvl run index build SOURCES...`
        if not srcs:
            raise JobError("no sources given.", hint="Pass rasters, folders or glob patterns after the task.")
        if out is None:
            raise JobError("no output folder given.", hint="Pass -o OUTDIR.")
        kwargs = {"task": task, "sources": srcs, "out": str(out), "options": {}}
    given = {"model": model, "weights": str(weights) if weights else None, "device": device, "workers": workers,
             "gpus_per_worker": gpus_per_worker, "address": address, "on_error": on_error, "block": block,
             "cog": cog, "item_timeout": item_timeout, "resume": resume, "overwrite": overwrite}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    if out is not None:
        kwargs["out"] = str(out)
    opts = dict(kwargs.pop("options"))
    named = {"classes": classes, "labels_file": str(labels_file) if labels_file else None, "expression": expression,
             "question": question, "tile": tile, "overlap": overlap, "batch_size": batch_size, "gsd": gsd, "bands": bands,
             "vector_format": vector_format}
    opts.update({k: v for k, v in named.items() if v is not None})
    opts.update(parse_option(o) for o in option or [])
    task_name, srcs, out_dir = kwargs.pop("task"), kwargs.pop("sources"), kwargs.pop("out")
    result = run_scaled(task_name, srcs, out_dir, **kwargs, **opts)
    if as_json:
        emit_json(result.to_dict())
    else:
        console = Console(highlight=False)
        console.print(f"{result.task}: {result.done}/{result.items} item(s) done "
                      f"({result.skipped} from before), {result.seconds:.1f} s "
                      f"(merge {result.merge_seconds:.1f} s)")
        for kind, paths in result.merged.items():
            for p in paths:
                console.print(f"{kind:>13}  {p}")
        console.print(f"{'manifest':>13}  {result.manifest}")
    if result.failed:
        for f in result.failed[:10]:
            state.error(f"{f['item']}: {f['error']}")
        state.error(f"{len(result.failed)} of {result.items} item(s) failed (listed in {result.manifest}); "
                    "fix them and rerun with --resume")
        raise typer.Exit(2)
