"""Swin Transformer building blocks with upstream (Swin-Seg / LAVT) names and behaviour:
windowed attention with a relative position bias, shifted windows, patch embedding and
merging. The stages that fuse language are :mod:`rsvl.models.fianet.backbone`'s."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window: int) -> Tensor:
    r = torch.arange(window, device="cpu")  # on the CPU even under a meta / cuda device context
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias table."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        # persistent, as upstream: FIANet checkpoints carry it
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x``: (B, nW, N, C) windows; ``mask``: (nW, N, N) additive or None."""
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nW, h, N, d)
        n2 = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n2, n2, h).permute(2, 0, 1)  # (h, N, N)
        attn_mask = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask.to(q.dtype), scale=self.scale
        )
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


def to_windows(x: Tensor, w: int) -> Tensor:
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hp // w) * (wp // w), w * w, c)


def from_windows(x: Tensor, w: int, hp: int, wp: int) -> Tensor:
    b, _, _, c = x.shape
    x = x.reshape(b, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)


def shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Swin's (nW, N, N) mask for shifted windows (-100 between regions), as upstream."""
    img = torch.zeros(1, hp, wp, 1, device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = to_windows(img, window).reshape(-1, window * window)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP; pads H, W up to multiples of the window."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int], mask: Tensor | None) -> Tensor:
        """``x``: (B, H*W, C) tokens."""
        h, w = hw
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).reshape(b, h, w, c)
        ws = self.window
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(to_windows(x, ws), mask if self.shift > 0 else None)
        x = from_windows(x, ws, hp, wp)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order x00, x10, x01, x11) -> LN -> linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        h, w = hw
        b, _, c = x.shape
        x = x.reshape(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch
        if w % p or h % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        b, c, gh, gw = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, c, gh, gw)


__all__ = [
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "SwinTransformerBlock",
    "WindowAttention",
    "from_windows",
    "relative_position_index",
    "shift_mask",
    "to_windows",
]
