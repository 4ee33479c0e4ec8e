"""One ``rsvl train clip`` run: build the model, read the data, fit, export.

Outputs under ``out``: ``checkpoints/last.ckpt`` (Lightning state: model, teacher, optimizer,
scheduler, step - written every ``ckpt_every`` steps and at the end, to a temporary name then
renamed), ``logs/version_*/metrics.csv`` (per-step losses), ``train_config.json`` and
``final.pt`` in FarSLIP's layout ``{'epoch', 'step', 'name', 'state_dict': {'module.' + key:
tensor}}`` that ``rsvl.load(..., weights=...)`` and open_clip's ``load_checkpoint`` read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from rsvl.errors import (
    DatasetError,
    OutputError,
    ResumeError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.io import atomic_path, write_text
from rsvl.models import clip
from rsvl.models.cards import ModelCard, normalise_name
from rsvl.models.device import check_device
from rsvl.models.registry import REGISTRY
from rsvl.models.weights import resolve_weights
from rsvl.train.clip.config import ClipTrainConfig, resolve_precision
from rsvl.train.clip.data import ClipTrainData, open_train_items
from rsvl.train.clip.module import ClipFineTuner
from rsvl.train.resume import fit

log = logging.getLogger(__name__)


def save_farslip_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    name: str = "",
    epoch: int = 0,
    step: int = 0,
) -> Path:
    """Write ``{'epoch', 'step', 'name', 'state_dict': {'module.' + key: tensor}}`` (FarSLIP's
    training-checkpoint layout, float32) to a temporary name, then rename it to ``path``."""
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    payload = {
        "epoch": int(epoch),
        "step": int(step),
        "name": str(name),
        "state_dict": {"module." + k: v.detach().float().cpu().contiguous() for k, v in sd.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


class LastCheckpoint(L.Callback):
    """Write ``<dir>/last.ckpt`` every ``every`` optimizer steps and when training ends
    (temporary name, then rename)."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory = Path(directory)
        self.every = int(every)
        self._saved_at = -1

    @property
    def path(self) -> Path:
        return self.directory / "last.ckpt"

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_at:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp)
        else:  # every rank takes part in the save (barriers); under DDP only rank 0 writes
            trainer.save_checkpoint(self.path)
        trainer.strategy.barrier("rsvl_last_checkpoint")
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every > 0 and trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


