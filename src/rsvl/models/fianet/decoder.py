"""LAVT's decoder (upstream ``SimpleDecoding``): the segmentation head of FIANet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SimpleDecoding(nn.Module):
    """LAVT's decoder: three top-down fusions of two conv3x3-BN-ReLU, then 1x1 conv to 2."""

    def __init__(self, c4_dims: int, factor: int = 2) -> None:
        super().__init__()
        hidden = c4_dims // factor
        c3, c2, c1 = c4_dims // factor, c4_dims // factor**2, c4_dims // factor**3
        for tag, cin in (("4", c4_dims + c3), ("3", hidden + c2), ("2", hidden + c1)):
            self.add_module(f"conv1_{tag}", nn.Conv2d(cin, hidden, 3, padding=1, bias=False))
            self.add_module(f"bn1_{tag}", nn.BatchNorm2d(hidden))
            self.add_module(f"conv2_{tag}", nn.Conv2d(hidden, hidden, 3, padding=1, bias=False))
            self.add_module(f"bn2_{tag}", nn.BatchNorm2d(hidden))
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def _fuse(self, tag: str, x: Tensor, skip: Tensor) -> Tensor:
        if x.shape[-2] < skip.shape[-2] or x.shape[-1] < skip.shape[-1]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([x, skip], dim=1)
        x = F.relu(getattr(self, f"bn1_{tag}")(getattr(self, f"conv1_{tag}")(x)))
        return F.relu(getattr(self, f"bn2_{tag}")(getattr(self, f"conv2_{tag}")(x)))

    def forward(self, x_c4: Tensor, x_c3: Tensor, x_c2: Tensor, x_c1: Tensor) -> Tensor:
        x = self._fuse("4", x_c4, x_c3)
        x = self._fuse("3", x, x_c2)
        x = self._fuse("2", x, x_c1)
        return self.conv1_1(x)


__all__ = ["SimpleDecoding"]
