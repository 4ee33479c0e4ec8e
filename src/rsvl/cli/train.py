"""``rsvl train ...``: one sub-command per trainable family.

Each sub-command module exposes ``register(train_app)`` and adds its own
sub-command (``rsvl train clip``, ``rsvl train mini-clip``, ``rsvl train refer``,
``rsvl train instances``). The training code itself lives in ``rsvl.train.*``; these
commands only parse options and report.
"""

from __future__ import annotations

import typer

from rsvl.cli import (
    train_chat,
    train_clip,
    train_fsvlm,
    train_instances,
    train_mini_clip,
    train_refer,
)

train_app = typer.Typer(
    help="Train or fine-tune models (Lightning: AMP, checkpoints, resume).",
    no_args_is_help=True,
    rich_markup_mode=None,
)



def register(app: typer.Typer) -> None:
    # order here is the order in `rsvl train --help`
    for module in (train_clip, train_mini_clip, train_instances, train_refer, train_chat, train_fsvlm):
        module.register(train_app)
    app.add_typer(train_app, name="train")
