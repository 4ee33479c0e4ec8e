"""``rsvl train clip``: fine-tune an open_clip CLIP with FarSLIP's stage 1 or stage 2 losses."""

from __future__ import annotations

from pathlib import Path

import typer

from rsvl.console import emit_json, state
from rsvl.errors import GridError


def register(train_app: typer.Typer) -> None:
    train_app.command("clip")(train_clip_command)


def train_clip_command(
    data: Path = typer.Option(..., "--data", help="ucm.json, Karpathy dataset_*.json or caption CSV (stage 1); MGRS-style region JSON (stage 2, or stage 1)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints/last.ckpt, logs/, final.pt (FarSLIP layout)."),
    stage: int = typer.Option(1, "--stage", min=1, max=2, help="1: global ITC + 0.1 x RoI patch-to-crop distillation; 2: global ITC + region ITC keyed on category id."),
    model: str = typer.Option(..., "--model", "-m", help="rsvl CLIP model (farslip2-vit-b16, openai-vit-b32, ...) or open_clip architecture (ViT-B-32, ...)."),
    weights: Path = typer.Option(None, "--weights", help="Initial weights (any layout rsvl loads). Default: the model's cached file; random init for a bare architecture."),
    random_init: bool = typer.Option(False, "--random-init", help="Start from open_clip's random initialisation."),
    quick_gelu: bool = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="Override the activation (default: the model card's; OpenAI-initialised weights need QuickGELU)."),
    long_text: bool = typer.Option(False, "--long-text", help="Stretch a 77-token text tower to FarSLIP's 248-token Long-CLIP layout (first table frozen)."),
    split: str = typer.Option(None, "--split", help="Split of ucm.json / Karpathy JSON (default: train)."),
    caption_key: str = typer.Option("title", "--caption-key", help="CSV caption column."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder the index's image paths are relative to."),
    epochs: int = typer.Option(1, "--epochs", min=1),
    max_steps: int = typer.Option(-1, "--max-steps", help="Stop after N optimizer steps (-1: run --epochs)."),
    batch_size: int = typer.Option(40, "--batch-size", min=2),
    lr: float = typer.Option(1e-6, "--lr", help="Peak learning rate (FarSLIP: 1e-6 stage 1, 4e-9 stage 2)."),
    wd: float = typer.Option(1.0, "--wd", help="AdamW weight decay (not on norms, biases, logit_scale)."),
    warmup: int = typer.Option(0, "--warmup", min=0, help="Linear warmup steps before the cosine decay."),
    max_boxes: int = typer.Option(4, "--max-boxes", min=1, help="Crops (stage 1) or regions (stage 2) per image."),
    distill_type: str = typer.Option("active", "--distill-type", help="active (no teacher, FarSLIP default), ema or frozen teacher."),
    w_global: float = typer.Option(1.0, "--w-global"),
    w_distill: float = typer.Option(0.1, "--w-distill"),
    w_region: float = typer.Option(1.0, "--w-region"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, else fp32), 32, bf16, 16."),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto, cpu, gpu."),
    devices: str = typer.Option("auto", "--devices", help="Number of devices, or auto."),
    strategy: str = typer.Option("auto", "--strategy", help="Lightning strategy: auto, ddp, ddp_spawn, ..."),
    ckpt_every: int = typer.Option(500, "--ckpt-every", min=0, help="Write checkpoints/last.ckpt every N steps (and always at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.ckpt."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    threads: int = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    seed: int = typer.Option(0, "--seed"),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Log losses every N steps."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (steps, loss start/end, paths)."),
) -> None:
    """Fine-tune a CLIP with FarSLIP's losses (Lightning: AMP, DDP, checkpoints, --resume).

    Writes OUT/final.pt as {'state_dict': {'module.*'}}, loadable with
    `rsvl ... --model <card> --weights OUT/final.pt` and open_clip.
    """
    # lazy: rsvl.train.clip imports Lightning, measured at 11-13 s, which every other
    # rsvl command would pay at start-up (torch too: see rsvl.cli)
    import torch

    from rsvl.train.clip import DISTILL_TYPES, ClipTrainConfig, resolve_precision, train_clip

    if threads is not None:
        torch.set_num_threads(threads)
    if distill_type not in DISTILL_TYPES:
        raise GridError(f"--distill-type {distill_type!r} is unknown.", hint=f"Use one of {', '.join(DISTILL_TYPES)}.")
    try:
        resolve_precision(precision, accelerator)
    except ValueError as exc:
        raise GridError(str(exc), hint="Use --precision auto, 32, bf16 or 16.") from None
    n_devices: int | str = int(devices) if devices.isdigit() else devices
    cfg = ClipTrainConfig(
        stage=stage, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
        weight_decay=wd, warmup_steps=warmup, max_boxes=max_boxes, distill_type=distill_type,
        w_global=w_global, w_distill=w_distill, w_region=w_region, seed=seed,
        num_workers=workers, ckpt_every=ckpt_every, log_every=log_every,
    )
    res = train_clip(
        data, out, model=model, weights=weights, random_init=random_init, quick_gelu=quick_gelu,
        long_text=long_text, config=cfg, split=split, caption_key=caption_key,
        image_root=image_root, precision=precision, accelerator=accelerator, devices=n_devices,
        strategy=strategy, resume=resume, progress=not state.quiet and not as_json,
    )
    summary = res.summary()
    if as_json:
        emit_json({
            "steps": res.steps, "epochs": res.epochs, "weights": str(res.weights),
            "checkpoint": str(res.checkpoint), "losses": summary, "settings": res.settings,
        })
        return
    typer.echo(f"trained {res.steps} steps ({res.settings['n_images']} images, {res.settings['precision']})")
    for name, v in summary.items():
        typer.echo(f"  {name:<11} first {v['first']:.4f} -> last {v['last']:.4f}")
    typer.echo(f"weights: {res.weights}")
    typer.echo(f"resume:  rsvl train clip ... --out {out} --resume")