@dataclass
class TrainResult:
    out: Path
    weights: Path
    checkpoint: Path
    steps: int
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self, window: int | None = None) -> dict[str, dict[str, float]]:
        """Mean of each loss over the first and the last ``window`` steps of this run
        (default: a third of the steps, at most 10)."""
        out: dict[str, dict[str, float]] = {}
        if not self.history:
            return out
        if window is None:
            window = max(1, min(10, len(self.history) // 3))
        keys = [k for k in self.history[0] if k != "step"]
        head, tail = self.history[:window], self.history[-window:]
        for k in keys:
            out[k] = {
                "first": float(np.mean([r[k] for r in head])),
                "last": float(np.mean([r[k] for r in tail])),
            }
        return out


def training_card(
    model: str, *, quick_gelu: bool | None = None, model_cfg: Mapping[str, Any] | None = None
) -> tuple[ModelCard, bool]:
    """(card, registered?) for ``--model``: a registered CLIP card or an open_clip
    architecture (any name with ``model_cfg``)."""
    card = REGISTRY.get(normalise_name(model))
    if card is not None and card.family != "clip":
        raise UnknownModelError(
            f"Model {card.name!r} is a {card.family!r} model; `rsvl train clip` fine-tunes "
            "open_clip CLIPs.",
            hint="Pick a CLIP model (`rsvl models`) or an open_clip architecture name.",
        )
    if card is not None:
        return card, True
    return clip.card_for(model, model_cfg=model_cfg, quick_gelu=quick_gelu), False


def train_clip(
    data: str | Path,
    out: str | Path,
    *,
    model: str,
    weights: str | Path | None = None,
    random_init: bool = False,
    quick_gelu: bool | None = None,
    long_text: bool = False,
    model_cfg: Mapping[str, Any] | None = None,
    config: ClipTrainConfig | None = None,
    split: str | None = None,
    caption_key: str = "title",
    image_root: str | Path | None = None,
    precision: str = "auto",
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    resume: bool | str | Path = False,
    progress: bool = True,
    callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` (FarSLIP stage ``config.stage``) and write ``out``.

    ``resume=True`` continues from ``out/checkpoints/last.ckpt`` (a path continues from that
    file): step, optimizer, scheduler and teacher state are restored. ``callbacks`` are extra
    Lightning callbacks (monitoring, tests).
    """
    cfg = config or ClipTrainConfig()
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path: Path | None = None
    if resume:
        ckpt_path = last if resume is True else Path(resume)
        if not ckpt_path.is_file():
            raise ResumeError(
                f"Nothing to resume: {ckpt_path} does not exist.",
                hint="Start without --resume (or point --out at the run to continue).",
            )
    elif last.exists():
        raise OutputError(
            f"{out} already holds a training run ({last}).",
            hint="Pass --resume to continue it, or choose another --out.",
        )

    items, layout = open_train_items(data, split=split, caption_key=caption_key, image_root=image_root)
    card, registered = training_card(model, quick_gelu=quick_gelu, model_cfg=model_cfg)
    if random_init and weights is not None:
        raise WeightsNotFoundError(
            "--random-init and --weights exclude each other.", hint="Drop one of them."
        )
    start: str | Path | None = weights
    if start is None and registered and not random_init:
        start = resolve_weights(card)  # the card's published weights (cache or download)
    net = clip.build(
        card, weights=start, quick_gelu=quick_gelu, long_text=long_text, model_cfg=model_cfg
    )
    size = getattr(net.visual, "image_size", card.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    ctx = int(net.positional_embedding.shape[0])
    dataset = ClipTrainData(
        items, stage=cfg.stage, image_size=size, context_length=ctx, config=cfg,
        mean=card.mean, std=card.std,
    )
    if len(dataset) < 2:
        raise DatasetError(
            f"{data} has {len(dataset)} training image(s); contrastive training needs at least 2.",
            hint="Use a larger split.",
        )
    batch_size = min(cfg.batch_size, len(dataset))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
    )
    if accelerator in ("gpu", "cuda"):
        check_device("cuda")  # one line instead of Lightning's MisconfigurationException
    prec = resolve_precision(precision, accelerator)
    module = ClipFineTuner(net, cfg)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    saver = LastCheckpoint(ckpt_dir, cfg.ckpt_every)
    all_callbacks: list[L.Callback] = [saver, *callbacks]
    if progress:
        all_callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        max_epochs=cfg.epochs if cfg.max_steps < 0 else -1,
        max_steps=cfg.max_steps,
        precision=prec,  # type: ignore[arg-type]
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        callbacks=all_callbacks,
        logger=CSVLogger(str(out), name="logs"),
        log_every_n_steps=max(1, min(cfg.log_every, len(loader))),
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    settings = {
        "model": model, "architecture": card.architecture,
        "quick_gelu": card.quick_gelu if quick_gelu is None else bool(quick_gelu),
        "weights": None if weights is None else str(weights), "random_init": random_init,
        "long_text": hasattr(net, "positional_embedding_res"), "data": str(data),
        "layout": layout, "split": split, "n_images": len(dataset), "precision": prec,
        "strategy": strategy, "config": cfg.to_dict(),
        "resumed_from": None if ckpt_path is None else str(ckpt_path),
    }
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "train_config.json", json.dumps(settings, indent=2))
    fit(trainer, module, train_dataloaders=loader, ckpt_path=ckpt_path)
    weights_out = out / "final.pt"
    if trainer.is_global_zero:
        save_farslip_checkpoint(
            module.model, weights_out, name=card.architecture,
            epoch=trainer.current_epoch, step=trainer.global_step,
        )
    return TrainResult(
        out=out, weights=weights_out, checkpoint=saver.path, steps=int(trainer.global_step),
        epochs=int(trainer.current_epoch), history=module.history, settings=settings,
    )


__all__ = ["LastCheckpoint", "TrainResult", "save_farslip_checkpoint", "train_clip", "training_card"]
