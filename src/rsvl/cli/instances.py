"""``rsvl instances IMAGE|FOLDER|RASTER``: instance segmentation (boxes, masks, polygons)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rsvl.cli import preflight
from rsvl.cli.options import fast_option, parse_bands
from rsvl.console import emit_json, state, task_progress
from rsvl.errors import ResumeError
from rsvl.geo.journal import refuse_stale_journal


def register(app: typer.Typer) -> None:
    app.command("instances")(instances)


def instances(
    source: Path = typer.Argument(..., help="Image, folder of images, or georeferenced raster (GeoTIFF, COG, VRT...)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output prefix (a folder for a folder input; default: the input's name in the current folder)."),
    model: str = typer.Option("mini-instances", "--model", "-m", help="Model name (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint to use instead of the model card's file."),
    classes: str = typer.Option(None, "--classes", help="Keep only these classes, e.g. airplane,ship (default: all)."),
    score: float = typer.Option(0.5, "--score", help="Minimum detection score."),
    tile: int = typer.Option(768, "--tile", help="Tile size in pixels for rasters and large images."),
    overlap: int = typer.Option(None, "--overlap", help="Tile overlap in pixels (default: a quarter of the tile)."),
    batch_size: int = typer.Option(2, "--batch-size", help="Tiles per model call."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    gsd: float = typer.Option(None, "--gsd", help="Resample the raster to this GSD (metres) first; default: native."),
    instance_tif: bool = typer.Option(False, "--instance-tif", help="Also write an instance-id GeoTIFF (0 = background)."),
    vector_format: str = typer.Option("gpkg", "--vector-format", help="gpkg, geojson or parquet (rasters)."),
    to_crs: str = typer.Option(None, "--to-crs", help="Reproject polygons, e.g. EPSG:4326."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    fast: bool = fast_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run on a raster (same input and options)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Find object instances: PNG overlay + GeoJSON for images; polygons in the source CRS
    (GeoPackage) and optionally an instance-id GeoTIFF for rasters."""
    import rsvl  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.instances import (
        instances as run_instances,  # lazy: torch start-up, see rsvl.cli
    )
    from rsvl.tasks.instances import output_paths  # lazy: torch start-up, see rsvl.cli

    preflight.model_for("instances", model, weights)
    preflight.file_or_folder(source)
    preflight.vector_format(vector_format)
    if source.is_dir() and resume:
        raise ResumeError("--resume continues one raster, not a folder of images.",
                          hint="Run the folder again without --resume (with --overwrite to redo its outputs).")
    if source.is_dir():
        base = out if out is not None else Path.cwd() / source.name
        jobs = [(f, base / f.stem) for f in preflight.images(source)]
    else:
        jobs = [(source, out if out is not None else Path.cwd() / source.stem)]
    for path, prefix in jobs:
        georeferenced = preflight.raster_file(path)
        paths = output_paths(prefix, vector_format, georeferenced)
        if not (georeferenced and instance_tif):
            paths.pop("instance_tif", None)
        refuse_stale_journal(paths["instances"], resume, overwrite)
        if not resume:
            preflight.new_outputs(paths.values(), overwrite)
    m = rsvl.load(model, weights=weights, device=device, fast=fast)
    progress = task_progress("instances", unit="images" if source.is_dir() else "tiles")
    result = run_instances(
        m, source, out, classes=classes, score=score, tile=tile, overlap=overlap,
        batch_size=batch_size, bands=parse_bands(bands), gsd=gsd, vector_format=vector_format,
        to_crs=to_crs, instance_tif=instance_tif, overwrite=overwrite, resume=resume, progress=progress,
        model_name=model,
    )
    results = result if isinstance(result, list) else [result]
    if as_json:
        doc = [r.to_dict() for r in results]
        emit_json(doc if isinstance(result, list) else doc[0])
        return

    console = Console(highlight=False)
    for r in results:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items())) or "none"
        console.print(f"{Path(r.source).name}: {r.instances} instance(s) ({counts}); "
                      f"{r.tiles} tile(s), {r.seconds:.1f} s", markup=False)
        for k, v in r.outputs.items():
            console.print(f"  {k}: {v}", markup=False)
    if results and not any(r.instances for r in results):
        state.notice(nothing_found(model, results[0].classes, score))


def nothing_found(model: str, classes: list[str], score: float) -> str:
    """The one line that says what a model can find, when it found nothing."""
    return (f"nothing found: {model} detects only {', '.join(classes)} "
            f"(--score {score}); other objects are not detected.")
