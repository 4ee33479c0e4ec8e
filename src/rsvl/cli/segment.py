"""``rsvl segment RASTER "classes"``: open-vocabulary segmentation of any raster or image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli import preflight
from rsvl.cli.options import fast_option, parse_bands
from rsvl.console import emit_json, state, task_progress
from rsvl.data.classes import load_classes


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)


def segment(
    raster: Path = typer.Argument(..., help="Raster or image (GeoTIFF, COG, VRT, JPEG2000, PNG, JPEG)."),
    classes: str = typer.Argument(
        None, help='Classes separated by commas, synonyms joined by "|": "forest|trees, water, buildings|houses".'
    ),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class file: one class per line, synonyms separated by commas."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Language-guided models (mini-fsvlm, fsvlm-7b): read the request from this text file."),
    out: Path = typer.Option(None, "--out", "-o", help="Output prefix (default: the raster's name in the current folder)."),
    model: str = typer.Option("mini-clip", "--model", "-m", help="Model name (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint to use instead of the model card's file."),
    templates: str = typer.Option(None, "--templates", help="'imagenet', 'farslip', or one template with {} (default: the model's)."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    gsd: float = typer.Option(None, "--gsd", help="Resample to this GSD (metres) for the model; default: the model's training GSD (refused if "
                                 "that upsamples more than 4x: pass it to confirm); 0: native."),
    tile: int = typer.Option(None, "--tile", help="Tile size in pixels (default: the model's)."),
    overlap: int = typer.Option(None, "--overlap", help="Tile overlap in pixels (default: a quarter of the tile)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per model call."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write per-class probability bands."),
    cls_lambda: float = typer.Option(
        0.0, "--cls-lambda", help="SegEarth-OV CLS correction: add lambda x cos(CLS, class) to every pixel (SegEarth: -0.3; ViT CLIPs only)."
    ),
    threshold: float = typer.Option(
        0.0, "--threshold", help="Pixels whose best class probability is below this become --background (SegEarth: 0.1-0.4)."
    ),
    background: str = typer.Option(
        "background", "--background", help="Class for low-confidence pixels: a class of the list, else added as an extra class."
    ),
    other: bool = typer.Option(
        None, "--other/--no-other", help="The model's learned 'other' class for pixels of none of the classes "
        "(default: on when the model has one): it joins --background if listed, else is added as that class."
    ),
    min_pixels: int = typer.Option(16, "--min-pixels", help="Drop polygons smaller than this many pixels."),
    simplify: float = typer.Option(0.0, "--simplify", help="Simplify polygons (tolerance in pixels)."),
    vector_format: str = typer.Option("gpkg", "--vector-format", help="gpkg, geojson or parquet."),
    to_crs: str = typer.Option(None, "--to-crs", help="Reproject polygons, e.g. EPSG:4326."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    fast: bool = fast_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Segment RASTER into the given classes: class GeoTIFF, confidence, polygons, PNG overlay.

    With a language-guided model (--model mini-fsvlm, fsvlm-7b, lisa-7b-v1) the text is a
    request instead: "This is a 1 m image of irrigated fields. Please segment the farmland."
    """
    import rsvl  # lazy: torch start-up, see rsvl.cli

    card = preflight.model_for("segment", model, weights, also=("farmland",))
    if "farmland" in card.tasks and "segment" not in card.tasks:
        _segment_request(raster, classes, prompt_file, out, model, weights, bands, gsd, tile, overlap, min_pixels,
                         simplify, vector_format, to_crs, device, overwrite, resume, as_json)
        return
    if prompt_file is not None:
        raise typer.BadParameter(f"--prompt-file is for language-guided models; {model} takes classes.",
                                 param_hint="--prompt-file")
    from rsvl.tasks.segment import output_paths  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.segment import segment as run_segment  # lazy: torch start-up, see rsvl.cli

    preflight.not_a_path(classes)
    specs = load_classes(inline=classes, file=labels_file)
    preflight.raster_file(raster)
    prefix = out if out is not None else Path.cwd() / raster.stem
    if not resume:
        paths = output_paths(prefix, probabilities, preflight.vector_format(vector_format))
        preflight.new_outputs(paths.values(), overwrite)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    m = rsvl.load(model, weights=weights, device=device, fast=fast)
    progress = task_progress("segment")
    result = run_segment(
        m, raster, specs, prefix, templates=templates, bands=parse_bands(bands), gsd=gsd, tile=tile,
        overlap=overlap, batch_size=batch_size, probabilities=probabilities, min_pixels=min_pixels,
        simplify=simplify, vector_format=vector_format, to_crs=to_crs, overwrite=overwrite, resume=resume,
        progress=progress, model_name=model, cls_lambda=cls_lambda, threshold=threshold, background=background,
        other=other,
    )
    if as_json:
        emit_json(result.to_dict())
        return

    console = Console(highlight=False)
    console.print(f"{raster.name}: {result.tiles} tile(s), {result.seconds:.1f} s")
    t = Table(show_edge=False)
    t.add_column("class")
    t.add_column("share", justify="right")
    for name, frac in result.class_fractions.items():
        t.add_row(name, f"{100 * frac:.1f} %")
    console.print(t)
    for kind, path in result.outputs.items():
        console.print(f"{kind:>13}  {path}")
    state.notice(f"{result.polygons} polygon(s)")


def _segment_request(raster: Path, text: str | None, prompt_file: Path | None, out: Path | None, model: str,
                     weights: Path | None, bands: str | None, gsd: float | None, tile: int | None, overlap: int | None,
                     min_pixels: int, simplify: float, vector_format: str, to_crs: str | None, device: str,
                     overwrite: bool, resume: bool, as_json: bool) -> None:
    import rsvl  # lazy: torch start-up, see rsvl.cli
    from rsvl.errors import InputNotFoundError
    from rsvl.tasks.farmland import check_request, output_paths

    if prompt_file is not None:
        if text:
            raise typer.BadParameter("give the request inline or with --prompt-file, not both.", param_hint="--prompt-file")
        if not prompt_file.is_file():
            raise InputNotFoundError(f"prompt file not found: {prompt_file}.")
        text = prompt_file.read_text(encoding="utf-8", errors="replace")
    request = check_request(text)
    preflight.raster_file(raster)
    prefix = out if out is not None else Path.cwd() / raster.stem
    if not resume:
        preflight.new_outputs(output_paths(prefix, preflight.vector_format(vector_format)).values(), overwrite)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    m = rsvl.load(model, weights=weights, device=device)
    result = m.segment(raster, request, prefix, bands=parse_bands(bands), gsd=gsd, tile=tile, overlap=overlap,
                       min_pixels=min_pixels, simplify=simplify, vector_format=vector_format, to_crs=to_crs,
                       overwrite=overwrite, resume=resume, progress=task_progress("segment"))
    if as_json:
        emit_json(result.to_dict())
        return
    console = Console(highlight=False)
    console.print(f"{raster.name}: {result.tiles} tile(s), {result.seconds:.1f} s")
    console.print(f"answer: {result.answer}", markup=False)
    area = f", {result.hectares:.2f} ha" if result.hectares is not None else ""
    console.print(f"{result.target}: {100 * result.fraction:.1f} % of the valid pixels, {result.polygons} polygon(s){area}",
                  markup=False)
    for kind, path in result.outputs.items():
        console.print(f"{kind:>13}  {path}")
