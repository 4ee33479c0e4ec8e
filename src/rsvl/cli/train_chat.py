"""``rsvl train chat``: train mini-chat's projector and LoRA adapters on instruction data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rsvl.console import emit_json
from rsvl.errors import InputNotFoundError


def register(train_app: typer.Typer) -> None:
    train_app.command("chat")(train_chat_command)


def train_chat_command(
    data: Path = typer.Option(..., "--data", help="Folder with train.json and val.json (VHM's training format, e.g. from rsvl data chat)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: adapter.safetensors (best val loss) and summary.json."),
    epochs: float = typer.Option(2.0, "--epochs", min=0.01, help="Passes over the train conversations."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes (the best val weights so far are kept)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate of the LoRA adapters."),
    projector_lr: float = typer.Option(1e-3, "--projector-lr", help="Peak learning rate of the projector."),
    lora_r: int = typer.Option(16, "--lora-r", min=1, help="LoRA rank (alpha = 2 x rank)."),
    eval_every: int = typer.Option(150, "--eval-every", min=1, help="Steps between val-loss evaluations."),
    val_samples: int = typer.Option(240, "--val-samples", min=1, help="Val conversations in the selection loss."),
    seed: int = typer.Option(0, "--seed"),
    limit_train: int = typer.Option(None, "--limit-train", min=1, help="A random N train conversations only (smoke runs)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train mini-chat on DATA/train.json, keep the adapters with the best val loss."""
    # lazy: the trainer pulls in torch, transformers and peft (seconds)
    from rsvl.models.device import check_device
    from rsvl.train.chat import ChatTrainConfig, train_chat

    for name in ("train.json", "val.json"):
        if not (data / name).is_file():
            raise InputNotFoundError(f"{data / name}: not found.",
                                     hint="Build the data with: rsvl data chat --ucm ../shared/data/ucm "
                                     "--nwpu ../shared/data/nwpu_vhr10/instances_train.json --out DATA")
    device = check_device(device)
    cfg = ChatTrainConfig(epochs=epochs, max_minutes=max_minutes, batch_size=batch_size, lr=lr,
                          projector_lr=projector_lr, lora_r=lora_r, eval_every=eval_every,
                          val_samples=val_samples, seed=seed, limit_train=limit_train, threads=threads,
                          device=device)
    console = Console(highlight=False, stderr=True)
    summary = train_chat(data, out, cfg, log=(lambda _m: None) if quiet else (lambda m: console.print(m, markup=False)))
    if as_json:
        emit_json(summary)
    elif not quiet:
        console.print(f"{summary['steps']} steps, {summary['minutes']:.1f} min; best val loss "
                      f"{summary['best_val_loss']:.3f} at step {summary['best_step']}; weights {summary['weights']}",
                      markup=False)
