"""RSPrompter's prompt regression: sin-cos prompt tokens, DETR's sine position encoding, and
the RoI prompt head of the anchor variant."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sincos_prompts(values: Tensor, num_points: int) -> Tensor:
    """RSPrompter's prompt regression: (..., K_p * 2C) -> (..., K_p, C) as sin(even) + odd."""
    v = values.reshape(*values.shape[:-1], num_points, -1)
    if v.shape[-1] % 2:
        raise ValueError(f"the prompt head gives {v.shape[-1]} values per point; need an even count")
    return torch.sin(v[..., 0::2]) + v[..., 1::2]


def sine_positional_encoding(
    h: int, w: int, num_feats: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """DETR's normalised sine encoding of an unpadded (h, w) grid -> (1, 2 * num_feats, h, w).

    Coordinates are cumulative counts 1..h / 1..w divided by the last one, times 2 pi; channels
    are [y, x], each with interleaved sin/cos at temperatures 10000^(2 floor(i/2) / num_feats).
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px = x[:, None] / dim_t  # (w, F)
    py = y[:, None] / dim_t  # (h, F)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=-1).flatten(1)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=-1).flatten(1)
    pos = torch.cat(
        (py[:, None, :].expand(h, w, num_feats), px[None, :, :].expand(h, w, num_feats)), dim=-1
    )
    return pos.permute(2, 0, 1)[None].to(dtype)

class RoIPromptHead(nn.Module):
    """A 14x14 RoI feature -> K_p sin-cos prompt tokens (RSPrompter's ``point_emb``)."""

    def __init__(self, in_channels: int, prompt_dim: int, roi_size: int = 14, num_points: int = 5) -> None:
        super().__init__()
        self.num_points = num_points
        side = (roi_size + 1) // 2
        self.point_emb = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(in_channels * side * side, in_channels),
            nn.ReLU(inplace=True),
            nn.Linear(in_channels, in_channels),
            nn.ReLU(inplace=True),
            nn.Linear(in_channels, prompt_dim * 2 * num_points),
        )

    def forward(self, roi_feats: Tensor) -> Tensor:
        """(N, C, r, r) -> (N, K_p, prompt_dim)."""
        return sincos_prompts(self.point_emb(roi_feats), self.num_points)
