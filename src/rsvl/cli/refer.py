"""``rsvl refer IMAGE|RASTER "the ship closest to the bridge"``: referring segmentation."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rsvl.cli import preflight
from rsvl.cli.options import parse_bands
from rsvl.console import emit_json, task_progress
from rsvl.errors import UnknownModelError


def register(app: typer.Typer) -> None:
    app.command("refer")(refer)


def refer(
    source: Path = typer.Argument(..., help="Image (PNG, JPEG) or raster (GeoTIFF, COG, VRT ...)."),
    expression: str = typer.Argument(..., help='What to find, e.g. "the ship closest to the bridge".'),
    out: Path = typer.Option(None, "--out", "-o", help="Output prefix (default: the input's name in the current folder)."),
    model: str = typer.Option("mini-refer", "--model", "-m", help="Referring model (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint instead of the model card's file."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    gsd: float = typer.Option(None, "--gsd", help="Resample to this GSD (metres, also on EPSG:4326) before the model; default: native."),
    tile: int = typer.Option(1280, "--tile", help="Inputs larger than this are cut into tiles of this size (mini-refer was trained on whole ~500-1100 px images resized to 480)."),
    overlap: int = typer.Option(256, "--overlap", help="Tile overlap in pixels."),
    threshold: float = typer.Option(0.5, "--threshold", help="Probability above which a pixel belongs to the object."),
    min_pixels: int = typer.Option(16, "--min-pixels", help="Ignore candidate objects smaller than this."),
    all_objects: bool = typer.Option(False, "--all", help="Keep every candidate object, not only the best one."),
    vector_format: str = typer.Option("gpkg", "--vector-format", help="gpkg, geojson or parquet (georeferenced inputs)."),
    to_crs: str = typer.Option(None, "--to-crs", help="Reproject the polygon, e.g. EPSG:4326."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Segment the one object EXPRESSION refers to: mask, polygon with score, overlay."""
    import rsvl  # lazy: torch start-up, see rsvl.cli
    from rsvl.models.registry import get_card  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.refer import (
        check_expression,  # lazy: torch start-up, see rsvl.cli
        output_paths,  # lazy: torch start-up, see rsvl.cli
    )
    from rsvl.tasks.refer import refer as run_refer  # lazy: torch start-up, see rsvl.cli

    check_expression(expression)
    georeferenced = preflight.raster_file(source)
    card = get_card(model)
    if "refer" not in card.tasks:
        raise UnknownModelError(f"{card.name} is not a referring-segmentation model.",
                                hint="Use --model mini-refer (see `rsvl models` for the refer task).")
    prefix = out if out is not None else Path.cwd() / source.stem
    preflight.new_outputs(output_paths(prefix, vector_format, georeferenced).values(), overwrite)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    m = rsvl.load(card.name, weights=weights, device=device)
    result = run_refer(m, source, expression, prefix, tile=tile, overlap=overlap, threshold=threshold,
                       min_pixels=min_pixels, keep="all" if all_objects else "best",
                       bands=parse_bands(bands), gsd=gsd, vector_format=vector_format, to_crs=to_crs,
                       overwrite=overwrite, device=device, model_name=card.name, progress=task_progress("refer"))
    if as_json:
        emit_json(result.to_dict())
        return

    console = Console(highlight=False)
    if result.found:
        console.print(f'"{result.expression}": found, score {result.score:.3f}, {result.pixels} px '
                      f"({result.tiles} tile(s), {result.seconds:.1f} s)", markup=False)
    else:
        console.print(f'"{result.expression}": nothing above threshold {threshold} '
                      f"({result.tiles} tile(s), {result.seconds:.1f} s)", markup=False)
    for name, path in result.outputs.items():
        console.print(f"  {name}: {path}", markup=False)
