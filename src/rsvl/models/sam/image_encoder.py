"""SAM's ViT image encoder: windowed attention with decomposed relative positions and a few
global layers, then a two-conv neck (segment-anything's ``modeling/image_encoder.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.models.sam.common import LayerNorm2d, MLPBlock
from rsvl.models.sam.config import SamConfig


def _rel_pos_table(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """(q_size, k_size, head_dim) embeddings of the relative offsets between q and k."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:  # a different input size than trained: resample linearly
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    q_idx = torch.arange(q_size, device=table.device)[:, None] * q_ratio
    k_idx = torch.arange(k_size, device=table.device)[None, :] * k_ratio
    offsets = q_idx - k_idx + (k_size - 1) * k_ratio
    return table[offsets.long()]


class EncoderAttention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, grid: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
        bias = None
        if self.use_rel_pos:
            rh = _rel_pos_table(h, h, self.rel_pos_h)  # (h, h, hd)
            rw = _rel_pos_table(w, w, self.rel_pos_w)  # (w, w, hd)
            grid_q = q.reshape(b, self.num_heads, h, w, -1)
            bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
            bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


def _to_windows(x: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    ph, pw = -h % size, -w % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def _from_windows(win: Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    hp, wp = padded
    c = win.shape[-1]
    b = win.shape[0] // ((hp // size) * (wp // size))
    x = win.reshape(b, hp // size, wp // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, c)
    return x[:, : hw[0], : hw[1]]


class EncoderBlock(nn.Module):
    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.encoder_ln_eps)
        self.attn = EncoderAttention(
            dim,
            cfg.encoder_num_heads,
            cfg.qkv_bias,
            cfg.use_rel_pos,
            window_size if window_size > 0 else cfg.embedding_size,
        )
        self.norm2 = nn.LayerNorm(dim, eps=cfg.encoder_ln_eps)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio), nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded = _to_windows(x, self.window_size)
            x = _from_windows(self.attn(x), self.window_size, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


class ImageEncoderViT(nn.Module):
    """SAM's ViT: windowed attention with a few global layers, then a 2-conv neck."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.img_size = cfg.image_size
        dim = cfg.encoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.pos_embed: nn.Parameter | None = None
        if cfg.use_abs_pos:
            g = cfg.embedding_size
            self.pos_embed = nn.Parameter(torch.zeros(1, g, g, dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg, 0 if i in cfg.encoder_global_attn_indexes else cfg.window_size)
            for i in range(cfg.encoder_depth)
        )
        out = cfg.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    def forward(
        self, x: Tensor, return_hidden_states: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, 3, S, S) normalised pixels -> (B, prompt_dim, S/16, S/16).

        With ``return_hidden_states`` also returns the channels-last (B, h, w, C) tokens after
        the position embedding and after every block (depth + 1 tensors), as transformers'
        ``SamVisionEncoder(output_hidden_states=True)`` does (RSPrompter's aggregator uses them).
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:  # other input size: resample the table
                pos = F.interpolate(
                    pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            x = x + pos
        hidden = [x]
        for blk in self.blocks:
            x = blk(x)
            if return_hidden_states:
                hidden.append(x)
        out = self.neck(x.permute(0, 3, 1, 2))
        return (out, hidden) if return_hidden_states else out
