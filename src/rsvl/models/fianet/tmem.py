"""TMEM: text-aware multi-scale enhancement of the four stage maps before the decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.models.fianet.fusion import SpatialImageLanguageAttention


class HSigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3.0) / 6.0


class ScaleAwareGate(nn.Module):
    """``BN(conv(local)) * up(hsigmoid(BN(conv(global)))) + up(BN(conv(global)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.local_embedding = nn.Conv2d(channels, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.global_embedding = nn.Conv2d(channels, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.global_act = nn.Conv2d(channels, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)
        self.act = HSigmoid()

    def forward(self, x_local: Tensor, x_global: Tensor) -> Tensor:
        size = x_local.shape[-2:]
        local = self.bn1(self.local_embedding(x_local))
        glob = F.interpolate(
            self.bn2(self.global_embedding(x_global)), size=size, mode="bilinear", align_corners=False
        )
        act = F.interpolate(
            self.act(self.bn3(self.global_act(x_global))), size=size, mode="bilinear", align_corners=False
        )
        return local * act + glob


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TMEMBlock(nn.Module):
    def __init__(self, dim: int, l_in: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tma = SpatialImageLanguageAttention(dim, l_in, dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 2 * dim)

    def forward(self, x: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.tma(self.norm1(x), words, mask)
        x = x + self.ff(self.norm2(x))
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


class TMEM(nn.Module):
    """Text-aware multi-scale enhancement over the four stage outputs."""

    def __init__(self, channels: Sequence[int], num_blocks: int, l_in: int) -> None:
        super().__init__()
        dim = sum(channels)
        self.channels = list(channels)
        hidden = dim // 4
        self.down_channel = nn.Conv2d(dim, hidden, 1)
        self.up_channel = nn.Conv2d(hidden, dim, 1)
        self.block = nn.ModuleList(TMEMBlock(hidden, l_in) for _ in range(num_blocks))
        self.bn = nn.BatchNorm2d(hidden)
        self.fusion = nn.ModuleList(ScaleAwareGate(c) for c in channels)

    def forward(self, feats: Sequence[Tensor], words: Tensor, mask: Tensor) -> list[Tensor]:
        size = feats[-1].shape[-2:]
        out = torch.cat([F.adaptive_avg_pool2d(f, size) for f in feats], dim=1)
        out = self.down_channel(out)
        for blk in self.block:
            out = blk(out, words, mask)
        out = self.up_channel(self.bn(out))
        parts = out.split(self.channels, dim=1)
        return [fuse(f, g) for fuse, f, g in zip(self.fusion, feats, parts, strict=True)]

