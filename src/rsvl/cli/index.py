"""``rsvl index build|add`` and ``rsvl search``: RS CLIP text / image search over an index."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli import preflight
from rsvl.cli.options import fast_option, parse_bands
from rsvl.console import emit_json, state, task_progress
from rsvl.errors import PromptError


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Build and extend embedding indexes for `rsvl search`.", no_args_is_help=True,
                      rich_markup_mode=None)
    sub.command("build")(build)
    sub.command("add")(add)
    app.add_typer(sub, name="index")
    app.command("search")(search)


def _load(name: str, weights: Path | None, device: str, fast: bool = False):
    from rsvl.api import load  # lazy: torch start-up, see rsvl.cli

    return load(name, weights=weights, device=device, fast=fast)


def _report(result, as_json: bool, verb: str) -> None:

    if as_json:
        emit_json(result.to_dict())
        return

    c = Console(highlight=False)
    c.print(f"{result.index}: {verb} {result.added} vector(s) from {len(result.sources_added)} source(s); "
            f"{result.count} in the index ({result.index_type}, model {result.model})", markup=False)
    if result.sources_skipped:
        c.print(f"  {len(result.sources_skipped)} source(s) already indexed and unchanged: skipped", markup=False)
    if result.sources_replaced:
        c.print(f"  {len(result.sources_replaced)} changed source(s) re-embedded", markup=False)
    if result.tiles_skipped_nodata:
        c.print(f"  {result.tiles_skipped_nodata} tile(s) mostly nodata: not indexed", markup=False)


def build(
    sources: list[Path] = typer.Argument(..., help="Images, folders of images (recursive) and rasters."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to create."),
    model: str = typer.Option("mini-clip", "--model", "-m", help="Model name (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint to use instead of the model card's file."),
    tile: int = typer.Option(None, "--tile", help="Tile size for georeferenced rasters (default: the model's input size)."),
    overlap: int = typer.Option(0, "--overlap", help="Tile overlap in pixels."),
    gsd: float = typer.Option(None, "--gsd", help="Resample rasters to this GSD (metres) first."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    batch_size: int = typer.Option(16, "--batch-size"),
    index_type: str = typer.Option("auto", "--index-type",
                                   help="auto (exact up to --ivf-threshold vectors, IVF above), flat, ivf or hnsw."),
    ivf_threshold: int = typer.Option(50_000, "--ivf-threshold", help="With auto: above this many vectors, build an approximate IVF index."),
    nlist: int = typer.Option(None, "--nlist", help="IVF lists (default: 4 x sqrt(count))."),
    nprobe: int = typer.Option(None, "--nprobe", help="IVF lists probed per query (default: derived from the size)."),
    hnsw_m: int = typer.Option(None, "--hnsw-m", help="HNSW neighbours per vector (default 32)."),
    ef_search: int = typer.Option(None, "--ef-search", help="HNSW candidates per query (default 64)."),
    device: str = typer.Option("cpu", "--device"),
    fast: bool = fast_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Embed images, folders and raster tiles into a new index folder."""
    from rsvl.index.store import IndexConfig, check_output  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.search import build as run_build  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.search import expand_sources  # lazy: torch start-up, see rsvl.cli

    config = IndexConfig(ivf_threshold, nlist, nprobe, index_type, hnsw_m, None, ef_search).check()
    preflight.model_for("search", model, weights)
    check_output(out, replace=overwrite)
    expand_sources(sources)
    m = _load(model, weights, device, fast)
    result = run_build(m, sources, out, tile=tile, overlap=overlap, gsd=gsd,
                       bands=parse_bands(bands), batch_size=batch_size, ivf_threshold=ivf_threshold, nlist=nlist,
                       nprobe=nprobe, index_type=config.index_type, hnsw_m=hnsw_m, ef_search=ef_search,
                       overwrite=overwrite, progress=task_progress("index", unit="images"))
    _report(result, as_json, "indexed")


def add(
    index: Path = typer.Argument(..., help="Index folder (from `rsvl index build`)."),
    sources: list[Path] = typer.Argument(..., help="Images, folders and rasters to add."),
    model: str = typer.Option(None, "--model", "-m", help="Must be the index's model (default: it)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint of the index's model."),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    fast: bool = fast_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Add sources to an index; sources already indexed and unchanged are not re-embedded."""
    from rsvl.index.store import EmbeddingIndex  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.search import add as run_add  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.search import expand_sources  # lazy: torch start-up, see rsvl.cli

    idx = EmbeddingIndex.open(index)
    expand_sources(sources)
    if model is not None:
        idx.check_model(model, what="extend")
    m = _load(idx.model, weights, device, fast)
    result = run_add(m, index, sources, batch_size=batch_size, progress=task_progress("index", unit="images"))
    _report(result, as_json, "added")


def search(
    index: Path = typer.Argument(..., help="Index folder (from `rsvl index build`)."),
    query: str = typer.Argument(None, help='Text query, e.g. "a stadium next to a river".'),
    k: int = typer.Option(10, "-k", "--top-k", help="How many hits."),
    image: Path = typer.Option(None, "--image", help="Search with this image instead of text."),
    geojson: Path = typer.Option(None, "--geojson", help="Write the hits' footprints (EPSG:4326) here."),
    model: str = typer.Option(None, "--model", "-m", help="Must be the index's model (default: it)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint of the index's model."),
    nprobe: int = typer.Option(None, "--nprobe", help="IVF lists probed (default: the index's)."),
    ef_search: int = typer.Option(None, "--ef-search", help="HNSW candidates per query (default: the index's)."),
    device: str = typer.Option("cpu", "--device"),
    fast: bool = fast_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --geojson file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Rank the tiles and images of an index by similarity to a text or an image."""
    from rsvl.index.store import EmbeddingIndex  # lazy: torch start-up, see rsvl.cli
    from rsvl.tasks.search import search as run_search  # lazy: torch start-up, see rsvl.cli

    if image is None and (query is None or not query.strip()):

        raise PromptError("empty query: give a text query or --image PATH.",
                          hint=f'Example: rsvl search {index} "a stadium next to a river"')
    idx = EmbeddingIndex.open(index)
    if model is not None:
        idx.check_model(model)
    if image is not None:
        preflight.raster_file(image)
    preflight.new_outputs([geojson], overwrite)
    m = _load(idx.model, weights, device, fast)
    result = run_search(idx, query, k=k, image=image, model=m, nprobe=nprobe, ef_search=ef_search)
    if geojson is not None:
        result.write_geojson(geojson, overwrite=overwrite)
        missing = sum(1 for h in result.hits if h.geometry_4326 is None)
        if missing:
            state.warn(f"{missing} hit(s) have no footprint (source not georeferenced): left out of {geojson}")
    if as_json:
        emit_json(result.to_dict())
        return

    console = Console(highlight=False)
    t = Table(show_edge=False, title=f"{len(result.hits)} hits ({result.model})")
    for name, just in (("rank", "right"), ("score", "right"), ("source", "left"), ("row", "right"),
                       ("col", "right"), ("window", "left")):
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    for h in result.hits:
        t.add_row(str(h.rank), f"{h.score:.4f}", Path(h.source).name,
                  "" if h.row is None else str(h.row), "" if h.col is None else str(h.col),
                  ",".join(map(str, h.window)))
    console.print(t)
    for kind, path in result.outputs.items():
        console.print(f"{kind:>8}  {path}", markup=False)
