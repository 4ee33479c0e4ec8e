"""``rsvl train ...``: one sub-command per trainable family.

Each module in :data:`TRAIN_MODULES` exposes ``register(train_app)`` and adds its own
sub-command (``rsvl train clip``, ``rsvl train mini-clip``, ``rsvl train refer``,
``rsvl train instances``). The training code itself lives in ``rsvl.train.*``; these
commands only parse options and report.
"""

from __future__ import annotations

import importlib

import typer

train_app = typer.Typer(
    help="Train or fine-tune models (Lightning: AMP, checkpoints, resume).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

#: order here is the order in `rsvl train --help`
TRAIN_MODULES: list[str] = [
    "rsvl.cli.train_clip",
    "rsvl.cli.train_mini_clip",
    "rsvl.cli.train_instances",
    "rsvl.cli.train_refer",
]


def register(app: typer.Typer) -> None:
    for name in TRAIN_MODULES:
        importlib.import_module(name).register(train_app)
    app.add_typer(train_app, name="train")
