"""``rsvl data ...``: build training and evaluation data from what rsvl's users have.

``rsvl data refgen`` writes referring expressions generated from COCO instance labels in
RRSIS-D's layout (what ``rsvl train refer`` and ``rsvl eval refer`` read); see
:mod:`rsvl.data.refgen` for the templates and the uniqueness checks.

``rsvl data farmland`` writes language-guided segmentation data in FSVLM's FIT layout from
the real pixel labels (UCM mosaics for farmland, NWPU VHR-10 and WHU "segment the X"
requests, LoveDA tiles as the test split); see :mod:`rsvl.data.farmland`.

``rsvl data semseg-split`` cuts the shared pixel-labelled crops (LoveDA, Potsdam, Vaihingen,
WHU building) into train and val crops, keeping at least one crop of each out for val; see
:mod:`rsvl.data.semseg_split`.

``rsvl data chat`` writes instruction data (VHM's training layout, plus the val items in the
VHM_Eval layout that ``rsvl eval chat`` scores) from UCM, RSIVQA, NWPU VHR-10 and AID; see
:mod:`rsvl.data.chat` for the tasks and answer formats.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from rsvl.console import emit_json, state
from rsvl.data.chat import DEFAULT_MAX_PER_TASK, build_chat_data
from rsvl.data.chat import format_stats as format_chat_stats
from rsvl.data.refgen import default_image_dir, format_stats, generate, load_coco, write_rrsisd
from rsvl.data.semseg_split import build_semseg_split

data_app = typer.Typer(
    help="Build training and evaluation data (referring expressions, chat instructions).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


class Link(StrEnum):
    symlink = "symlink"
    copy = "copy"
    none = "none"


def register(app: typer.Typer) -> None:
    data_app.command("refgen")(refgen)
    data_app.command("chat")(chat)
    data_app.command("farmland")(farmland)
    data_app.command("semseg-split")(semseg_split)
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


def chat(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (train.json, val.json, eval/, stats.json); must not exist."),
    ucm: Path = typer.Option(None, "--ucm", help="UCM folder with ucm.json (captions, classes) and rsivqa.json (e.g. ../shared/data/ucm)."),
    nwpu: Path = typer.Option(None, "--nwpu", help="NWPU VHR-10 COCO instances JSON, images in 'images' beside it."),
    nwpu_images: Path = typer.Option(None, "--nwpu-images", help="Folder of the NWPU images (default: 'images' beside the COCO file)."),
    aid: Path = typer.Option(None, "--aid", help="AID folder, one sub-folder per class (optional)."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", min=0.0, help="Fraction of NWPU and AID images that become val (UCM and RSIVQA keep their split)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the splits, the phrasings and the caps."),
    max_per_task: int = typer.Option(DEFAULT_MAX_PER_TASK, "--max-per-task", min=1, help="Train items kept per task (a seeded choice)."),
    max_val_per_task: int = typer.Option(None, "--max-val-per-task", min=1, help="Val items kept per task (default: all)."),
    link: Link = typer.Option(Link.symlink, "--link", help="How val images are placed under OUT/eval/images: symlink, copy, or none (absolute image_path)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT written by this command."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (statistics, output folder) on stdout."),
) -> None:
    """Build chat instruction data (train/val, VHM layout) and its eval files (VHM_Eval layout)."""
    stats = build_chat_data(out, ucm=ucm, nwpu=nwpu, aid=aid, nwpu_images=nwpu_images,
                            val_fraction=val_fraction,
                            seed=seed, max_per_task=max_per_task,
                            max_val_per_task=max_val_per_task, link=link.value,
                            overwrite=overwrite)
    if as_json:
        emit_json({"out": str(out), "stats": stats})
        return
    typer.echo(format_chat_stats(stats))
    state.notice(f"wrote {out}")


def farmland(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder ({train,val,test}/{img,lbl,json}, stats.json); must not exist."),
    ucm: Path = typer.Option(..., "--ucm", help="UCM folder with ucm.json (e.g. ../shared/data/ucm): farmland mosaics."),
    nwpu: Path = typer.Option(None, "--nwpu", help="NWPU VHR-10 COCO instances JSON: 'Please segment the X.' requests."),
    nwpu_images: Path = typer.Option(None, "--nwpu-images", help="Folder of the NWPU images (default: 'images' beside the COCO file)."),
    whu: Path = typer.Option(None, "--whu", help="WHU building folder ({train,val}/{image,label})."),
    loveda: Path = typer.Option(None, "--loveda", help="LoveDA crops folder (images/, labels/): the test split (agriculture = farmland)."),
    aid: Path = typer.Option(None, "--aid", help="AID folder (one sub-folder per class): look-alike landscapes in the mosaics."),
    train_mosaics: int = typer.Option(800, "--train-mosaics", min=1, help="Farmland mosaics built from UCM train scenes."),
    val_mosaics: int = typer.Option(80, "--val-mosaics", min=1, help="Farmland mosaics built from UCM val scenes."),
    size: int = typer.Option(384, "--size", min=64, help="Side of the mosaics in pixels."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", min=0.0, help="Fraction of NWPU and AID images that become val."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT written by this command."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as one JSON document."),
) -> None:
    """Build language-guided segmentation data (FSVLM's FIT layout) from real pixel labels."""
    from rsvl.data.farmland import build_farmland_data  # lazy: pycocotools, PIL

    stats = build_farmland_data(out, ucm=ucm, nwpu=nwpu, nwpu_images=nwpu_images, whu=whu, loveda=loveda, aid=aid,
                                train_mosaics=train_mosaics, val_mosaics=val_mosaics, size=size,
                                val_fraction=val_fraction, seed=seed, overwrite=overwrite, log=state.notice)
    if as_json:
        emit_json({"out": str(out), "stats": stats})
        return
    for split, n in stats["samples"].items():
        typer.echo(f"{split:>6}: {n} samples")
    for key, n in stats["by_source"].items():
        typer.echo(f"  {key}: {n}")
    state.notice(f"wrote {out}")


def semseg_split(
    semseg: Path = typer.Argument(..., help="Folder with loveda/, potsdam/, vaihingen/, whu_building/ (e.g. ../shared/data/semseg)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (train/<name>/, val/<name>/, split.json)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print what went where as one JSON document."),
) -> None:
    """Cut the pixel-labelled crops into train and val crops (at least one val crop per dataset)."""
    stats = build_semseg_split(semseg, out, overwrite=overwrite)
    if as_json:
        emit_json({"out": str(out), **stats})
        return
    for name, splits in stats["crops"].items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    state.notice(f"wrote {out}")
