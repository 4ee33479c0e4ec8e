"""ViTDet-style simple feature pyramid on the aggregated SAM features.

Upstream's ``RSSimpleFPN`` builds its norms with ``norm_cfg=dict(type='LN2d')`` through mmcv's
``build_norm_layer``, which sets ``eps=1e-5`` when the config gives none; so every
``LayerNorm2d`` here uses eps 1e-5 (:data:`LN_EPS`), not the 1e-6 default of SAM's own
``LayerNorm2d`` (the SAM neck keeps that one).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.models.sam.common import LayerNorm2d

#: eps of the pyramid's LayerNorm2d: mmcv ``build_norm_layer``'s default (upstream's config sets none)
LN_EPS = 1e-5


class _ConvLN(nn.Module):
    """Conv (no bias) + LayerNorm2d; attribute names as MMCV's ConvModule with LN2d."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.norm_layer = LayerNorm2d(cout, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_layer(self.conv(x))


class SimpleFPN(nn.Module):
    """ViTDet-style pyramid from one stride-16 map: strides 4, 8, 16, 32 (+64 by pooling)."""

    def __init__(self, backbone_channel: int = 256, out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        c = backbone_channel
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2), LayerNorm2d(c // 2, eps=LN_EPS), nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2))
        self.fpn3 = nn.Sequential(nn.Identity())
        self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
        ins = [c // 4, c // 2, c, c]
        self.lateral_convs = nn.ModuleList(_ConvLN(i, out_channels, 1) for i in ins)
        self.fpn_convs = nn.ModuleList(_ConvLN(out_channels, out_channels, 3) for _ in ins)
        self.num_outs = num_outs

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [self.fpn1(x), self.fpn2(x), self.fpn3(x), self.fpn4(x)]
        outs = [fc(lc(lv)) for lv, lc, fc in zip(levels, self.lateral_convs, self.fpn_convs, strict=True)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
