"""``rsvl classify IMAGE|FOLDER|RASTER --labels "..."``: zero-shot scene classification."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli import preflight
from rsvl.cli.options import fast_option, parse_bands
from rsvl.console import emit_json, task_progress
from rsvl.data.classes import load_classes
from rsvl.errors import OutputError
from rsvl.geo.journal import refuse_stale_journal
from rsvl.io import atomic_path


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)


def classify(
    source: Path = typer.Argument(..., help="An image, a folder of images, or a raster."),
    labels: str = typer.Option(None, "--labels", "-l", help='Classes: "farmland|cropland, forest|trees, river, residential".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class file: one class per line, synonyms separated by commas."),
    model: str = typer.Option("mini-clip", "--model", "-m", help="Model name (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint to use instead of the model card's file."),
    templates: str = typer.Option(None, "--templates", help="'imagenet', 'farslip', or one template with {} (default: the model's). Templates only: the scale stays the model's."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels to report per image."),
    tile: int = typer.Option(None, "--tile", help="Classify a grid of tiles of this size (default for georeferenced rasters: the model's input size)."),
    gsd: float = typer.Option(None, "--gsd", help="Resample rasters to this GSD (metres) first."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    batch_size: int = typer.Option(16, "--batch-size"),
    out: Path = typer.Option(None, "--out", "-o", help="Raster mode: output prefix for _tiles.gpkg and _tiles.tif."),
    csv_path: Path = typer.Option(None, "--csv", help="Also write the table as CSV."),
    device: str = typer.Option("cpu", "--device"),
    fast: bool = fast_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Raster tiles: continue an interrupted run (same input and options)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Zero-shot classification: top-k labels per image, or per tile of a raster.

    Scores are softmax over the classes of the model's own logit scale x cosine similarity
    (exp of the scale the checkpoint learned, capped at 100), also with --templates
    farslip. FarSLIP's benchmark protocol (rsvl eval zeroshot --templates farslip) fixes the
    scale at 100 instead: same ranking, other probabilities.
    """
    import rsvl  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.classify import classify as run_classify  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.classify import raster_output_paths  # lazy: torch start-up, see rsvl.cli

    specs = load_classes(inline=labels, file=labels_file)
    preflight.model_for("classify", model, weights)
    georeferenced = preflight.file_or_folder(source)
    if georeferenced is not None and (tile is not None or georeferenced):
        tiles_out = raster_output_paths(source, out)
        refuse_stale_journal(tiles_out[0], resume, overwrite)
        if not resume:
            preflight.new_outputs(tiles_out, overwrite)
    preflight.new_outputs([csv_path], overwrite)
    m = rsvl.load(model, weights=weights, device=device, fast=fast)
    result = run_classify(m, source, specs, templates=templates, top_k=top_k, batch_size=batch_size,
                          bands=parse_bands(bands), tile=tile, gsd=gsd, out=out, overwrite=overwrite,
                          resume=resume, progress=task_progress("classify", unit="images" if source.is_dir() else "tiles"))
    if csv_path is not None:
        _write_csv(result, csv_path, top_k, overwrite)
    if as_json:
        emit_json(result.to_dict())
        return

    console = Console(highlight=False)
    if result.outputs:
        counts: dict[str, int] = {}
        for p in result.predictions:
            counts[p.label] = counts.get(p.label, 0) + 1
        t = Table(title=f"{len(result.predictions)} tiles", show_edge=False)
        t.add_column("label")
        t.add_column("tiles", justify="right")
        for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
            t.add_row(k, str(v))
        console.print(t)
        for kind, path in result.outputs.items():
            console.print(f"{kind:>8}  {path}")
        return
    t = Table(show_edge=False)
    t.add_column("image")
    for i in range(min(top_k, len(result.classes))):
        t.add_column(f"#{i + 1}")
    for p in result.predictions:
        t.add_row(Path(p.source).name, *[f"{lab} {s:.2f}" for lab, s in p.topk])
    console.print(t)


def _write_csv(result, path: Path, top_k: int, overwrite: bool) -> None:

    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists.", hint="Pass --overwrite to replace it.")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        k = min(top_k, len(result.classes))
        w.writerow(["source", "label", "score", *[x for i in range(2, k + 1) for x in (f"label{i}", f"score{i}")]])
        for p in result.predictions:
            w.writerow([p.source, p.label, f"{p.score:.6f}", *[x for lab, s in p.topk[1:] for x in (lab, f"{s:.6f}")]])
    print(f"wrote {path}", file=sys.stderr)
