"""FSVLM's (LISA's) mask losses, as ``train_ds.py`` defines them.

* BCE: per-pixel mean binary cross-entropy with logits, then averaged over the masks;
* Dice: on the sigmoid of the logits, each mask flattened, ``1 - (2 I + s) / (P + G + s)``
  with ``I = sum(p * g) / 1000``, ``P = sum(p) / 1000``, ``G = sum(g) / 1000`` (upstream's
  ``scale=1000``) and ``s = eps = 1e-6``, summed and divided by the number of masks.

The total FSVLM trains on is ``1.0 * CE + 2.0 * BCE + 0.5 * Dice`` (CE over the answer tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: FSVLM's loss weights: language-model cross-entropy, mask BCE, mask Dice
CE_WEIGHT, BCE_WEIGHT, DICE_WEIGHT = 1.0, 2.0, 0.5


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """Mean over masks of upstream's Dice loss; ``logits``/``targets`` (N, H, W)."""
    p = logits.float().sigmoid().flatten(1)
    g = targets.float().flatten(1)
    inter = 2 * (p / scale * g).sum(-1)
    total = (p / scale).sum(-1) + (g / scale).sum(-1)
    loss = 1 - (inter + eps) / (total + eps)
    return loss.sum() / max(1, logits.shape[0])


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean BCE of each mask, averaged over masks; (N, H, W)."""
    per_mask = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").flatten(1).mean(-1)
    return per_mask.sum() / max(1, logits.shape[0])


def seg_losses(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"bce", "dice", "mask"}`` for (N, H, W) mask logits against 0/1 targets, where
    ``mask = 2.0 * bce + 0.5 * dice`` (the mask part of FSVLM's total)."""
    if logits.shape != targets.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    bce = bce_loss(logits, targets)
    dice = dice_loss(logits, targets)
    return {"bce": bce, "dice": dice, "mask": BCE_WEIGHT * bce + DICE_WEIGHT * dice}


__all__ = ["BCE_WEIGHT", "CE_WEIGHT", "DICE_WEIGHT", "bce_loss", "dice_loss", "seg_losses"]
