"""``rsvl chat IMAGE|RASTER ["question"]``: ask a chat model about an image or a raster.

With a QUESTION the answer is printed (``--json``: the answer, its parsed boxes, number or
yes/no, how a raster's windows were combined, and the settings). Without one, questions are
read from stdin one per line until EOF or ``exit`` (a terminal, or a pipe: ``printf 'How
many ships?\\nWhere are they?\\n' | rsvl chat scene.tif``), and every answer sees the
earlier turns; ``--json`` then prints one document with every turn at the end. On a
terminal the answer about a single image appears as it is generated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli import preflight
from rsvl.cli.options import parse_bands
from rsvl.console import emit_json, state, task_progress
from rsvl.errors import NoCRSError, PromptError, UnknownModelError
from rsvl.geo.tiles import check_gsd, check_tiling

#: words that end an interactive session (besides EOF)
EXIT_WORDS = ("exit", "quit", ":q")


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


def load_chat_model(name: str, weights: Path | None, device: str) -> Any:
    """The :class:`rsvl.models.chat.ChatModel` registered as ``name`` (the one place the
    command loads its model): refuses a card that does not serve chat, before loading."""
    import rsvl  # lazy: torch start-up, see rsvl.cli
    from rsvl.models.registry import get_card  # lazy: torch start-up, see rsvl.cli

    card = get_card(name)
    if "chat" not in card.tasks:
        raise UnknownModelError(f"{card.name} is not a chat model (it serves {', '.join(card.tasks)}).",
                                hint="Use --model mini-chat (see `rsvl models` for the chat task).")
    return rsvl.load(card.name, weights=weights, device=device).module


def chat(
    source: Path = typer.Argument(..., help="Image (PNG, JPEG) or raster (GeoTIFF, COG, VRT ...)."),
    question: str = typer.Argument(None, help='The question, e.g. "How many airplanes are there?"; '
                                   "leave it out for an interactive session (questions from stdin)."),
    model: str = typer.Option("mini-chat", "--model", "-m", help="Chat model (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint instead of the model card's file."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature; 0 is greedy (deterministic)."),
    task: str = typer.Option(None, "--task", help="Task tag for models trained with them: cls, vqa, vg, idk, it."),
    bands: str = typer.Option(None, "--bands", help="Bands to use as RGB, e.g. 4,3,2."),
    gsd: float = typer.Option(None, "--gsd", help="Resample rasters to this GSD (metres); default: the model's "
                              "training GSD (refused if that upsamples more than 4x: pass it to confirm); 0: native."),
    tile: int = typer.Option(None, "--tile", help="Window size in pixels (default: the model's input size); "
                             "also cuts a plain image into windows."),
    overlap: int = typer.Option(None, "--overlap", help="Window overlap in pixels (default: an eighth of the window)."),
    iou: float = typer.Option(0.5, "--iou", help="Boxes of overlapping windows with at least this IoU are one object."),
    out: Path = typer.Option(None, "--out", "-o", help="Write boxes or windows with their answers: .gpkg, "
                             ".geojson, .parquet, or .csv (one row per window)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Answer QUESTION about an image or raster; a raster is asked window by window and the
    answers are combined by the kind of question (counts summed, any-yes, boxes on the map)."""
    from rsvl.tasks.chat import (
        ChatSession,  # lazy: torch start-up, see rsvl.cli
        check_generation,  # lazy: torch start-up, see rsvl.cli
        check_iou,  # lazy: torch start-up, see rsvl.cli
        check_output,  # lazy: torch start-up, see rsvl.cli
        check_question,  # lazy: torch start-up, see rsvl.cli
    )

    if question is not None:
        question = check_question(question)
    elif out is not None:
        raise PromptError("--out needs a QUESTION (an interactive session writes no files).",
                          hint='Pass the question after the source, e.g. rsvl chat scene.tif "Where are the ships?" -o ships.gpkg.')
    georeferenced = preflight.raster_file(source)
    check_generation(max_new_tokens, temperature, task)
    check_iou(iou)
    if check_gsd(gsd) and not georeferenced:
        raise NoCRSError(f"{source} has no CRS, so a target GSD in ground units cannot be applied.",
                         hint="Drop --gsd, or assign a CRS first (e.g. gdal_edit.py -a_srs EPSG:XXXX).")
    if tile is not None:
        check_tiling(tile, overlap if overlap is not None else 0)
    check_output(out, [source], overwrite=overwrite)
    m = load_chat_model(model, weights, device)
    # one image on a terminal: the answer appears as it is generated
    stream = Stream() if not as_json and not georeferenced and tile is None and sys.stdout.isatty() else None
    session = ChatSession(m, source, out=out, gsd=gsd, tile=tile, overlap=overlap, bands=parse_bands(bands),
                          iou=iou, max_new_tokens=max_new_tokens, temperature=temperature, task=task,
                          overwrite=overwrite, progress=task_progress("chat", unit="windows"), model_name=model,
                          on_text=stream)
    console = Console(highlight=False)
    if question is not None:
        result = session.ask(question)
        if as_json:
            emit_json(result.to_dict())
        else:
            _print(console, result, stream)
        return
    interactive = sys.stdin.isatty()
    if interactive and not as_json:
        state.notice(f"{model} on {source.name}: ask a question per line; exit or Ctrl-D ends.")
    while True:
        if interactive:
            state.err.print("> ", end="", markup=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            break
        result = session.ask(text)
        if not as_json:
            _print(console, result, stream)
    if as_json:
        emit_json({"source": str(source), "model": model,
                   "turns": [r.to_dict() for r in session.results]})


class Stream:
    """``on_text`` for a terminal: writes each piece of the answer as it is generated and
    remembers whether anything was written (the answer is then not printed again)."""

    def __init__(self) -> None:
        self.wrote = False

    def __call__(self, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
        self.wrote = True


def _print(console: Console, result: Any, stream: Stream | None = None) -> None:
    """The answer, then (for a raster) how it was combined, the boxes and the outputs."""
    windows = result.windows
    if stream is not None and stream.wrote:
        stream.wrote = False
        console.print()  # the answer is on the screen already
    elif windows and result.kind in ("describe", "other") and len(windows) > 1:
        t = Table(show_edge=False)
        for col in ("window", "bounds", "answer"):
            t.add_column(col)
        for w in windows:
            t.add_row(str(w["window"]), f"{w['minx']:.6g}, {w['miny']:.6g}, {w['maxx']:.6g}, {w['maxy']:.6g}",
                      w["answer"])
        console.print(t)
    else:
        console.print(result.answer, markup=False)
    if windows:
        console.print(f"({result.combined})", markup=False)
    unit = "map" if result.settings.get("crs") else "pixel"
    for i, b in enumerate(result.boxes[:20]):
        label = f" {b['label']}" if b["label"] else ""
        console.print(f"  box {i + 1}{label}: {b['x1']:.6g}, {b['y1']:.6g}, {b['x2']:.6g}, {b['y2']:.6g} "
                      f"({unit})", markup=False)
    if len(result.boxes) > 20:
        console.print(f"  ... {len(result.boxes) - 20} more boxes", markup=False)
    for name, path in result.outputs.items():
        console.print(f"  {name}: {path}", markup=False)
