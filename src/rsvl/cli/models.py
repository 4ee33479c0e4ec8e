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
    """List every model rsvl knows, where its weights come from, and whether they are here."""
    from rsvl.models.registry import list_cards  # lazy: see rsvl.cli
    from rsvl.models.weights import is_available_offline  # lazy: see rsvl.cli

    rows = []
    for card in list_cards(family=family, task=task):
        src = card.source
        rows.append({
            "name": card.name,
            "family": card.family,
            "architecture": card.architecture,
            "tasks": list(card.tasks),
            "licence": card.licence,
            "source": src.download_url if getattr(src, "download_url", None) else (src.bundled or ("unpublished" if src.unpublished else "")),
            "revision": src.revision,
            "sha256": card.sha256,
            "available_offline": bool(is_available_offline(card)),
        })
    if as_json:
        emit_json({"models": rows})
        return

    t = Table(show_edge=False)
    t.add_column("name", no_wrap=True)
    for col in ("family", "tasks", "offline", "licence"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["family"], ",".join(r["tasks"]) or "-", "yes" if r["available_offline"] else "no",
                  r["licence"].split(" (")[0])
    Console(highlight=False, width=max(100, Console().width)).print(t)
    state.notice("Fetch one with `rsvl fetch NAME`, or pass --weights PATH to any command.")


def fetch(
    name: str = typer.Argument(..., help="Model name (see `rsvl models`)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Download a model's weights into the cache (pinned revision; sha256 checked where published)."""
    from rsvl.models.registry import get_card  # lazy: see rsvl.cli
    from rsvl.models.weights import fetch as do_fetch  # lazy: see rsvl.cli
    from rsvl.models.weights import sha256_file  # lazy: see rsvl.cli

    card = get_card(name)
    path = do_fetch(card, force=force)
    doc = {"name": card.name, "path": str(path), "sha256": sha256_file(path), "verified": card.sha256 is not None}
    if as_json:
        emit_json(doc)
        return
    typer.echo(f"{card.name}: {path}")
    typer.echo(f"sha256 {doc['sha256']}" + (" (matches the card)" if card.sha256 else " (the card publishes none)"))
