"""FIANet's language fusion: pixel-word attention (SILA, LAVT's PWAM), the tanh gates and
the object-position alignment branch (OPAB)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: value SILA adds to the scores of masked words (``1e4 * mask - 1e4``)
SILA_MASK_VALUE = 1e4


class SpatialImageLanguageAttention(nn.Module):
    """SILA: pixels attend to words. Q = IN(conv(x)); K, V = conv(words) * mask; softmax over
    words with ``-1e4`` on masked ones and scale ``key_channels ** -0.5``; out = IN(conv)."""

    def __init__(
        self, v_in: int, l_in: int, key_channels: int, value_channels: int, num_heads: int = 1
    ) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        self.f_key = nn.Sequential(nn.Conv1d(l_in, key_channels, 1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in, value_channels, 1))
        self.W = nn.Sequential(
            nn.Conv1d(value_channels, value_channels, 1), nn.InstanceNorm1d(value_channels)
        )

    def forward(self, x: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``x``: (B, HW, C); ``words``: (B, C_l, N); ``mask``: (B, N, 1). Returns (B, HW, Cv)."""
        b, hw = x.shape[:2]
        h = self.num_heads
        m = mask.permute(0, 2, 1)  # (B, 1, N)
        query = self.f_query(x.permute(0, 2, 1)).permute(0, 2, 1)  # (B, HW, Ck)
        key = self.f_key(words) * m
        value = self.f_value(words) * m
        n = value.shape[-1]
        query = query.reshape(b, hw, h, self.key_channels // h).permute(0, 2, 1, 3)
        key = key.reshape(b, h, self.key_channels // h, n)
        value = value.reshape(b, h, self.value_channels // h, n)
        sim = torch.matmul(query, key) * self.key_channels**-0.5
        sim = sim + (SILA_MASK_VALUE * m.unsqueeze(1) - SILA_MASK_VALUE)
        sim = F.softmax(sim, dim=-1)
        out = torch.matmul(sim, value.permute(0, 1, 3, 2))  # (B, h, HW, Cv/h)
        out = out.permute(0, 2, 1, 3).reshape(b, hw, self.value_channels)
        return self.W(out.permute(0, 2, 1)).permute(0, 2, 1)


class PWAM(nn.Module):
    """LAVT's pixel-word attention module."""

    def __init__(self, dim: int, l_in: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(dim, l_in, dim, dim, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        vis = self.vis_project(x.permute(0, 2, 1))
        lang = self.image_lang_att(x, words, mask).permute(0, 2, 1)
        return self.project_mm(vis * lang).permute(0, 2, 1)


def tanh_gate(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
    )


class OPAB(nn.Module):
    """Object-position alignment block: ground-object attention gated by a spatial map from
    the spatial-phrase attention."""

    def __init__(self, dim: int, l_in: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.go_cross_attn = SpatialImageLanguageAttention(dim, l_in, dim, dim, num_heads)
        self.go_tanh_gating = tanh_gate(dim)
        #: defined upstream and saved in its checkpoints, never used in forward
        self.go_embedding = nn.Linear(dim, dim, bias=False)
        self.sp_cross_attn = SpatialImageLanguageAttention(dim, l_in, dim, dim, num_heads)
        self.conv1 = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def spatial_attention(
        self, x: Tensor, hw: tuple[int, int], words: Tensor, mask: Tensor
    ) -> Tensor:
        """(B, H*W, 1) map in (0, 1) from the spatial-phrase words."""
        b = x.shape[0]
        h, w = hw
        sp = self.sp_cross_attn(x, words, mask).reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
        sp = torch.cat([sp.mean(dim=1, keepdim=True), sp.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(sp)).permute(0, 2, 3, 1).reshape(b, h * w, 1)

    def forward(
        self, x: Tensor, hw: tuple[int, int], t: Tensor, t_mask: Tensor, p: Tensor, p_mask: Tensor
    ) -> Tensor:
        go = self.go_cross_attn(x, t, t_mask)
        go = self.go_tanh_gating(go) * go
        return go * self.spatial_attention(x, hw, p, p_mask)


__all__ = ["OPAB", "PWAM", "SILA_MASK_VALUE", "SpatialImageLanguageAttention", "tanh_gate"]
