"""``rsvl data ...``: build training and evaluation data from what rsvl's users have.

``rsvl data refgen`` writes referring expressions generated from COCO instance labels in
RRSIS-D's layout (what ``rsvl train refer`` and ``rsvl eval refer`` read); see
:mod:`rsvl.data.refgen` for the templates and the uniqueness checks.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from rsvl.console import emit_json, state
from rsvl.data.refgen import default_image_dir, format_stats, generate, load_coco, write_rrsisd

data_app = typer.Typer(
    help="Build training and evaluation data (referring expressions from instance labels).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


class Link(StrEnum):
    symlink = "symlink"
    copy = "copy"
    none = "none"


def register(app: typer.Typer) -> None:
    data_app.command("refgen")(refgen)
    app.add_typer(data_app, name="data")


def refgen(
    coco: Path = typer.Option(..., "--coco", help="COCO instances JSON (e.g. ../shared/data/nwpu_vhr10/instances_train.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output root (gets rrsisd/ and images/)."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", min=0.0, help="Fraction of the images that become the val split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of the expression choice."),
    images: Path = typer.Option(None, "--images", help="Folder of the COCO images (default: 'images' beside the COCO file)."),
    link: Link = typer.Option(Link.symlink, "--link", help="How referred images are placed under OUT/images: symlink, copy or none."),
    group_sentences: bool = typer.Option(False, "--group-sentences", help="One ref per instance with all its sentences (RefCOCO style)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT/rrsisd."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (statistics, output folder) on stdout."),
) -> None:
    """Generate referring expressions from COCO instances, written in RRSIS-D's layout."""
    data = load_coco(coco)
    result = generate(data, val_fraction=val_fraction, seed=seed, group_sentences=group_sentences)
    image_dir = images if images is not None else default_image_dir(coco)
    ddir = write_rrsisd(result, data, out, image_dir=image_dir, link=link.value, overwrite=overwrite)
    if as_json:
        emit_json({"out": str(ddir), "stats": result.stats})
        return
    typer.echo(format_stats(result.stats))
    state.notice(f"wrote {ddir}")
