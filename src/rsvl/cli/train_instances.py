"""``rsvl train instances``: train mini-instances or an RSPrompter-family model on COCO data."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rsvl.console import emit_json, state
from rsvl.errors import PromptError, UnknownModelError
from rsvl.models.cards import normalise_name


def register(train_app: typer.Typer) -> None:
    train_app.command("instances")(instances)


def _parse_config(items: list[str] | None) -> dict:


    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PromptError(f"--model-config {item!r} is not KEY=VALUE.",
                              hint="Example: --model-config test_min_size=640")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def instances(
    model: str = typer.Option("mini-instances", "--model", "-m", help="mini-instances, rsprompter-anchor, rsprompter-query, sam-seg or sam-det."),
    data: Path = typer.Option(..., "--data", help="COCO instances JSON (polygons or RLE)."),
    images: Path = typer.Option(None, "--images", help="Image folder (default: images/ or imgs/ next to --data)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: last.ckpt, model.safetensors, log.jsonl, train.json."),
    epochs: int = typer.Option(12, "--epochs", min=1),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this much training time (the LR schedule anneals over it)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    lr: float = typer.Option(None, "--lr", help="Base LR (default 0.02 SGD for mini-instances, 2e-4 AdamW for SAM models)."),
    optimizer: str = typer.Option(None, "--optimizer", help="sgd or adamw (default: by model)."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warm-up iterations."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="Images held out for validation (never trained on)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val split and of training."),
    flips: bool = typer.Option(True, "--flips/--no-flips", help="Random horizontal/vertical flips and transposes."),
    lsj: bool = typer.Option(False, "--lsj", help="Large-scale jitter (resize x0.1-2.0, crop --lsj-size)."),
    lsj_size: int = typer.Option(1024, "--lsj-size"),
    sam: str = typer.Option(None, "--sam", help="SAM variant for the SAM-based models (base, large, huge)."),
    sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint", help="Local SAM checkpoint (HF SamModel layout)."),
    lora: bool = typer.Option(False, "--lora", help="LoRA on the SAM ViT's qkv (r16, alpha 32) instead of freezing it."),
    model_config: list[str] = typer.Option(None, "--model-config", help="Model setting KEY=VALUE (repeatable), e.g. test_min_size=640."),
    val_every: int = typer.Option(0, "--val-every", help="Validate (COCO AP on the val split) every N epochs; 0 = never."),
    ckpt_every: int = typer.Option(50, "--ckpt-every", help="Write last.ckpt every N steps."),
    workers: int = typer.Option(0, "--workers", help="Data loader processes."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (AMP on CUDA)."),
    limit_images: int = typer.Option(None, "--limit-images", help="Train on the first N train images (quick checks)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.ckpt."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Train an instance segmentation model on a COCO dataset (train split; val split held out)."""
    from rsvl.train.instances import (  # lazy: torch start-up, see rsvl.cli
        INSTANCE_MODELS,
        InstanceTrainConfig,
        train_instances,
    )

    key = normalise_name(model)
    if key not in INSTANCE_MODELS:

        raise UnknownModelError(f"Unknown instance model {model!r}.",
                                hint=f"Use one of: {', '.join(INSTANCE_MODELS)}.")
    if optimizer is not None and optimizer.lower() not in ("sgd", "adamw"):
        raise PromptError(f"--optimizer {optimizer!r} is not sgd or adamw.")
    cfg = InstanceTrainConfig(
        data=str(data), images=None if images is None else str(images), out=str(out), model=key,
        epochs=epochs, max_minutes=max_minutes, batch_size=batch_size, lr=lr, optimizer=optimizer,
        warmup_iters=warmup, val_fraction=val_fraction, seed=seed, flips=flips, lsj=lsj,
        lsj_size=lsj_size, sam=sam, sam_checkpoint=None if sam_checkpoint is None else str(sam_checkpoint),
        lora=lora, model_config=_parse_config(model_config), val_every=val_every,
        ckpt_every=ckpt_every, num_workers=workers, threads=threads, device=device,
        limit_images=limit_images, resume=resume,
    )
    res = train_instances(cfg, quiet=state.quiet or as_json)
    if as_json:
        emit_json(res.to_dict())
        return
    state.notice(f"trained {res.steps} steps ({res.train_minutes} min) on {res.n_train} images; "
                 f"weights: {res.weights}")
    if res.val:
        state.notice(f"val: box AP {res.val['bbox_AP']}, mask AP {res.val['segm_AP']}")
