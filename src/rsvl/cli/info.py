"""``rsvl info RASTER``: what the raster is and what rsvl will do with it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli.options import parse_bands
from rsvl.console import emit_json, state
from rsvl.geo.raster import RasterSource, check_last_block, open_dataset
from rsvl.geo.tiles import check_gsd


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(
    raster: Path = typer.Argument(..., help="Any raster GDAL reads (GeoTIFF, COG, VRT, JPEG2000, PNG, JPEG)."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, 1-based, e.g. 4,3,2 (or one band)."),
    stretch: str = typer.Option("auto", "--stretch", help="auto | percentile | none."),
    gsd: float = typer.Option(None, "--gsd", help="Also say what resampling to this GSD (metres) would do "
                              "(segment's default is the model's training GSD: 0.3048 m for mini-clip)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Print size, bands, dtype, CRS, GSD, nodata, overviews, and how rsvl will read it."""

    with RasterSource(raster, bands=parse_bands(bands), stretch=stretch, target_gsd=check_gsd(gsd) or None) as src:
        meta = src.info()
    with open_dataset(raster) as ds:
        check_last_block(ds)
    for w in meta.warnings:
        state.warn(w)
    if as_json:
        emit_json(meta.to_dict())
        return
    _print(meta)


def _print(m) -> None:

    console = Console(highlight=False)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("file", m.path)
    t.add_row("driver", m.driver + (f" ({m.compression.lower()})" if m.compression else ""))
    t.add_row("size", f"{m.width} x {m.height} px, {m.count} band(s)")
    dt = sorted(set(m.dtypes))
    t.add_row("dtype", ", ".join(dt))
    t.add_row("bands", ", ".join(f"{i + 1}:{c}" for i, c in enumerate(m.colorinterp)))
    t.add_row("crs", m.crs or "none (outputs will not be georeferenced)")
    if m.crs:
        gsd = f"{m.gsd[0]:.6g} x {m.gsd[1]:.6g} {m.gsd_units}"
        if m.gsd_m is not None and m.gsd_units not in ("metre", "meter", "m"):
            gsd += f" (~{m.gsd_m:.3g} m)"
        t.add_row("gsd", gsd)
        t.add_row("bounds", ", ".join(f"{v:.6g}" for v in m.bounds))
    t.add_row("nodata", "none" if m.nodata is None else f"{m.nodata:g}")
    t.add_row("overviews", ", ".join(map(str, m.overviews)) if m.overviews else "none")
    t.add_row("blocks", f"{m.block_shapes[0][1]} x {m.block_shapes[0][0]}")
    t.add_row("rsvl will", m.plan["bands_note"])
    t.add_row("", m.plan["stretch_note"])
    t.add_row("", m.plan["resampling_note"])
    if m.nodata is not None or m.has_mask:
        t.add_row("", "nodata/masked pixels are left out of every output")
    console.print(t)
