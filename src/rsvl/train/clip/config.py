"""Settings of a ``rsvl train clip`` run (FarSLIP's defaults where it has one)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

LOSS_NAMES: tuple[str, ...] = ("global_itc", "distill", "region_itc")
DISTILL_TYPES: tuple[str, ...] = ("active", "ema", "frozen")
PRECISIONS: dict[str, str] = {
    "32": "32-true",
    "32-true": "32-true",
    "fp32": "32-true",
    "16": "16-mixed",
    "fp16": "16-mixed",
    "16-mixed": "16-mixed",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
}
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class ClipTrainConfig:
    """Everything that shapes a run (FarSLIP's defaults where it has one)."""

    stage: int = 1
    epochs: int = 1
    #: stop after this many optimizer steps (-1: run ``epochs``)
    max_steps: int = -1
    batch_size: int = 40
    lr: float = 1e-6
    weight_decay: float = 1.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    w_global: float = 1.0
    w_distill: float = 0.1
    w_region: float = 1.0
    max_boxes: int = 4
    #: stage 2: keep regions with min_size² <= area <= max_size² (pixels of the original image)
    min_size: float = 64.0
    max_size: float = 1024.0
    #: stage 1 crops: RandomResizedCrop scale (area fraction) and aspect-ratio ranges
    crop_scale: tuple[float, float] = (0.3, 0.7)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    distill_type: str = "active"
    ema_momentum: float = 0.99
    #: attention of the modified last block that makes the dense patch tokens
    dense_attn: str = "segearth"
    seed: int = 0
    num_workers: int = 0
    #: write ``checkpoints/last.ckpt`` every N optimizer steps (0: only at the end)
    ckpt_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.distill_type not in DISTILL_TYPES:
            raise ValueError(f"distill_type must be one of {DISTILL_TYPES}, got {self.distill_type!r}")
        if self.max_boxes < 1:
            raise ValueError("max_boxes must be >= 1")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        self.crop_ratio = tuple(self.crop_ratio)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` -> bf16-mixed on CUDA with bf16 support, 16-mixed on other CUDA, else 32-true."""
    p = str(precision).strip().lower()
    if p == "auto":
        cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if not cuda:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if p not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[p]


__all__ = [
    "DISTILL_TYPES",
    "LOSS_NAMES",
    "MAX_LOGIT_SCALE",
    "PRECISIONS",
    "ClipTrainConfig",
    "resolve_precision",
]
