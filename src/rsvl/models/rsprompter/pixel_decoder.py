"""Mask2Former's multi-scale deformable-attention pixel decoder, in plain PyTorch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.models.rsprompter.prompts import sine_positional_encoding


def _ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], loc: Tensor, weights: Tensor) -> Tensor:
    """value (B, N_v, H, D); loc (B, N_q, H, L, P, 2) in [0, 1]; weights (B, N_q, H, L, P)."""
    b, _, heads, d = value.shape
    _, nq, _, levels, points, _ = loc.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*H, N_q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*H, D, N_q, L*P)
    w_ = weights.transpose(1, 2).reshape(b * heads, 1, nq, levels * points)
    return (stacked * w_).sum(-1).view(b, heads * d, nq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), in plain PyTorch (grid_sample)."""

    def __init__(self, dim: int, num_heads: int = 8, num_levels: int = 3, num_points: int = 4) -> None:
        super().__init__()
        self.h, self.l, self.p = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(num_heads, dtype=torch.float32) * (2 * math.pi / num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2)
        grid = grid.repeat(1, num_levels, num_points, 1) * torch.arange(1, num_points + 1).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, pos: Tensor, ref: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        b, n, c = x.shape
        q = x + pos
        v = self.value_proj(x).view(b, n, self.h, c // self.h)
        off = self.sampling_offsets(q).view(b, n, self.h, self.l, self.p, 2)
        aw = self.attention_weights(q).view(b, n, self.h, self.l * self.p).softmax(-1)
        aw = aw.view(b, n, self.h, self.l, self.p)
        norm = torch.tensor([[w, h] for h, w in shapes], device=x.device, dtype=x.dtype)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        return self.output_proj(_ms_deform_attn(v, shapes, loc, aw)) + x


class FFN(nn.Module):
    """Linear-ReLU-Linear with a residual (MMCV FFN names: layers.0.0, layers.1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(0.0)),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, levels, 4)
        self.ffn = FFN(dim, ffn)
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])

    def forward(self, x: Tensor, pos: Tensor, ref: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norms[0](self.self_attn(x, pos, ref, shapes))
        return self.norms[1](self.ffn(x))


class _Encoder(nn.Module):
    def __init__(self, layers: list[_EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _ConvGN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, groups: int, bias: bool, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable encoder on the 3 coarsest levels + FPN tail."""

    def __init__(
        self, in_channels: Sequence[int], feat_channels: int = 128, out_channels: int = 256,
        num_layers: int = 3, num_heads: int = 8, ffn_channels: int = 512, num_encoder_levels: int = 3,
        groups: int = 32,
    ) -> None:
        super().__init__()
        n_in = len(in_channels)
        self.n_in, self.n_enc = n_in, num_encoder_levels
        self.feat_channels = feat_channels
        self.input_convs = nn.ModuleList(
            _ConvGN(in_channels[i], feat_channels, 1, groups, True, False)
            for i in range(n_in - 1, n_in - num_encoder_levels - 1, -1)
        )
        self.encoder = _Encoder(
            [_EncoderLayer(feat_channels, num_heads, num_encoder_levels, ffn_channels) for _ in range(num_layers)]
        )
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        rest = range(n_in - num_encoder_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList(_ConvGN(in_channels[i], feat_channels, 1, groups, False, False) for i in rest)
        self.output_convs = nn.ModuleList(_ConvGN(feat_channels, feat_channels, 3, groups, False, True) for _ in rest)
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """feats: strides 4..64 (high to low resolution) -> mask features (stride 4) and the
        encoder outputs from low to high resolution."""
        b = feats[0].shape[0]
        srcs, poss, refs, shapes = [], [], [], []
        for i in range(self.n_enc):
            f = self.input_convs[i](feats[self.n_in - i - 1])
            h, w = f.shape[-2:]
            pos = sine_positional_encoding(h, w, self.feat_channels // 2, device=f.device, dtype=f.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            srcs.append(f.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2).expand(b, -1, -1))
            ys = (torch.arange(h, device=f.device, dtype=f.dtype) + 0.5) / h
            xs = (torch.arange(w, device=f.device, dtype=f.dtype) + 0.5) / w
            refs.append(torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], -1).reshape(-1, 2))
            shapes.append((h, w))
        x = torch.cat(srcs, 1)
        pos_all = torch.cat(poss, 1)
        ref = torch.cat(refs, 0)[None, :, None, :].expand(b, -1, self.n_enc, -1)
        for layer in self.encoder.layers:
            x = layer(x, pos_all, ref, shapes)
        outs = [
            t.transpose(1, 2).reshape(b, -1, h, w)
            for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        for i, lat, oc in zip(range(self.n_in - self.n_enc - 1, -1, -1), self.lateral_convs, self.output_convs, strict=True):
            cur = lat(feats[i])
            y = cur + F.interpolate(outs[-1], cur.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(oc(y))
        return self.mask_feature(outs[-1]), outs[: self.n_enc]
