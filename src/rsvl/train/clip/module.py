"""The Lightning module of ``rsvl train clip``: FarSLIP's losses, optimiser and schedule.

Optimisation as FarSLIP: AdamW (betas 0.9/0.98, eps 1e-6), no weight decay on parameters with
``ndim < 2`` or named ``bn``/``ln``/``bias``/``logit_scale``, linear warmup then cosine per
step, ``logit_scale`` clamped to ``[0, ln 100]`` after each step. Global and region features
are all-gathered (with gradients) across DDP ranks, as open_clip's ``ClipLoss``.
``distill_type="active"`` (FarSLIP's default) computes the distillation target with the
student itself; ``"ema"`` (momentum 0.99) and ``"frozen"`` use a teacher copy without gradients.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from rsvl.errors import ResumeError
from rsvl.train.clip.config import MAX_LOGIT_SCALE, ClipTrainConfig
from rsvl.train.clip.losses import (
    check_vit,
    clip_infonce,
    encode_image_and_dense,
    multi_positive_contrastive,
    roi_distill_loss,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-d tensors, norms, biases and ``logit_scale``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        exclude = p.ndim < 2 or any(t in low for t in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def warmup_cosine(warmup: int, total: int) -> Any:
    """LambdaLR factor: linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


class ClipFineTuner(L.LightningModule):
    """FarSLIP-style fine-tuning of an open_clip ``CLIP`` (``self.model``).

    :meth:`compute_losses` returns every active term and their weighted ``total``; the
    training step logs them as ``loss/<name>``.
    """

    def __init__(self, model: nn.Module, config: ClipTrainConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, ClipTrainConfig) else ClipTrainConfig(**dict(config or {}))
        self.config = cfg
        self.model = model
        self.teacher: nn.Module | None = None
        if cfg.stage == 1:
            check_vit(model)
            if cfg.distill_type in ("ema", "frozen"):
                self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ helpers
    def _world(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather rows across ranks with gradients (open_clip ``gather_with_grad``)."""
        if self._world() <= 1:
            return x
        return self.all_gather(x, sync_grads=True).flatten(0, 1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def train(self, mode: bool = True) -> ClipFineTuner:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        scale = self.logit_scale()
        images, texts = batch["image"], batch["text"]
        losses: dict[str, torch.Tensor] = {}
        if cfg.stage == 1:
            glob, dense = encode_image_and_dense(self.model, images, attn=cfg.dense_attn)
            assert glob is not None
        else:
            glob, dense = self.model.encode_image(images), None
        txt = self.model.encode_text(texts)
        losses["global_itc"] = clip_infonce(self._gather(glob), self._gather(txt), scale)
        total = cfg.w_global * losses["global_itc"]
        if cfg.stage == 1:
            assert dense is not None
            valid = batch["box_valid"].bool()
            crops = batch["crops"][valid]
            net = self.teacher if self.teacher is not None else self.model
            ctx = torch.no_grad() if self.teacher is not None else contextlib.nullcontext()
            with ctx:
                _, crop_dense = encode_image_and_dense(net, crops, attn=cfg.dense_attn, with_global=False)
                target = crop_dense.flatten(2).mean(dim=-1)
            losses["distill"] = roi_distill_loss(dense, batch["boxes"], valid, target)
            total = total + cfg.w_distill * losses["distill"]
        else:
            labels = batch["region_labels"].long()
            valid = labels >= 0
            r_img = self.model.encode_image(batch["region_images"][valid])
            r_txt = self.model.encode_text(batch["region_texts"][valid])
            lab = labels[valid]
            if self._world() > 1:  # equal shapes on every rank: pad to B*K, label -1
                n = labels.numel()
                pad_i = r_img.new_zeros(n, r_img.shape[-1])
                pad_t = r_txt.new_zeros(n, r_txt.shape[-1])
                pad_l = labels.new_full((n,), -1)
                m = valid.flatten()
                r_img = pad_i.masked_scatter(m[:, None], r_img)
                r_txt = pad_t.masked_scatter(m[:, None], r_txt)
                lab = pad_l.masked_scatter(m, lab)
                r_img, r_txt, lab = self._gather(r_img), self._gather(r_txt), self._gather(lab)
            losses["region_itc"] = multi_positive_contrastive(r_img, r_txt, lab, scale)
            total = total + cfg.w_region * losses["region_itc"]
        losses["total"] = total
        return losses

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        bs = int(batch["image"].shape[0])
        self.log_dict({f"loss/{k}": v.detach() for k, v in losses.items()}, batch_size=bs,
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", losses["total"].detach(), batch_size=bs, prog_bar=True)
        self.log("logit_scale", self.logit_scale().detach(), batch_size=bs)
        if self._trainer is None or self.trainer.is_global_zero:
            row = {"step": float(self.global_step + 1)}
            row.update({k: float(v.detach()) for k, v in losses.items()})
            self.history.append(row)
        return losses["total"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if self.teacher is not None and self.config.distill_type == "ema":
                m = self.config.ema_momentum
                for pt, ps in zip(self.teacher.parameters(), self.model.parameters(), strict=True):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def configure_optimizers(self) -> Any:
        cfg = self.config
        opt = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
        )
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, max(total, 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rsvl_config"] = self.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("rsvl_config") or {}
        for key in ("stage", "distill_type"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ResumeError(
                    f"The checkpoint was written by a run with {key}={saved[key]!r}; this run has "
                    f"{key}={getattr(self.config, key)!r}.",
                    hint="Resume with the same settings, or start a new run in another --out.",
                )

    # ------------------------------------------------------------------ export
    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}


__all__ = ["ClipFineTuner", "param_groups", "warmup_cosine"]
