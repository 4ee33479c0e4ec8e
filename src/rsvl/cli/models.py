"""``rsvl models`` lists the model cards; ``rsvl fetch NAME`` downloads and verifies weights."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from rsvl.console import emit_json, state


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("fetch")(fetch)


def models(
    task: str = typer.Option(None, "--task", help="Only models serving this task (classify, search, segment, ...)."),
    family: str = typer.Option(None, "--family", help="Only this family (clip, mini-clip, sam, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """List every model rsvl knows and where its weights come from: bundled, cached, download, or bring your own."""
    from rsvl.models.registry import list_cards  # lazy: see rsvl.cli
    from rsvl.models.weights import (  # lazy: see rsvl.cli
        is_available_offline,
        trained_weights_published,
        weights_state,
    )

    rows = []
    for card in list_cards(family=family, task=task):
        src = card.source
        published = trained_weights_published(card)
        rows.append({
            "name": card.name,
            "family": card.family,
            "architecture": card.architecture,
            "tasks": list(card.tasks),
            "licence": card.licence,
            "source": (src.download_url or src.bundled or "") if published else "unpublished",
            "revision": src.revision if published else None,
            "sha256": card.sha256,
            "weights": weights_state(card),
            "available_offline": bool(is_available_offline(card)),
        })
    if as_json:
        emit_json({"models": rows})
        return

    t = Table(show_edge=False)
    t.add_column("name", no_wrap=True)
    for col in ("family", "tasks", "weights", "licence"):
        t.add_column(col, no_wrap=col == "weights")
    for r in rows:
        t.add_row(r["name"], r["family"], ",".join(r["tasks"]) or "-", r["weights"], r["licence"].split(" (")[0])
    Console(highlight=False, width=max(100, Console().width)).print(t)
    state.notice("weights: bundled (ships with rsvl), cached (here), download (`rsvl fetch NAME` or first use), "
                 "bring your own (nothing published: pass a trained file with --weights PATH).")


def fetch(
    name: str = typer.Argument(..., help="Model name (see `rsvl models`)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Download a model's weights into the cache (pinned revision; sha256 checked where published)."""
    from rsvl.models.registry import fetch as do_fetch  # lazy: see rsvl.cli
    from rsvl.models.registry import get_card  # lazy: see rsvl.cli
    from rsvl.models.weights import sha256_file  # lazy: see rsvl.cli

    card = get_card(name)
    path = do_fetch(card, force=force)
    if path.is_dir():  # a folder of files (VHM, GeoChat): list them
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
        doc = {"name": card.name, "path": str(path), "files": files, "verified": False}
        if as_json:
            emit_json(doc)
            return
        typer.echo(f"{card.name}: {path} ({len(files)} files)")
        return
    doc = {"name": card.name, "path": str(path), "sha256": sha256_file(path), "verified": card.sha256 is not None}
    if as_json:
        emit_json(doc)
        return
    typer.echo(f"{card.name}: {path}")
    typer.echo(f"sha256 {doc['sha256']}" + (" (matches the card)" if card.sha256 else " (the card publishes none)"))
