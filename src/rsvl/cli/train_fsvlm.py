"""``rsvl train fsvlm``: train a language-guided segmentation model on a FIT-layout folder.

``--model mini-fsvlm`` (default) trains the built-in model (:mod:`rsvl.train.fsvlm`);
``--model fsvlm-7b|fsvlm-13b|lisa-7b-v1`` trains a LISA-family model as upstream's
``train_ds.py`` does, from ``--base`` (a LLaVA folder with ``--sam``, or a LISA folder)
(:mod:`rsvl.train.lisa`).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rsvl.console import emit_json
from rsvl.errors import InputNotFoundError

#: per-model defaults of the options whose upstream values differ
DEFAULTS = {"mini-fsvlm": {"steps": 1500, "batch_size": 8, "seed": 0},
            "lisa": {"steps": 10_000, "batch_size": 2, "seed": 42}}


def register(train_app: typer.Typer) -> None:
    train_app.command("fsvlm")(train_fsvlm_command)


def train_fsvlm_command(
    data: Path = typer.Argument(..., help="FarmSeg-VL/FIT folder: {train,val}/{img,lbl,json} (e.g. from `rsvl data farmland`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (mini-fsvlm: fsvlm.safetensors; LISA cards: "
                             "merged/, lora/pytorch_model.bin, checkpoints/last.ckpt) and summary.json."),
    model: str = typer.Option("mini-fsvlm", "--model", "-m", help="mini-fsvlm, or fsvlm-7b / fsvlm-13b / lisa-7b-v1."),
    base: Path = typer.Option(None, "--base", help="LISA cards: the LLaVA folder to start from (upstream's --version), "
                              "or a LISA / FSVLM folder to fine-tune."),
    vision_tower: Path = typer.Option(None, "--vision-tower", help="LISA cards: the CLIP tower folder "
                                      "(openai/clip-vit-large-patch14); default BASE/vision_tower or the HF cache."),
    sam: Path = typer.Option(None, "--sam", help="LISA cards from a LLaVA base: SAM ViT-H (sam_vit_h_4b8939.pth)."),
    resume: bool = typer.Option(False, "--resume", help="LISA cards: continue from OUT/checkpoints/last.ckpt."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimiser steps (mini-fsvlm 1500; LISA cards 10000 = 10 x 1000)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Samples per forward (mini-fsvlm 8; LISA cards 2)."),
    grad_accumulation: int = typer.Option(5, "--grad-accumulation", min=1, help="LISA cards: batches per optimiser step."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (FSVLM: 3e-4, AdamW betas 0.9/0.95)."),
    warmup: int = typer.Option(100, "--warmup", min=0, help="LISA cards: warm-up steps of WarmupDecayLR."),
    save_every: int = typer.Option(500, "--save-every", min=1, help="LISA cards: steps between resume checkpoints."),
    save_dtype: str = typer.Option("float32", "--save-dtype", help="LISA cards: dtype of merged/ (float32, bfloat16, float16)."),
    eval_every: int = typer.Option(150, "--eval-every", min=1, help="mini-fsvlm: steps between val evaluations."),
    ucm: Path = typer.Option(None, "--ucm", help="mini-fsvlm: UCM folder with rsivqa.json: chat questions where [SEG] must not be predicted."),
    chat_negatives: int = typer.Option(400, "--chat-negatives", min=0, help="mini-fsvlm: RSIVQA train questions used as [SEG] negatives."),
    seed: int = typer.Option(None, "--seed", help="Random seed (mini-fsvlm 0; LISA cards 42)."),
    limit_train: int = typer.Option(None, "--limit-train", min=1, help="A random N train requests only (smoke runs)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    cache: Path = typer.Option(None, "--cache", help="mini-fsvlm: folder that keeps the frozen parts' outputs, so a second run with the same data starts training at once."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or auto (mini-fsvlm: cpu; LISA cards: auto)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Train with FSVLM's loss (CE + 2 BCE + 0.5 Dice) on DATA/train: mini-fsvlm (selected on
    DATA/val) or a LISA-family card as upstream's train_ds.py."""
    from rsvl.models.device import check_device  # lazy: torch start-up, see rsvl.cli

    console = Console(highlight=False, stderr=True)
    log = (lambda _m: None) if quiet else (lambda m: console.print(m, markup=False))
    key = "mini-fsvlm" if model == "mini-fsvlm" else "lisa"
    d = DEFAULTS[key]
    steps = steps or d["steps"]
    batch_size = batch_size or d["batch_size"]
    seed = d["seed"] if seed is None else seed
    if key == "lisa":
        from rsvl.train import lisa  # lazy: torch, transformers, peft

        card = lisa.lisa_card(model)
        if not (data / "train" / "img").is_dir():
            raise InputNotFoundError(f"{data / 'train' / 'img'}: not found.",
                                     hint="DATA is a FarmSeg-VL / FIT folder: DATA/train/{img,lbl,json}.")
        cfg = lisa.LisaTrainConfig(steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, lr=lr,
                                   warmup=warmup, save_every=save_every, save_dtype=save_dtype, seed=seed,
                                   device=check_device(device or "auto"), max_minutes=max_minutes,
                                   limit_train=limit_train, threads=threads)
        summary = lisa.train_lisa(card.name, data, out, cfg, base=base, vision_tower=vision_tower, sam=sam,
                                  resume=resume, quiet=quiet, log=log)
        if as_json:
            emit_json(summary)
        elif not quiet:
            console.print(f"{summary['steps']} steps, {summary['seconds'] / 60:.1f} min; merged model "
                          f"{summary['merged']}, LoRA file {summary['lora']}", markup=False)
        return
    for split in ("train", "val"):
        if not (data / split / "img").is_dir():
            raise InputNotFoundError(f"{data / split / 'img'}: not found.",
                                     hint="Build the data with: rsvl data farmland --ucm ../shared/data/ucm --out DATA")
    from rsvl.train.fsvlm import FsvlmTrainConfig, train_fsvlm  # lazy: torch, transformers, peft

    cfg_mini = FsvlmTrainConfig(steps=steps, max_minutes=max_minutes, batch_size=batch_size, lr=lr,
                                eval_every=eval_every, chat_negatives=chat_negatives, seed=seed,
                                limit_train=limit_train, threads=threads, device=check_device(device or "cpu"))
    summary = train_fsvlm(data, out, cfg_mini, ucm=ucm, log=log, cache_dir=cache)
    if as_json:
        emit_json(summary)
    elif not quiet:
        console.print(f"{summary['steps']} steps, {summary['minutes']:.1f} min; best val gIoU "
                      f"{summary['best_val_score']:.3f} at step {summary['best_step']}; weights {summary['weights']}",
                      markup=False)
