"""``rsvl train refer``: train a referring-segmentation model (mini-refer or FIANet)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rsvl.console import emit_json
from rsvl.errors import InputNotFoundError, UnknownModelError
from rsvl.models.cards import normalise_name

#: learning rate when --lr is not given: mini-refer trains a decoder from scratch, FIANet
#: fine-tunes pretrained towers (its RRSIS-D setting)
DEFAULT_LR = {"mini-refer": 1e-3, "fianet": 3e-5}


def register(train_app: typer.Typer) -> None:
    train_app.command("refer")(train_refer_command)


def train_refer_command(
    model: str = typer.Option("mini-refer", "--model", "-m", help="mini-refer or fianet."),
    data: Path = typer.Option(..., "--data", help="REFER-format dataset root (RRSIS-D layout, e.g. from rsvl data refgen)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints/, summary.json and the exported weights."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs (default: 40 for FIANet, 4 for mini-refer)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes (the best val checkpoint so far is kept)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt."),
    weights: Path = typer.Option(None, "--weights", help="Start from these weights (fine-tune)."),
    swin: Path = typer.Option(None, "--swin", help="FIANet: Swin-B 22k weights to start from (swin_base_patch4_window12_384_22k.pth or timm's)."),
    bert: Path = typer.Option(None, "--bert", help="FIANet: bert-base-uncased weights (file or folder) to start from."),
    vocab: Path = typer.Option(None, "--vocab", help="FIANet: BERT vocab.txt (default: next to --bert / --weights)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: 1e-3 mini-refer, 3e-5 FIANet)."),
    weight_decay: float = typer.Option(1e-2, "--weight-decay"),
    seed: int = typer.Option(2401, "--seed"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Run the frozen towers every step instead of caching their outputs."),
    no_flip: bool = typer.Option(False, "--no-flip", help="No flipped views (with swapped direction words) in the cached path."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Feature cache folder (default: ~/.cache/rsvl/mini-refer-features)."),
    limit_train: int = typer.Option(None, "--limit-train", min=1, help="First N train samples only (smoke runs)."),
    limit_val: int = typer.Option(None, "--limit-val", min=1, help="First N val samples only (smoke runs)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train on the train split, select the best epoch on val (oIoU), export the weights."""
    # imported when the command runs, since every CLI module is imported when `rsvl` starts
    # lazy: the trainer pulls in torch and Lightning (seconds)
    from rsvl.train.refer import MODELS, ReferTrainConfig, train_refer

    key = normalise_name(model)
    if key not in MODELS:
        raise UnknownModelError(f"cannot train model {model!r}.", hint=f"Choose one of: {', '.join(MODELS)}.")
    if not data.exists():
        raise InputNotFoundError(f"{data}: no such dataset folder.",
                                 hint="Generate one with: rsvl data refgen --coco "
                                 "../shared/data/nwpu_vhr10/instances_train.json --out DIR")
    if weights is not None and not weights.is_file():
        raise InputNotFoundError(f"{weights}: no such weights file.", hint="Check the path.")
    cfg = ReferTrainConfig(
        epochs=epochs or (4 if key == "mini-refer" else 40), batch_size=batch_size,
        lr=lr if lr is not None else DEFAULT_LR[key], weight_decay=weight_decay, seed=seed,
        max_minutes=max_minutes, cache_features=not no_cache, flip_views=not no_flip,
        limit_train=limit_train, limit_val=limit_val, device=device, threads=threads,
    )
    for given, what in ((swin, "--swin"), (bert, "--bert"), (vocab, "--vocab")):
        if given is not None and not given.exists():
            raise InputNotFoundError(f"{what} {given}: no such file or folder.", hint="Check the path.")
    summary = train_refer(key, data, out, cfg, weights=weights, resume=resume, cache_dir=cache_dir,
                          quiet=quiet, swin=swin, bert=bert, vocab=vocab)
    if as_json:
        emit_json(summary)
        return
    if not quiet:
        best = summary.get("best_val", {})
        Console(highlight=False, stderr=True).print(
            f"{summary['epochs_run']} epoch(s), {summary['seconds']:.0f} s; best val "
            + ", ".join(f"{k} {100 * v:.2f}" for k, v in best.items() if k.startswith("val_"))
            + f"; weights {summary.get('weights')}", markup=False)
