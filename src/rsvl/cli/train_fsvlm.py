"""``rsvl train fsvlm``: train a language-guided segmentation model on a FIT-layout folder."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rsvl.console import emit_json
from rsvl.errors import InputNotFoundError, UnknownModelError


def register(train_app: typer.Typer) -> None:
    train_app.command("fsvlm")(train_fsvlm_command)


def train_fsvlm_command(
    data: Path = typer.Argument(..., help="FarmSeg-VL/FIT folder: {train,val}/{img,lbl,json} (e.g. from `rsvl data farmland`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: fsvlm.safetensors (best val gIoU) and summary.json."),
    model: str = typer.Option("mini-fsvlm", "--model", "-m", help="Model to train (mini-fsvlm)."),
    steps: int = typer.Option(1500, "--steps", min=1, help="Optimiser steps."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes (the best val weights so far are kept)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (FSVLM: 3e-4, AdamW betas 0.9/0.95)."),
    eval_every: int = typer.Option(150, "--eval-every", min=1, help="Steps between val evaluations."),
    ucm: Path = typer.Option(None, "--ucm", help="UCM folder with rsivqa.json: chat questions where [SEG] must not be predicted."),
    chat_negatives: int = typer.Option(400, "--chat-negatives", min=0, help="RSIVQA train questions used as [SEG] negatives."),
    seed: int = typer.Option(0, "--seed"),
    limit_train: int = typer.Option(None, "--limit-train", min=1, help="A random N train requests only (smoke runs)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train mini-fsvlm with FSVLM's loss (CE + 2 BCE + 0.5 Dice) on DATA/train, select on DATA/val."""
    from rsvl.models.device import check_device  # lazy: torch start-up, see rsvl.cli

    if model != "mini-fsvlm":
        raise UnknownModelError(f"rsvl train fsvlm trains mini-fsvlm; {model!r} is not supported here yet.",
                                hint="Published LISA/FSVLM checkpoints are trained with upstream's DeepSpeed "
                                     "script on a GPU; rsvl loads the result (merged or unmerged).")
    for split in ("train", "val"):
        if not (data / split / "img").is_dir():
            raise InputNotFoundError(f"{data / split / 'img'}: not found.",
                                     hint="Build the data with: rsvl data farmland --ucm ../shared/data/ucm --out DATA")
    from rsvl.train.fsvlm import FsvlmTrainConfig, train_fsvlm  # lazy: torch, transformers, peft

    cfg = FsvlmTrainConfig(steps=steps, max_minutes=max_minutes, batch_size=batch_size, lr=lr, eval_every=eval_every,
                           chat_negatives=chat_negatives, seed=seed, limit_train=limit_train, threads=threads,
                           device=check_device(device))
    console = Console(highlight=False, stderr=True)
    summary = train_fsvlm(data, out, cfg, ucm=ucm,
                          log=(lambda _m: None) if quiet else (lambda m: console.print(m, markup=False)))
    if as_json:
        emit_json(summary)
    elif not quiet:
        console.print(f"{summary['steps']} steps, {summary['minutes']:.1f} min; best val gIoU "
                      f"{summary['best_val_score']:.3f} at step {summary['best_step']}; weights {summary['weights']}",
                      markup=False)
